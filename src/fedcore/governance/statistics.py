"""What a node lets researchers compute with federated statistics, and what it refuses.

Policy keys of ``config.toml``, read on every request by :func:`statistics_policy`:
``statistics`` (default true), ``min_count`` (default 5), ``allow_min_max`` (default false),
``statistics_dp`` (default false) and ``statistics_noise`` (default 10).

The rules a node applies so that its exact answers never single out fewer than ``min_count``
records, against a researcher who sends crafted queries (docs/statistics.md states them and
their limits):

- :func:`check_bins`: a histogram has at most ``values / min_count`` bins, so that the
  expected cell holds ``min_count`` values;
- :class:`Partition` and :func:`isolating_atoms`: the bin edges a researcher asked about a
  variable cut its axis into *atoms*; any difference of cells of two histograms is a sum of
  atoms, so once a researcher asks for new edges every atom must hold no record or at least
  ``min_count`` (edges the node refused count as asked, so refusals cannot be used to probe);
- :func:`records_changed` and :func:`cells_changed`: between two answers on a variable its
  data must change by no record, or by at least ``min_count`` records in every count a
  difference would show (the "sum before and after one admission" attack).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError, GovernanceError

__all__ = [
    "Measure",
    "Partition",
    "StatisticsPolicy",
    "cells_changed",
    "check_bins",
    "edges_key",
    "isolates",
    "isolating_atoms",
    "records_changed",
    "statistics_policy",
]

#: The noise multiplier of differentially private statistics when the policy sets none.
DEFAULT_NOISE = 10.0


@dataclass(frozen=True)
class StatisticsPolicy:
    """What a node lets researchers compute, read from its ``config.toml``.

    ``allowed``: answer statistics at all (key ``statistics``). ``min_count``: the fewest
    records a shared count may single out (0 or 1: no protection). ``min_max``: share
    extremes (key ``allow_min_max``). ``dp``: answer only with differential privacy (key
    ``statistics_dp``); ``noise``: its Gaussian noise multiplier (key ``statistics_noise``).
    """

    allowed: bool = True
    min_count: int = 5
    min_max: bool = False
    dp: bool = False
    noise: float = DEFAULT_NOISE

    @property
    def protects(self) -> bool:
        """Whether exact answers are checked against ``min_count`` (it is 2 or more)."""
        return self.min_count > 1


def statistics_policy(config: Mapping[str, Any]) -> StatisticsPolicy:
    """The statistics policy in a node's configuration; ``ConfigurationError`` if malformed."""
    allowed = config.get("statistics", True)
    min_count = config.get("min_count", 5)
    min_max = config.get("allow_min_max", False)
    dp = config.get("statistics_dp", False)
    noise = config.get("statistics_noise", DEFAULT_NOISE)
    for key, value in (("statistics", allowed), ("allow_min_max", min_max),
                       ("statistics_dp", dp)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"config.toml: {key} must be true or false. "
                                     f"Received: {key} = {value!r}")
    if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 0:
        raise ConfigurationError(f"config.toml: min_count must be an integer >= 0. "
                                 f"Received: min_count = {min_count!r}")
    if (not isinstance(noise, (int, float)) or isinstance(noise, bool)
            or not math.isfinite(noise) or noise <= 0):
        raise ConfigurationError(f"config.toml: statistics_noise must be a number > 0. "
                                 f"Received: statistics_noise = {noise!r}")
    return StatisticsPolicy(allowed=allowed, min_count=min_count, min_max=min_max, dp=dp,
                            noise=float(noise))


# --- one histogram ----------------------------------------------------------------------------


def check_bins(variable: str, bins: int, values: int, k: int) -> None:
    """Refuse (``GovernanceError``) a histogram finer than ``values / k`` bins.

    With more bins, most non-empty cells would hold fewer than ``k`` values: the histogram
    would be mostly withheld, and its empty cells would say where the records are not.
    """
    if k > 1 and values >= k and bins * k > values:
        raise GovernanceError(
            f"A histogram of {variable!r} with {bins} bins is too fine for this node: it "
            f"answers at most one bin per {k} values (policy min_count), so at most "
            f"{values // k} bins here. Ask for fewer or wider bins.")


def edges_key(edges: np.ndarray) -> str:
    """A short stable name of one edge set (to tell a repeated histogram from a new one)."""
    return hashlib.sha256(np.ascontiguousarray(edges, dtype="<f8").tobytes()).hexdigest()[:32]


