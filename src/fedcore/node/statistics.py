"""A node's side of federated statistics: its policy, the computation, the audit.

A node answers a :class:`~fedcore.wire.messages.StatsRequest` with additive sufficient statistics
per variable (see :mod:`fedcore.researcher.statistics` for the researcher's side):

- ``count`` and ``missing`` values, ``sum`` of ``x - shift`` and ``sumsq`` of
  ``(x - shift) ** 2`` in float64, and for a histogram the counts per bin and ``below`` and
  ``above`` its edges. Replies of several nodes add up to the pooled ones.
- ``min`` and ``max`` when asked and the policy allows; they are not additive.
- ``withheld``: the cells it suppressed. A variable with fewer records than ``min_count``
  (values of a column, images of a modality) is withheld whole; so is every histogram cell
  with a non-zero count below ``min_count``, and enough further cells that their total,
  which the published count reveals, is at least ``min_count`` too. Withheld sums are zero.

Policy keys in ``config.toml``: ``statistics`` (default true), ``min_count`` (default 5)
and ``allow_min_max`` (default true), read on every request by :func:`statistics_policy`.

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
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from fedcore.errors import ConfigurationError, DatasetError, FedcoreError
from fedcore.governance import Decision, Request
from fedcore.governance.statistics import StatisticsPolicy, statistics_policy
from fedcore.node._secagg import SecaggSessions
from fedcore.node.registry import DatasetRegistry
from fedcore.params import ParameterSet
from fedcore.wire.messages import Body, Envelope, ErrorReply, StatsReply, StatsRequest
from fedcore.wire.statistics import (
    IMAGE_VARIABLE,
    MAX_BINS,
    MAX_QUERIES,
    SECURE_FIELDS,
    additive_from_vector,
    additive_vector,
    check_edges,
    check_query,
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
    _secagg: SecaggSessions

    @property
    def node_id(self) -> str:
        """The node's name."""

    @property
    def policy(self) -> dict[str, Any]:
        """The node's effective policy (``ConfigurationError`` while it cannot be read)."""

    def review(self, request: Request) -> Decision:
        """The node's governance decision on ``request``."""

    def audit(self, event: str, **fields: Any) -> None:
        """Write ``event`` to the node's audit log."""

    def researcher(self, env: Envelope) -> str:
        """The verified name of the researcher who sent ``env``."""


# --- computation ------------------------------------------------------------------------------


