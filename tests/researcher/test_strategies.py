"""Node-selection strategies: how much each node's update weighs in the aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import Experiment, simulate
from fedcore.aggregators import FedAvg
from fedcore.errors import ConfigurationError
from fedcore.researcher.strategies import AllNodes, Fraction, Strategy, from_params

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier


class Recording(FedAvg):
    """FedAvg that keeps the updates and weights it was given (to check the arithmetic)."""

    def start(self, global_params, round):
        super().start(global_params, round)
        self.seen = []

    def add(self, update, weight, node="", extras=None):
        super().add(update, weight, node, extras)
        self.seen.append((node, weight, update.copy()))


def _run(strategy):
    rng = np.random.default_rng(0)
    fed = simulate.SimulatedFederation()
    for n in (20, 200):  # one small site, one large one
        X = rng.normal(size=(n, 3))
        fed.add_node().datasets.add_arrays(f"site-{n}", ["w"], X, (X[:, 0] > 0).astype(int))
    agg = Recording()
    with fed:
        exp = Experiment(Plan, tags=["w"], federation=fed.url, aggregator=agg,
                         strategy=strategy, test_ratio=0.0, progress=False,
                         training_args={"epochs": 1, "batch_size": 8})
        exp.run_once()
    return exp, agg


def _mean(agg, weights):
    total = sum(weights)
    return {k: sum(w * u[k] for (_, _, u), w in zip(agg.seen, weights, strict=True)) / total
            for k in agg.seen[0][2]}


def test_uniform_weighting_counts_every_node_alike_and_samples_by_size():
    exp, agg = _run(AllNodes())
    sizes = [w for _, w, _ in agg.seen]
    assert sorted(sizes) == [20.0, 200.0]  # the default: training sample counts
    for k, v in _mean(agg, sizes).items():
        np.testing.assert_allclose(exp.parameters[k], v, rtol=1e-6)

    exp, agg = _run(AllNodes(weighting="uniform"))
    assert [w for _, w, _ in agg.seen] == [1.0, 1.0]
    expected = _mean(agg, [1.0, 1.0])
    for k, v in expected.items():
        np.testing.assert_allclose(exp.parameters[k], v, rtol=1e-6)
    # ...which is not the size-weighted mean: the large site no longer dominates.
    weighted = _mean(agg, sizes)
    assert not all(np.allclose(expected[k], weighted[k]) for k in expected)


def test_weighting_is_configuration_and_survives_a_checkpoint():
    s = Fraction(0.5, seed=3, min_nodes=2, weighting="uniform")
    assert s.get_params()["weighting"] == "uniform"
    assert repr(from_params("Fraction", s.get_params())) == repr(s)
    with pytest.raises(ConfigurationError, match="weighting must be one of"):
        AllNodes(weighting="by-size")


def test_a_custom_strategy_overrides_one_small_method():
    class OnlyLarge(Strategy):
        def select(self, nodes, round):
            return [n for n in nodes if n.endswith("2")]

    exp, agg = _run(OnlyLarge())
    assert len(agg.seen) == 1 and set(exp.history["node"]) == {agg.seen[0][0]}


def test_a_custom_weight_is_refused_with_secure_aggregation_whichever_is_set_first():
    class Sqrt(Strategy):
        def weight(self, node, n_samples):
            return float(n_samples) ** 0.5

    with pytest.raises(ConfigurationError, match=r"overrides weight\(\).*weighting="):
        Experiment(Plan, tags=["t"], federation="inproc://none", strategy=Sqrt(),
                   secagg="masking")
    exp = Experiment(Plan, tags=["t"], federation="inproc://none", strategy=Sqrt())
    with pytest.raises(ConfigurationError, match="sees only the sum"):
        exp.secagg = "masking"
    assert exp.secagg is None  # nothing half-set
    exp = Experiment(Plan, tags=["t"], federation="inproc://none", secagg="masking",
                     strategy=AllNodes(weighting="uniform"))  # the built-in rules are fine
    with pytest.raises(ConfigurationError, match="Sqrt overrides weight"):
        exp.strategy = Sqrt()
    assert type(exp.strategy) is AllNodes
