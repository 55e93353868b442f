from __future__ import annotations

import numpy as np
import pytest

from fedcore.plan import metrics

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("n_classes", [2, 4])
def test_classification_metrics_match_scikit_learn(n_classes):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, n_classes, 300))
    got = metrics.classification_metrics(y, p)
    avg = "binary" if n_classes == 2 else "macro"
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    assert got["precision"] == pytest.approx(sk.precision_score(y, p, average=avg))
    assert got["recall"] == pytest.approx(sk.recall_score(y, p, average=avg))
    assert got["f1"] == pytest.approx(sk.f1_score(y, p, average=avg))


def test_regression_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.normal(size=200)
    p = y + rng.normal(scale=0.3, size=200)
    got = metrics.regression_metrics(y, p)
    assert got["mse"] == pytest.approx(sk.mean_squared_error(y, p))
    assert got["mae"] == pytest.approx(sk.mean_absolute_error(y, p))
    assert got["r2"] == pytest.approx(sk.r2_score(y, p))


def test_evaluate_picks_metrics_by_task():
    assert set(metrics.evaluate("regression", [1.0, 2.0], [1.0, 2.5])) == {"mse", "mae", "r2"}
    assert "accuracy" in metrics.evaluate("classification", [0, 1], [0, 0])
    assert metrics.evaluate("classification", [], []) == {}
