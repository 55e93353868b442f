"""fedcore: federated learning for biomedical research.

The core imports no ML framework; backends (``fedcore_sklearn``, ``fedcore_torch``) and
transports are plug-ins found through entry points.
"""

from . import simulate
from .aggregators import Aggregator, FedAvg
from .data import ArrayDataset, Dataset, TabularDataset
from .errors import (
    ConfigurationError,
    DatasetError,
    FedcoreError,
    GovernanceError,
    PlanError,
    ProtocolError,
    RoundError,
    TransportError,
)
from .experiment import Experiment
from .node import Node
from .params import ParameterSet
from .plan import PlanBundle, TrainingPlan
from .statistics import FederatedStatistics, Histogram

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "ArrayDataset",
    "ConfigurationError",
    "Dataset",
    "DatasetError",
    "Experiment",
    "FedAvg",
    "FedcoreError",
    "FederatedStatistics",
    "GovernanceError",
    "Histogram",
    "Node",
    "ParameterSet",
    "PlanBundle",
    "PlanError",
    "ProtocolError",
    "RoundError",
    "TabularDataset",
    "TrainingPlan",
    "TransportError",
    "simulate",
    "__version__",
]
