"""Federated statistics: counts, sums, means, variances, extremes, histograms, quantiles.

Nodes answer with *additive* sufficient statistics (see :mod:`fedcore.node.statistics`):
per variable, the count, the sum of ``x - shift`` and of ``(x - shift) ** 2`` in float64,
histogram counts for bin edges the researcher sends, the number of missing values. Pooled
results are computed from the sums of these over nodes alone (:func:`_pool`), so they are
exact, not averaged averages, and a sum-only secure aggregation can later combine the
nodes' replies without showing them one by one. Extremes are not additive: they come from
the nodes whose policy shares them.

A mean and a variance take two round trips: the first finds the pooled mean, the second asks
for sums about it (``shift``): the two-pass algorithm numpy uses, spread over nodes, so no
cancellation whatever the offset of the data. Quantiles are read from a pooled histogram
(:mod:`fedcore.researcher._quantiles`): exact to within a bin's width, or not given where the
cells nodes withheld could move them out of their bin.

With ``secagg=`` the replies are summed by a secure aggregation scheme
(:mod:`fedcore.researcher._secure_statistics`): results hold the pooled row only, and no extremes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore import _runtime
from fedcore.data import merge_metadata
from fedcore.data.preprocessing import Preprocessing
from fedcore.errors import ConfigurationError
from fedcore.researcher._quantiles import auto_bins, bounds, check_q, quantiles
from fedcore.researcher._replies import nobody_answered as _nobody_answered
from fedcore.researcher._replies import outcome as _why
from fedcore.researcher._secure_statistics import (
    FIRST_BOUND,
    SecureSums,
    second_pass_bound,
    secure_sums,
)
from fedcore.researcher.federation import Federation, Selection
from fedcore.secagg import SecureAggregation, scheme_of
from fedcore.wire.messages import StatsReply, StatsRequest
from fedcore.wire.statistics import MAX_BINS, check_edges, withheld_cells

__all__ = [
    "POOLED",
    "FederatedStatistics",
    "Histogram",
]

log = logging.getLogger("fedcore.statistics")

#: The row label of pooled results.
POOLED = "pooled"

_Bounds = tuple[float, float] | Mapping[str, tuple[float, float]] | None

# --- researcher side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """A federated histogram of one variable: per-node rows and the pooled row.

    ``counts`` has one row per node then ``"pooled"`` and one column per bin (an
    ``IntervalIndex``; as in numpy the last bin includes its right edge). Cells a node
    withheld (too few values) are not named: they read as 0, in its row and in the pooled
    one. ``totals`` has, per row, the ``count`` of values, those ``below`` the first edge and
    ``above`` the last, and how many sit in ``withheld`` cells. ``notes`` says, per row, what
    was withheld or why a node is missing; ``suppressed`` has one row per node that withheld
    cells: how many ``cells``, how many ``values`` they hold, and the reason. Under secure
    aggregation there is only the pooled row, and ``suppressed`` is empty (the pooled note
    counts the cells).
    """

    variable: str
    edges: np.ndarray
    counts: pd.DataFrame
    totals: pd.DataFrame
    notes: pd.Series
    suppressed: pd.DataFrame

    @property
    def pooled(self) -> np.ndarray:
        """The pooled counts per bin (withheld cells left out)."""
        return self.counts.loc[POOLED].to_numpy(dtype=np.int64)

    def __repr__(self) -> str:
        cells = int(self.suppressed["cells"].sum()) if len(self.suppressed) else 0
        return (f"Histogram({self.variable!r}, bins={self.edges.size - 1}, "
                f"withheld cells={cells})\n{self.counts.T}")


@dataclass
class _Answers:
    """The nodes' results (node -> one result per query) and the nodes without any."""

    results: dict[str, list[dict[str, Any]]]
    failed: dict[str, tuple[str, str]]  # node -> (status, message)
    secure: SecureSums | None = None  # under secure aggregation: the pooled sums only


