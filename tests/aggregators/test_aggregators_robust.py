from __future__ import annotations

import numpy as np
import pytest

from fedcore import Experiment, plugins, simulate
from fedcore.aggregators import FedAvg, Krum, Median, TrimmedMean
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet

N_NODES, N_BAD = 10, 2


def _fold(agg, x: ParameterSet, updates: list[ParameterSet], weights=None) -> ParameterSet:
    agg.start(x, 1)
    for i, u in enumerate(updates):
        agg.add(u, (weights or [100.0] * len(updates))[i], f"node-{i:02d}")
    return agg.result()


def _federation_round(attack: str, seed: int = 0):
    """The global model, ten nodes' updates (the first two attacking) and the honest mean.

    Honest nodes move the model by a shared step ``g`` plus noise of 5% of it; attackers
    send ``x + 100 * delta`` (scaled) or ``x - delta`` (sign-flipped) of their own delta.
    """
    rng = np.random.default_rng(seed)
    x = ParameterSet({"w": rng.standard_normal((50, 20)).astype(np.float32),
                      "b": rng.standard_normal(20).astype(np.float32)})
    g = {k: rng.choice([-1.0, 1.0], a.shape) for k, a in x.items()}
    deltas = [{k: g[k] + 0.05 * rng.standard_normal(a.shape) for k, a in x.items()}
              for _ in range(N_NODES)]
    honest = {k: x[k] + np.mean([d[k] for d in deltas[N_BAD:]], axis=0) for k in x}
    factor = {"scaled": 100.0, "sign-flip": -1.0}[attack]
    updates = [ParameterSet({k: (x[k] + (factor if i < N_BAD else 1.0) * d[k]).astype(np.float32)
                             for k in x}) for i, d in enumerate(deltas)]
    return x, updates, honest


def _relative_error(result, honest, x) -> float:
    """Distance to the honest mean, relative to the size of the honest step."""
    num = sum(np.sum((result[k] - honest[k]) ** 2) for k in x)
    den = sum(np.sum((honest[k] - x[k]) ** 2) for k in x)
    return float(np.sqrt(num / den))


@pytest.mark.parametrize("attack", ["scaled", "sign-flip"])
@pytest.mark.parametrize("make", [Median, lambda: TrimmedMean(beta=0.2), lambda: Krum(f=2),
                                  lambda: Krum(f=2, m=5)],
                         ids=["median", "trimmed-mean", "krum", "multi-krum"])
def test_two_attackers_out_of_ten_barely_move_robust_aggregates(make, attack):
    x, updates, honest = _federation_round(attack)
    # The attack works on plain averaging: FedAvg lands far from the honest mean (sign-flip:
    # 0.4 of the honest step; scaled: ~20 times it)...
    assert _relative_error(_fold(FedAvg(), x, updates), honest, x) > 0.3
    # ...while the robust aggregate stays within 10% of the honest step from the honest mean
    # (one honest node's own noise is 5% of it).
    agg = make()
    result = _fold(agg, x, updates)
    assert _relative_error(result, honest, x) < 0.1
    assert all(result[k].dtype == np.float32 for k in result)
    if isinstance(agg, Krum):
        assert len(agg.selected_) == agg.m
        assert not {"node-00", "node-01"} & set(agg.selected_)  # the attackers are left out
        assert min(agg.scores_, key=agg.scores_.get) == agg.selected_[0]


def test_median_and_trimmed_mean_match_numpy_and_ignore_weights(rng):
    x = ParameterSet({"w": np.zeros((7, 3), np.float32), "n": np.array(0, np.int64)})
    for n in (5, 6):  # odd and even counts
        ups = [ParameterSet({"w": rng.standard_normal((7, 3)).astype(np.float32),
                             "n": np.array(10 * i + 1, np.int64)}) for i in range(n)]
        stacked = np.stack([u["w"] for u in ups])
        med = _fold(Median(), x, ups, weights=[1.0, 1e6, 1.0, 1.0, 1.0, 1.0][:n])
        np.testing.assert_allclose(med["w"], np.median(stacked, axis=0), rtol=1e-6)
        assert med["n"].dtype == np.int64 and med["n"] == np.rint(np.median([10 * i + 1 for i in
                                                                            range(n)]))
        trimmed = _fold(TrimmedMean(beta=0.2), x, ups)
        k = int(0.2 * n)
        want = np.sort(stacked.astype(np.float64), axis=0)[k:n - k].mean(axis=0)
        np.testing.assert_allclose(trimmed["w"], want, rtol=1e-6)
        assert trimmed["w"].dtype == np.float32


