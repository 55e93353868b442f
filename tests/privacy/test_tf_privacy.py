"""TF DP-SGD through tensorflow-privacy, in its own environment (.venv-tfdp).

Every test here is marked `tfdp`: scripts/test.sh runs them with FEDCORE_TFDP=1 in the
environment that has tensorflow-privacy (conftest.py then sets TF_USE_LEGACY_KERAS=1 before
TensorFlow is imported), and the main run deselects them.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

pytestmark = pytest.mark.tfdp

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.data import ArrayDataset  # noqa: E402
from fedcore.errors import RoundError  # noqa: E402
from fedcore.privacy import DEFAULT_ORDERS, Accountant  # noqa: E402
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


#: The Renyi orders of tensorflow-privacy 0.9.0's ``compute_dp_sgd_privacy`` (a local list
#: there). If a release changes them, the exact match below fails and says so.
TFP_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, *range(5, 64), 128, 256, 512]


def _tf_privacy_lib():
    import sys

    sys.skip_tf_privacy_import = True
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib as lib

    return lib


def test_dp_sgd_trains_on_a_node_and_its_epsilon_matches_tensorflow_privacy():
    lib = _tf_privacy_lib()
    X, y = _data()
    z, clip, delta, batch, epochs = 1.1, 1.0, 1e-5, 16, 2
    with simulate.from_arrays(X, y, n_nodes=2, tags=["dp"]) as fed:
        exp = Experiment(SmallKerasPlan, tags=["dp"], federation=fed.url, progress=False,
                         training_args={"epochs": epochs, "batch_size": batch, "lr": 0.1},
                         privacy={"mechanism": "dp-sgd", "noise_multiplier": z,
                                  "clip": clip, "delta": delta},
                         test_ratio=0.0, evaluate_global=False, evaluate_local=False)
        rows = exp.run_once()
        # Under DP the reply withholds training statistics: the steps are the node's count,
        # as charged to its ledger.
        steps_by_node = {node.node_id: node.ledger.events(node.datasets.list()[0]["id"])[0].steps
                         for node in fed.nodes}
    assert set(rows["status"]) == {"ok"}, rows.get("error")

    for row in rows.to_dict("records"):
        n, steps = int(row["n_samples"]), steps_by_node[row["node"]]
        # The steps the node ran are the ones tensorflow-privacy counts for these settings
        # (ceil(epochs * n / batch): the same as the plan's when batch divides n).
        assert n % batch == 0
        assert steps == epochs * n // batch == math.ceil(epochs * n / batch)
        events = [(z, batch / n, steps)]
        theirs, _ = lib.compute_dp_sgd_privacy(n, batch, z, epochs, delta)
        # The same settings, orders included: the same epsilon.
        assert Accountant(events, orders=TFP_ORDERS).epsilon(delta) == pytest.approx(
            theirs, rel=0, abs=1e-6)
        # What the node reported: the same events, over fedcore's default (Opacus's) orders.
        reported = row["privacy_epsilon"]
        assert reported == pytest.approx(Accountant(events).epsilon(delta), rel=1e-12)
        # Two grids of orders over the same RDP curve, each a valid bound: searching both
        # gives the smaller of the two, so the order grid is the whole difference (here
        # 0.25%; up to ~1%, either way, over typical settings).
        both = Accountant(events, orders=[*DEFAULT_ORDERS, *TFP_ORDERS]).epsilon(delta)
        assert both == pytest.approx(min(reported, theirs), rel=1e-12)
        assert reported == pytest.approx(theirs, rel=0.01)


def test_dp_sgd_accounts_for_the_steps_it_ran():
    X, y = _data(165)  # batch 16 does not divide it: the last partial batch is dropped
    z, clip, delta, batch, epochs = 1.1, 1.0, 1e-5, 16, 2
    runs = {}
    for limit in (None, 7):
        plan = SmallKerasPlan({}, {"epochs": epochs, "batch_size": batch},
                              {"categories": {"target": [0, 1, 2]}})
        plan.build(seed=0)
        before = plan.get_parameters().copy()
        dp = DPKerasSGD(z, clip, delta)
        runs[limit] = dp.train(plan, plan.training_data(ArrayDataset(X, y)), epochs=epochs,
                               batch_size=batch, lr=0.1, num_updates=limit)
        (event,) = dp.events()
        assert event == (z, batch / len(X), runs[limit]["steps"])
        assert dp.epsilon() == Accountant([event]).epsilon(delta)
        assert not np.allclose(plan.get_parameters()["1.kernel"], before["1.kernel"])
    # 10 full batches an epoch (tensorflow-privacy's formula would count 21 steps), and
    # num_updates stops training where the node's budget check expects it to.
    assert runs[None]["steps"] == epochs * (len(X) // batch) == 20
    assert runs[7]["steps"] == 7


def test_a_round_that_spent_more_than_its_budget_predicted_is_withheld():
    """The node's budget check predicts Opacus's schedule (rate 1/ceil(n/b), epochs *
    ceil(n/b) steps); TF's fixed batches spend rate b/n for epochs * (n // b) steps, a little
    more when b does not divide n. With a budget between the two, the round passes the
    check, trains, and the node withholds its update rather than cross the budget."""
    from fedcore.privacy import PrivacySpec

    X, y = _data(165)
    z, clip, delta, batch, epochs = 1.1, 1.0, 1e-5, 16, 2
    privacy = {"mechanism": "dp-sgd", "noise_multiplier": z, "clip": clip, "delta": delta}
    args = {"epochs": epochs, "batch_size": batch, "lr": 0.1}
    predicted = Accountant(PrivacySpec.parse(privacy).events(
        n_train=len(X), training_args=args)).epsilon(delta)
    spent = Accountant([(z, batch / len(X), epochs * (len(X) // batch))]).epsilon(delta)
    assert predicted < spent
    with simulate.from_arrays(X, y, n_nodes=1, tags=["dp"]) as fed:
        (node,) = fed.nodes
        node.set_policy(dp_max_epsilon=(predicted + spent) / 2, dp_delta=delta)
        exp = Experiment(SmallKerasPlan, tags=["dp"], federation=fed.url, progress=False,
                         training_args=args, privacy=privacy, test_ratio=0.0,
                         evaluate_global=False, evaluate_local=False)
        with pytest.raises(RoundError, match="spent more than predicted"):
            exp.run_once()
        (entry,) = node.datasets.list()
        assert node.ledger.spent(entry["id"])[0] == 0  # nothing released, nothing spent
        events = [e["event"] for e in node.audit_log()]
    assert "train-refused" in events and "trained" not in events


class SkipsDP(SmallKerasPlan):
    """Trains with the plain loop whatever the request asks, and reports nothing spent."""

    privacy_events: list = []

    def fit(self, dataset, seed):
        return KerasTrainingPlan.fit(self, dataset, seed)


class ReportsNothing(SmallKerasPlan):
    """The standard loop, with a claim of no spending the node never reads."""

    privacy_events = [(1000.0, 1e-6, 1)]


def test_the_node_applies_and_charges_tf_dp_sgd_whatever_the_plan_reports():
    """A Keras plan that overrides fit is refused DP-SGD; one that claims to spend nothing
    is trained by the node's KerasPrivateTraining and charged the node's own count."""
    X, y = _data(160)
    privacy = {"mechanism": "dp-sgd", "noise_multiplier": 1.1, "clip": 1.0, "delta": 1e-5}
    args = {"epochs": 1, "batch_size": 16, "lr": 0.1}
    with simulate.from_arrays(X, y, n_nodes=1, tags=["dp"]) as fed:
        (node,) = fed.nodes
        node.set_policy(dp_max_epsilon=50.0)
        for plan, ok in ((SkipsDP, False), (ReportsNothing, True)):
            exp = Experiment(plan, tags=["dp"], federation=fed.url, progress=False,
                             training_args=args, privacy=privacy, test_ratio=0.0,
                             evaluate_global=False, evaluate_local=False)
            if not ok:
                with pytest.raises(RoundError, match="overrides `fit`"):
                    exp.run_once()
                (entry,) = node.datasets.list()
                assert node.ledger.events(entry["id"]) == []
                continue
            (row,) = exp.run_once().to_dict("records")
            assert row["status"] == "ok"
        assert [list(e) for e in node.ledger.events(entry["id"])] == [[1.1, 16 / 160, 10]]
