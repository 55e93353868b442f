"""fedcore: federated learning for biomedical research.

The core imports no ML framework; backends (``fedcore_sklearn``, ``fedcore_torch``) and
transports are plug-ins found through entry points.
"""

from fedcore import simulate
from fedcore.aggregators import Aggregator, FedAvg
from fedcore.data import ArrayDataset, Dataset, TabularDataset
from fedcore.errors import (
    ConfigurationError,
    DatasetError,
    FedcoreError,
    GovernanceError,
    PlanError,
    ProtocolError,
    RoundError,
    TransportError,
)
from fedcore.node import Node
from fedcore.params import ParameterSet
from fedcore.plan import PlanBundle, TrainingPlan
from fedcore.researcher import Experiment, FederatedStatistics, Federation, Histogram

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
    "Federation",
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