def test_krum_scores_are_sums_of_squared_distances_to_the_nearest_neighbours():
    # One-dimensional updates: 0, 1, 2, 3 are close together, 10 and -20 are outliers.
    points = [0.0, 1.0, 2.0, 3.0, 10.0, -20.0]
    x = ParameterSet({"w": np.array([5.0]), "steps": np.array(7)})
    ups = [ParameterSet({"w": np.array([p]), "steps": np.array(7 + i)}) for i, p in
           enumerate(points)]
    agg = Krum(f=1, m=2)  # n - f - 2 = 3 nearest neighbours
    result = _fold(agg, x, ups)
    brute = {}
    for i, p in enumerate(points):
        d = sorted((p - q) ** 2 for j, q in enumerate(points) if j != i)
        brute[f"node-{i:02d}"] = sum(d[:3])
    assert agg.scores_ == pytest.approx(brute)
    assert agg.selected_ == ["node-01", "node-02"]  # scores 1+1+4 = 6 each, ties by order
    assert result["w"] == pytest.approx(1.5) and result["steps"] == 8  # (8 + 9) / 2 rounded


def test_bad_input_gets_clear_errors():
    x = ParameterSet({"w": np.zeros(4, np.float32)})
    for agg in (Median(), TrimmedMean(), Krum()):
        agg.start(x, 1)
        with pytest.raises(ValueError, match=r"node 'n1'.*'w' has shape \(5,\); expected \(4,\)"):
            agg.add(ParameterSet({"w": np.zeros(5, np.float32)}), 1.0, "n1")
        with pytest.raises(ValueError, match="node 'n2' has NaN or infinite values in "
                                             "parameter 'w': refused"):
            agg.add(ParameterSet({"w": np.array([0, np.nan, 0, 0], np.float32)}), 1.0, "n2")
        with pytest.raises(ConfigurationError, match="positive"):
            agg.add(ParameterSet({"w": np.zeros(4, np.float32)}), 0.0, "n3")
        with pytest.raises(ConfigurationError, match="called before any update"):
            agg.result()
    ups = [ParameterSet({"w": np.full(4, i, np.float32)}) for i in range(4)]
    with pytest.raises(ConfigurationError, match=r"Krum\(f=1\) needs at least 2f \+ 3 = 5 "
                                                 r"updates .* n = 4 .* allows f <= 0"):
        _fold(Krum(f=1), x, ups)
    with pytest.raises(ConfigurationError, match=r"at most n - f = 4 .* Lower m"):
        _fold(Krum(f=0, m=5), x, ups)
    with pytest.raises(ConfigurationError, match=r"beta=0.5\) would leave nothing"):
        TrimmedMean(beta=0.5)
    with pytest.raises(ConfigurationError, match=r"Expected beta .* \[0, 0.5\)"):
        TrimmedMean(beta=-0.1)
    with pytest.raises(ConfigurationError, match="Expected f to be an integer >= 0. "
                                                 "Received: f=1.5"):
        Krum(f=1.5)
    with pytest.raises(ConfigurationError, match="Received: m=0"):
        Krum(m=0)


def test_registry_names_and_flags():
    for name, cls in [("median", Median), ("trimmed-mean", TrimmedMean), ("krum", Krum)]:
        assert plugins.load("aggregators", name) is cls
        agg = cls()
        assert agg.name == name and not agg.streaming and not agg.sum_only
        assert repr(cls(**agg.get_params())) == repr(agg)
    assert Krum(f=2, m=3).get_params() == {"f": 2, "m": 3}


# --- in a real federation ------------------------------------------------------------------

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class BreastPlan(SklearnTrainingPlan):
    estimator = SGDClassifier


MODEL_ARGS = {"loss": "log_loss", "alpha": 1e-3}
TRAINING_ARGS = {"epochs": 2, "batch_size": 16}


def _experiment(fed, **kwargs):
    return Experiment(BreastPlan, tags=["breast"], federation=fed.url, model_args=MODEL_ARGS,
                      training_args=TRAINING_ARGS, progress=False, evaluate_global=False,
                      evaluate_local=False, **kwargs)


def test_median_by_name_trains_a_federation_and_krum_explains_too_few_nodes(breast_cancer):
    Xtr, Xte, ytr, yte = breast_cancer
    rounds = 6
    with simulate.from_arrays(Xtr, ytr, n_nodes=5, tags=["breast"], seed=1) as fed:
        exp = _experiment(fed, aggregator="median", round_limit=rounds)
        exp.run()
        federated = exp.trained_plan().model.score(Xte, yte)
        exp.close()
        few = _experiment(fed, aggregator=Krum(f=1), nodes=["node-01", "node-02", "node-03"])
        with pytest.raises(ConfigurationError, match=r"2f \+ 3 = 5 .* n = 3 \(node-01, "
                                                     r"node-02, node-03\)"):
            few.run_once()
        assert few.round == 0  # the failed round left the model as it was
        few.close()
    central = SGDClassifier(**MODEL_ARGS, random_state=0)
    rng = np.random.default_rng(0)
    for _ in range(rounds * TRAINING_ARGS["epochs"]):
        order = rng.permutation(len(Xtr))
        for s in range(0, len(Xtr), 16):
            central.partial_fit(Xtr[order[s:s + 16]], ytr[order[s:s + 16]], classes=[0, 1])
    centralized = central.score(Xte, yte)
    # 143 held-out patients (0.7 points each). The median of five models, each trained on a
    # fifth of the data, is not their average: allow 3 patients below the centralized model
    # trained for as many passes over the pooled data.
    assert centralized > 0.9
    assert federated >= centralized - 0.021, (federated, centralized)
