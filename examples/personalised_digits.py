"""Personalised models on label-skewed hospitals: FedPer and FedBN against FedAvg.

scikit-learn's bundled digits (1,797 images, 10 classes, no download) are dealt to 20
simulated hospitals with a Dirichlet(0.1) label skew: each hospital sees mostly one or two
digits. Three experiments train the same network on the same federation:

- FedAvg: every parameter is shared;
- FedPer: the classifier head stays on each hospital (``local_parameters = ("head.*",)``);
- FedBN: the batch-norm layer (weights and running statistics) stays on each hospital
  (``local_parameters = ("norm.*",)``).

Each is scored on every hospital's own test split, with the model that hospital ends with
(the shared parameters and, for FedPer and FedBN, its own local ones), weighted by the
test split's size. The local parameters never leave a hospital. A last step fine-tunes the
FedAvg model on each hospital for two more epochs (``Experiment.fine_tune``), also scored
locally.

Needs ``fedcore[torch]``: ``.venv/bin/python examples/personalised_digits.py``. Prints one
line per method and, last, the scores as JSON.
"""

import argparse
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import fedcore
from fedcore_torch import TorchTrainingPlan


class Net(nn.Module):
    """64 pixels -> hidden (batch-normed) -> 10 digits."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.body = nn.Linear(n_in, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.training and len(h) == 1:  # a batch of one: normalise by the running stats
            self.norm.eval()
            h = self.norm(h)
            self.norm.train()
        else:
            h = self.norm(h)
        return self.head(F.relu(h))


class SharedPlan(TorchTrainingPlan):
    """FedAvg: every parameter is shared."""

    def init_model(self) -> nn.Module:
        torch.set_num_threads(1)
        return Net(64, int(self.model_args.get("hidden", 32)),
                   len(self.data_info["categories"]["target"]))

    def init_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.training.lr)

    def training_data(self, dataset):
        X, y = super().training_data(dataset)
        return X / 16.0, y

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(data), target)


class FedPerPlan(SharedPlan):
    """FedPer: each hospital keeps its own classifier head."""

    local_parameters = ("head.*",)


class FedBNPlan(SharedPlan):
    """FedBN: each hospital keeps its own batch-norm weights and statistics."""

    local_parameters = ("norm.*",)


def local_accuracy(rows) -> float:
    """Accuracy on the hospitals' own test splits, weighted by their sizes."""
    return float(np.average(rows["global_accuracy"], weights=rows["n_test"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    X, y = load_digits(return_X_y=True)
    scores = {}
    with fedcore.simulate.from_arrays(X, y, n_nodes=args.hospitals, tags=["digits"],
                                      scheme="dirichlet", alpha=args.alpha,
                                      seed=args.seed) as fed:
        for name, plan in [("fedavg", SharedPlan), ("fedper", FedPerPlan),
                           ("fedbn", FedBNPlan)]:
            exp = fedcore.Experiment(plan, tags=["digits"], federation=fed.url,
                                     training_args={"epochs": 2, "batch_size": 16,
                                                    "lr": 0.01},
                                     test_ratio=0.3, seed=args.seed, progress=False,
                                     evaluate_local=False)
            exp.run(args.rounds)
            # One more round evaluates, on each hospital's test split, the model it ends
            # the federation with (scored before that round's training).
            scores[name] = local_accuracy(exp.run_once())
            print(f"{name:<8} accuracy on the hospitals' own test splits: "
                  f"{scores[name]:.4f}")
            if name == "fedavg":
                tuned = exp.fine_tune(epochs=2)
                scores["fedavg+fine-tune"] = float(np.average(tuned["local_accuracy"],
                                                              weights=tuned["n_test"]))
                print(f"{'+ fine-tune':<8} accuracy after 2 local epochs:               "
                      f"{scores['fedavg+fine-tune']:.4f}")
            exp.close()
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
