"""A node's statistics computed on its data: exact with small counts withheld, or noised.

:func:`compute_statistics` answers checked queries (:class:`~fedcore.wire.statistics.Query`)
on an opened dataset. Exact answers withhold what would single out fewer than ``min_count``
records (:func:`_withhold`); answers under differential privacy (:class:`Noise`) clip every
value to the query's bounds and add Gaussian noise to every sum instead. While computing, it
also measures what the query log needs (:class:`Track`): record counts, a digest of the
values, counts per atom of the bin edges the researcher asked about.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.errors import ConfigurationError, DatasetError
from fedcore.governance.statistics import Measure, Partition, StatisticsPolicy, check_bins
from fedcore.wire.statistics import IMAGE_VARIABLE, MAX_QUERIES, Query, check_query

if TYPE_CHECKING:  # pandas is imported by the query that reads a table, not by the node
    import pandas as pd

__all__ = ["Noise", "Track", "compute_statistics"]


@dataclass
class Track:
    """What the query log needs of one variable, measured while answering (never sent).

    ``before``: the partition of the researcher's last answer on it; ``after``: every edge
    asked until now, this request's included. Filled in by :func:`compute_statistics`.
    """

    before: Partition
    after: Partition
    measure_before: Measure = field(default_factory=Measure)
    measure_after: Measure = field(default_factory=Measure)
    _crc: int = 0

    def digest(self, x: np.ndarray) -> None:
        """Fold one chunk of raw values (missing ones included) into the data's checksum.

        CRC-32 tells whether the data changed between two answers (the node's own data, not
        an adversary's); it costs a millisecond per million values.
        """
        self._crc = zlib.crc32(np.ascontiguousarray(x).data, self._crc)

    def add(self, x: np.ndarray) -> None:
        """Count one chunk of non-missing values."""
        after = self.after.counts(x) if self.after else None
        before = after if self.before == self.after else (
            self.before.counts(x) if self.before else None)
        for counts, measure in ((before, self.measure_before), (after, self.measure_after)):
            if counts is not None:
                measure.atoms = counts if measure.atoms.size == 0 else measure.atoms + counts

    def finish(self, records: int, missing: int) -> None:
        """Seal the measures once every chunk was counted."""
        digest = f"{records}:{missing}:{self._crc:08x}"
        for partition, measure in ((self.before, self.measure_before),
                                   (self.after, self.measure_after)):
            measure.records, measure.missing, measure.digest = records, missing, digest
            measure.partition = partition
            if measure.atoms.size == 0:
                measure.atoms = np.zeros(partition.size, dtype=np.int64)


@dataclass(frozen=True)
class Noise:
    """Differentially private answers: values clipped, Gaussian noise on every sum.

    Each value is clipped to its query's bounds; each sum gets noise of standard deviation
    ``multiplier`` times its sensitivity to one record added or removed.
    """

    multiplier: float
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @staticmethod
    def steps(queries: Sequence[Query]) -> int:
        """The Gaussian releases a request makes.

        Per query: count and missing, sum, sum of squares, and the histogram if any.
        """
        return sum(3 + (1 if q.edges is not None else 0) for q in queries)


def compute_statistics(dataset: Any, queries: Sequence[Any], policy: StatisticsPolicy, *,
                       tracks: Mapping[str, Track] | None = None,
                       noise: Noise | None = None) -> list[dict[str, Any]]:
    """Answer ``queries`` on ``dataset`` under ``policy``: additive sums, extremes, withheld.

    Tables answer for their numeric columns (``dataset.frame``), medical folders for the voxel
    intensities of a modality (``dataset.modalities``, ``dataset.iter_volumes(modality)``),
    image folders for ``"intensity"`` (``dataset.iter_images()``). Every query is checked
    before any is computed; a bad one raises ``ConfigurationError`` naming its key, a
    histogram too fine for the node's ``min_count`` a ``GovernanceError``. ``tracks``
    (variable -> :class:`Track`) are filled while the first query on each variable is
    answered. With ``noise`` the answers are differentially private instead of exact.
    """
    if not 0 < len(queries) <= MAX_QUERIES:
        raise ConfigurationError(f"A statistics request holds 1 to {MAX_QUERIES} queries. "
                                 f"Received: {len(queries)}")
    checked = [check_query(i, q) for i, q in enumerate(queries)]
    if noise is not None:
        for i, q in enumerate(checked):
            if q.clip is None:
                raise ConfigurationError(
                    f"Query {i} ({q.variable!r}): differentially private sums need 'bounds' "
                    "[low, high] to clip values to (their sensitivity), e.g. "
                    "describe(..., bounds={'age': (0, 120)}), or histogram edges.")
    sources = [_source(dataset, q.variable) for q in checked]
    pending = dict(tracks or {})
    return [_answer(q, chunks, unit, policy, pending.pop(q.variable, None), noise)
            for q, (chunks, unit) in zip(checked, sources, strict=True)]


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
    import pandas as pd

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
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(dtype)) and not pd.api.types.is_complex_dtype(
        dtype)


@dataclass
class _Sums:
    """One query's running sums over the chunks of its variable."""

    query: Query
    n: int = 0
    missing: int = 0
    images: int = 0
    below: int = 0
    above: int = 0
    s: float = 0.0
    q: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    hist: np.ndarray | None = None

    def add(self, x: np.ndarray, *, extremes: bool, clip: tuple[float, float] | None) -> None:
        """Add one chunk of non-missing values."""
        self.n += x.size
        edges = self.query.edges
        if extremes:
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if edges is not None:
            if self.hist is None:
                self.hist = np.zeros(edges.size - 1, dtype=np.int64)
            # Equal bins take numpy's fast path, which bins exactly as searchsorted would.
            if np.array_equal(edges, np.linspace(edges[0], edges[-1], edges.size)):
                self.hist += np.histogram(x, bins=edges.size - 1,
                                          range=(edges[0], edges[-1]))[0]
            else:
                self.hist += np.histogram(x, bins=edges)[0]
            self.below += int(np.count_nonzero(x < edges[0]))
            self.above += int(np.count_nonzero(x > edges[-1]))
        if clip is not None:
            x = np.clip(x, *clip)
        d = x - self.query.shift if self.query.shift else x
        self.s += float(d.sum())
        self.q += float(np.dot(d, d))

    def additive(self) -> dict[str, Any]:
        """The additive statistics of a reply."""
        out: dict[str, Any] = {"count": self.n, "missing": self.missing, "sum": self.s,
                               "sumsq": self.q}
        if self.query.edges is not None:
            hist = self.hist if self.hist is not None else np.zeros(
                self.query.edges.size - 1, dtype=np.int64)
            out.update(hist=hist, below=self.below, above=self.above)
        return out


def _read(query: Query, chunks: Iterable[Any], *, extremes: bool, track: Track | None,
          clip: tuple[float, float] | None) -> _Sums:
    """Every chunk of the variable summed (and measured for the query log)."""
    sums = _Sums(query)
    for chunk in chunks:
        x = np.asarray(chunk)
        if x.dtype.kind not in "biuf":
            raise DatasetError(f"{query.variable!r} holds {x.dtype} values, not numbers.")
        x = x.reshape(-1).astype(np.float64, copy=False)
        sums.images += 1
        if track is not None:
            track.digest(x)
        nan = np.isnan(x)
        if nan.any():
            sums.missing += int(nan.sum())
            x = x[~nan]
        if x.size:
            if track is not None:
                track.add(x)
            sums.add(x, extremes=extremes, clip=clip)
    return sums


def _answer(query: Query, chunks: Iterable[Any], unit: str, policy: StatisticsPolicy,
            track: Track | None, noise: Noise | None) -> dict[str, Any]:
    extremes = query.min_max and policy.min_max and noise is None
    sums = _read(query, chunks, extremes=extremes, track=track,
                 clip=query.clip if noise is not None else None)
    n = sums.n
    records = n if unit == "values" else sums.images
    if track is not None:
        track.finish(records, sums.missing)
    result: dict[str, Any] = {"variable": query.variable, "additive": sums.additive(),
                              "min": None, "max": None, "withheld": [], "_cells": []}
    if noise is not None:
        return _noised(result, query, noise)
    if query.min_max and n:
        if policy.min_max:
            result.update(min=sums.lo, max=sums.hi)
        else:
            result["withheld"].append({"cell": "min_max",
                                       "reason": "node policy (allow_min_max = false)"})
    if 0 < n < policy.min_count <= records:  # many images, yet few values (NaN voxels)
        records, unit = n, "values"
    if query.edges is not None and policy.protects and records >= policy.min_count:
        check_bins(query.variable, query.bins, n, policy.min_count)
    _withhold(result, records, unit, policy.min_count)
    return result


def _noised(result: dict[str, Any], query: Query, noise: Noise) -> dict[str, Any]:
    """``result`` with Gaussian noise on every sum (counts rounded, at least 0)."""
    assert query.clip is not None
    add, sigma, rng = result["additive"], noise.multiplier, noise.rng
    bound = max(abs(query.clip[0] - query.shift), abs(query.clip[1] - query.shift))
    sd = {"count": sigma, "sum": sigma * bound, "sumsq": sigma * bound * bound}
    for key in ("count", "missing"):
        add[key] = max(int(np.rint(add[key] + rng.normal(0.0, sigma))), 0)
    add["sum"] = float(add["sum"] + rng.normal(0.0, sd["sum"]))
    add["sumsq"] = float(max(add["sumsq"] + rng.normal(0.0, sd["sumsq"]), 0.0))
    if "hist" in add:
        sd["hist"] = sigma
        cells = np.concatenate([[add["below"]], add["hist"], [add["above"]]]).astype(float)
        cells = np.maximum(np.rint(cells + rng.normal(0.0, sigma, cells.size)), 0).astype(
            np.int64)
        add.update(below=int(cells[0]), hist=cells[1:-1], above=int(cells[-1]))
    result["noise"] = sd
    return result


def _withhold(result: dict[str, Any], records: int, unit: str, k: int) -> None:
    """Zero the counts below ``k`` (and enough others that the total cannot reveal them).

    The reply counts the withheld cells without naming them (a withheld cell reads as an
    empty one); ``result["_cells"]`` names them for the node's audit log only.
    """
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
    if not withheld.any():
        return
    last = cells.size - 1
    result["_cells"] = ["below" if i == 0 else "above" if i == last else f"bin[{i - 1}]"
                        for i in np.flatnonzero(withheld)]
    result["withheld"].append({
        "cell": "cells", "cells": int(withheld.sum()),
        "reason": f"cells holding fewer than {k} values, and enough others that their total "
                  f"holds at least {k}; they are not named and count as 0"})
    cells[withheld] = 0
    add.update(below=int(cells[0]), hist=cells[1:-1].copy(), above=int(cells[-1]))
