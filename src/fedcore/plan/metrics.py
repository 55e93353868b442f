"""Evaluation metrics computed with numpy alone (the core imports no ML framework)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["classification_metrics", "evaluate", "regression_metrics"]


def classification_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Accuracy, and precision, recall and F1 (binary for two classes, macro-averaged above).

    A class never predicted has precision 0 (as scikit-learn's ``zero_division=0``).
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if len(y_true) == 0:
        return {}
    labels = np.unique(np.concatenate([y_true, y_pred]))
    tp = np.array([np.sum((y_pred == c) & (y_true == c)) for c in labels], dtype=np.float64)
    pred = np.array([np.sum(y_pred == c) for c in labels], dtype=np.float64)
    true = np.array([np.sum(y_true == c) for c in labels], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred > 0, tp / pred, 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    if len(labels) == 2:
        pick = slice(1, 2)  # the positive class is the larger label
    else:
        pick = slice(None)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "precision": float(np.mean(precision[pick])),
        "recall": float(np.mean(recall[pick])),
        "f1": float(np.mean(f1[pick])),
    }


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Mean squared error, mean absolute error and the coefficient of determination R2."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(y_true.shape)
    if len(y_true) == 0:
        return {}
    err = y_pred - y_true
    ss_res = np.sum(err**2, axis=0)
    ss_tot = np.sum((y_true - y_true.mean(axis=0)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, 0.0)
    return {
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
        "r2": float(np.mean(r2)),
    }


def evaluate(task: str, y_true: Any, y_pred: Any) -> dict[str, float]:
    """The metrics of ``task`` (``"classification"`` or ``"regression"``)."""
    if task == "regression":
        return regression_metrics(y_true, y_pred)
    return classification_metrics(y_true, y_pred)
