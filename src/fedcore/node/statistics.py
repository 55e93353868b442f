"""A node's side of federated statistics: its policy, the disclosure checks, the audit.

A node answers a :class:`~fedcore.wire.messages.StatsRequest` with additive sufficient statistics
per variable (see :mod:`fedcore.researcher.statistics` for the researcher's side):

- ``count`` and ``missing`` values, ``sum`` of ``x - shift`` and ``sumsq`` of
  ``(x - shift) ** 2`` in float64, and for a histogram the counts per bin and ``below`` and
  ``above`` its edges. Replies of several nodes add up to the pooled ones.
- ``min`` and ``max`` when asked and the policy allows (``allow_min_max``, default false).
- ``withheld``: what it suppressed, never where. A variable with fewer than ``min_count``
  records is withheld whole; histogram cells with a non-zero count below ``min_count`` are
  zeroed, with enough further cells that their total is at least ``min_count`` too, and the
  reply only counts them. A histogram finer than one bin per ``min_count`` values is refused.

Every exact answer is checked against what the same researcher (the name the node trusts
its key under) was answered before, through the node's query log
(:mod:`fedcore.governance.statistics_log`): new bin edges that would, with earlier ones,
isolate fewer than ``min_count`` records, and data that changed by fewer than ``min_count``
records since the last answer, are refused (:mod:`fedcore.governance.statistics`).

A request with ``privacy`` (and every request on a dataset with a privacy budget, or on a
node with ``statistics_dp``) is answered with Gaussian noise instead, set by the node
(``statistics_noise``) and charged to the dataset's privacy budget like training.

Under secure aggregation (``StatsRequest.secagg``) the node computes the same results under
the same policy, then sends none of them in clear: it packs each query's additive statistics
in one float64 vector (:func:`additive_vector`: with two more sums, ``suppressed`` (1 when
the variable is withheld whole, its sums then being zeros) and ``withheld`` (cells withheld))
and hands it to the round's secure-aggregation session (:func:`protect_statistics`).
Extremes are not sums: they are never sent under secure aggregation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedcore.errors import ConfigurationError, DatasetError, FedcoreError, GovernanceError
from fedcore.governance import Decision, Governance, Request
from fedcore.governance.ledger import PrivacyLedger
from fedcore.governance.statistics import (
    Measure,
    Partition,
    StatisticsPolicy,
    cells_changed,
    edges_key,
    isolates,
    records_changed,
    statistics_policy,
)
from fedcore.governance.statistics_log import QueryLog, VariableLog
from fedcore.node._secagg import Binding, SecaggSessions
from fedcore.node._statistics_compute import Noise, Track, compute_statistics
from fedcore.node.registry import DatasetRegistry
from fedcore.params import ParameterSet
from fedcore.privacy.spec import DEFAULT_DELTA
from fedcore.secagg import NodeSession
from fedcore.wire.messages import Body, Envelope, ErrorReply, StatsReply, StatsRequest
from fedcore.wire.statistics import (
    IMAGE_VARIABLE,
    MAX_BINS,
    MAX_QUERIES,
    SECURE_FIELDS,
    additive_from_vector,
    additive_vector,
    check_edges,
    check_split,
    vector_size,
)

if TYPE_CHECKING:
    import concurrent.futures

__all__ = [
    "IMAGE_VARIABLE",
    "MAX_BINS",
    "MAX_QUERIES",
    "SECURE_FIELDS",
    "StatisticsNode",
    "StatisticsPolicy",
    "additive_from_vector",
    "additive_vector",
    "answer_statistics",
    "check_edges",
    "check_split",
    "compute_statistics",
    "protect_statistics",
    "statistics_policy",
    "vector_size",
]

log = logging.getLogger("fedcore.node")


class StatisticsNode(Protocol):
    """What :func:`answer_statistics` uses of a :class:`~fedcore.node.Node`."""

    datasets: DatasetRegistry
    ledger: PrivacyLedger
    statistics_log: QueryLog
    _secagg: SecaggSessions

    def _secagg_binding(self, env: Envelope) -> Binding:
        """What the request's secure-aggregation session must be bound to."""

    @property
    def node_id(self) -> str:
        """The node's name."""

    @property
    def policy(self) -> dict[str, Any]:
        """The node's effective policy (``ConfigurationError`` while it cannot be read)."""

    @property
    def governance(self) -> Governance:
        """The node's chain of policies."""

    def review(self, request: Request) -> Decision:
        """The node's governance decision on ``request`` (audited)."""

    def audit(self, event: str, **fields: Any) -> None:
        """Write ``event`` to the node's audit log."""

    def researcher(self, env: Envelope) -> str:
        """The verified name of the researcher who sent ``env``."""