async def answer_statistics(node: StatisticsNode, env: Envelope,
                            executor: concurrent.futures.Executor | None) -> Body:
    """A node's answer to a :class:`StatsRequest`: policy, computation on ``executor``, audit.

    Every request and its outcome goes to the node's audit log; a refused, invalid or failed
    request is answered with an :class:`ErrorReply` and the node keeps serving.
    """
    request: StatsRequest = env.body  # type: ignore[assignment]
    secure = request.secagg if isinstance(request.secagg, Mapping) else {}
    scheme = str(secure.get("scheme") or "plain") if secure else None
    base: dict[str, Any] = {
        "researcher": node.researcher(env), "dataset": request.dataset_id,
        "queries": [_describe_query(q) for q in request.queries[:MAX_QUERIES]]}
    if scheme is not None:
        base["secagg"] = scheme
    try:
        # The node's checked policy (it raises while config.toml cannot be read).
        policy = statistics_policy(node.policy)
        entry = node.datasets.get(request.dataset_id)
        # The whole governance chain: statistics allowed, dataset access, minimum samples,
        # secure aggregation required...
        decision = node.review(Request(
            kind="statistics", researcher=node.researcher(env), experiment=env.experiment,
            dataset=entry, n_samples=int(entry["metadata"].get("n_samples") or 0),
            secagg=scheme))
    except ConfigurationError as exc:  # fail closed: an unreadable policy allows nothing
        reason = f"Node {node.node_id!r} refuses statistics: its policy is invalid ({exc})"
        node.audit("statistics-refused", **base, reason=reason)
        return ErrorReply(kind="governance", message=reason, exc_type="GovernanceError")
    except DatasetError as exc:
        node.audit("statistics-failed", **base, reason=str(exc))
        return ErrorReply(kind="dataset", message=str(exc), exc_type="DatasetError")
    if not decision.allowed:
        reason = f"Node {node.node_id!r} refuses statistics: {decision.reason}"
        node.audit("statistics-refused", **base, reason=reason)
        return ErrorReply(kind="governance", message=reason, exc_type="GovernanceError")
    start = time.perf_counter()
    try:
        split = check_split(secure.get("split")) if secure else 0.0
    except ConfigurationError as exc:
        node.audit("statistics-invalid", **base, reason=str(exc))
        return ErrorReply(kind="configuration", message=str(exc),
                          exc_type="ConfigurationError")
    try:
        dataset = node.datasets.open(entry)
    except (ConfigurationError, DatasetError) as exc:
        node.audit("statistics-failed", **base, reason=str(exc))
        return ErrorReply(kind="dataset", message=str(exc), exc_type=type(exc).__name__)
    loop = asyncio.get_running_loop()
    try:
        results = await loop.run_in_executor(
            executor, compute_statistics, dataset, request.queries, policy)
    except ConfigurationError as exc:  # the request does not fit: say which key
        node.audit("statistics-invalid", **base, reason=str(exc))
        return ErrorReply(kind="configuration", message=str(exc),
                          exc_type="ConfigurationError")
    except DatasetError as exc:
        node.audit("statistics-failed", **base, reason=str(exc))
        return ErrorReply(kind="dataset", message=str(exc), exc_type="DatasetError")
    except Exception as exc:  # a reader or a node bug: details (maybe paths) stay here
        log.exception("Statistics failed on dataset %s", request.dataset_id)
        node.audit("statistics-failed", **base, error=f"{type(exc).__name__}: {exc}")
        return ErrorReply(kind="internal", exc_type=type(exc).__name__, message=(
            f"{type(exc).__name__} while computing statistics on node {node.node_id!r}; "
            "its administrator finds the details in the node's log."))
    withheld = [f"{r['variable']}:{w['cell']}" + (f"[{w['bin']}]" if "bin" in w else "")
                for r in results for w in r["withheld"]]
    payload: dict[str, Any] = {}
    if secure:  # the policy is applied above: what is protected is what it lets through
        try:
            payload = await loop.run_in_executor(
                executor, protect_statistics, node._secagg, secure, results, split)
        except (FedcoreError, ValueError) as exc:
            node.audit("statistics-failed", **base, reason=f"secure aggregation: {exc}")
            kind = "dataset" if isinstance(exc, DatasetError) else "protocol"
            return ErrorReply(kind=kind, message=str(exc), exc_type=type(exc).__name__)
    node.audit("statistics", **base, min_count=policy.min_count, withheld=withheld,
               seconds=round(time.perf_counter() - start, 4))
    if secure:
        return StatsReply(node_id=node.node_id, results=[], min_count=policy.min_count,
                          secagg=payload)
    return StatsReply(node_id=node.node_id, results=results, min_count=policy.min_count)


def _describe_query(query: Any) -> dict[str, Any]:
    if not isinstance(query, Mapping):
        return {"malformed": type(query).__name__}
    edges = query.get("edges")
    return {"variable": str(query.get("variable")), "min_max": query.get("min_max") is True,
            "bins": len(edges) - 1 if isinstance(edges, np.ndarray) and edges.ndim == 1 else 0}


