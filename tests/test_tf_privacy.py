"""TF DP-SGD through tensorflow-privacy, in its own environment (.venv-tfdp).

Every test here is marked `tfdp`: scripts/test.sh runs them with FEDCORE_TFDP=1 in the
environment that has tensorflow-privacy (conftest.py then sets TF_USE_LEGACY_KERAS=1 before
TensorFlow is imported), and the main run deselects them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.tfdp

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.privacy import Accountant  # noqa: E402
from fedcore_tf import KerasTrainingPlan  # noqa: E402
from fedcore_tf.privacy import DPKerasSGD  # noqa: E402


class SmallKerasPlan(KerasTrainingPlan):
    def init_model(self):
        return tf.keras.Sequential([tf.keras.Input((8,)),
                                    tf.keras.layers.Dense(16, activation="relu"),
                                    tf.keras.layers.Dense(3)])


def _data(n=320):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    return rng.normal(size=(n, 8)) + y[:, None], y


def test_the_tfdp_process_runs_keras_2():
    assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
    assert tf.keras.__name__.startswith("tf_keras") or tf.keras.__version__.startswith("2.")


def test_dp_sgd_trains_on_a_node_and_its_epsilon_matches_tensorflow_privacy():
    import sys

    sys.skip_tf_privacy_import = True
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib as lib

    X, y = _data()
    z, clip, delta, batch, epochs = 1.1, 1.0, 1e-5, 16, 2
    with simulate.from_arrays(X, y, n_nodes=2, tags=["dp"]) as fed:
        exp = Experiment(SmallKerasPlan, tags=["dp"], federation=fed.url, progress=False,
                         training_args={"epochs": epochs, "batch_size": batch, "lr": 0.1},
                         privacy={"mechanism": "dp-sgd", "noise_multiplier": z,
                                  "clip": clip, "delta": delta},
                         test_ratio=0.0, evaluate_global=False, evaluate_local=False)
        rows = exp.run_once()
    assert set(rows["status"]) == {"ok"}, rows.get("error")

    # One node's round, with the node's own sample count: its events and epsilon.
    n = int(rows["n_samples"].iloc[0])
    assert n % batch == 0  # tensorflow-privacy counts ceil(epochs * n / batch) steps
    dp = DPKerasSGD(z, clip, delta)
    plan = SmallKerasPlan({}, {"epochs": epochs, "batch_size": batch},
                          {"categories": {"target": [0, 1, 2]}})
    plan.build(seed=0)
    from fedcore.data import ArrayDataset

    stats = dp.train(plan, plan.training_data(ArrayDataset(X[:n], y[:n])), epochs=epochs,
                     batch_size=batch, lr=0.1)
    assert stats["steps"] == epochs * (n // batch)
    (event,) = dp.events()
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (
        z, batch / n, epochs * (n // batch))
    ours = Accountant(dp.events()).epsilon(delta)
    theirs = _tf_privacy_epsilon(lib, n, batch, z, epochs, delta)
    assert ours == pytest.approx(theirs, rel=0.02), (ours, theirs)


def _tf_privacy_epsilon(lib, n, batch, z, epochs, delta):
    """tensorflow-privacy's own RDP epsilon for DP-SGD with these settings."""
    if hasattr(lib, "compute_dp_sgd_privacy"):
        eps, _ = lib.compute_dp_sgd_privacy(n, batch, z, epochs, delta)
        return float(eps)
    return float(lib._compute_dp_sgd_example_privacy(
        num_epochs=epochs, noise_multiplier=z, example_delta=delta,
        used_microbatching=False, poisson_subsampling_probability=batch / n))
