"""Secure aggregation and differential privacy in real rounds: in-process nodes, real
messages, real node databases. The secure sums are checked against plain rounds run with
the same seeds, and drop-outs are real nodes leaving the federation between two exchanges.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import Experiment, simulate
from fedcore.errors import ConfigurationError, RoundError
from fedcore.privacy import Accountant
from fedcore.secagg import JoyeLibert, PairwiseMasking
from tests._support.faults import DiesBeforeUnmasking

pytest.importorskip("sklearn")
pytest.importorskip("torch")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402
from fedcore_torch import TorchTrainingPlan  # noqa: E402


class Linear(SklearnTrainingPlan):
    estimator = SGDClassifier


class TinyMLP(TorchTrainingPlan):
    def init_model(self):
        import torch
        import torch.nn as nn

        torch.set_num_threads(1)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, data, target):
        import torch.nn.functional as F

        return F.cross_entropy(self.model(data), target)


def _data(seed, n=60):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    return X, (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)


def _federation(n_nodes, dying=(), policy=None):
    fed = simulate.SimulatedFederation()
    for i in range(n_nodes):
        node_id = f"node-{i + 1:02d}"
        if node_id in dying:
            node = DiesBeforeUnmasking(fed.root / node_id, node_id=node_id,
                                       approval_required=False)
            node.start(fed.url)
            fed.nodes.append(node)
        else:
            node = fed.add_node(node_id)
        if policy:
            node.set_policy(**policy)
        node.datasets.add_arrays(f"part-{i}", ["sec"], *_data(i))
    return fed


def _run(plan, n_nodes=3, rounds=2, dying=(), policy=None, **kwargs):
    with _federation(n_nodes, dying, policy) as fed:
        exp = Experiment(plan, tags=["sec"], federation=fed.url, seed=3, progress=False,
                         training_args={"epochs": 1, "batch_size": 16, "lr": 0.1},
                         timeout=30, **kwargs)
        exp.run(rounds)
        return exp


@pytest.mark.parametrize("plan", [Linear, TinyMLP])
def test_masked_rounds_give_the_plain_model(plan):
    plain = _run(plan)
    masked = _run(plan, secagg="masking")
    assert masked.parameters.allclose(plain.parameters, rtol=0, atol=1e-6)
    assert not masked.parameters.equal(_run(plan, rounds=1).parameters)  # it trained
    h = masked.history
    assert set(h["secagg"]) == {"masking"} and set(h["status"]) == {"ok"}
    assert (h["secagg_clipped"] == 0).all()


def test_joye_libert_rounds_give_the_plain_model():
    plain = _run(TinyMLP, rounds=1)
    encrypted = _run(TinyMLP, rounds=1, secagg=JoyeLibert(key_size=512),
                     policy={"secagg_min_key_bits": 512})  # small keys: a test's speed
    assert encrypted.parameters.allclose(plain.parameters, rtol=0, atol=1e-5)
    assert set(encrypted.history["secagg"]) == {"joye-libert"}


def test_masking_survives_nodes_that_leave_before_unmasking_until_too_few_remain(caplog):
    plain = _run(Linear, n_nodes=5, rounds=1)
    for dying in (["node-02"], ["node-02", "node-04"]):
        caplog.clear()
        exp = _run(Linear, n_nodes=5, rounds=1, dying=dying,
                   secagg=PairwiseMasking(threshold=3))
        # Their masked updates arrived before they left: the sum still holds all five.
        assert exp.parameters.allclose(plain.parameters, rtol=0, atol=1e-6), dying
        assert set(exp.history["status"]) == {"ok"}
        named = [r.getMessage() for r in caplog.records if "(unmask)" in r.getMessage()]
        assert sorted(m.split()[3] for m in named) == dying, named
    with pytest.raises(RoundError, match="3") as err:
        _run(Linear, n_nodes=5, rounds=1, dying=["node-01", "node-02", "node-04"],
             secagg=PairwiseMasking(threshold=3))
    assert "node-03" in err.value.failures  # the round failed for the survivors too


def test_secure_aggregation_refuses_aggregators_that_need_updates_in_clear():
    with _federation(1) as fed:
        with pytest.raises(ConfigurationError, match="Median needs each node's update"):
            Experiment(Linear, tags=["sec"], federation=fed.url, aggregator="median",
                       secagg="masking")
        exp = Experiment(Linear, tags=["sec"], federation=fed.url, secagg="masking")
        with pytest.raises(ConfigurationError, match="sum-only aggregator"):
            exp.aggregator = "krum"


def test_update_level_dp_is_reported_per_node_and_round_and_spent_on_the_node(tmp_path):
    privacy = {"mechanism": "update", "clip": 1.0, "noise_multiplier": 2.0, "delta": 1e-5}
    exp = _run(Linear, rounds=3, privacy=privacy, secagg="masking")
    h = exp.history
    assert set(h["privacy"]) == {"update"}
    one = Accountant([(2.0, 1.0, 1)]).epsilon(1e-5)
    assert np.allclose(h["privacy_epsilon"], one)
    totals = h.groupby("round")["privacy_epsilon_total"].first().to_numpy()
    expected = [Accountant([(2.0, 1.0, 1)] * r).epsilon(1e-5) for r in (1, 2, 3)]
    assert np.allclose(totals, expected) and totals[2] > totals[0]
    # The checkpoint keeps the scheme and the privacy settings.
    back = Experiment.load(exp.save(tmp_path / "dp.fedcore"))
    assert back.privacy == exp.privacy and back.secagg.name == "masking"


def test_dp_sgd_on_torch_nodes_reports_the_accountant_epsilon():
    privacy = {"mechanism": "dp-sgd", "clip": 1.0, "noise_multiplier": 1.1}
    exp = _run(TinyMLP, rounds=1, privacy=privacy)
    h = exp.history
    assert set(h["status"]) == {"ok"} and set(h["privacy"]) == {"dp-sgd"}
    # 48 training samples, batches of 16: sample rate 1/3, 3 steps in the epoch.
    assert np.allclose(h["privacy_epsilon"], Accountant([(1.1, 1 / 3, 3)]).epsilon(1e-5))


def test_dp_sgd_on_a_backend_without_it_fails_clearly():
    privacy = {"mechanism": "dp-sgd", "clip": 1.0, "noise_multiplier": 1.1}
    with pytest.raises(RoundError, match="does not support"):
        _run(Linear, rounds=1, privacy=privacy)


@pytest.mark.parametrize("aggregator", ["fedprox", "scaffold"])
def test_dp_sgd_with_a_gradient_correction_is_refused_by_the_node(aggregator):
    # FedProx's term and SCAFFOLD's correction would change the clipped, noised gradients.
    privacy = {"mechanism": "dp-sgd", "clip": 1.0, "noise_multiplier": 1.1}
    with pytest.raises(RoundError, match="cannot be combined with FedProx or SCAFFOLD"):
        _run(TinyMLP, rounds=1, privacy=privacy, aggregator=aggregator)


def test_a_node_budget_refuses_the_round_that_would_cross_it():
    privacy = {"mechanism": "update", "clip": 1.0, "noise_multiplier": 2.0}
    two, three = (Accountant([(2.0, 1.0, 1)] * r).epsilon(1e-5) for r in (2, 3))
    with _federation(2) as fed:
        fed.nodes[0].set_policy(dp_max_epsilon=(two + three) / 2)
        exp = Experiment(Linear, tags=["sec"], federation=fed.url, progress=False,
                         privacy=privacy, training_args={"epochs": 1})
        exp.run(2)
        rows = exp.run_once()  # the third round would cross node-01's budget
        refused = rows.set_index("node").loc["node-01"]
        assert refused["status"] == "failed" and refused["error_kind"] == "governance"
        assert "remains" in refused["error"] and "would exceed" in refused["error"]
        assert rows.set_index("node").loc["node-02", "status"] == "ok"
        spent, _ = fed.nodes[0].ledger.spent(fed.nodes[0].datasets.list()[0]["id"])
        assert spent == pytest.approx(two)


def test_values_clipped_to_the_fixed_point_range_are_counted_and_reported(caplog):
    exp = _run(Linear, rounds=1, secagg=PairwiseMasking(clip=0.01))
    assert (exp.history["secagg_clipped"] > 0).all()
    assert any("clipped to the secure-aggregation range" in r.getMessage()
               for r in caplog.records)
