from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fedcore.aggregators.base import Aggregator
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet

#: Values per slice when folding an update into the running sums: the float64 products of
#: one slice (2 MB) stay in cache instead of making a model-sized temporary per update.
_CHUNK = 1 << 18
#: Values up to which an update's layer is widened into a temporary of its own: the same
#: arithmetic (widen, multiply in float64, add), in fewer calls (~2 us a node and round for
#: a 64 x 10 linear model).
_SMALL = 1 << 12


class FedAvg(Aggregator):
    """Sample-weighted federated averaging (McMahan et al., 2017), streamed.

    Each update is folded into float64 running sums as it arrives, so memory is one copy of
    the model whatever the number of nodes. Results keep each parameter's dtype; integer
    parameters (counters) are rounded. The sums' memory serves the next round again (the
    first update of a round overwrites it), instead of new memory the system must hand
    over, page by page, every round.
    """

    name = "fedavg"
    sum_only = True

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        #: The previous round's sums, by name: the memory the next round's are written into.
        self._spare: dict[str, np.ndarray] = {}
        self._total = 0.0
        self._reference: ParameterSet | None = None
        self._scratch = np.empty(0, np.float64)

    @property
    def total_weight(self) -> float:
        """Sum of the weights of the updates added this round (0 before the first)."""
        return self._total

    def start(self, global_params: ParameterSet, round: int) -> None:
        self._reference = global_params
        if self._sums:  # nothing outside holds them: result() and means() return copies
            self._spare = self._sums
        self._sums = {}
        self._total = 0.0

    def add(self, update: ParameterSet, weight: float, node: str = "",
            extras: Mapping[str, Any] | None = None) -> None:
        if not weight > 0:
            raise ConfigurationError(
                f"Update weights must be positive. Received {weight!r} from node {node!r}."
            )
        if self._reference is not None:
            self._reference.check_layout(update, what=f"update from node {node!r}")
        if not self._sums:
            self._sums = self._first(update, weight)
        else:
            sums, fold = self._sums, self._fold
            for k, a in update.items():
                fold(sums[k], a, weight)
        self._total += weight

    def _first(self, update: ParameterSet, weight: float) -> dict[str, np.ndarray]:
        """The sums of a round's first update, ``a * weight`` in float64.

        Written into the previous round's sums where a parameter kept its name and shape;
        whatever they held is overwritten. Nothing is kept unless every one was made.
        """
        spare, sums = self._spare, {}
        for k, a in update.items():
            shape = np.shape(a)
            acc = spare.get(k)
            if acc is None or acc.shape != shape:
                acc = np.empty(shape, np.float64)
            np.copyto(acc, a, casting="same_kind")
            sums[k] = np.multiply(acc, weight, out=acc)
        self._spare = {}  # in ``sums`` now, or of another layout: not held twice
        return sums

    def _fold(self, acc: np.ndarray, a: np.ndarray, weight: float) -> None:
        """``acc += a * weight`` in float64, slice by slice through a small scratch buffer."""
        a = np.asarray(a)
        n = a.size
        if n <= _SMALL:  # a temporary of a few kB: two calls, not a scratch slice's five
            np.add(acc, np.multiply(a, weight, dtype=np.float64), out=acc)
            return
        if self._scratch.size < min(n, _CHUNK):
            self._scratch = np.empty(min(max(n, 1024), _CHUNK), np.float64)
        if n <= _CHUNK:  # one slice: the whole array, in its own shape
            self._fold_slice(acc, a, self._scratch[:n].reshape(a.shape), weight)
            return
        flat_acc, flat = acc.reshape(-1), a.reshape(-1)
        for s in range(0, n, _CHUNK):
            e = min(s + _CHUNK, n)
            self._fold_slice(flat_acc[s:e], flat[s:e], self._scratch[:e - s], weight)

    @staticmethod
    def _fold_slice(acc: np.ndarray, a: np.ndarray, tmp: np.ndarray, weight: float) -> None:
        # Widen, then multiply in float64: the same arithmetic as multiply(..., dtype=
        # float64), whose buffered cast made it slower (65 -> 60 us for 85k float32).
        np.copyto(tmp, a, casting="same_kind")
        np.multiply(tmp, weight, out=tmp)
        np.add(acc, tmp, out=acc)

    def means(self) -> Iterator[tuple[str, np.ndarray]]:
        """The weighted mean of each parameter so far, in float64, one at a time.

        :meth:`result` casts each back to its parameter's dtype; server optimizers build on
        them. One parameter at a time, so a caller holds one extra layer, not a model.
        """
        self._check_total()
        for k, s in self._sums.items():
            yield k, s / self._total

    def _check_total(self) -> None:
        if self._total <= 0:
            raise ConfigurationError("FedAvg.result() called before any update was added.")

    def result(self) -> ParameterSet:
        self._check_total()
        ref = self._reference
        return ParameterSet({k: mean_as(s, self._total, ref[k].dtype if ref is not None else None)
                             for k, s in self._sums.items()})


def mean_as(sums: np.ndarray, total: float, dtype: np.dtype | None) -> np.ndarray:
    """``cast_like(sums / total, dtype)``, the same bits.

    A float dtype gets the quotient written straight into it, without a float64 temporary
    the size of the parameter.
    """
    if dtype is not None and dtype.kind == "f":
        return np.divide(sums, total, out=np.empty(sums.shape, dtype), casting="same_kind")
    return cast_like(sums / total, dtype)


def cast_like(mean: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """A float64 mean in a parameter's own dtype; integer and boolean ones are rounded."""
    dtype = dtype or np.dtype(np.float64)
    if dtype.kind in "iub":
        mean = np.rint(mean)
    return np.asarray(mean).astype(dtype, copy=False)