class _Refused(Exception):
    """A request the node refuses or cannot answer.

    ``kind`` and ``reason`` go in the reply, ``event`` and ``fields`` in the audit log.
    """

    def __init__(self, kind: str, reason: str, event: str = "statistics-refused",
                 exc_type: str = "GovernanceError", **fields: Any):
        super().__init__(reason)
        self.kind, self.reason, self.event, self.exc_type = kind, reason, event, exc_type
        self.fields = fields

    def reply(self, node: StatisticsNode, base: Mapping[str, Any]) -> ErrorReply:
        node.audit(self.event, **base, reason=self.reason, **self.fields)
        return ErrorReply(kind=self.kind, message=self.reason, exc_type=self.exc_type)


# --- the request ------------------------------------------------------------------------------


async def answer_statistics(node: StatisticsNode, env: Envelope,
                            executor: concurrent.futures.Executor | None) -> Body:
    """A node's answer to a :class:`StatsRequest`: policy, computation on ``executor``, audit.

    Every request and its outcome goes to the node's audit log under the researcher's
    verified name; a refused, invalid or failed request is answered with an
    :class:`ErrorReply` and the node keeps serving.
    """
    request: StatsRequest = env.body  # type: ignore[assignment]
    researcher = node.researcher(env)
    secure = request.secagg if isinstance(request.secagg, Mapping) else {}
    base: dict[str, Any] = {
        "researcher": researcher, "dataset": request.dataset_id,
        "queries": [_describe_query(q) for q in request.queries[:MAX_QUERIES]]}
    if request.privacy:
        base["privacy"] = request.privacy
    session: NodeSession | None = None
    scheme = None
    if secure:  # the session this node holds decides the protection and what policy sees
        try:
            session = node._secagg.session_for(secure, node._secagg_binding(env))
        except FedcoreError as exc:
            node.audit("secagg-refused", **base, phase="statistics", reason=str(exc))
            return ErrorReply(kind="protocol", message=str(exc), exc_type=type(exc).__name__)
        scheme = base["secagg"] = session.scheme.name
    start = time.perf_counter()
    try:
        policy, entry, events = _admit(node, env, request, researcher, scheme)
        split = check_split(secure.get("split")) if secure else 0.0
        dataset = _open(node, entry)
        results, internals = await _compute(node, researcher, entry, dataset, request,
                                            policy, events, executor)
        payload: dict[str, Any] = {}
        if session is not None:  # the policy is applied above: what it lets through is
            payload = await asyncio.get_running_loop().run_in_executor(  # protected
                executor, protect_statistics, node._secagg, session, secure, results, split)
        privacy = _charge(node, env, entry, request, researcher, events, base)
    except _Refused as refusal:
        return refusal.reply(node, base)
    except Exception as exc:  # noqa: BLE001 - every failure is answered, the node serves on
        return _failure(node, base, request, exc)
    node.audit("statistics", **base, min_count=policy.min_count, withheld=internals,
               seconds=round(time.perf_counter() - start, 4))
    if secure:
        return StatsReply(node_id=node.node_id, results=[], min_count=policy.min_count,
                          secagg=payload, privacy=privacy)
    return StatsReply(node_id=node.node_id, results=results, min_count=policy.min_count,
                      privacy=privacy)


def _admit(node: StatisticsNode, env: Envelope, request: StatsRequest, researcher: str,
           scheme: str | None) -> tuple[StatisticsPolicy, dict[str, Any], list[list[float]]]:
    """The node's policy, the dataset's entry and the privacy the answer will spend.

    The whole governance chain reviews it: statistics allowed (or only with differential
    privacy), dataset access, minimum samples, secure aggregation required, privacy budget.
    """
    try:  # fail closed: an unreadable policy allows nothing
        policy = statistics_policy(node.policy)
    except ConfigurationError as exc:
        raise _Refused("governance", f"Node {node.node_id!r} refuses statistics: its policy "
                       f"is invalid ({exc})") from None
    try:
        entry = node.datasets.get(request.dataset_id)
    except DatasetError as exc:
        raise _Refused("dataset", str(exc), "statistics-failed", "DatasetError") from None
    events = _events(request, policy)
    decision = node.review(Request(
        kind="statistics", researcher=researcher, experiment=env.experiment, dataset=entry,
        n_samples=int(entry["metadata"].get("n_samples") or 0), secagg=scheme,
        privacy={"events": events} if events else {}))
    if not decision.allowed:
        raise _Refused("governance",
                       f"Node {node.node_id!r} refuses statistics: {decision.reason}")
    return policy, entry, events


def _open(node: StatisticsNode, entry: dict[str, Any]) -> Any:
    try:
        return node.datasets.open(entry)
    except (ConfigurationError, DatasetError) as exc:  # the node's own setup: not the request
        raise _Refused("dataset", str(exc), "statistics-failed", type(exc).__name__) from None


