"""PyTorch training plans that several test modules ship to nodes (needs torch)."""

from __future__ import annotations

import torch

from fedcore_torch import TorchTrainingPlan


class TinyMLP(TorchTrainingPlan):
    """A 4-8-2 MLP: a model small enough for Joye-Libert rounds."""

    def init_model(self):
        torch.set_num_threads(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 2))

    def training_step(self, data, target):
        return torch.nn.functional.cross_entropy(self.model(data), target)


class BatchNormMLP(TorchTrainingPlan):
    """A 4-64-2 MLP with BatchNorm: an int64 buffer (``num_batches_tracked``) beside floats."""

    def init_model(self):
        torch.set_num_threads(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.BatchNorm1d(64),
                                   torch.nn.ReLU(), torch.nn.Linear(64, 2))

    def training_step(self, data, target):
        return torch.nn.functional.cross_entropy(self.model(data), target)
