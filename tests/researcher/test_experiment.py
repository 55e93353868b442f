from __future__ import annotations

import asyncio
import logging

import numpy as np
import pandas as pd
import pytest

from fedcore import Experiment, simulate
from fedcore.errors import ConfigurationError, DatasetError, RoundError
from fedcore.wire import codec
from fedcore.wire.messages import Checkpoint, Envelope

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier, SGDRegressor  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class BreastPlan(SklearnTrainingPlan):
    estimator = SGDClassifier


MODEL_ARGS = {"loss": "log_loss", "alpha": 1e-3}
TRAINING_ARGS = {"epochs": 2, "batch_size": 16}


def _experiment(fed, **kwargs):
    args = dict(tags=["breast"], federation=fed.url, model_args=MODEL_ARGS,
                training_args=TRAINING_ARGS, progress=False)
    args.update(kwargs)
    return Experiment(BreastPlan, **args)


def test_sklearn_federation_matches_a_centralized_model(breast_cancer):
    Xtr, Xte, ytr, yte = breast_cancer
    rounds, epochs = 10, 2
    with simulate.from_arrays(Xtr, ytr, n_nodes=3, tags=["breast"], seed=1) as fed:
        exp = _experiment(fed, round_limit=rounds, test_ratio=0.1)
        exp.run()
        federated = exp.trained_plan().model.score(Xte, yte)
    # Centralized: the same estimator, the same number of passes over the pooled data.
    central = SGDClassifier(**MODEL_ARGS, random_state=0)
    rng = np.random.default_rng(0)
    for _ in range(rounds * epochs):
        order = rng.permutation(len(Xtr))
        for s in range(0, len(Xtr), 16):
            central.partial_fit(Xtr[order[s:s + 16]], ytr[order[s:s + 16]], classes=[0, 1])
    centralized = central.score(Xte, yte)
    assert centralized > 0.9
    assert federated >= centralized - 0.02, (federated, centralized)
    h = exp.history
    assert len(h) == rounds * 3 and set(h["status"]) == {"ok"}
    assert {"round", "node", "n_samples", "global_accuracy", "local_f1", "train_s",
            "round_trip_s"} <= set(h.columns)
    assert h.groupby("round")["n_samples"].sum().iloc[0] == pytest.approx(0.9 * len(Xtr), abs=3)
    m = exp.metrics()
    assert list(m["round"]) == list(range(1, rounds + 1))
    assert m["accuracy"].iloc[-1] > 0.9  # the global model, judged on the nodes' test splits


def test_search_lists_datasets_and_unknown_tags_list_what_nodes_have(breast_cancer):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr, ytr, n_nodes=2, tags=["breast", "2024"]) as fed:
        found = _experiment(fed).search()
        assert list(found["node"]) == ["node-01", "node-02"]
        assert found["n_samples"].sum() == len(Xtr)
        assert "path" not in str(found.to_dict())
        with pytest.raises(DatasetError, match=r"Tags the nodes have: node-01: \['2024', "
                                               r"'breast'\]; node-02"):
            _experiment(fed, tags=["lung"]).search()


def test_node_filter_restricts_and_checks_nodes(breast_cancer):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr, ytr, n_nodes=3, tags=["breast"]) as fed:
        exp = _experiment(fed, nodes=["node-02"])
        exp.run_once()
        assert set(exp.history["node"]) == {"node-02"}
        with pytest.raises(ConfigurationError, match=r"Nodes \['node-09'\] are not connected"):
            _experiment(fed, nodes=["node-09"], connect_timeout=0.2).search()


def test_resume_from_a_checkpoint_is_bit_identical(breast_cancer, tmp_path):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr, ytr, n_nodes=3, tags=["breast"]) as fed:
        straight = _experiment(fed, round_limit=6, seed=7)
        straight.run()
        first = _experiment(fed, round_limit=6, seed=7, checkpoint_dir=tmp_path / "ckpt")
        first.run(3)
        first.close()
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
            "round_0001.fedcore", "round_0002.fedcore", "round_0003.fedcore"]
        resumed = Experiment.load(tmp_path / "ckpt", progress=False)  # newest checkpoint
        assert resumed.round == 3 and len(resumed.history) == 9
        resumed.run()
        assert resumed.round == 6
        assert len(list((tmp_path / "ckpt").iterdir())) == 6  # it keeps checkpointing
    assert resumed.parameters.equal(straight.parameters)
    assert not resumed.parameters.equal(first.parameters)
    assert resumed.plan_hash == straight.plan_hash


