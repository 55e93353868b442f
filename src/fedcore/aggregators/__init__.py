"""Aggregators fold node updates into the next global ParameterSet."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcore import _lazy

if TYPE_CHECKING:
    from fedcore.aggregators._local import LocalAlgorithm, LocalState
    from fedcore.aggregators.base import Aggregator
    from fedcore.aggregators.fedavg import FedAvg
    from fedcore.aggregators.fedopt import (
        FedAdagrad,
        FedAdam,
        FedAvgM,
        FedYogi,
        ServerOptimizer,
    )
    from fedcore.aggregators.fedprox import FedProx
    from fedcore.aggregators.robust import Krum, Median, TrimmedMean
    from fedcore.aggregators.scaffold import Scaffold

__all__ = [
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "LocalAlgorithm",
    "LocalState",
    "Median",
    "Scaffold",
    "ServerOptimizer",
    "TrimmedMean",
]

# Imported on first use (PEP 562): a node and its plan workers read the algorithms' state
# (``_local``) and the one algorithm a round names, not every aggregator.
_HOMES = {
    "LocalAlgorithm": "fedcore.aggregators._local", "LocalState": "fedcore.aggregators._local",
    "Aggregator": "fedcore.aggregators.base", "FedAvg": "fedcore.aggregators.fedavg",
    **dict.fromkeys(("FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer"),
                    "fedcore.aggregators.fedopt"),
    "FedProx": "fedcore.aggregators.fedprox",
    **dict.fromkeys(("Krum", "Median", "TrimmedMean"), "fedcore.aggregators.robust"),
    "Scaffold": "fedcore.aggregators.scaffold",
}

__getattr__, __dir__ = _lazy.exports(__name__, _HOMES, globals(), __all__)