class FederatedStatistics:
    """Statistics of the datasets tagged ``tags`` across a federation, per node and pooled.

    Pooled figures are computed from the nodes' summed counts and sums, never by averaging
    their averages, and exclude what nodes withheld (each result says so). Synchronous
    methods work in scripts and inside Jupyter; each has an async twin.

    ``secagg`` (as for an :class:`~fedcore.Experiment`: ``"masking"``, ``"joye-libert"`` or
    a :mod:`fedcore.secagg` scheme) sums the nodes' replies securely: the researcher learns
    the pooled counts and sums only. Results then hold the pooled row alone (no per-node
    rows, no min or max; histograms and quantiles need a ``range`` or explicit edges), and
    the pooled note names the scheme, how many nodes contributed and how many withheld the
    variable (they contribute zeros). A node whose policy requires secure aggregation
    (``secagg_required``) refuses requests without it.

    ``privacy=True`` asks for differentially private answers: each node clips values to
    the query's bounds (``describe(..., bounds=...)``, a histogram's edges), adds Gaussian
    noise it chooses and charges its dataset's privacy budget; a dataset with a budget
    answers only so. No extremes then, and figures are noisy (the notes say so). See
    docs/statistics.md.

    Example::

        with FederatedStatistics(fed.url, tags=["diabetes"]) as stats:
            stats.describe(["age", "bmi"])              # one row per (variable, node)
            stats.histogram("age", bins=10).counts      # one row per node, then pooled
            stats.quantiles("bmi", [0.25, 0.5, 0.75])
    """

    def __init__(self, federation: str | Federation, tags: Sequence[str] | str,
                 nodes: Sequence[str] | None = None, *, timeout: float = 60.0,
                 connect_timeout: float = 10.0, identity: str | Path | None = None,
                 enrolled: Mapping[str, str] | str | Path | None = None,
                 secagg: str | SecureAggregation | None = None, privacy: bool = False):
        self._selection = Selection(tags, nodes)
        if not isinstance(privacy, bool):
            raise ConfigurationError(f"privacy must be True or False. Received: {privacy!r}")
        #: Whether answers are asked for with differential privacy.
        self.privacy = privacy
        secagg = scheme_of(secagg)
        #: The secure aggregation scheme, or None (replies in clear).
        self.secagg = secagg
        # A private copy: its fixed-point ranges are set per request (the user's is untouched).
        self._scheme = None if secagg is None else copy.copy(secagg)
        self._secure_rounds = 0
        self.timeout = float(timeout)
        self._owns_session = not isinstance(federation, Federation)
        #: The :class:`~fedcore.researcher.federation.Federation` the requests go over.
        self.session = federation if isinstance(federation, Federation) else Federation(
            federation, identity=identity, enrolled=enrolled, connect_timeout=connect_timeout)

    @property
    def federation(self) -> str:
        """The federation's URL."""
        return self.session.url

    @property
    def tags(self) -> list[str]:
        """The tags of the datasets the statistics are computed on."""
        return self._selection.tags

    @property
    def nodes(self) -> list[str] | None:
        """Only these nodes answer (``None``: every node with matching data)."""
        return self._selection.nodes

    @property
    def _targets(self) -> dict[str, dict[str, Any]] | None:
        return self._selection.targets

    def __repr__(self) -> str:
        secure = "" if self.secagg is None else f", secagg={self.secagg.name!r}"
        return f"FederatedStatistics(federation={self.federation!r}, tags={self.tags}{secure})"

    # --- public API -------------------------------------------------------------------------

    def describe(self, variables: str | Sequence[str], *, ddof: int = 1,
                 bounds: _Bounds = None) -> pd.DataFrame:
        """Count, missing, sum, mean, variance (``ddof``), std, min and max of each variable.

        One row per ``(variable, node)``, the node ``"pooled"`` last; ``status`` is ``ok``,
        ``suppressed`` (the node withheld the variable: too few values), ``refused`` (its
        policy) or ``failed``; ``note`` explains, and on pooled rows lists what was left out.
        Under secure aggregation: the pooled rows only, ``min`` and ``max`` NaN. ``bounds``
        (``(low, high)`` for every variable, or ``{variable: (low, high)}``) is the range
        values are clipped to under differential privacy.
        """
        return _runtime.run(self._describe(_names(variables), ddof, bounds))

    def histogram(self, variable: str, bins: int | Sequence[float] = 10,
                  range: tuple[float, float] | None = None) -> Histogram:
        """Counts of ``variable`` in ``bins``: a number of equal bins or explicit edges.

        With a number of bins and no ``range``, the range is the pooled min and max (one
        more round trip; nodes whose policy withholds extremes, and secure aggregation, then
        need an explicit range).
        """
        return _runtime.run(self._histogram(variable, bins, range))

    def quantiles(self, variable: str, q: float | Sequence[float] = (0.25, 0.5, 0.75), *,
                  bins: int | Sequence[float] | None = None,
                  range: tuple[float, float] | None = None) -> pd.DataFrame:
        """Quantiles read from a histogram: exact to one bin's width, or not given.

        One row per node, then pooled; columns ``"25%"`` etc. and ``note``. ``bins`` is a
        number of equal bins over ``range`` or explicit edges; by default about 20 values
        per bin at the smallest node (at most 100 bins), so that few cells fall under the
        nodes' ``min_count``. Without withheld cells a quantile is interpolated within its
        bin. Where nodes withheld small cells, a quantile is given (its bin's centre) only
        when no placement of the withheld values could move it out of that bin; otherwise
        it is NaN and the note says why and the interval it is known to lie in. A quantile
        outside the histogram's range is NaN too. Never a value biased by what was
        withheld. See docs/statistics.md.
        """
        return _runtime.run(self._quantiles(variable, q, bins, range))

    def metadata(self) -> dict[str, Any]:
        """The merged metadata of the datasets (columns, dtypes, categories every node shows)."""
        return _runtime.run(self._metadata())

    def fit_preprocessing(self, *, standardize: Sequence[str] = (),
                          impute: Sequence[str] | Mapping[str, str] = (),
                          categorical: Sequence[str] = (),
                          levels: Mapping[str, Sequence[float]] | None = None
                          ) -> Preprocessing:
        """A :class:`~fedcore.data.preprocessing.Preprocessing` fitted on these datasets.

        ``standardize``: columns scaled by the pooled mean and standard deviation (ddof 0,
        as scikit-learn's ``StandardScaler``); ``impute``: numeric columns whose missing
        values become the pooled mean, or ``{column: "mean" | "most_frequent"}`` (the
        most frequent: the level of a discrete, numerically coded column with the largest
        pooled count, from a histogram the nodes answer under their small-cell rules; the
        candidate levels are those the metadata lists, or ``levels={column: [...]}``);
        ``categorical``: columns whose categories (from the
        merged metadata) become indices. Secure aggregation, when set, protects the sums.
        Raises :class:`ConfigurationError` when a pooled statistic is incomplete (a node
        withheld it) or a column has no listed categories. Give the result to
        ``Experiment(preprocessing=...)``.
        """
        from fedcore.researcher.preprocessing import fit

        return fit(self, standardize=standardize, impute=impute, categorical=categorical,
                   levels=levels)

    def __enter__(self) -> FederatedStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def adescribe(self, variables: str | Sequence[str], *, ddof: int = 1,
                        bounds: _Bounds = None) -> pd.DataFrame:
        """Async twin of :meth:`describe`."""
        return await _runtime.run_async(self._describe(_names(variables), ddof, bounds))

    async def ahistogram(self, variable: str, bins: int | Sequence[float] = 10,
                         range: tuple[float, float] | None = None) -> Histogram:
        """Async twin of :meth:`histogram`."""
        return await _runtime.run_async(self._histogram(variable, bins, range))

    async def aquantiles(self, variable: str, q: float | Sequence[float] = (0.25, 0.5, 0.75),
                         *, bins: int | Sequence[float] | None = None,
                         range: tuple[float, float] | None = None
                         ) -> pd.DataFrame:
        """Async twin of :meth:`quantiles`."""
        return await _runtime.run_async(self._quantiles(variable, q, bins, range))

    # --- network ----------------------------------------------------------------------------

    async def _close(self) -> None:
        """Disconnect from the federation (the object reconnects when used again).

        A session given as a :class:`Federation` stays open: closing it is its owner's.
        """
        if self._owns_session:
            await self.session.aclose()

    async def _search(self) -> pd.DataFrame:
        """The datasets the statistics are computed on: one row per node."""
        found = await self._selection.search(self.session)
        return pd.DataFrame([{"node": n, "dataset": t["id"], "name": t["name"],
                              "n_samples": t["metadata"].get("n_samples")}
                             for n, t in found.targets.items()])

    async def _metadata(self) -> dict[str, Any]:
        found = await self._selection.search(self.session)
        return merge_metadata([t["metadata"] for t in found.targets.values()])

    search = _runtime.blocking(_search)
    asearch = _runtime.awaitable(_search)
    close = _runtime.blocking(_close)
    aclose = _runtime.awaitable(_close)

    async def _ask(self, queries: list[dict[str, Any]], bound: float = FIRST_BOUND
                   ) -> _Answers:
        """The nodes' answers; under secure aggregation their sum, ``bound`` on each value."""
        targets = await self._selection.current(self.session)
        if self._scheme is not None:
            self._secure_rounds += 1
            sums = await secure_sums(
                self.session, self._scheme, targets, queries, bound=bound,
                label=f"statistics-{id(self):x}", round=self._secure_rounds,
                timeout=self.timeout, privacy=self._privacy_request)
            for node, (status, message) in sorted(sums.failed.items()):
                log.warning("Node %s gave no statistics (%s): %s", node, status, message)
            return _Answers({}, sums.failed, sums)
        bodies = {n: StatsRequest(dataset_id=t["id"], queries=queries,
                                  privacy=self._privacy_request)
                  for n, t in targets.items()}
        answers = _Answers({}, {})
        invalid: dict[str, str] = {}
        async for reply in self.session.scatter(bodies, timeout=self.timeout):
            body = reply.expect(StatsReply)
            if body is not None and len(body.results) == len(queries):
                answers.results[reply.node] = body.results
            elif reply.remote and reply.kind == "configuration":
                invalid[reply.node] = reply.message
            else:
                answers.failed[reply.node] = _why(reply)
        if invalid:
            by_message: dict[str, list[str]] = {}
            for node, message in sorted(invalid.items()):
                by_message.setdefault(message, []).append(node)
            raise ConfigurationError("Invalid statistics request. " + "; ".join(
                f"{m} ({', '.join(nodes)})" for m, nodes in by_message.items()))
        if not answers.results:
            raise _nobody_answered(answers.failed)
        for node, (status, message) in sorted(answers.failed.items()):
            log.warning("Node %s gave no statistics (%s): %s", node, status, message)
        return answers

    # --- statistics -------------------------------------------------------------------------

    @property
    def _privacy_request(self) -> dict[str, Any]:
        return {"mechanism": "gaussian"} if self.privacy else {}

    async def _describe(self, variables: list[str], ddof: int,
                        bounds: _Bounds) -> pd.DataFrame:
        if not isinstance(ddof, int) or ddof < 0:
            raise ConfigurationError(f"ddof must be an integer >= 0. Received: {ddof!r}")
        clip = _bounds(variables, bounds)
        first = await self._ask([_query(v, bounds=clip[v]) for v in variables])
        totals = [_pool(first, i) for i, _ in enumerate(variables)]
        shifts = [t["sum"] / t["count"] if t["count"] else 0.0 for t in totals]
        extremes = self.secagg is None and not self.privacy
        answers = await self._ask([_query(v, shift=s, min_max=extremes, bounds=clip[v])
                                   for v, s in zip(variables, shifts, strict=True)],
                                  bound=second_pass_bound(totals))
        rows = []
        for i, variable in enumerate(variables):
            for node in self._order(answers):
                row: dict[str, Any] = {"variable": variable, "node": node}
                rows.append(row)
                row.update(_node_status(answers, node, i))
                if row["status"] == "ok":
                    r = answers.results[node][i]
                    row.update(_moments(r["additive"], shifts[i], ddof),
                               min=_nan(r["min"]), max=_nan(r["max"]))
            rows.append(_pooled_describe(variable, answers, i, shifts[i], ddof))
        frame = pd.DataFrame(rows, columns=["variable", "node", "count", "missing", "sum",
                                            "mean", "var", "std", "min", "max", "status",
                                            "note"])
        frame[["count", "missing"]] = frame[["count", "missing"]].astype("Int64")
        return frame.set_index(["variable", "node"])

    async def _range(self, variable: str) -> tuple[float, float]:
        if self.secagg is not None or self.privacy:
            why = "secure aggregation" if self.secagg is not None else "differential privacy"
            raise ConfigurationError(
                f"Cannot choose bins for {variable!r}: under {why} nodes send only sums, "
                "never their min and max. Pass range=(low, high) or explicit bin edges.")
        answers = await self._ask([_query(variable, min_max=True)])
        lows, highs, without = [], [], []
        for node, results in answers.results.items():
            r = results[0]
            if _suppressed(r) or not r["additive"]["count"]:
                continue
            if r["min"] is None:
                without.append(node)
            else:
                lows.append(r["min"])
                highs.append(r["max"])
        if without or not lows:
            who = f"nodes {sorted(without)} withhold" if without else "no node shares"
            raise ConfigurationError(f"Cannot choose bins for {variable!r}: {who} its min and "
                                     "max. Pass range=(low, high) or explicit bin edges.")
        lo, hi = min(lows), max(highs)
        return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)  # numpy's choice

    async def _histogram(self, variable: str, bins: int | Sequence[float],
                         range: tuple[float, float] | None) -> Histogram:
        edges = _edges(bins, range)
        if edges is None:
            lo, hi = await self._range(variable)
            edges = np.linspace(lo, hi, int(bins) + 1)  # type: ignore[arg-type]
        answers = await self._ask([_query(variable, edges=edges)])
        index = pd.Index([*self._order(answers), POOLED], name="node")
        intervals = pd.IntervalIndex.from_breaks(edges, closed="left", name="bin")
        # Rows are gathered first and framed once: a row assigned into a one-bin frame
        # is taken for one cell holding a sequence.
        hist: dict[str, list[Any]] = {n: [pd.NA] * (edges.size - 1) for n in index}
        tot: dict[str, list[Any]] = {n: [pd.NA] * 4 for n in index}
        notes = pd.Series({n: _node_status(answers, n, 0)["note"] for n in index[:-1]},
                          dtype=object)
        notes[POOLED] = _pooled_note(answers, 0)
        withheld = []
        for node, results in answers.results.items():
            r = results[0]
            if _suppressed(r):
                continue
            add = r["additive"]
            hist[node] = list(add["hist"])
            tot[node] = [add["count"], add["below"], add["above"], _hidden(add)]
            for w in r["withheld"]:
                if w["cell"] == "cells":
                    withheld.append({"node": node, "cells": int(w["cells"]),
                                     "values": _hidden(add), "reason": w["reason"]})
        pooled = _pool(answers, 0)
        hist[POOLED] = list(pooled["hist"])
        tot[POOLED] = [pooled["count"], pooled["below"], pooled["above"], _hidden(pooled)]
        counts = pd.DataFrame([hist[n] for n in index], index=index, columns=intervals,
                              dtype="Int64")
        totals = pd.DataFrame([tot[n] for n in index], index=index, dtype="Int64",
                              columns=["count", "below", "above", "withheld"])
        suppressed = pd.DataFrame(withheld, columns=["node", "cells", "values", "reason"])
        return Histogram(variable, edges, counts, totals, notes, suppressed)

    async def _quantiles(self, variable: str, q: float | Sequence[float],
                         bins: int | Sequence[float] | None,
                         range: tuple[float, float] | None) -> pd.DataFrame:
        qs = check_q(q)
        if bins is None:
            targets = await self._selection.current(self.session)
            bins = auto_bins([t["metadata"].get("n_samples") or 0 for t in targets.values()])
        hist = await self._histogram(variable, bins, range)
        labels = [f"{100 * x:g}%" for x in qs]
        withheld = dict(zip(hist.suppressed["node"], hist.suppressed["cells"], strict=True))
        per_node = hist.counts.index[:-1]
        rows: list[list[Any]] = []
        pooled_low = pooled_high = np.zeros(len(hist.edges))
        for node in hist.counts.index:
            note = hist.notes[node]
            if pd.isna(hist.totals.loc[node, "count"]):
                rows.append([*np.full(len(qs), np.nan), note])
                continue
            counts = hist.counts.loc[node].fillna(0).to_numpy(dtype=np.float64)
            total, below, above, hidden = (int(x) for x in hist.totals.loc[
                node, ["count", "below", "above", "withheld"]].fillna(0))
            if node != POOLED:
                low, high = bounds(counts, below, above, hidden, int(withheld.get(node, 0)))
                pooled_low, pooled_high = pooled_low + low, pooled_high + high
            elif len(per_node):  # the sums of the nodes' bounds: tighter than the pooled row's
                low, high = pooled_low, pooled_high
            else:  # secure aggregation: only the pooled sums are known
                low, high = bounds(counts, below, above, hidden)
            values, why = quantiles(hist.edges, counts, below, above, low, high, total, qs)
            notes = [note, *(f"{label} not given: {reason}"
                             for label, reason in zip(labels, why, strict=True) if reason)]
            rows.append([*values, "; ".join(n for n in notes if n)])
        return pd.DataFrame(rows, index=hist.counts.index, columns=[*labels, "note"])

    def _order(self, answers: _Answers) -> list[str]:
        """The nodes with a row of their own: none under secure aggregation."""
        assert self._targets is not None
        return [] if answers.secure is not None else list(self._targets)


