"""Monitoring: the history's timings, plot() and the TensorBoard event files of an experiment."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcore import Experiment, simulate
from fedcore.errors import ConfigurationError
from fedcore.researcher.monitoring import plot, round_metrics

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")
PIL = pytest.importorskip("PIL.Image")

from sklearn.linear_model import SGDClassifier  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402

NODES = ["node-01", "node-02", "node-03"]
ROUNDS = 3


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier

    def training_data(self, dataset):
        X, y = super().training_data(dataset)
        if np.isnan(X).any():
            raise ValueError("found NaN in the features")
        return X, y


def _experiment(fed, **kwargs) -> Experiment:
    args = dict(tags=["breast"], federation=fed.url, model_args={"loss": "log_loss"},
                training_args={"epochs": 1, "batch_size": 32}, progress=False)
    return Experiment(Plan, **{**args, **kwargs})


@pytest.fixture(scope="module")
def trained(breast_cancer, tmp_path_factory):
    """An experiment of 3 rounds on 3 hospitals, logged to TensorBoard."""
    Xtr, _, ytr, _ = breast_cancer
    logdir = tmp_path_factory.mktemp("tb")
    with simulate.from_arrays(Xtr, ytr, n_nodes=3, tags=["breast"]) as fed:
        exp = _experiment(fed, round_limit=ROUNDS, tensorboard=logdir)
        exp.run()
    return exp


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of one TensorBoard run folder, as TensorBoard reads it: tag -> points."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --- history ---------------------------------------------------------------------------------

def test_history_rows_carry_their_rounds_wall_time(trained):
    h = trained.history
    assert h["round_s"].notna().all()
    per_round = h.groupby("round")["round_s"]
    assert (per_round.nunique() == 1).all()  # one wall time per round, on each of its rows
    # The round lasts at least as long as its slowest node's round trip.
    assert (per_round.first() >= h.groupby("round")["round_trip_s"].max()).all()


def test_metrics_weight_evaluations_by_test_samples_and_training_by_samples():
    h = pd.DataFrame({
        "round": [1, 1, 1], "node": ["a", "b", "c"], "status": ["ok", "ok", "failed"],
        "n_samples": [100, 300, 0], "n_test": [30, 10, 0],
        "global_accuracy": [0.5, 0.9, np.nan], "train_loss": [1.0, 2.0, np.nan],
        "train_s": [0.1, 0.2, np.nan],
    })
    m = round_metrics(h, "global")
    assert m.loc[0, "accuracy"] == pytest.approx((0.5 * 30 + 0.9 * 10) / 40)
    assert m.loc[0, "nodes"] == 2  # the failed node does not count
    t = round_metrics(h, "train")
    assert t.loc[0, "loss"] == pytest.approx((1.0 * 100 + 2.0 * 300) / 400)
    assert "s" not in t  # train_s is a timing, not a training statistic


# --- plot ------------------------------------------------------------------------------------

def _near(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(pixels[..., :3].astype(int) - rgb).max(axis=-1) <= tol).sum())


def test_plot_draws_each_node_and_the_weighted_mean_and_writes_a_png(trained, tmp_path):
    path = tmp_path / "curves" / "accuracy.png"
    fig = trained.plot(path=path)

    lines = fig.axes[0].lines
    assert [line.get_label() for line in lines] == [*NODES, "all nodes (weighted)"]
    mean = lines[-1]
    assert list(mean.get_xdata()) == list(range(1, ROUNDS + 1))
    np.testing.assert_allclose(mean.get_ydata(), trained.metrics()["accuracy"])
    assert mean.get_linewidth() > max(line.get_linewidth() for line in lines[:-1])
    node2 = trained.history.query("node == 'node-02'")["global_accuracy"]
    np.testing.assert_allclose(lines[1].get_ydata(), node2)
    assert fig.axes[0].get_xlabel() == "round"
    assert "accuracy" in fig.axes[0].get_title()

    with PIL.open(path) as image:
        assert image.format == "PNG" and image.size == (700, 420)  # figsize 7 x 4.2 at 100 dpi
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not a blank canvas
    for colour in [(31, 119, 180), (255, 127, 14), (44, 160, 44)]:  # the nodes' lines
        assert _near(pixels, colour) > 30, colour
    assert _near(pixels, (0, 0, 0), tol=30) > 1000  # the bold mean


def test_plot_other_metrics_sizes_formats_and_axes(trained, tmp_path):
    fig = plot(trained.history, "f1", "local", path=tmp_path / "f1.svg", figsize=(4, 3),
               dpi=50)
    assert (tmp_path / "f1.svg").read_text().lstrip().startswith("<?xml")
    fig.savefig(tmp_path / "f1.png")
    with PIL.open(tmp_path / "f1.png") as image:
        assert image.size == (200, 150)

    from matplotlib.figure import Figure

    mine = Figure(figsize=(10, 4))
    left, right = mine.subplots(1, 2)
    assert trained.plot("accuracy", "global", ax=left) is mine
    trained.plot("batches", "train", ax=right)
    assert len(left.lines) == len(right.lines) == len(NODES) + 1
    assert right.get_ylabel() == "train_batches"


def test_unknown_metrics_and_families_are_explained(trained):
    with pytest.raises(ConfigurationError) as info:
        trained.plot("auc")
    message = str(info.value)
    assert "metric='auc'" in message
    assert "global: accuracy, f1, precision, recall" in message
    assert "train: batches, epochs" in message
    with pytest.raises(ConfigurationError, match="'global', 'local', 'train'. Received: 'best'"):
        trained.plot("accuracy", which="best")
    with pytest.raises(ConfigurationError, match="run at least one round"):
        plot(pd.DataFrame())


def test_the_figure_shows_itself_in_a_notebook(trained):
    png = trained.plot()._repr_png_()
    assert png.startswith(b"\x89PNG")


# --- TensorBoard -----------------------------------------------------------------------------

def test_tensorboard_holds_the_rounds_means_and_each_node(trained):
    logdir = trained.tensorboard
    assert logdir is not None
    aggregate = scalars(logdir / "aggregate")
    for which in ("global", "local"):
        metrics = trained.metrics(which)
        for metric in ("accuracy", "f1"):
            steps, values = zip(*aggregate[f"{which}/{metric}"], strict=True)
            assert list(steps) == list(metrics["round"])
            np.testing.assert_allclose(values, metrics[metric], rtol=1e-6)
    h = trained.history
    assert [v for _, v in aggregate["nodes/ok"]] == [3] * ROUNDS
    assert [v for _, v in aggregate["nodes/failed"]] == [0] * ROUNDS
    np.testing.assert_allclose([v for _, v in aggregate["time/round_s"]],
                               h.groupby("round")["round_s"].first(), rtol=1e-6)
    assert [v for _, v in aggregate["samples/train"]] == list(
        h.groupby("round")["n_samples"].sum())

    assert sorted(p.name for p in (logdir / "nodes").iterdir()) == NODES
    for node in NODES:
        mine = h[h["node"] == node]
        points = scalars(logdir / "nodes" / node)
        assert [s for s, _ in points["global/accuracy"]] == list(range(1, ROUNDS + 1))
        np.testing.assert_allclose([v for _, v in points["global/accuracy"]],
                                   mine["global_accuracy"], rtol=1e-6)
        np.testing.assert_allclose([v for _, v in points["time/round_trip_s"]],
                                   mine["round_trip_s"], rtol=1e-6)
        assert [v for _, v in points["samples/test"]] == list(mine["n_test"])


def test_a_resumed_experiment_appends_to_the_same_log_without_duplicates(breast_cancer,
                                                                         tmp_path):
    Xtr, _, ytr, _ = breast_cancer
    logdir, ckpt = tmp_path / "tb", tmp_path / "ckpt"
    with simulate.from_arrays(Xtr, ytr, n_nodes=2, tags=["breast"], name="tb-resume") as fed:
        exp = _experiment(fed, round_limit=4, checkpoint_dir=ckpt, tensorboard=logdir)
        exp.run(2)
        exp.close()

        resumed = Experiment.load(ckpt, progress=False)
        assert resumed.tensorboard == logdir  # the log folder travels with the checkpoint
        resumed.run()
        resumed.close()
        points = scalars(logdir / "aggregate")["global/accuracy"]
        assert [s for s, _ in points] == [1, 2, 3, 4]
        np.testing.assert_allclose([v for _, v in points], resumed.metrics()["accuracy"],
                                   rtol=1e-6)
        node = scalars(logdir / "nodes" / "node-01")["local/accuracy"]
        assert [s for s, _ in node] == [1, 2, 3, 4]

        # Going back to round 1's checkpoint: rounds 2-4 of the log are replaced, not doubled.
        again = Experiment.load(ckpt / "round_0001.fedcore", progress=False)
        again.run(1)
        again.close()
        points = scalars(logdir / "aggregate")["global/accuracy"]
        assert [s for s, _ in points] == [1, 2]
        assert points[1][1] == pytest.approx(again.metrics()["accuracy"].iloc[1], rel=1e-6)


def test_failed_nodes_are_counted_and_left_out_of_curves(breast_cancer, tmp_path):
    Xtr, _, ytr, _ = breast_cancer
    fed = simulate.SimulatedFederation()
    for i in range(3):
        Xi = Xtr[100 * i: 100 * (i + 1)].copy()
        if i == 1:
            Xi[5, 3] = np.nan  # node-02's plan fails every round
        fed.add_node().datasets.add_arrays(f"part{i}", ["breast"], Xi, ytr[100 * i:100 * (i + 1)])
    with fed:
        exp = _experiment(fed, tensorboard=tmp_path / "tb")
        exp.run(2)
    assert (exp.history.query("node == 'node-02'")["status"] == "failed").all()
    fig = exp.plot("accuracy", "local")
    assert [line.get_label() for line in fig.axes[0].lines] == [
        "node-01", "node-03", "all nodes (weighted)"]
    aggregate = scalars(tmp_path / "tb" / "aggregate")
    assert [v for _, v in aggregate["nodes/failed"]] == [1, 1]
    assert [v for _, v in aggregate["nodes/ok"]] == [2, 2]
    np.testing.assert_allclose([v for _, v in aggregate["local/accuracy"]],
                               exp.metrics("local")["accuracy"], rtol=1e-6)
    assert not (tmp_path / "tb" / "nodes" / "node-02").exists()


def test_missing_extras_name_the_pip_install_that_fixes_them(tmp_path):
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("matplotlib", "tensorboard"):
                    raise ImportError(f"No module named {{name!r}}")
                return None

        sys.meta_path.insert(0, Block())
        import pandas as pd
        import fedcore
        from fedcore.researcher.monitoring import TensorBoardWriter, plot
        history = pd.DataFrame({{"round": [1], "node": ["a"], "status": ["ok"],
                                "n_test": [1], "global_accuracy": [1.0]}})
        for call in (lambda: plot(history), lambda: TensorBoardWriter({str(tmp_path)!r})):
            try:
                call()
            except fedcore.ConfigurationError as exc:
                print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install -c constraints.txt ".[plot]"' in out.stdout
    assert 'pip install -c constraints.txt ".[tensorboard]"' in out.stdout