def _events(request: StatsRequest, policy: StatisticsPolicy) -> list[list[float]]:
    """The Gaussian releases a differentially private answer makes (none: exact answers)."""
    asked = request.privacy
    if not asked:
        return []
    if not isinstance(asked, Mapping) or dict(asked) != {"mechanism": "gaussian"}:
        raise _Refused("configuration", "A statistics request's privacy must be "
                       '{"mechanism": "gaussian"} (the node sets the noise). '
                       f"Received: {asked!r}", "statistics-invalid", "ConfigurationError")
    queries = [q for q in request.queries if isinstance(q, Mapping)]
    steps = sum(3 + (q.get("edges") is not None) for q in queries) or 1
    return [[policy.noise, 1.0, steps]]


async def _compute(node: StatisticsNode, researcher: str, entry: Mapping[str, Any],
                   dataset: Any, request: StatsRequest, policy: StatisticsPolicy,
                   events: list[list[float]], executor: concurrent.futures.Executor | None
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    """The results, checked against the researcher's query log, and the withheld cells.

    The cells are named for the node's audit log only.
    """
    dataset_id = str(entry["id"])
    checked = policy.protects and not events
    logs = _logs(node.statistics_log, researcher, dataset_id, request.queries) if checked else {}
    tracks = {v: Track(lg.last.partition if lg.last else Partition(), lg.asked.joined(asked))
              for v, (lg, asked, _) in logs.items()}
    noise = Noise(policy.noise) if events else None
    try:
        results = await asyncio.get_running_loop().run_in_executor(
            executor, lambda: compute_statistics(dataset, request.queries, policy,
                                                 tracks=tracks, noise=noise))
    except GovernanceError as exc:
        raise _Refused("governance", f"Node {node.node_id!r} refuses statistics: {exc}"
                       ) from None
    verdicts = {v: _verdict(lg, keys, tracks[v], policy.min_count)
                for v, (lg, _, keys) in logs.items()}
    refused = next(((v, *why) for v, why in verdicts.items() if why[0]), None)
    changed = {}
    for variable, (lg, _, keys) in logs.items():
        after = _next_log(lg, keys, tracks[variable], answered=refused is None)
        if _differs(lg, after):  # a repeated request writes nothing
            changed[variable] = after
    if changed:
        node.statistics_log.put(researcher, dataset_id, changed)
    if refused is not None:
        variable, reason, detail = refused
        raise _Refused("governance", f"Node {node.node_id!r} refuses statistics on "
                       f"{variable!r}: {reason}.", variable=variable, where=detail)
    internals = [f"{r['variable']}:{cell}" for r in results for cell in r.pop("_cells", [])]
    for r in results:
        if any(w["cell"] == "all" for w in r["withheld"]):
            internals.append(f"{r['variable']}:all")
    return results, internals


def _logs(query_log: QueryLog, researcher: str, dataset: str, queries: Sequence[Any]
          ) -> dict[str, tuple[VariableLog, Partition, set[str]]]:
    """Per variable: the researcher's log, this request's edges, the keys of its edge sets.

    Malformed queries are left to :func:`compute_statistics` to explain.
    """
    earlier = query_log.get(researcher, dataset)
    edges: dict[str, list[np.ndarray]] = {}
    for q in queries:
        if isinstance(q, Mapping) and isinstance(q.get("variable"), str):
            sets = edges.setdefault(q["variable"], [])
            if q.get("edges") is not None:
                try:
                    sets.append(check_edges(q["edges"], "edges"))
                except ConfigurationError:
                    continue
    return {v: (earlier.get(v) or VariableLog(), Partition.of(sets),
                {edges_key(e) for e in sets}) for v, sets in edges.items()}


def _verdict(lg: VariableLog, keys: set[str], track: Track, k: int) -> tuple[str, str]:
    """Why answering would single out records with the researcher's earlier answers."""
    reason = detail = ""
    if lg.last is not None:
        reason, detail = records_changed(lg.last, track.measure_before, k)
        if not reason and keys:
            reason, detail = cells_changed(lg.last, track.measure_before, k)
    if not reason and keys - lg.answered and (lg.asked or len(keys) > 1):
        reason, detail = isolates(track.measure_after, k)
    return reason, detail


def _next_log(lg: VariableLog, keys: set[str], track: Track, *, answered: bool
              ) -> VariableLog:
    """The researcher's log on a variable after this request (edges refused count as asked).

    The atoms kept are those of the last histogram answered; records and digest those of
    the last answer.
    """
    if not answered:
        return VariableLog(track.after, lg.answered, lg.last)
    now = track.measure_after
    if not keys and lg.last is not None:
        now = Measure(now.records, now.missing, now.digest, lg.last.partition, lg.last.atoms)
    return VariableLog(track.after, lg.answered | keys, now)


def _differs(old: VariableLog, new: VariableLog) -> bool:
    if (old.asked, old.answered) != (new.asked, new.answered) or (old.last is None) != (
            new.last is None):
        return True
    return old.last is not None and new.last is not None and (
        (old.last.digest, old.last.partition) != (new.last.digest, new.last.partition)
        or not np.array_equal(old.last.atoms, new.last.atoms))


def _charge(node: StatisticsNode, env: Envelope, entry: Mapping[str, Any],
            request: StatsRequest, researcher: str, events: list[list[float]],
            base: Mapping[str, Any]) -> dict[str, Any]:
    """Charge a differentially private answer to the dataset's budget, before it leaves."""
    if not events:
        return {}
    # Asked again, unaudited, right before charging: another request may have spent the
    # budget while this one was computed.
    decision = node.governance.review(Request(
        kind="statistics", researcher=researcher, experiment=env.experiment, dataset=entry,
        n_samples=int(entry["metadata"].get("n_samples") or 0), privacy={"events": events}))
    if not decision.allowed:
        raise _Refused("governance", f"Node {node.node_id!r} refuses statistics: "
                       f"{decision.reason}")
    try:
        delta = float(node.policy.get("dp_delta") or DEFAULT_DELTA)
    except ConfigurationError:
        delta = DEFAULT_DELTA
    epsilon, delta = node.ledger.record(str(entry["id"]), events, delta=delta)
    noise, _, steps = events[0]
    return {"mechanism": "gaussian", "noise_multiplier": noise, "steps": int(steps),
            "epsilon": epsilon, "delta": delta}


def _failure(node: StatisticsNode, base: Mapping[str, Any], request: StatsRequest,
             exc: Exception) -> ErrorReply:
    """The reply and audit record of a request that could not be answered."""
    if isinstance(exc, ConfigurationError):  # the request does not fit: say which key
        node.audit("statistics-invalid", **base, reason=str(exc))
        return ErrorReply(kind="configuration", message=str(exc),
                          exc_type="ConfigurationError")
    if isinstance(exc, DatasetError):
        node.audit("statistics-failed", **base, reason=str(exc))
        return ErrorReply(kind="dataset", message=str(exc), exc_type="DatasetError")
    if isinstance(exc, (FedcoreError, ValueError)):  # secure aggregation
        node.audit("statistics-failed", **base, reason=f"secure aggregation: {exc}")
        return ErrorReply(kind="protocol", message=str(exc), exc_type=type(exc).__name__)
    # a reader or a node bug: details (maybe paths) stay here
    log.error("Statistics failed on dataset %s", request.dataset_id, exc_info=exc)
    node.audit("statistics-failed", **base, error=f"{type(exc).__name__}: {exc}")
    return ErrorReply(kind="internal", exc_type=type(exc).__name__, message=(
        f"{type(exc).__name__} while computing statistics on node {node.node_id!r}; "
        "its administrator finds the details in the node's log."))


def _describe_query(query: Any) -> dict[str, Any]:
    if not isinstance(query, Mapping):
        return {"malformed": type(query).__name__}
    edges = query.get("edges")
    return {"variable": str(query.get("variable")), "min_max": query.get("min_max") is True,
            "bins": len(edges) - 1 if isinstance(edges, np.ndarray) and edges.ndim == 1 else 0}


# --- secure aggregation -----------------------------------------------------------------------


def protect_statistics(sessions: SecaggSessions, session: NodeSession,
                       options: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                       split: float) -> dict[str, Any]:
    """The protected payload of ``results`` under ``session`` (named in ``options``).

    Each vector ``v`` is cut at ``split`` (a power of two) into ``hi = split * rint(v /
    split)`` and ``lo = v - hi`` (both exact in float64, ``|lo| <= split / 2``): ``hi`` is
    the update and ``lo`` the extra ``"lo"``, each summed at its own fixed-point step. Counts
    come out exact and sums to ~2^-120 of the range, whatever the scale of the data; weight 1.
    """
    vectors = {f"q{i}": additive_vector(r) for i, r in enumerate(results)}
    infinite = [r["variable"] for r, v in zip(results, vectors.values(), strict=True)
                if not np.isfinite(v).all()]
    if infinite:
        raise DatasetError(f"Variables {infinite} hold infinite values (or sums beyond float64): "
                           "secure aggregation sums finite numbers only.")
    hi = {k: np.rint(v / split) * split for k, v in vectors.items()}
    lo = {k: v - hi[k] for k, v in vectors.items()}
    return sessions.protect(session, options, ParameterSet(hi), 1.0, {"lo": ParameterSet(lo)})
