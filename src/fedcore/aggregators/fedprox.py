"""FedProx (Li et al., 2020): FedAvg with a proximal term in every node's local objective."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedcore.aggregators._local import LocalAlgorithm
from fedcore.aggregators.base import Aggregator
from fedcore.aggregators.fedavg import FedAvg
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet

if TYPE_CHECKING:
    from fedcore.aggregators._local import LocalState
    from fedcore.plan import TrainingPlan

__all__ = ["FedProx", "FedProxLocal"]


def _check_mu(mu: Any) -> float:
    try:
        value = float(mu)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigurationError(
            f"Expected FedProx's mu to be a finite number >= 0 (e.g. 0.01). Received: {mu!r}")
    return value


class FedProxLocal(LocalAlgorithm):
    """Node side of FedProx: local training minimises ``loss + mu/2 ||w - w_global||^2``."""

    title = "FedProx"
    requires = frozenset({"proximal"})
    hint = "Use a torch plan or an SGD-type scikit-learn estimator, or FedAvg."

    def __init__(self, options: Mapping[str, Any]):
        super().__init__(options)
        self.mu = _check_mu(options.get("mu", 0.0))

    def before_fit(self, plan: TrainingPlan, global_params: ParameterSet,
                   state: LocalState) -> None:
        """Set ``plan.proximal`` (left unset for ``mu == 0``: plain FedAvg training)."""
        if self.mu > 0:
            plan.proximal = (self.mu, global_params)


class FedProx(Aggregator):
    """FedProx: nodes add ``mu/2 * ||w - w_global||^2`` to their local loss.

    The proximal term keeps each node's model near the global one, which limits the drift
    of nodes whose data differ (label skew) when they train for several local epochs. The
    researcher's side is :class:`FedAvg` (sample-weighted, streamed, secure-aggregation
    compatible). ``mu`` is usually tried among 0.001, 0.01, 0.1 and 1: too small changes
    nothing, too large slows learning to a crawl. ``mu=0`` is FedAvg, bit for bit.
    """

    name = "fedprox"
    sum_only = True
    local_algorithm = FedProxLocal

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = _check_mu(mu)
        self._avg = FedAvg()

    def start(self, global_params: ParameterSet, round: int) -> None:  # noqa: D102
        self._avg.start(global_params, round)

    def add(self, update: ParameterSet, weight: float, node: str = "",  # noqa: D102
            extras: Mapping[str, Any] | None = None) -> None:
        self._avg.add(update, weight, node, extras)

    def round_options(self) -> dict[str, Any]:
        """``{"name": "fedprox", "mu": mu}``, which every node applies in local training."""
        return {"name": self.name, "mu": self.mu}

    def result(self) -> ParameterSet:  # noqa: D102
        return self._avg.result()
