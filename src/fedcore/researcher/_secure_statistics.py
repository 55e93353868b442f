"""Federated statistics under secure aggregation: the researcher's side of one request.

The nodes' additive statistics (:func:`fedcore.wire.statistics.additive_vector`) are summed
by the scheme through the phases of a training round (:class:`~._secure_round.SecureRound`):
setup, share_keys, the protected payload (here in the statistics reply), unmask. The
researcher learns the pooled vectors and the report (survivors, clipped values), nothing of
one node.

**Range and precision.** Each node cuts its vector ``v`` at ``split``, a power of two, into
``hi = split * rint(v / split)`` (summed with the step ``split``: exact) and ``lo = v - hi``
(``|lo| <= split / 2``, summed at the step ``split * n' / 2^63``, ``n'`` the node count
rounded up to a power of two). So ``|v|`` may reach ``R = 2^62 * split / n'`` and sums are
exact to about ``R / 2^124``: counts are exact, sums as good as float64's. ``split`` comes
from a bound on every node's values that the researcher already knows, never from one node:
:data:`FIRST_BOUND` when it knows nothing (a first request, a histogram), and the pooled
totals of the first pass for the second pass of a mean and variance. A value beyond ``R`` is
clipped and counted in the report (summed over nodes), and no result is returned: a request
at :data:`FIRST_BOUND` is asked again at :func:`widest_bound` (the researcher learns only
that some node's value exceeded the first), beyond which the request fails. Never a wrong
result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError, ProtocolError, SecureAggregationError
from fedcore.params import ParameterSet
from fedcore.researcher._replies import nobody_answered, outcome
from fedcore.researcher.protection import Scatters, SecureExchange
from fedcore.secagg import SecureAggregation
from fedcore.wire.messages import StatsReply, StatsRequest
from fedcore.wire.statistics import additive_from_vector, vector_size

log = logging.getLogger("fedcore.statistics")

#: The bound on one node's values used when the researcher knows nothing of them: 2^80
#: (1.2e24), beyond any count, sum or sum of squares of real data; the step of the sums
#: is then ~2^-43 (1e-13) times the number of nodes.
FIRST_BOUND = float(2**80)

_PARAMS = ("clip", "extras_clip", "max_weight")


@dataclass
class SecureSums:
    """A secure request's outcome: the pooled additive statistics per query, and who."""

    pooled: list[dict[str, Any]]
    scheme: str
    survivors: list[str]
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (status, why)
    report: dict[str, Any] = field(default_factory=dict)


def split_for(bound: float, n_nodes: int) -> float:
    """The power of two ``split`` at which values up to ``bound`` (with a margin of 2) fit."""
    n2 = 1 << max(n_nodes - 1, 0).bit_length()  # n rounded up to a power of two
    exponent = math.ceil(math.log2(max(float(bound), 1e-300) * 2 * n2)) - 62
    return math.ldexp(1.0, max(exponent, -1000))


def second_pass_bound(totals: Sequence[Mapping[str, Any]]) -> float:
    """A bound on every node's values about the pooled mean, from the first pass's totals.

    Counts are at most the pooled count, a node's sum of squares about the mean at most the
    pooled one (sums of non-negative terms), its sum about the mean at most ``sqrt(n * Q)``
    (Cauchy-Schwarz); the pooled sum of squares is bounded from the first pass with a margin
    for float64 rounding.
    """
    bound = 1.0
    for t in totals:
        n, s, q = float(t["count"]), float(t["sum"]), float(t["sumsq"])
        q_mean = max(q - s * s / n, 0.0) + 1e-6 * abs(q) + 1e-9 if n else 0.0
        bound = max(bound, n, float(t["missing"]), q_mean, math.sqrt(n * q_mean))
    return bound


def configured(scheme: SecureAggregation, n_nodes: int, split: float) -> SecureAggregation:
    """``scheme`` with the fixed-point ranges of ``split`` and weights of 1, set in place.

    Schemes without those parameters (``plain``, a third party's) are used as they are; the
    report's clip count still guards the result.
    """
    if not set(_PARAMS) <= set(scheme.get_params()):
        return scheme
    if "value_bits" in scheme.get_params():  # Joye-Libert's packing: sums need 64-bit slots
        scheme.value_bits = 64  # type: ignore[attr-defined]
    if "ring_bits" in scheme.get_params():  # masking: the same, in a 64-bit ring
        scheme.ring_bits = 64  # type: ignore[attr-defined]
    n2 = 1 << max(n_nodes - 1, 0).bit_length()
    # FixedPoint.for_sum's step is 2^(ceil(log2(n * max_weight * clip)) - 62): this clip
    # makes the update's step exactly ``split`` (so ``hi`` sums exactly), and the extras'
    # ``split * n2 / 2^63``. tests/researcher/test_statistics_secagg.py checks that counts
    # are exact.
    scheme.clip = math.ldexp(split, 62) / n2  # type: ignore[attr-defined]
    scheme.extras_clip = split / 2  # type: ignore[attr-defined]
    scheme.max_weight = 1.0  # type: ignore[attr-defined]
    return scheme


