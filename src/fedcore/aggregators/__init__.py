"""Aggregators fold node updates into the next global ParameterSet."""

from ._local import LocalAlgorithm, LocalState
from .base import Aggregator
from .fedavg import FedAvg
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from .fedprox import FedProx
from .robust import Krum, Median, TrimmedMean
from .scaffold import Scaffold

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