# --- several histograms: atoms ----------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """The atoms the edges of some histograms cut a variable's axis into.

    ``edges`` (sorted, distinct) cut it into half-open intervals ``(-inf, e0)``, ``[e0,
    e1)``, ... ``[e_last, inf)``; every histogram's last bin also holds its right edge
    (numpy's rule), so each such edge is an atom of its own (``points``). Every cell of every
    histogram, ``below`` and ``above`` included, is a union of atoms.
    """

    edges: tuple[float, ...] = ()
    points: tuple[float, ...] = ()

    @classmethod
    def of(cls, edge_sets: Iterable[Sequence[float] | np.ndarray]) -> Partition:
        """The common refinement of histograms with these edge sets."""
        sets = [np.asarray(e, dtype=np.float64) for e in edge_sets]
        if not sets:
            return cls()
        edges = np.unique(np.concatenate(sets))
        points = np.unique([s[-1] for s in sets])
        return cls(tuple(edges.tolist()), tuple(points.tolist()))

    def joined(self, other: Partition) -> Partition:
        """The common refinement of two partitions."""
        return Partition(tuple(sorted(set(self.edges) | set(other.edges))),
                         tuple(sorted(set(self.points) | set(other.points))))

    def __bool__(self) -> bool:
        return bool(self.edges)

    @property
    def size(self) -> int:
        """How many atoms there are."""
        return len(self.edges) + 1 + len(self.points) if self.edges else 0

    def counts(self, x: np.ndarray) -> np.ndarray:
        """How many of the (finite, non-missing) values ``x`` fall in each atom."""
        if not self.edges:
            return np.zeros(0, dtype=np.int64)
        edges = np.asarray(self.edges)
        ordered = np.sort(x)  # then a few binary searches: cheaper than one per value
        at = np.searchsorted(ordered, edges, side="left")
        out = np.diff(np.concatenate([[0], at, [ordered.size]])).astype(np.int64)
        points = []
        for p in self.points:
            n = int(np.searchsorted(ordered, p, side="right") - np.searchsorted(ordered, p))
            out[int(np.searchsorted(edges, p, side="right"))] -= n
            points.append(n)
        return np.concatenate([out, np.asarray(points, dtype=np.int64)])

    def describe(self, atom: int) -> str:
        """Atom ``atom`` as an interval, for a refusal's reason."""
        e = self.edges
        if atom > len(e):
            return f"[{self.points[atom - len(e) - 1]:g}]"
        lo = "-inf" if atom == 0 else f"{e[atom - 1]:g}"
        hi = "inf" if atom == len(e) else f"{e[atom]:g}"
        return f"[{lo}, {hi})"


def isolating_atoms(counts: np.ndarray, k: int) -> np.ndarray:
    """Indices of atoms holding 1 to ``k - 1`` records (what a difference would single out)."""
    counts = np.abs(np.asarray(counts, dtype=np.int64))
    return np.flatnonzero((counts > 0) & (counts < k))


# --- data that changed between two answers ----------------------------------------------------


@dataclass
class Measure:
    """What a node knows of one variable's data when it answers (never sent).

    ``records``: values, or images for an imaging variable; ``missing`` values; ``digest``
    of every value in order; ``atoms``: counts per atom of ``partition``.
    """

    records: int = 0
    missing: int = 0
    digest: str = ""
    partition: Partition = field(default_factory=Partition)
    atoms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def records_changed(before: Measure, now: Measure, k: int) -> tuple[str, str]:
    """Why a sum or count now, with one answered before on other data, singles out records.

    Returns ``(reason, detail)``: the reason for the researcher (``""``: safe) and, for the
    node's audit log only, what moved. Counts that moved by 0 or at least ``k`` are safe; a
    digest that moved with no count moving is not (a value changed in place).
    """
    if before.digest == now.digest:
        return "", ""
    records, missing = abs(now.records - before.records), abs(now.missing - before.missing)
    detail = f"records {before.records} -> {now.records}, missing {before.missing} -> " \
             f"{now.missing}"
    if records < k and (0 < records or missing == 0):
        return (f"its data changed by fewer than {k} records since your last answered query "
                "on it, so the difference of the two answers would show them. The node "
                f"answers again once at least {k} records were added or removed"), detail
    if 0 < missing < k:
        return (f"fewer than {k} of its values became missing or present since your last "
                "answered query on it"), detail
    return "", ""


def cells_changed(before: Measure, now: Measure, k: int) -> tuple[str, str]:
    """Why a histogram now, with those answered before on other data, singles out records.

    ``now.atoms`` must be counted over ``before.partition`` (the atoms of the edges asked
    until the last histogram answered): each must have moved by 0 or at least ``k``.
    """
    if not before.partition or now.atoms.size != before.atoms.size:
        return "", ""
    moved = isolating_atoms(now.atoms - before.atoms, k)
    if not moved.size:
        return "", ""
    return (f"the records that changed since your last answered histogram of it put fewer "
            f"than {k} values in a bin you asked for before, which a difference of the two "
            "answers would show"), before.partition.describe(int(moved[0]))


def isolates(after: Measure, k: int) -> tuple[str, str]:
    """Why new bin edges, with the edges asked before, would single out records.

    ``(reason, detail)`` as for :func:`records_changed`; the reason never says where.
    """
    small = isolating_atoms(after.atoms, k)
    if not small.size:
        return "", ""
    return (f"with the bin edges you asked for before on this variable, these edges cut it "
            f"into pieces of which some hold fewer than {k} records, which a difference of "
            "cells would show. Ask again with the edges of a histogram you were answered; "
            "new edges for this variable are refused while its data stays as it is"), (
            after.partition.describe(int(small[0])))
