"""A PyTorch plan on four simulated hospitals with skewed labels (8x8 handwritten digits).

scikit-learn's bundled digits (1,797 images, 10 classes, no download) are dealt to four
hospitals with a Dirichlet label skew, so each hospital sees some digits much more than
others. A small multilayer perceptron is trained with FedAvg; the model's size comes from
``model_args`` and its input and output sizes from ``data_info``, the merged metadata of
the hospitals' datasets.

Needs ``fedcore[torch]`` (the dev environment of ``make test`` has it):
``.venv/bin/python examples/torch_digits.py``.
"""

import argparse
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fedcore
from fedcore_torch import TorchTrainingPlan


class DigitsPlan(TorchTrainingPlan):
    """An MLP whose hidden width is a model_arg; Adam with training_args['lr']."""

    def init_model(self) -> nn.Module:
        n_in = math.prod(self.data_info["feature_shape"])  # [64] for 8x8 images
        n_out = len(self.data_info["categories"]["target"])  # the 10 digits, over all nodes
        hidden = int(self.model_args.get("hidden", 64))
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_out))

    def init_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(),
                                lr=float(self.training_args.get("lr", 1e-3)))

    def training_data(self, dataset):
        X, y = super().training_data(dataset)  # float32 features, int64 labels
        return X / 16.0, y  # pixel intensities are 0..16

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(data), target)

    def testing_step(self, data: torch.Tensor, target: torch.Tensor):
        return target, self.model(data).argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet label skew: small is very skewed, large is near IID")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny model: threads cost more than they bring

    X, y = load_digits(return_X_y=True)
    X_pool, X_test, y_pool, y_test = train_test_split(
        X, y, test_size=0.2, stratify=y, random_state=args.seed)

    with fedcore.simulate.from_arrays(X_pool, y_pool, n_nodes=args.hospitals, tags=["digits"],
                                      scheme="dirichlet", alpha=args.alpha,
                                      seed=args.seed) as fed:
        exp = fedcore.Experiment(
            DigitsPlan, tags=["digits"], federation=fed.url, model_args={"hidden": 64},
            training_args={"epochs": 2, "batch_size": 32, "lr": 3e-3},
            round_limit=args.rounds, seed=args.seed, name="digits",
        )
        for node in fed.nodes:
            _, labels = node.datasets.load(node.datasets.list()[0]["id"]).arrays()
            counts = np.bincount(labels, minlength=10)
            print(f"{node.node_id}: {len(labels):4d} images, per digit {counts.tolist()}")
        exp.run()
        plan = exp.trained_plan()

    print(exp.metrics("global")[["round", "nodes", "accuracy", "f1"]].to_string(
        index=False, float_format="{:.4f}".format))
    plan.model.eval()
    with torch.no_grad():
        logits = plan.model(torch.as_tensor(X_test / 16.0, dtype=torch.float32))
    accuracy = float((logits.argmax(dim=1).numpy() == y_test).mean())
    print(f"held-out images:    {len(y_test)}")
    print(f"federated accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