def compute_statistics(dataset: Any, queries: Sequence[Any],
                       policy: StatisticsPolicy) -> list[dict[str, Any]]:
    """Answer ``queries`` on ``dataset`` under ``policy``: additive sums, extremes, withheld cells.

    Tables answer for their numeric columns (``dataset.frame``), medical folders for the voxel
    intensities of a modality (``dataset.modalities``, ``dataset.iter_volumes(modality)``),
    image folders for ``"intensity"`` (``dataset.iter_images()``). Every query is checked
    before any is computed; a bad one raises ``ConfigurationError`` naming its key.
    """
    if not 0 < len(queries) <= MAX_QUERIES:
        raise ConfigurationError(f"A statistics request holds 1 to {MAX_QUERIES} queries. "
                                 f"Received: {len(queries)}")
    checked = [check_query(i, q) for i, q in enumerate(queries)]
    sources = [_source(dataset, variable) for variable, *_ in checked]
    return [_answer(variable, chunks, unit, shift, min_max, edges, policy)
            for (variable, shift, min_max, edges), (chunks, unit) in zip(checked, sources,
                                                                          strict=True)]


def _source(dataset: Any, variable: str) -> tuple[Iterable[Any], str]:
    """The values of ``variable`` as chunks, and what one record is ("values" or "images")."""
    modalities: list[str] = []
    if hasattr(dataset, "modalities") and hasattr(dataset, "iter_volumes"):
        modalities = [str(m) for m in dataset.modalities]
        if variable in modalities:
            return _Lazy(dataset.iter_volumes, variable), "images"
    table = _table(dataset)
    if table is not None:
        columns = {str(c): c for c in table.columns}
        numeric = [name for name, c in columns.items() if _numeric(table[c].dtype)]
        if variable not in columns and modalities:
            raise ConfigurationError(f"{variable!r} is neither a modality nor a column of the "
                                     f"dataset. Modalities: {modalities}; numeric columns: "
                                     f"{numeric}")
        if variable not in columns:
            raise ConfigurationError(f"Column {variable!r} is not in the dataset. Numeric "
                                     f"columns: {numeric}")
        column = table[columns[variable]]
        if variable not in numeric:
            raise ConfigurationError(
                f"Column {variable!r} holds {column.dtype} values, not numbers: statistics "
                f"need a numeric column. Numeric columns: {numeric}")
        return [column.to_numpy(dtype=np.float64, na_value=np.nan)], "values"
    if modalities:
        raise ConfigurationError(f"Modality {variable!r} is not in the dataset. "
                                 f"Modalities: {modalities}")
    if hasattr(dataset, "iter_images"):
        if variable != IMAGE_VARIABLE:
            raise ConfigurationError(f"An image folder has one variable, {IMAGE_VARIABLE!r} "
                                     f"(pixel intensities). Received: {variable!r}")
        return _Lazy(dataset.iter_images), "images"
    meta = dataset.metadata() if hasattr(dataset, "metadata") else {}
    raise DatasetError(
        f"Statistics are not available for a dataset of kind {meta.get('kind', '?')!r}: "
        "expected a table (its numeric columns), a medical folder (its modalities and "
        f"demographics) or an image folder ({IMAGE_VARIABLE!r}).")


def _table(dataset: Any) -> pd.DataFrame | None:
    """A table's rows (``frame``), or a medical folder's ``demographics``; None otherwise."""
    for name in ("frame", "demographics"):
        table = getattr(dataset, name, None)
        if isinstance(table, pd.DataFrame):
            return table
    return None


class _Lazy:
    """An iterable calling ``fn(*args)`` when iterated, so checks run before any reading."""

    def __init__(self, fn: Any, *args: Any):
        self.fn, self.args = fn, args

    def __iter__(self) -> Any:
        return iter(self.fn(*self.args))


def _numeric(dtype: Any) -> bool:
    return bool(pd.api.types.is_numeric_dtype(dtype)) and not pd.api.types.is_complex_dtype(
        dtype)


