"""PyTorch backend: TorchTrainingPlan, zero-copy tensor <-> numpy, device choice."""

from fedcore_torch.plan import TorchTrainingPlan

__all__ = ["TorchTrainingPlan"]
