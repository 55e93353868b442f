"""Federated preprocessing: fitted on federated statistics, shipped with the experiment,
applied on every node before training and evaluation, kept in checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")

from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.linear_model import SGDClassifier  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.data.preprocessing import Preprocessing  # noqa: E402
from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore.researcher.statistics import FederatedStatistics  # noqa: E402
from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class LogisticPlan(SklearnTrainingPlan):
    estimator = SGDClassifier


COLUMNS = [f"f{i}" for i in range(30)]


def _frame() -> pd.DataFrame:
    """Breast-cancer features, raw (scales from 1e-3 to 1e3), with a large offset on one."""
    X, y = load_breast_cancer(return_X_y=True)
    frame = pd.DataFrame(X, columns=COLUMNS)
    frame["f0"] += 1e6  # catastrophic cancellation would show here
    frame["label"] = y
    return frame


def _experiment(fed, preprocessing=None) -> Experiment:
    return Experiment(LogisticPlan, tags=["bc"], federation=fed.url, seed=1,
                      model_args={"target": "label", "loss": "log_loss"},
                      training_args={"epochs": 2}, preprocessing=preprocessing,
                      progress=False)


def test_federated_standardisation_is_the_pooled_one_and_trains_the_central_model(tmp_path):
    frame = _frame()
    X = frame[COLUMNS].to_numpy()
    with simulate.from_dataframe(frame, target="label", n_nodes=4, tags=["bc"],
                                 seed=0) as fed:
        with FederatedStatistics(fed.url, tags=["bc"]) as stats:
            spec = stats.fit_preprocessing(standardize=COLUMNS)
        mean, std = X.mean(axis=0), X.std(axis=0)
        for i, column in enumerate(COLUMNS):
            m, s = spec.standardize[column]
            assert abs(m - mean[i]) <= 1e-9 * max(1.0, abs(mean[i])), column
            assert abs(s - std[i]) <= 1e-9 * max(1.0, std[i]), column
        federated = _experiment(fed, spec)
        federated.run(3)
        federated.close()

    # The same federation with the data standardised centrally, before it was dealt out.
    central = frame.copy()
    central[COLUMNS] = StandardScaler().fit_transform(X)
    with simulate.from_dataframe(central, target="label", n_nodes=4, tags=["bc"],
                                 seed=0) as fed:
        reference = _experiment(fed)
        reference.run(3)
        reference.close()

    def accuracy(exp):
        last = exp.history[exp.history["round"] == 3]
        return float(np.average(last["local_accuracy"], weights=last["n_test"]))

    assert accuracy(reference) > 0.9
    assert abs(accuracy(federated) - accuracy(reference)) <= 0.01
    assert federated.parameters.allclose(reference.parameters, atol=1e-6)


def test_imputation_and_vocabularies_are_applied_on_every_node(tmp_path):
    rng = np.random.default_rng(0)
    n = 240
    frame = pd.DataFrame({"age": rng.normal(60, 10, n),
                          "site": rng.choice(["north", "south", "east"], n),
                          "label": np.arange(n) % 2})
    frame.loc[rng.choice(n, 30, replace=False), "age"] = np.nan
    frame["age"] += frame["label"] * 5
    with simulate.from_dataframe(frame, target="label", n_nodes=3, tags=["t"]) as fed:
        with FederatedStatistics(fed.url, tags=["t"]) as stats:
            spec = stats.fit_preprocessing(standardize=["age"], impute=["age"],
                                           categorical=["site"])
        assert spec.impute["age"] == pytest.approx(frame["age"].mean(), rel=1e-12)
        assert spec.vocabularies["site"] == sorted(["east", "north", "south"])
        out = spec.apply(frame)
        assert not out["age"].isna().any()
        assert set(out["site"]) == {0.0, 1.0, 2.0}
        assert spec.apply(pd.DataFrame({"age": [1.0], "site": ["west"], "label": [0]})
                          )["site"].tolist() == [-1.0]
        # Without the transform, the NaNs and the text column stop every node's round.
        exp = Experiment(LogisticPlan, tags=["t"], federation=fed.url, progress=False,
                         model_args={"target": "label"}, preprocessing=spec,
                         checkpoint_dir=tmp_path / "ckpt")
        assert set(exp.run_once()["status"]) == {"ok"}
        exp.close()
        again = Experiment.load(tmp_path / "ckpt" / "round_0001.fedcore", federation=fed.url)
        assert again.preprocessing == spec
        assert set(again.run_once()["status"]) == {"ok"}
        again.close()


def test_a_node_without_the_column_fails_its_round_with_a_clear_reason():
    frame = pd.DataFrame({"x": np.arange(40.0), "label": np.arange(40) % 2})
    with simulate.from_dataframe(frame, target="label", n_nodes=2, tags=["t"]) as fed:
        exp = Experiment(LogisticPlan, tags=["t"], federation=fed.url, progress=False,
                         model_args={"target": "label"}, strategy=None,
                         preprocessing=Preprocessing(standardize={"bmi": (25.0, 4.0)}))
        with pytest.raises(Exception, match=r"columns \['bmi'\], which this dataset lacks"):
            exp.run_once()
        assert set(exp.history["error_kind"]) == {"dataset"}
        exp.preprocessing = None
        assert set(exp.run_once()["status"]) == {"ok"}  # the nodes kept serving
        exp.close()


@pytest.mark.parametrize("wire, message", [
    ({"standardize": {"x": [0.0, 0.0]}}, "std must be > 0"),
    ({"standardize": {"x": [float("nan"), 1.0]}}, "must be a finite number"),
    ({"impute": {"x": "mean"}}, "must be a finite number"),
    ({"vocabularies": {"x": ["a", "a"]}}, "lists a category twice"),
    ({"code": "import os"}, "Expected preprocessing as"),
])
def test_a_malformed_transform_is_refused(wire, message):
    with pytest.raises(ConfigurationError, match=message):
        Preprocessing.from_wire(wire)


def test_standardisation_fitted_under_secure_aggregation_is_the_pooled_one():
    frame = _frame()[["f0", "f1", "f2", "label"]]
    X = frame[["f0", "f1", "f2"]].to_numpy()
    with simulate.from_dataframe(frame, target="label", n_nodes=3, tags=["bc"]) as fed:
        with FederatedStatistics(fed.url, tags=["bc"], secagg="masking") as stats:
            spec = stats.fit_preprocessing(standardize=["f0", "f1", "f2"])
    for i, column in enumerate(["f0", "f1", "f2"]):
        m, s = spec.standardize[column]
        assert abs(m - X[:, i].mean()) <= 1e-9 * max(1.0, abs(X[:, i].mean())), column
        assert abs(s - X[:, i].std()) <= 1e-9 * max(1.0, X[:, i].std()), column


# --- most-frequent imputation, attacks, plan workers ------------------------------------------


def _cohorts() -> list[pd.DataFrame]:
    """Three hospitals with different sex ratios, a stage column with a level rare everywhere
    (3 per hospital, under min_count 5) and gaps in both."""
    rng = np.random.default_rng(0)
    frames = []
    for i, n in enumerate((180, 250, 320)):
        frame = pd.DataFrame({
            "sex": rng.choice([1, 2], n, p=[0.7 - 0.2 * i, 0.3 + 0.2 * i]).astype(float),
            "stage": np.r_[rng.choice([1, 2], n - 3, p=[0.2, 0.8]), [3, 3, 3]].astype(float),
            "site": f"h{i}",
            "label": np.arange(n) % 2})
        frame.loc[rng.choice(n, 10, replace=False), "sex"] = np.nan
        frame.loc[rng.choice(n - 3, 10, replace=False), "stage"] = np.nan
        frames.append(frame)
    return frames


@pytest.mark.parametrize("secagg", [None, "masking"])
def test_most_frequent_imputation_is_the_pooled_mode(tmp_path, secagg):
    from tests._support.statistics import federation

    frames = _cohorts()
    pooled = pd.concat(frames, ignore_index=True)
    with federation(tmp_path, frames) as fed, FederatedStatistics(
            fed.url, tags=["cohort"], secagg=secagg) as stats:
        # With gaps the columns are floats, which the metadata lists no levels for.
        spec = stats.fit_preprocessing(impute={"sex": "most_frequent",
                                               "stage": "most_frequent"},
                                       levels={"sex": [1, 2], "stage": [1, 2, 3]})
    # Hospital 1's majority (sex 1) is not the pooled one: the pooled counts decide.
    assert frames[0]["sex"].mode()[0] == 1.0
    assert spec.impute == {"sex": pooled["sex"].mode()[0], "stage": 2}
    assert spec.impute["sex"] == 2
    out = spec.apply(pooled)
    assert not out[["sex", "stage"]].isna().any().any()


def test_most_frequent_imputation_refuses_what_it_cannot_count(tmp_path):
    from tests._support.statistics import federation

    frames = [f.assign(bmi=np.linspace(18, 35, len(f))) for f in _cohorts()]
    with federation(tmp_path, frames) as fed, FederatedStatistics(
            fed.url, tags=["cohort"]) as stats:
        with pytest.raises(ConfigurationError, match="impute maps columns to one of"):
            stats.fit_preprocessing(impute={"sex": "median"})
        with pytest.raises(ConfigurationError, match=r"'sex'.*lists no levels.*levels="):
            stats.fit_preprocessing(impute={"sex": "most_frequent"})
        with pytest.raises(ConfigurationError, match="'site'.*levels are text"):
            stats.fit_preprocessing(impute={"site": "most_frequent"})


class _Crafted:
    """What a crafted, correctly signed request could carry in place of a fitted transform."""

    def to_wire(self):
        return {"standardize": {"f0": "__import__('os').system('touch /tmp/x')"}}


def test_a_crafted_transform_fails_the_round_on_the_node_and_it_serves_on():
    frame = _frame()[["f0", "f1", "label"]]
    with simulate.from_dataframe(frame, target="label", n_nodes=2, tags=["bc"]) as fed:
        exp = _experiment(fed)
        with pytest.raises(ConfigurationError, match="Expected a Preprocessing"):
            exp.preprocessing = _Crafted()  # the researcher's side checks it...
        exp._preprocessing = _Crafted()  # ...which an attacker skips: the nodes check it
        with pytest.raises(Exception, match=r"standardize\['f0'\]"):
            exp.run_once()
        assert len(exp.history) == 2 and set(exp.history["status"]) != {"ok"}
        exp._preprocessing = None
        assert set(exp.run_once()["status"]) == {"ok"}  # the nodes kept serving
        exp.close()


class _AssertStandardizedPlan(SklearnTrainingPlan):
    """Fails the round unless the node handed it standardised columns."""

    estimator = SGDClassifier

    def training_data(self, dataset):
        X, y = super().training_data(dataset)
        if np.abs(X.mean(axis=0)).max() > 0.5 or np.abs(X).max() > 50:
            raise AssertionError("raw columns reached the plan")
        return X, y


def test_a_node_running_plans_in_a_worker_process_applies_it_too():
    frame = _frame()[["f0", "f1", "f2", "label"]]
    with simulate.from_dataframe(frame, target="label", n_nodes=2, tags=["bc"]) as fed:
        fed.nodes[1].set_policy(plan_isolation="process")  # as deployed nodes run plans
        assert fed.nodes[1].plan_isolation == "process"
        with FederatedStatistics(fed.url, tags=["bc"]) as stats:
            spec = stats.fit_preprocessing(standardize=["f0", "f1", "f2"])
        exp = Experiment(_AssertStandardizedPlan, tags=["bc"], federation=fed.url,
                         model_args={"target": "label", "loss": "log_loss"},
                         progress=False)
        with pytest.raises(Exception, match="raw columns reached the plan"):
            exp.run_once()
        assert set(exp.history["node"]) == {"node-01", "node-02"}
        assert set(exp.history["status"]) != {"ok"}
        exp.preprocessing = spec
        assert set(exp.run_once()["status"]) == {"ok"}
        exp.close()
