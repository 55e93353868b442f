"""Simulated nodes of one process each run the plan in a class of their own.

A plan's code that another node of the process ran already is loaded again for each node
(its own module, its own class), and it is found by the SHA-256 the node computes from the
files it received: a crafted but correctly signed request that names that hash over other
files gets neither the other node's class nor its code run.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedcore import Experiment, simulate
from fedcore.data import ArrayDataset
from fedcore.plan import PlanBundle
from fedcore.plan import bundle as bundle_module
from fedcore.wire.identity import Identity
from fedcore.wire.messages import ErrorReply, TrainReply, TrainRequest
from tests._support.attack import Attacker, serve

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class Counting(SklearnTrainingPlan):
    """Keeps, in its class, the size of every dataset it trained on and where it loaded."""

    estimator = SGDClassifier
    LOADED_ON = threading.current_thread().name  # runs when the node loads the plan
    SEEN: list = []

    def training_data(self, dataset):
        type(self).SEEN.append(len(dataset))
        return super().training_data(dataset)


def _data(n):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, 4))
    return X, (X[:, 0] > 0).astype(np.int64)


def test_nodes_of_one_process_keep_a_plan_class_each_and_load_the_first_off_the_loop(
        tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_module, "_COMPILED", {})  # the plan never ran in this process
    sizes = {"site-0": 40, "site-1": 50, "site-2": 30}
    with simulate.SimulatedFederation(root=tmp_path) as fed:
        for name, n in sizes.items():
            fed.add_node(name).datasets.add_arrays(name, ["t"], *_data(n))
        exp = Experiment(Counting, tags=["t"], federation=fed.url, progress=False,
                         test_ratio=0.0, model_args={"loss": "log_loss"},
                         training_args={"epochs": 1, "batch_size": 16})
        exp.run_once()
        exp.run_once()
        sha = exp.plan_hash
        exp.close()
        classes = {node.node_id: node._plans[sha] for node in fed.nodes}
    assert len({id(c) for c in classes.values()}) == 3  # a class each...
    assert len({c.__module__ for c in classes.values()}) == 1  # ...from the same shipped code
    assert len({id(vars(c)["SEEN"]) for c in classes.values()}) == 3
    for name, cls in classes.items():
        assert cls.SEEN == [sizes[name]] * 2  # its own two rounds, nobody else's
    # The first load may import the plan's framework: it ran off the nodes' loop.
    assert any(c.LOADED_ON != "fedcore-runtime" for c in classes.values())


def _plan_source(tag: str, extra: str = "") -> str:
    return ("from sklearn.linear_model import SGDClassifier\n"
            "from fedcore_sklearn import SklearnTrainingPlan\n\n\n"
            "class Tagged(SklearnTrainingPlan):\n"
            "    estimator = SGDClassifier\n"
            f"    TAG = {tag!r}\n{extra}")


def test_a_crafted_request_naming_a_plan_that_ran_gets_neither_its_class_nor_runs(tmp_path):
    key = tmp_path / "alice.key"
    Identity(key)
    url, node = serve(tmp_path / "site", "site", trusted={"alice": key}, approval_required=False)
    node.set_policy(plan_isolation="none")  # plans run in this process, as when simulated
    X, y = _data(30)
    ds = node.datasets.add_arrays("d", ["t"], X, y)["id"]
    info = {**ArrayDataset(X, y).metadata(), "categories": {"target": [0, 1]}}
    start = Counting({"loss": "log_loss"}, {}, info)  # the same estimator: the model's layout
    start.build(seed=0)
    marker = tmp_path / "forged-code-ran"
    honest = PlanBundle({"plan.py": _plan_source(str(tmp_path))}, "Tagged", "sklearn")
    forged = PlanBundle({"plan.py": _plan_source(
        "forged", f"    open({str(marker)!r}, 'w').close()\n")}, "Tagged", "sklearn")
    other = PlanBundle({"plan.py": _plan_source("other")}, "Tagged", "sklearn")

    rounds = iter(range(1, 10))

    def train(plan):
        body = TrainRequest(plan=plan, params=start.get_parameters(), dataset_id=ds,
                            model_args={"loss": "log_loss"}, data_info=info,
                            training_args={"epochs": 1})
        return attacker.ask("site", body, sender="alice", round=next(rounds)).body

    try:
        with Attacker(url, {"site": node.identity.public_bytes}, key=key) as attacker:
            assert isinstance(train(honest.to_wire()), TrainReply)
            assert honest.ran_before  # this process ran it: the next load stays on the loop
            # The honest plan's hash over other files: refused, and the code never runs.
            reply = train({**forged.to_wire(), "sha256": honest.sha256})
            assert isinstance(reply, ErrorReply) and reply.kind == "governance"
            assert f"do not match its declared hash {honest.sha256}" in reply.message
            assert not marker.exists() and not forged.ran_before
            # Another plan with the same class name gets its own code, not the honest one's.
            assert isinstance(train(other.to_wire()), TrainReply)
    finally:
        node.stop()
    assert node._plans[honest.sha256].TAG == str(tmp_path)
    assert node._plans[other.sha256].TAG == "other"
    assert forged.sha256 not in node._plans and not marker.exists()
