from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..params import ParameterSet
from .base import Aggregator


class FedAvg(Aggregator):
    """Sample-weighted federated averaging (McMahan et al., 2017), streamed.

    Each update is folded into float64 running sums as it arrives, so memory is one copy of
    the model whatever the number of nodes. Results keep each parameter's dtype; integer
    parameters (counters) are rounded.
    """

    name = "fedavg"
    sum_only = True

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._total = 0.0
        self._reference: ParameterSet | None = None

    def start(self, global_params: ParameterSet, round: int) -> None:
        self._reference = global_params
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
            for k, a in update.items():
                self._sums[k] = np.multiply(a, weight, dtype=np.float64)
        else:
            for k, a in update.items():
                self._sums[k] += np.multiply(a, weight, dtype=np.float64)
        self._total += weight

    def result(self) -> ParameterSet:
        if self._total <= 0:
            raise ConfigurationError("FedAvg.result() called before any update was added.")
        dtypes = {k: (self._reference[k].dtype if self._reference is not None else None)
                  for k in self._sums}
        out = {}
        for k, s in self._sums.items():
            mean = s / self._total
            dtype = dtypes[k] or np.dtype(np.float64)
            if dtype.kind in "iub":
                mean = np.rint(mean)
            out[k] = mean.astype(dtype, copy=False)
        return ParameterSet(out)
