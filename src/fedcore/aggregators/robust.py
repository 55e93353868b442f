"""Robust aggregators, for federations where some updates may be wrong or malicious.

They look at every update in clear, so they hold all of a round's updates until
:meth:`~fedcore.aggregators.Aggregator.result` (memory: the number of nodes times the model
size, plus a few MB of work space), do not stream (``streaming = False``) and do not work under
secure aggregation, which only reveals sums (``sum_only = False``). Sample counts are not
used: a node could inflate its own. Updates with NaN or infinite values are refused when they
arrive (the round goes on without that node).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedcore.aggregators._checks import at_least, in_range
from fedcore.aggregators.base import Aggregator
from fedcore.aggregators.fedavg import cast_like
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet

__all__ = ["Krum", "Median", "TrimmedMean"]

log = logging.getLogger(__name__)

#: Values per work block (coordinates x nodes): blocks of a few MB stay in cache.
_BLOCK = 1 << 19


class _Collecting(Aggregator):
    """Holds a round's updates; subclasses combine them in :meth:`_combine`."""

    streaming = False
    sum_only = False

    def __init__(self) -> None:
        self._reference: ParameterSet | None = None
        self._updates: list[ParameterSet] = []
        self._nodes: list[str] = []
        self._result: ParameterSet | None = None

    def start(self, global_params: ParameterSet, round: int) -> None:
        """Begin a round from ``global_params``; drops what the last round held."""
        self._reference = global_params
        self._updates, self._nodes, self._result = [], [], None

    def add(self, update: ParameterSet, weight: float, node: str = "",
            extras: Mapping[str, Any] | None = None) -> None:
        """Keep one node's update (its ``weight`` is checked, then not used)."""
        if not weight > 0:
            raise ConfigurationError(
                f"Update weights must be positive. Received {weight!r} from node {node!r}.")
        what = f"update from node {node!r}"
        layout = self._reference if self._reference is not None else (
            self._updates[0] if self._updates else None)
        if layout is not None:
            layout.check_layout(update, what=what)
        for k, a in update.items():
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                raise ValueError(
                    f"The {what} has NaN or infinite values in parameter {k!r}: refused.")
        self._updates.append(update)
        self._nodes.append(node)

    def result(self) -> ParameterSet:
        """Combine the round's updates, then release them; a second call returns the same."""
        if self._result is not None:
            return self._result
        if not self._updates:
            raise ConfigurationError(
                f"{type(self).__name__}.result() called before any update was added.")
        self._result = self._combine()
        self._updates, self._nodes = [], []
        return self._result

    def _combine(self) -> ParameterSet:
        raise NotImplementedError

    def _layout(self) -> ParameterSet:
        return self._reference if self._reference is not None else self._updates[0]

    def _coordinatewise(self, reduce: Callable[[np.ndarray], np.ndarray]) -> ParameterSet:
        """Apply ``reduce`` to blocks of shape (coordinates, nodes), each row sorted."""
        n = len(self._updates)
        rows = max(256, _BLOCK // n)
        out = {}
        for k, ref in self._layout().items():
            flats = [np.asarray(u[k]).reshape(-1) for u in self._updates]
            res = np.empty(ref.size, ref.dtype)
            for s in range(0, ref.size, rows):
                block = np.stack([f[s:s + rows] for f in flats], axis=1)
                block.sort(axis=1)
                res[s:s + rows] = cast_like(reduce(block), ref.dtype)
            out[k] = res.reshape(ref.shape)
        return ParameterSet(out)


class Median(_Collecting):
    """Coordinate-wise median of the updates (Yin et al., 2018).

    Each value of the result is the median of that value over the nodes (the mean of the two
    middle ones for an even count), unweighted: sample counts are ignored, so a node cannot
    buy influence by claiming many samples. Up to half the nodes minus one can send anything
    without moving a coordinate outside the range of the honest values. Holds every update
    of the round (memory: nodes x model). Integer parameters are rounded.
    """

    name = "median"

    def __init__(self) -> None:
        super().__init__()

    def _combine(self) -> ParameterSet:
        n = len(self._updates)
        h = n // 2
        if n % 2:
            return self._coordinatewise(lambda b: b[:, h])
        return self._coordinatewise(
            lambda b: (b[:, h - 1].astype(np.float64) + b[:, h]) * 0.5)


class TrimmedMean(_Collecting):
    """Coordinate-wise trimmed mean (Yin et al., 2018).

    For each value, the ``beta`` fraction of largest and of smallest values over the nodes
    (``floor(beta * n)`` each) are dropped and the rest averaged, unweighted. With
    ``floor(beta * n) = 0`` nothing is dropped (a warning says so, once): choose ``beta`` at least
    ``1 / n`` for the number of nodes you expect. Holds every update of the round (memory:
    nodes x model).

    Args:
        beta: fraction trimmed at each end, in [0, 0.5).
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta >= 0.5:
            raise ConfigurationError(
                f"TrimmedMean(beta={beta!r}) would leave nothing to average: it drops the "
                "beta fraction of largest and the beta fraction of smallest values of each "
                "coordinate. Expected beta in [0, 0.5), e.g. 0.1 to drop 10% at each end.")
        self.beta = in_range("beta", beta, 0.0, 0.5)
        self._warned = False

    def _combine(self) -> ParameterSet:
        n = len(self._updates)
        k = math.floor(self.beta * n + 1e-9)
        if k == 0 and self.beta > 0 and not self._warned:
            self._warned = True
            log.warning("TrimmedMean(beta=%g) trims nothing from %d updates (beta * n < 1): "
                        "this round's result is the plain mean.", self.beta, n)
        return self._coordinatewise(lambda b: b[:, k:n - k].mean(axis=1, dtype=np.float64))


class Krum(_Collecting):
    """Krum (Blanchard et al., 2017), and Multi-Krum when ``m > 1``.

    Each update is scored by the sum of its squared Euclidean distances to its ``n - f - 2``
    nearest other updates (over the float parameters, flattened and concatenated); the
    ``m`` best-scored updates are averaged, unweighted (``m=1``: the result is one node's
    update). Needs ``n >= 2f + 3`` updates to tolerate ``f`` Byzantine nodes, and ``m`` at
    most ``n - f``. After :meth:`result`, ``selected_`` lists the chosen nodes (best first)
    and ``scores_`` maps every node to its score. Holds every update of the round (memory:
    nodes x model); distances come from one n x n Gram matrix, accumulated in float64.

    Args:
        f: number of Byzantine nodes to tolerate.
        m: number of best-scored updates to average.
    """

    name = "krum"

    def __init__(self, f: int = 1, m: int = 1) -> None:
        super().__init__()
        self.f = at_least("f", f, 0)
        self.m = at_least("m", m, 1)
        self.selected_: list[str] = []
        self.scores_: dict[str, float] = {}

    def _combine(self) -> ParameterSet:
        n, f = len(self._updates), self.f
        if n < 2 * f + 3:
            fix = (f"Lower f (n = {n} allows f <= {(n - 3) // 2}) or select more nodes."
                   if n >= 3 else "Select more nodes.")
            raise ConfigurationError(
                f"Krum(f={f}) needs at least 2f + 3 = {2 * f + 3} updates to tolerate {f} "
                f"Byzantine node(s); this round has n = {n} ({', '.join(self._nodes)}). {fix}")
        if self.m > n - f:
            raise ConfigurationError(
                f"Krum(m={self.m}) averages the m best-scored updates, at most n - f = "
                f"{n - f} of this round's n = {n} updates with f = {f}. Lower m.")
        d2 = _squared_distances(self._gram())
        np.fill_diagonal(d2, np.inf)
        scores = np.sort(d2, axis=1)[:, :n - f - 2].sum(axis=1)
        order = np.argsort(scores, kind="stable")[:self.m]
        self.selected_ = [self._nodes[i] for i in order]
        self.scores_ = dict(zip(self._nodes, scores.tolist(), strict=True))
        chosen = [self._updates[i] for i in order]
        out = {}
        for k, ref in self._layout().items():
            acc = np.zeros(ref.shape, np.float64)
            for u in chosen:
                acc += u[k]
            out[k] = cast_like(acc / len(chosen), ref.dtype)
        return ParameterSet(out)

    def _gram(self) -> np.ndarray:
        """Dot products of the updates' float values, centred on the global model."""
        n = len(self._updates)
        cols = max(1024, 4 * _BLOCK // n)
        gram = np.zeros((n, n), np.float64)
        block = np.empty((n, cols), np.float64)
        for k, ref in self._layout().items():
            if ref.dtype.kind != "f":
                continue
            # Centring on the global model (distances do not change) keeps the values small,
            # so |a|^2 + |b|^2 - 2 a.b loses less to cancellation.
            centre = (np.asarray(self._reference[k]).reshape(-1)
                      if self._reference is not None else np.zeros(ref.size, ref.dtype))
            flats = [np.asarray(u[k]).reshape(-1) for u in self._updates]
            for s in range(0, ref.size, cols):
                e = min(s + cols, ref.size)
                b = block[:, :e - s]
                for i, flat in enumerate(flats):
                    np.subtract(flat[s:e], centre[s:e], out=b[i], dtype=np.float64)
                if e - s < cols:
                    b = np.ascontiguousarray(b)
                gram += b @ b.T
        return gram


def _squared_distances(gram: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances from a Gram matrix (clipped at 0)."""
    sq = np.diag(gram)
    d2 = sq[:, None] + sq[None, :] - 2.0 * gram
    return np.maximum(d2, 0.0, out=d2)