def test_save_is_atomic_and_load_explains_bad_files(breast_cancer, tmp_path):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr, ytr, n_nodes=2, tags=["breast"]) as fed:
        exp = _experiment(fed)
        exp.run_once()
        path = exp.save(tmp_path / "exp.fedcore")
    assert [p.name for p in tmp_path.iterdir()] == ["exp.fedcore"]  # no temporary left
    (tmp_path / "junk.fedcore").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigurationError, match="not a readable fedcore checkpoint"):
        Experiment.load(tmp_path / "junk.fedcore")
    with pytest.raises(ConfigurationError, match="No checkpoint"):
        Experiment.load(tmp_path / "missing.fedcore")
    # A checkpoint from another fedcore version names both formats.
    body = codec.decode(path.read_bytes()).body
    future = Checkpoint(state={**body.state, "format": 99}, params=body.params,
                        history=body.history, aggregator_state=body.aggregator_state)
    (tmp_path / "future.fedcore").write_bytes(codec.encode(Envelope(body=future)))
    with pytest.raises(ConfigurationError, match="format 99; this fedcore reads format 1"):
        Experiment.load(tmp_path / "future.fedcore")
    assert Experiment.load(path).parameters.equal(exp.parameters)


def test_the_experiment_runs_inside_a_running_event_loop(breast_cancer):
    Xtr, _, ytr, _ = breast_cancer

    async def notebook_cell(fed):
        assert asyncio.get_running_loop().is_running()
        exp = _experiment(fed)
        exp.run(2)  # the synchronous API, as typed in a Jupyter cell
        await exp.arun_once()  # and its async twin
        return exp

    with simulate.from_arrays(Xtr, ytr, n_nodes=2, tags=["breast"]) as fed:
        exp = asyncio.run(notebook_cell(fed))
    assert exp.round == 3 and len(exp.history) == 6


def test_run_shows_each_rounds_nodes_and_metric_in_its_bar(breast_cancer, capsys):
    """run() builds no frame per round for a hidden bar; a shown one still gets its postfix."""
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr, ytr, n_nodes=2, tags=["breast"]) as fed:
        exp = _experiment(fed, progress=True, test_ratio=0.2)
        history = exp.run(2)
        shown = capsys.readouterr().err
        exp.progress = False
        exp.run(1)
        hidden = capsys.readouterr().err
        once = exp.run_once()
    assert "2/2" in shown and "nodes=2/2" in shown and "accuracy=" in shown
    assert hidden == ""
    pd.testing.assert_frame_equal(history, exp.history.iloc[:4])
    pd.testing.assert_frame_equal(once, exp.history.iloc[6:].reset_index(drop=True))
    assert list(exp.history["round"]) == [1, 1, 2, 2, 3, 3, 4, 4]


def test_hyperparameters_change_between_rounds(breast_cancer):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr, ytr, n_nodes=2, tags=["breast"]) as fed:
        exp = _experiment(fed, round_limit=3)
        exp.run_once()
        exp.training_args = {"epochs": 1, "batch_size": 1000}
        exp.run_once()
        h = exp.history
        batches = h.groupby("round")["train_batches"].apply(set)
        assert batches[1] != batches[2]
        assert set(h[h["round"] == 2]["train_batches"]) == {1}
        with pytest.raises(ConfigurationError, match="training_args must be a dict"):
            exp.training_args = [1, 2]
        with pytest.raises(ConfigurationError, match="test_ratio"):
            exp.test_ratio = 1.5
        exp.run()
        assert exp.round == 3


def test_running_past_round_limit_says_so_and_how_to_go_on(breast_cancer, tmp_path, caplog):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr, ytr, n_nodes=2, tags=["breast"]) as fed:
        exp = _experiment(fed, round_limit=2)
        exp.run()
        assert exp.round == 2
        # An explicit number of rounds with none left is an error, not a silent no-op.
        with pytest.raises(ConfigurationError, match=r"has run 2 round\(s\).*round_limit = 3"):
            exp.run(1)
        with caplog.at_level(logging.WARNING, logger="fedcore.experiment"):
            exp.run()  # a cell run again: nothing to do, and the log says why
        assert "Raise the limit" in caplog.text and exp.round == 2
        exp.save(tmp_path / "done.fedcore")
        # The same after loading the checkpoint in a new session.
        loaded = Experiment.load(tmp_path / "done.fedcore", federation=fed.url, progress=False)
        with pytest.raises(ConfigurationError, match="Raise the limit"):
            loaded.run(3)
        # Raising the limit lets it go on; asking for more than is left runs what is left.
        loaded.round_limit = 3
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedcore.experiment"):
            loaded.run(5)
        assert loaded.round == 3 and "run(5) runs 1 round(s)" in caplog.text


class ExplodingPlan(SklearnTrainingPlan):
    estimator = SGDClassifier

    def training_data(self, dataset):
        X, y = super().training_data(dataset)
        if np.isnan(X).any():
            raise ValueError("found NaN in the features")
        return X, y


def _fed_with_a_bad_node(X, y):
    fed = simulate.SimulatedFederation()
    for i, (lo, hi) in enumerate([(0, 100), (100, 200), (200, 300)]):
        Xi = X[lo:hi].copy()
        if i == 1:
            Xi[5, 3] = np.nan
        fed.add_node().datasets.add_arrays(f"part{i}", ["breast"], Xi, y[lo:hi])
    return fed


