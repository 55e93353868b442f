"""One real node process serves torch, Keras and JAX plans in one session, one after the
other, without restarting (each framework is imported once, when its first plan arrives)."""

from __future__ import annotations

import importlib.util

import pytest

from fedcore import Experiment, Node
from tests._support.deployment import node_processes, write_csv
from tests._support.trust import enroll

pytestmark = pytest.mark.slow

for _module in ("websockets", "torch", "tensorflow", "jax", "optax"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed", allow_module_level=True)

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

from fedcore_jax import JaxTrainingPlan, mlp  # noqa: E402
from fedcore_tf import KerasTrainingPlan  # noqa: E402
from fedcore_torch import TorchTrainingPlan  # noqa: E402


class TorchPlan(TorchTrainingPlan):
    def init_model(self):
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 2))

    def training_step(self, data, target):
        return torch.nn.functional.cross_entropy(self.model(data), target)


class KerasPlan(KerasTrainingPlan):
    def init_model(self):
        return tf.keras.Sequential([tf.keras.Input((4,)),
                                    tf.keras.layers.Dense(8, activation="relu"),
                                    tf.keras.layers.Dense(2)])


class JaxPlan(JaxTrainingPlan):
    def init_model(self):
        return mlp([4, 8, 2], self.key)


def test_one_node_process_serves_torch_keras_and_jax_plans(tmp_path):
    from fedcore_node.cli import main
    from tests._support.net import free_port

    assert jax.__version__  # imported here only to check the environment has it
    home = tmp_path / "site-a"
    csv = write_csv(tmp_path / "site-a.csv", seed=0)
    assert main(["--home", str(home), "init", "--id", "site-a"]) == 0
    assert main(["--home", str(home), "policy", "set", "approval_required=false"]) == 0
    assert main(["--home", str(home), "dataset", "add", "--name", "cohort", "--tags", "all3",
                 "--path", str(csv)]) == 0
    enrolled = enroll({"site-a": home})
    url = f"ws://127.0.0.1:{free_port()}?retry_max=0.5"
    with node_processes({"site-a": home}, url) as procs:
        pid = procs["site-a"].pid
        for plan in (TorchPlan, KerasPlan, JaxPlan):
            with Experiment(plan, tags=["all3"], federation=url, nodes=["site-a"],
                            model_args={"target": "label"}, progress=False,
                            training_args={"epochs": 1, "batch_size": 16, "lr": 0.05},
                            connect_timeout=30, enrolled=enrolled) as exp:
                rows = exp.run_once()
            assert rows["status"].tolist() == ["ok"], (plan.__name__, rows.to_dict("records"))
            assert rows["n_samples"].iloc[0] > 0 and rows["local_accuracy"].notna().all()
        assert procs["site-a"].poll() is None and procs["site-a"].pid == pid
    trained = [r for r in Node(home).audit_log() if r["event"] == "trained"]
    assert len(trained) == 3  # one round of each plan, all in the one process
