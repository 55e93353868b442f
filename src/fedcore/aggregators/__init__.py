"""Aggregators fold node updates into the next global ParameterSet."""

from fedcore.aggregators._local import LocalAlgorithm, LocalState
from fedcore.aggregators.base import Aggregator
from fedcore.aggregators.fedavg import FedAvg
from fedcore.aggregators.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
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