def test_a_failing_plan_fails_only_that_nodes_round(breast_cancer, caplog):
    Xtr, _, ytr, _ = breast_cancer
    with _fed_with_a_bad_node(Xtr, ytr) as fed, caplog.at_level(logging.WARNING, "fedcore"):
        exp = Experiment(ExplodingPlan, tags=["breast"], federation=fed.url, progress=False)
        rows = exp.run_once()
    bad = rows[rows["node"] == "node-02"].iloc[0]
    assert bad["status"] == "failed"
    assert "ValueError: found NaN in the features" in bad["error"]
    assert bad["error_kind"] == "plan"
    assert set(rows[rows["node"] != "node-02"]["status"]) == {"ok"}
    assert exp.round == 1 and exp.parameters is not None
    assert "node-02 failed" in caplog.text


def test_a_round_where_every_node_fails_raises(breast_cancer):
    Xtr, _, ytr, _ = breast_cancer
    X = Xtr.copy()
    X[::50, 0] = np.nan
    with simulate.from_arrays(X, ytr, n_nodes=2, tags=["breast"]) as fed:
        exp = Experiment(ExplodingPlan, tags=["breast"], federation=fed.url, progress=False)
        with pytest.raises(RoundError, match="failed on every node") as info:
            exp.run_once()
    assert set(info.value.failures) == {"node-01", "node-02"}
    assert exp.round == 0  # nothing was aggregated


def test_a_csv_deleted_after_registration_is_reported_not_a_crash(breast_cancer):
    Xtr, _, ytr, _ = breast_cancer
    frame = pd.DataFrame(Xtr[:, :5], columns=[f"f{i}" for i in range(5)]).assign(label=ytr)
    with simulate.from_dataframe(frame, target="label", n_nodes=3, tags=["breast"]) as fed:
        exp = _experiment(fed, model_args={**MODEL_ARGS, "target": "label"})
        exp.search()
        (fed.nodes[2].home / "data" / "part3.csv").unlink()
        rows = exp.run_once()  # the node learns of it while training
        assert list(rows["status"]) == ["ok", "ok", "failed"]
        assert rows.iloc[2]["error_kind"] == "dataset"
        assert "unavailable" in rows.iloc[2]["error"]
        found = exp.search()  # a new search shows it as unavailable and leaves it out
        assert list(found["available"]) == [True, True, False]
        rows = exp.run_once()
        assert list(rows["node"]) == ["node-01", "node-02"]
        assert set(rows["status"]) == {"ok"}


def test_regression_plan_on_tabular_data_reports_regression_metrics(rng):
    X = rng.normal(size=(300, 3))
    frame = pd.DataFrame(X, columns=["a", "b", "c"]).assign(
        y=X @ np.array([1.0, -2.0, 0.5]) + 0.01 * rng.normal(size=300))

    class RegPlan(SklearnTrainingPlan):
        estimator = SGDRegressor

    with simulate.from_dataframe(frame, target="y", n_nodes=3, tags=["reg"],
                                 scheme="iid") as fed:
        exp = Experiment(RegPlan, tags=["reg"], federation=fed.url, progress=False,
                         model_args={"target": "y", "features": ["a", "b", "c"]},
                         training_args={"epochs": 5, "batch_size": 8})
        exp.run(5)
    m = exp.metrics()
    assert {"mse", "mae", "r2"} <= set(m.columns)
    assert m["r2"].iloc[-1] > 0.95
    coef = exp.parameters["coef_"]
    np.testing.assert_allclose(coef, [1.0, -2.0, 0.5], atol=0.1)


def test_no_node_at_the_url_is_explained():
    with pytest.raises(ConfigurationError, match="No node is connected"):
        Experiment(BreastPlan, tags=["x"], federation="inproc://nobody-here",
                   connect_timeout=0.1, progress=False).search()
    with pytest.raises(ConfigurationError, match="Expected a federation URL"):
        Experiment(BreastPlan, tags=["x"], federation="nowhere", progress=False).search()


class TaggedPlan(SklearnTrainingPlan):
    """A plan whose training says which plan ran."""

    estimator = SGDClassifier

    def fit(self, dataset, seed):
        return {**super().fit(dataset, seed), "which": 2,
                "data_samples": self.data_info["n_samples"]}


def test_a_plan_or_search_changed_between_rounds_is_what_the_next_round_sends(breast_cancer):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr, ytr, n_nodes=2, tags=["breast"]) as fed:
        exp = _experiment(fed, round_limit=4)
        first = exp.run_once()
        assert "train_which" not in first
        exp.plan = TaggedPlan
        rows = exp.run_once()
        assert set(rows["train_which"]) == {2}
        assert set(rows["train_data_samples"]) == {len(Xtr)}  # both nodes' samples
        exp.plan = BreastPlan
        assert "train_which" not in exp.run_once()
        exp.plan = TaggedPlan
        exp.nodes = ["node-01"]  # a new search: the data_info sent counts its samples only
        rows = exp.run_once()
        assert rows["node"].tolist() == ["node-01"]
        assert rows["train_data_samples"].tolist() == [first["n_samples"].iloc[0]
                                                       + first["n_test"].iloc[0]]
