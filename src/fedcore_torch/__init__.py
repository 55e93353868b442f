"""PyTorch backend: TorchTrainingPlan, zero-copy tensor <-> numpy, device choice."""

from .plan import TorchTrainingPlan

__all__ = ["TorchTrainingPlan"]
