"""A deployment end to end: three real ``fedcore-node start`` processes, each with its own
home made by ``fedcore-node init`` / ``policy set`` / ``dataset add`` and enrolled as a
deployment does it, train an sklearn plan and a small torch plan with the test process as
the researcher, over ws:// and over mqtt:// (a Mosquitto this module starts). The final
parameters must be bit-identical to the same experiments run in one process. Over MQTT the
broker is also killed and restarted between two rounds: the next round completes on every
node once they have reconnected.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torch")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore import Experiment, Node  # noqa: E402
from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402
from fedcore_torch import TorchTrainingPlan  # noqa: E402
from tests._support.deployment import node_processes as _node_processes  # noqa: E402
from tests._support.deployment import write_csv as _csv  # noqa: E402
from tests._support.trust import enroll  # noqa: E402

NODES = ("site-a", "site-b", "site-c")
TAGS = ["deploy-e2e"]


class SGDPlan(SklearnTrainingPlan):
    estimator = SGDClassifier


class TinyMLP(TorchTrainingPlan):
    """4-8-2, one thread so that the arithmetic is the same in every process."""

    def init_model(self):
        import torch
        import torch.nn as nn

        torch.set_num_threads(1)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, data, target):
        import torch.nn.functional as F

        return F.cross_entropy(self.model(data), target)


PLANS = {"sklearn": SGDPlan, "torch": TinyMLP}


def _experiment(plan: str, url: str, enrolled: dict[str, str] | None = None) -> Experiment:
    return Experiment(PLANS[plan], tags=TAGS, federation=url, nodes=list(NODES),
                      model_args={"target": "label"}, seed=7, progress=False,
                      training_args={"epochs": 1, "batch_size": 16, "lr": 0.05},
                      connect_timeout=20, enrolled=enrolled)


def _train(plan: str, url: str, enrolled: dict[str, str] | None = None) -> Experiment:
    exp = _experiment(plan, url, enrolled)
    try:
        exp.run(2)
    finally:
        exp.close()
    return exp


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path], dict[str, str]]:
    """Three node homes set up with the node CLI: (homes, csvs, enrolled keys)."""
    from fedcore_node.cli import main

    root = tmp_path_factory.mktemp("deployment")
    homes = {n: root / n for n in NODES}
    csvs = {n: _csv(root / f"{n}.csv", i) for i, n in enumerate(NODES)}
    for node_id, home in homes.items():
        assert main(["--home", str(home), "init", "--id", node_id]) == 0
        assert main(["--home", str(home), "policy", "set", "approval_required=false"]) == 0
        assert main(["--home", str(home), "dataset", "add", "--name", "cohort", "--tags",
                     TAGS[0], "--path", str(csvs[node_id])]) == 0
    return homes, csvs, enroll(homes)


@pytest.fixture(scope="module")
def reference(deployment, tmp_path_factory) -> dict[str, Experiment]:
    """The same experiments on an in-process federation of the same data."""
    _, csvs, _ = deployment
    root = tmp_path_factory.mktemp("reference")
    hub = f"inproc://deploy-reference-{uuid.uuid4().hex[:8]}"
    nodes = [Node(root / n, node_id=n, approval_required=False) for n in NODES]
    for node in nodes:
        node.datasets.add("cohort", TAGS, csvs[node.node_id])
        node.start(hub)
    try:
        return {plan: _train(plan, hub) for plan in PLANS}
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    pytest.importorskip("paho.mqtt")
    from tests._support.mqtt import Broker

    b = Broker(tmp_path_factory.mktemp("mqtt"), "allow_anonymous true").start()
    yield b
    b.stop()


def _trained(home: Path) -> int:
    return sum(r["event"] == "trained" for r in Node(home).audit_log())


def _assert_same(networked: Experiment, reference: Experiment) -> None:
    assert networked.round == reference.round == 2
    assert networked.parameters is not None and reference.parameters is not None
    assert networked.parameters.equal(reference.parameters), "the weights differ"
    metrics = [c for c in reference.history.columns if c.startswith(("global_", "local_"))]
    assert metrics, "no metrics in the history"
    pd.testing.assert_frame_equal(networked.history[["round", "node", "n_samples", *metrics]],
                                  reference.history[["round", "node", "n_samples", *metrics]])


def _run_both(url: str, deployment, reference) -> None:
    homes, _, enrolled = deployment
    before = {n: _trained(h) for n, h in homes.items()}
    with _node_processes(homes, url):
        results = {plan: _train(plan, url, enrolled) for plan in PLANS}
    for plan, exp in results.items():
        _assert_same(exp, reference[plan])
        assert exp.history["status"].tolist() == ["ok"] * 6
    for node_id, home in homes.items():  # each node audited the 2 x 2 rounds it trained
        assert _trained(home) - before[node_id] == 4


def test_node_processes_over_websockets_train_exactly_as_in_process(deployment, reference):
    pytest.importorskip("websockets")
    from tests._support.net import free_port

    _run_both(f"ws://127.0.0.1:{free_port()}?retry_max=0.5", deployment, reference)


def test_node_processes_over_mqtt_train_exactly_as_in_process(deployment, reference, broker):
    _run_both(f"mqtt://127.0.0.1:{broker.port}/deploy-{uuid.uuid4().hex[:8]}?retry_max=0.5",
              deployment, reference)


def test_a_round_completes_on_every_node_after_the_broker_restarts(deployment, reference,
                                                                   tmp_path):
    pytest.importorskip("paho.mqtt")
    from tests._support.mqtt import Broker

    homes, _, enrolled = deployment
    b = Broker(tmp_path, "allow_anonymous true").start()
    url = f"mqtt://127.0.0.1:{b.port}/restart-{uuid.uuid4().hex[:8]}?retry_max=0.5"
    try:
        with _node_processes(homes, url):
            exp = _experiment("sklearn", url, enrolled)
            try:
                assert exp.run_once()["status"].tolist() == ["ok"] * 3
                b.kill()  # no goodbye to anyone
                b.start()  # same port, same configuration
                deadline = time.monotonic() + 20
                while True:
                    status = exp.node_status().set_index("node")
                    if status["answers"].all():
                        break
                    assert time.monotonic() < deadline, f"not all back:\n{status}"
                    time.sleep(0.2)
                rows = exp.run_once()
            finally:
                exp.close()
    finally:
        b.stop()
    assert rows["status"].tolist() == ["ok"] * 3 and exp.round == 2
    assert rows["node"].tolist() == list(NODES)
    # The broker lost nothing the experiment needed: the result is still the reference's.
    assert exp.parameters is not None
    assert exp.parameters.equal(reference["sklearn"].parameters)
