"""fedcore: federated learning for biomedical research.

The core imports no ML framework; backends (``fedcore_sklearn``, ``fedcore_torch``) and
transports are plug-ins found through entry points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcore import _lazy

if TYPE_CHECKING:
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

# Each public name is imported on first use (PEP 562): a node daemon imports
# ``fedcore.errors`` and the node runtime, not the researcher side, pandas or the simulator
# (~1.5 s of imports it would never use before connecting).
_HOMES = {
    "Aggregator": "fedcore.aggregators", "FedAvg": "fedcore.aggregators",
    "ArrayDataset": "fedcore.data", "Dataset": "fedcore.data", "TabularDataset": "fedcore.data",
    **dict.fromkeys(("ConfigurationError", "DatasetError", "FedcoreError", "GovernanceError",
                     "PlanError", "ProtocolError", "RoundError", "TransportError"),
                    "fedcore.errors"),
    "Node": "fedcore.node", "ParameterSet": "fedcore.params",
    "PlanBundle": "fedcore.plan", "TrainingPlan": "fedcore.plan",
    **dict.fromkeys(("Experiment", "FederatedStatistics", "Federation", "Histogram"),
                    "fedcore.researcher"),
}

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


__getattr__, __dir__ = _lazy.exports(__name__, _HOMES, globals(), __all__)
