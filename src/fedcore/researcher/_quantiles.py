"""Quantiles from a pooled histogram: exact to one bin, or refused with the reason.

A node withholds the cells of its histogram that hold fewer than ``min_count`` values (and
enough others that their total cannot be told), without saying which. Those values are
somewhere unknown, so the count of values below each edge ``e_j`` is only known to lie
between two bounds ``L_j <= U_j`` (:func:`bounds`: per node, the withheld values lie in
the cells it shows as empty, one at least in each withheld cell; the pooled bounds are
the sums of the nodes'; under secure aggregation, where only the pooled sum is known, the
withheld values may be anywhere). The quantile at rank ``r`` is surely at or above
``e_j`` when ``U_j < r`` and at or below ``e_j`` when ``L_j >= r``. When these two
bounds are adjacent edges the quantile's bin is known, whatever the withheld values are,
and the bin's centre is given (within half a bin of the truth); otherwise the quantile is
not given, and the reason names the interval it is known to lie in. Without withheld
values the classic ogive (values spread evenly within each bin) gives it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcore.errors import ConfigurationError

#: Default histogram of ``quantiles()``: about this many values per bin at the smallest
#: node, so that few cells fall under a node's ``min_count`` (5 by default).
VALUES_PER_BIN = 20
#: ... and at most this many bins.
MAX_AUTO_BINS = 100


def auto_bins(sizes: Sequence[int]) -> int:
    """The number of bins for nodes holding ``sizes`` records (at least one bin)."""
    smallest = min((int(n) for n in sizes if n and int(n) > 0), default=0)
    return int(np.clip(smallest // VALUES_PER_BIN, 1, MAX_AUTO_BINS))


def check_q(q: float | Sequence[float]) -> list[float]:
    """The distinct quantiles asked for, each in [0, 1]."""
    qs = [q] if isinstance(q, (int, float)) else list(q)
    try:
        ok = bool(qs) and all(0.0 <= float(x) <= 1.0 for x in qs)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigurationError(f"q must be quantiles between 0 and 1. Received: q={q!r}")
    return list(dict.fromkeys(float(x) for x in qs))


def bounds(counts: np.ndarray, below: float, above: float, hidden: int,
           cells: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The least and the most values that can lie below each edge, given one reply.

    ``counts``, ``below`` and ``above`` are the shown cells; ``hidden`` the values in
    withheld cells. With ``cells``, the number of cells one node withheld, the bounds use
    what its reply shows: its withheld cells read as 0, and each holds a value at least
    (without it, as for a pooled sum under secure aggregation, hidden values may be
    anywhere).
    """
    shown = np.concatenate([[below], counts, [above]]).astype(np.float64)
    low = np.cumsum(shown)[:-1]  # shown values below edge j: cells 0..j
    if not hidden:
        return low, low.copy()
    if cells is None:
        return low, low + hidden
    zero = shown == 0
    zeros_below = np.cumsum(zero)[:-1]
    zeros_above = int(zero.sum()) - zeros_below
    least = np.where(zeros_above == 0, hidden, np.maximum(0, cells - zeros_above))
    most = np.where(zeros_below == 0, 0, hidden - np.maximum(0, cells - zeros_below))
    return low + least, low + most


def quantiles(edges: np.ndarray, counts: np.ndarray, below: float, above: float,
              low: np.ndarray, high: np.ndarray, total: float, qs: Sequence[float]
              ) -> tuple[np.ndarray, list[str]]:
    """Each quantile of ``qs`` and, where it is NaN, why (an empty string where given).

    ``counts``, ``below`` and ``above`` are the shown cells, ``low`` and ``high`` the
    :func:`bounds` of the values below each edge, ``total`` the count of values.
    """
    hidden = int(round(total - below - counts.sum() - above))
    if not hidden:
        values = interpolate(edges, counts, below, above, qs)
        return values, [_outside(edges, counts, below, above, q) if np.isnan(v) else ""
                        for v, q in zip(values, qs, strict=True)]
    values, reasons = np.full(len(qs), np.nan), []
    for i, q in enumerate(qs):
        rank = q * total
        above_of = np.flatnonzero(high < rank)  # edges the quantile is surely above
        below_of = np.flatnonzero(low >= rank)  # edges it is surely below
        lo = int(above_of[-1]) if above_of.size else None
        hi = int(below_of[0]) if below_of.size else None
        if lo is not None and hi is not None and hi - lo == 1:
            values[i] = (edges[lo] + edges[hi]) / 2
            reasons.append("")
            continue
        where = (f"[{'-inf' if lo is None else f'{edges[lo]:g}'}, "
                 f"{'inf' if hi is None else f'{edges[hi]:g}'}]")
        reasons.append(f"{hidden} values in withheld cells leave it anywhere in {where}, "
                       "more than one bin: ask for fewer, wider bins")
    return values, reasons


def _outside(edges: np.ndarray, counts: np.ndarray, below: float, above: float,
             q: float) -> str:
    if not counts.sum():
        return "no value falls within the histogram's range"
    rank = q * (below + counts.sum() + above)
    return ("it lies below the histogram's range: lower its low end" if rank <= below else
            "it lies above the histogram's range: raise its high end")


def interpolate(edges: np.ndarray, counts: np.ndarray, below: float, above: float,
                qs: Sequence[float]) -> np.ndarray:
    """Quantiles of a histogram, the values spread evenly within each bin (an ogive)."""
    inside = counts.sum()
    total = below + inside + above
    out = np.full(len(qs), np.nan)
    if not inside:
        return out
    cum = below + np.cumsum(counts)
    for j, q in enumerate(qs):
        rank = q * total
        if rank < below or rank > below + inside or (rank == below and below > 0):
            continue  # outside the histogram's range: unknown
        if rank == below:  # q = 0: the left edge of the first non-empty bin
            out[j] = edges[np.flatnonzero(counts)[0]]
            continue
        b = int(np.searchsorted(cum, rank, side="left"))
        before = cum[b] - counts[b]
        out[j] = edges[b] + (rank - before) / counts[b] * (edges[b + 1] - edges[b])
    return out