# --- pooling helpers ------------------------------------------------------------------------


def _query(variable: str, *, shift: float = 0.0, min_max: bool = False,
           edges: np.ndarray | None = None,
           bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    query = {"variable": variable, "shift": float(shift), "min_max": min_max, "edges": edges}
    if bounds is not None:
        query["bounds"] = [float(bounds[0]), float(bounds[1])]
    return query


def _pool(answers: _Answers, i: int) -> dict[str, Any]:
    """Query ``i``'s additive statistics summed over the nodes that answered.

    This sum is all that pooled results are computed from: under secure aggregation the
    scheme made it (``protect`` on nodes, ``unprotect_sum`` here) and it is all there is.
    """
    if answers.secure is not None:
        return answers.secure.pooled[i]
    total: dict[str, Any] = {}
    for results in answers.results.values():
        for key, value in results[i]["additive"].items():
            total[key] = total[key] + value if key in total else value
    return total


def _suppressed(result: dict[str, Any]) -> bool:
    return any(w["cell"] == "all" for w in result["withheld"])


def _node_status(answers: _Answers, node: str, i: int) -> dict[str, str]:
    if node in answers.failed:
        status, message = answers.failed[node]
        return {"status": status, "note": message}
    r = answers.results[node][i]
    if _suppressed(r):
        return {"status": "suppressed", "note": f"withheld: {r['withheld'][0]['reason']}"}
    cells = withheld_cells(r)
    notes = [f"{cells} small cell(s) withheld ({_hidden(r['additive'])} values, not located: "
             "they read as 0)"] if cells else []
    if any(w["cell"] == "min_max" for w in r["withheld"]):
        notes.append("min/max withheld by node policy")
    if "noise" in r:
        notes.append(f"differentially private: noise sd {r['noise']['count']:g} on counts")
    return {"status": "ok", "note": "; ".join(notes)}


def _pooled_note(answers: _Answers, i: int) -> str:
    if answers.secure is not None:
        return _secure_note(answers.secure, i)
    left_out = [f"{n} ({s})" for n, (s, _) in sorted(answers.failed.items())]
    partial, hidden = [], 0
    for node, results in sorted(answers.results.items()):
        if _suppressed(results[i]):
            left_out.append(f"{node} (suppressed)")
        elif withheld_cells(results[i]):
            partial.append(node)
            hidden += _hidden(results[i]["additive"])
    notes = [f"excludes {', '.join(left_out)}"] if left_out else []
    if partial:
        notes.append(f"excludes cells withheld by {', '.join(partial)} ({hidden} values)")
    if any("noise" in results[i] for results in answers.results.values()):
        notes.append("differentially private: sums of the nodes' noised answers")
    return "; ".join(notes)


def _secure_note(sums: SecureSums, i: int) -> str:
    pooled = sums.pooled[i]
    notes = [f"secure aggregation ({sums.scheme}) of {len(sums.survivors)} nodes: per-node "
             "values hidden"]
    if sums.failed:
        notes.append("excludes " + ", ".join(f"{n} ({s})" for n, (s, _) in sorted(
            sums.failed.items())))
    if pooled["suppressed"]:
        notes.append(f"{pooled['suppressed']} node(s) withheld the variable (fewer than "
                     "min_count records) and count as zeros")
    if pooled["withheld"]:
        notes.append(f"{pooled['withheld']} small cell(s) withheld by the nodes "
                     f"({_hidden(pooled)} values)")
    return "; ".join(notes)


def _hidden(add: dict[str, Any]) -> int:
    """How many counted values a histogram reply does not place: those in withheld cells."""
    if "hist" not in add:
        return 0
    return int(add["count"] - int(np.sum(add["hist"])) - add["below"] - add["above"])


def _moments(add: dict[str, Any], shift: float, ddof: int) -> dict[str, Any]:
    n, s, q = int(add["count"]), float(add["sum"]), float(add["sumsq"])
    mean = shift + s / n if n else math.nan
    m2 = max(q - s * s / n, 0.0) if n else math.nan
    var = m2 / (n - ddof) if n > ddof else math.nan
    return {"count": n, "missing": int(add["missing"]), "sum": s + n * shift, "mean": mean,
            "var": var, "std": math.sqrt(var)}


def _pooled_describe(variable: str, answers: _Answers, i: int, shift: float,
                     ddof: int) -> dict[str, Any]:
    row = {"variable": variable, "node": POOLED, **_moments(_pool(answers, i), shift, ddof),
           "status": "ok", "note": _pooled_note(answers, i)}
    if answers.secure is not None:
        if answers.secure.pooled[i]["suppressed"] == len(answers.secure.survivors):
            row.update(status="suppressed", mean=math.nan, var=math.nan, std=math.nan)
        row.update(min=math.nan, max=math.nan,
                   note=row["note"] + "; min/max are not sums: not available")
        return row
    shown = [r[i] for r in answers.results.values() if not _suppressed(r[i])]
    if not shown:
        row.update(status="suppressed", mean=math.nan, var=math.nan, std=math.nan)
    elif all(r["min"] is not None for r in shown if r["additive"]["count"]):
        mins = [r["min"] for r in shown if r["min"] is not None]
        row.update(min=min(mins, default=math.nan), max=max(
            (r["max"] for r in shown if r["max"] is not None), default=math.nan))
    else:
        row["note"] = "; ".join(x for x in (row["note"], "min/max withheld by a node") if x)
    return row


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


# --- argument checks ------------------------------------------------------------------------


def _names(variables: str | Sequence[str]) -> list[str]:
    names = [variables] if isinstance(variables, str) else list(variables)
    if not names or not all(isinstance(v, str) and v for v in names):
        raise ConfigurationError(f"Expected variable names (columns, modalities). Received: "
                                 f"{variables!r}")
    return list(dict.fromkeys(names))


def _edges(bins: Any, range: Any) -> np.ndarray | None:
    """Explicit edges from ``bins``/``range``; None when the range must come from the data."""
    if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        if not 1 <= bins <= MAX_BINS:
            raise ConfigurationError(f"bins must be between 1 and {MAX_BINS}. Received: "
                                     f"bins={bins!r}")
        if range is None:
            return None
        try:
            lo, hi = (float(x) for x in range)
        except (TypeError, ValueError):
            raise ConfigurationError(f"range must be (low, high). Received: range={range!r}"
                                     ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigurationError(f"range must be finite with low < high. Received: "
                                     f"range={range!r}")
        return np.linspace(lo, hi, int(bins) + 1)
    if range is not None:
        raise ConfigurationError("range applies when bins is a number of bins; explicit bin "
                                 f"edges already fix it. Received: bins={bins!r}, "
                                 f"range={range!r}")
    if isinstance(bins, (str, bytes)) or not isinstance(bins, (Sequence, np.ndarray)):
        raise ConfigurationError(f"bins must be a number of bins or a list of bin edges. "
                                 f"Received: bins={bins!r}")
    return check_edges(bins, "bins")


def _bounds(variables: list[str], bounds: _Bounds) -> dict[str, tuple[float, float] | None]:
    """Each variable's clipping range from ``describe(..., bounds=)`` (checked)."""
    given: Mapping[str, Any] = (bounds if isinstance(bounds, Mapping) else
                                dict.fromkeys(variables, bounds))
    unknown = sorted(set(given) - set(variables))
    if unknown:
        raise ConfigurationError(f"bounds names variables not asked for: {unknown}. "
                                 f"Variables: {variables}")
    out: dict[str, tuple[float, float] | None] = {}
    for v in variables:
        b = given.get(v)
        if b is not None:
            try:
                lo, hi = (float(x) for x in b)
            except (TypeError, ValueError):
                raise ConfigurationError(f"bounds must be (low, high) per variable. Received: "
                                         f"{v}={b!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigurationError(f"bounds must be finite with low < high. Received: "
                                         f"{v}={b!r}")
            b = (lo, hi)
        out[v] = b
    return out