def _answer(variable: str, chunks: Iterable[Any], unit: str, shift: float, min_max: bool,
            edges: np.ndarray | None, policy: StatisticsPolicy) -> dict[str, Any]:
    n = missing = images = below = above = 0
    s = q = 0.0
    lo, hi = math.inf, -math.inf
    hist = None if edges is None else np.zeros(edges.size - 1, dtype=np.int64)
    # Equally spaced edges take numpy's fast path, which bins exactly as searchsorted would.
    uniform = edges is not None and np.array_equal(
        edges, np.linspace(edges[0], edges[-1], edges.size))
    for chunk in chunks:
        x = np.asarray(chunk)
        if x.dtype.kind not in "biuf":
            raise DatasetError(f"{variable!r} holds {x.dtype} values, not numbers.")
        x = x.reshape(-1).astype(np.float64, copy=False)
        images += 1
        nan = np.isnan(x)
        if nan.any():
            missing += int(nan.sum())
            x = x[~nan]
        if not x.size:
            continue
        n += x.size
        d = x - shift if shift else x
        s += float(d.sum())
        q += float(np.dot(d, d))
        if min_max and policy.min_max:
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        if edges is not None and hist is not None:
            if uniform:
                hist += np.histogram(x, bins=edges.size - 1, range=(edges[0], edges[-1]))[0]
            else:
                hist += np.histogram(x, bins=edges)[0]
            below += int(np.count_nonzero(x < edges[0]))
            above += int(np.count_nonzero(x > edges[-1]))
    additive: dict[str, Any] = {"count": n, "missing": missing, "sum": s, "sumsq": q}
    if hist is not None:
        additive.update(hist=hist, below=below, above=above)
    result: dict[str, Any] = {"variable": variable, "additive": additive, "min": None,
                              "max": None, "withheld": []}
    if min_max and n:
        if policy.min_max:
            result.update(min=lo, max=hi)
        else:
            result["withheld"].append({"cell": "min_max",
                                       "reason": "node policy (allow_min_max = false)"})
    records = n if unit == "values" else images
    if 0 < n < policy.min_count <= records:  # many images, yet few values (NaN voxels)
        records, unit = n, "values"
    _withhold(result, records, unit, policy.min_count)
    return result


def _withhold(result: dict[str, Any], records: int, unit: str, k: int) -> None:
    """Zero the counts below ``k`` (and enough others that the total cannot reveal them)."""
    add = result["additive"]
    if 0 < records < k:
        for key, value in add.items():
            add[key] = np.zeros_like(value) if isinstance(value, np.ndarray) else type(value)(0)
        result.update(min=None, max=None, withheld=[
            {"cell": "all", "reason": f"fewer than {k} {unit}"}])
        return
    if "hist" not in add:
        return
    cells = np.concatenate([[add["below"]], add["hist"], [add["above"]]])
    primary = (cells > 0) & (cells < k)
    withheld = primary.copy()
    # The count is published, so the withheld cells' total is known: keep it >= k by
    # withholding the smallest other non-zero cells too (complementary suppression).
    while 0 < cells[withheld].sum() < k:
        others = np.flatnonzero(~withheld & (cells > 0))
        if not others.size:  # cannot happen: the cells hold count >= k values in all
            break
        withheld[others[np.argmin(cells[others])]] = True
    last = cells.size - 1
    for i in np.flatnonzero(withheld):
        cell: dict[str, Any] = ({"cell": "below"} if i == 0 else {"cell": "above"}
                                if i == last else {"cell": "bin", "bin": int(i - 1)})
        cell["reason"] = (f"fewer than {k} values" if primary[i] else
                          "complementary: the total would reveal a smaller withheld cell")
        result["withheld"].append(cell)
    cells[withheld] = 0
    add.update(below=int(cells[0]), hist=cells[1:-1].copy(), above=int(cells[-1]))


# --- secure aggregation -----------------------------------------------------------------------


def protect_statistics(sessions: SecaggSessions, options: Mapping[str, Any],
                       results: Sequence[Mapping[str, Any]], split: float) -> dict[str, Any]:
    """The protected payload of ``results`` for the secure-aggregation session in ``options``.

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
    return sessions.protect(options, ParameterSet(hi), 1.0, {"lo": ParameterSet(lo)})
