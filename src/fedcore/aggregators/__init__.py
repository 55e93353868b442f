"""Aggregators fold node updates into the next global ParameterSet."""

from .base import Aggregator
from .fedavg import FedAvg

__all__ = ["Aggregator", "FedAvg"]