async def secure_sums(client: Scatters, scheme: SecureAggregation,
                      targets: Mapping[str, Mapping[str, Any]],
                      queries: list[dict[str, Any]], *, bound: float, label: str, round: int,
                      timeout: float, privacy: Mapping[str, Any] | None = None) -> SecureSums:
    """Ask ``targets`` (node -> dataset) for ``queries`` and sum their replies securely.

    Asked again, once each: at :func:`widest_bound` when a value exceeded ``bound`` (the
    researcher learns only that some node's value did), and, for a scheme that needs every
    node (Joye-Libert), without the nodes that refused or failed. Raises
    ``ConfigurationError`` when the request is invalid, ``SecureAggregationError`` when the
    sum cannot be made (too few nodes for the threshold, values beyond the widest range),
    never returning a wrong one.
    """
    nodes = sorted(targets)
    failed: dict[str, tuple[str, str]] = {}
    widened = without = False
    for attempt in range(3):
        if len(nodes) < 2:
            raise _too_few(nodes, failed)
        try:
            return await _once(client, scheme, targets, nodes, queries, bound=bound,
                               label=label, round=3 * round + attempt, timeout=timeout,
                               failed=failed, privacy=dict(privacy or {}))
        except _OutOfRange:
            if widened or bound >= widest_bound(len(nodes)):
                raise
            widened, bound = True, widest_bound(len(nodes))
            log.info("Secure statistics: a node's sums exceed %.3g; asking again with the "
                     "widest range.", bound)
        except SecureAggregationError as exc:
            gone = set(failed) | set(exc.failures or {})
            if without or scheme.tolerates_dropout or not gone & set(nodes):
                raise
            without, nodes = True, [n for n in nodes if n not in gone]
            log.warning("Secure statistics: %s needs every node; asking again without %s.",
                        scheme.name, ", ".join(sorted(gone)))
    raise AssertionError("unreachable: at most one retry of each kind")


def widest_bound(n_nodes: int) -> float:
    """The largest bound at which counts stay exact: the low part's step is then 1."""
    n2 = 1 << max(n_nodes - 1, 0).bit_length()
    return math.ldexp(1.0, 124 - 2 * (n2.bit_length() - 1))


class _OutOfRange(SecureAggregationError):
    """Some node's value exceeded the range: the sum is not returned."""


async def _once(client: Scatters, scheme: SecureAggregation,
                targets: Mapping[str, Mapping[str, Any]], nodes: list[str],
                queries: list[dict[str, Any]], *, bound: float, label: str, round: int,
                timeout: float, failed: dict[str, tuple[str, str]],
                privacy: dict[str, Any]) -> SecureSums:
    split = split_for(bound, len(nodes))
    bins = [0 if q["edges"] is None else len(q["edges"]) - 1 for q in queries]
    reference = ParameterSet({f"q{i}": np.zeros(vector_size(b)) for i, b in enumerate(bins)})
    secure = SecureExchange(configured(scheme, len(nodes), split), client, experiment=label,
                         round=round, nodes=nodes, weights_hint=dict.fromkeys(nodes, 1.0),
                         reference=reference, weighting="uniform", timeout=timeout)
    await secure.prepare()
    for node, error in secure.failures.items():
        failed[node] = ("failed", error)
    bodies = {n: StatsRequest(dataset_id=str(targets[n]["id"]), queries=queries,
                              secagg={**secure.options(n), "split": split}, privacy=privacy)
              for n in secure.participants}
    invalid: dict[str, str] = {}
    async for reply in client.scatter(bodies, experiment=label, round=round, timeout=timeout):
        node, body = reply.node, reply.expect(StatsReply)
        if body is not None and body.secagg:
            try:
                secure.add(node, body.secagg)
            except (ProtocolError, ValueError) as exc:
                failed[node] = ("failed", f"secure aggregation: {exc}")
        elif reply.remote and reply.kind == "configuration":
            invalid[node] = reply.message
        else:
            failed[node] = outcome(reply)
    if invalid:
        by_message: dict[str, list[str]] = {}
        for node, message in sorted(invalid.items()):
            by_message.setdefault(message, []).append(node)
        raise ConfigurationError("Invalid statistics request. " + "; ".join(
            f"{m} ({', '.join(ns)})" for m, ns in by_message.items()))
    if all(n in failed for n in bodies):
        raise nobody_answered(failed)
    try:
        total = await secure.finish()
    except SecureAggregationError as exc:
        detail = "; ".join(f"{n}: {why}" for n, (_, why) in sorted(failed.items()))
        raise SecureAggregationError(f"{exc} {detail}".strip(), failures={
            **{n: why for n, (_, why) in failed.items()}, **(exc.failures or {})}) from exc
    for node, error in secure.failures.items():  # failed the unmask exchange only
        log.warning("Secure statistics: node %s %s", node, error)
    clipped = sum(total.report.get("clipped", {}).values())
    if clipped:
        raise _OutOfRange(
            f"{clipped} value(s) of the nodes' sums exceed the secure-aggregation range "
            f"(+-{bound:.3g}): the pooled result would be wrong, so none is returned. A "
            "node's sums of squares must stay below ~1e31 (rescale the variable), and its "
            "data must not change between two passes (ask again).", failures={})
    lo = total.extras.get("lo", ParameterSet())
    pooled = [additive_from_vector(total.sums[f"q{i}"] + lo.get(f"q{i}", 0.0), b)
              for i, b in enumerate(bins)]
    survivors = sorted(total.report.get("survivors", []))
    return SecureSums(pooled, scheme.name, survivors,
                      {n: s for n, s in failed.items() if n not in survivors}, total.report)


def _too_few(nodes: list[str], failed: Mapping[str, tuple[str, str]]) -> Exception:
    if not nodes and failed:
        return nobody_answered(dict(failed))
    left = ", ".join(f"{n} ({why})" for n, (_, why) in sorted(failed.items()))
    return ConfigurationError(
        f"Secure aggregation needs at least 2 nodes: the sum of one node is its own values. "
        f"Received: {nodes}" + (f" (left out: {left})" if left else "") + ". Add nodes, or "
        "ask without secagg where the nodes' policies allow it.")
