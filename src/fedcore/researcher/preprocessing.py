"""Fitting a :class:`~fedcore.data.preprocessing.Preprocessing` on federated statistics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from fedcore.data.preprocessing import Preprocessing, plain
from fedcore.errors import ConfigurationError


class _Statistics(Protocol):
    """What fitting uses of a FederatedStatistics (not imported: it imports this module)."""

    def describe(self, variables: Sequence[str], *, ddof: int = 1) -> pd.DataFrame:
        """Pooled and per-node moments."""

    def metadata(self) -> dict[str, Any]:
        """The merged metadata of the datasets."""

    def histogram(self, variable: str, bins: Any = 10) -> Any:
        """A federated histogram."""

__all__ = ["fit"]


_IMPUTE = ("mean", "most_frequent")


def fit(stats: _Statistics, *, standardize: Sequence[str] = (),
        impute: Sequence[str] | Mapping[str, str] = (),
        categorical: Sequence[str] = (),
        levels: Mapping[str, Sequence[float]] | None = None) -> Preprocessing:
    """See :meth:`FederatedStatistics.fit_preprocessing`."""
    for name, value in (("standardize", standardize), ("categorical", categorical)):
        if isinstance(value, str) or not all(isinstance(c, str) for c in value):
            raise ConfigurationError(
                f"Expected {name} to list column names. Received: {value!r}")
    strategies = _strategies(impute)
    means = [c for c, how in strategies.items() if how == "mean"]
    numeric = sorted({*standardize, *means})
    moments: dict[str, tuple[float, float]] = {}
    if numeric:
        table = stats.describe(numeric, ddof=0)
        for column in numeric:
            row = table.loc[(column, "pooled")]
            if row["status"] != "ok" or not math.isfinite(float(row["mean"])):
                raise ConfigurationError(
                    f"Cannot fit {column!r}: its pooled statistics are incomplete "
                    f"({row['status']}: {row['note']}).")
            moments[column] = (float(row["mean"]), float(row["std"]))
    categories: dict[str, Any] = {}
    if categorical or len(means) < len(strategies):
        categories = stats.metadata().get("categories") or {}
    vocabularies: dict[str, list[Any]] = {}
    for column in categorical:
        found = categories.get(column)
        if not found:
            raise ConfigurationError(
                f"Cannot build a vocabulary for {column!r}: the nodes' metadata lists "
                "no categories for it (too many distinct values, or values held by too "
                "few records to be shown).")
        vocabularies[column] = [plain(v) for v in found]
    fills = {c: moments[c][0] for c in means}
    for column, how in strategies.items():
        if how == "most_frequent":
            fills[column] = _most_frequent(stats, column, (levels or {}).get(column)
                                           or categories.get(column))
    return Preprocessing(impute=fills, standardize={c: moments[c] for c in standardize},
                         vocabularies=vocabularies)


def _strategies(impute: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``impute`` as ``{column: "mean" | "most_frequent"}`` (a list of columns: means)."""
    if isinstance(impute, Mapping):
        given = dict(impute)
    elif isinstance(impute, str) or not all(isinstance(c, str) for c in impute):
        raise ConfigurationError("Expected impute to list column names (filled with their "
                                 "mean) or map them to 'mean' or 'most_frequent'. "
                                 f"Received: {impute!r}")
    else:
        given = dict.fromkeys(impute, "mean")
    bad = {c: how for c, how in given.items() if not isinstance(c, str) or how not in _IMPUTE}
    if bad:
        raise ConfigurationError(f"impute maps columns to one of {list(_IMPUTE)}. "
                                 f"Received: {bad}")
    return given


def _most_frequent(stats: _Statistics, column: str, levels: Any) -> float:
    """The level of ``column`` with the largest pooled count the nodes reveal.

    Candidates are the levels the merged metadata lists (each node lists only levels it
    may show); their counts come from a pooled histogram with one bin per level, so a node's
    small cells stay withheld (they read as zeros) and secure aggregation, when set, sums them.
    """
    if not levels:
        raise ConfigurationError(
            f"Cannot impute {column!r} with its most frequent value: the nodes' metadata "
            "lists no levels for it (a float column, e.g. one with missing values, lists "
            "none): give its candidate levels, levels={column: [1, 2, ...]}, or impute it "
            "with 'mean'.")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels):
        raise ConfigurationError(
            f"Cannot impute {column!r} with its most frequent value: its levels are text, "
            "and federated statistics count numeric columns only. Code it as numbers.")
    codes = np.array(sorted(float(v) for v in levels))
    if codes.size > 1:
        half = float(np.min(np.diff(codes))) / 2
        edges = np.concatenate([[codes[0] - half], (codes[1:] + codes[:-1]) / 2,
                                [codes[-1] + half]])
    else:  # a spare empty bin: a histogram of one bin cannot be read back
        edges = np.array([codes[0] - 0.5, codes[0] + 0.5, codes[0] + 1.5])
    counts = stats.histogram(column, bins=edges.tolist()).pooled[:codes.size]
    if not counts.max() > 0:
        raise ConfigurationError(
            f"Cannot impute {column!r} with its most frequent value: the nodes revealed no "
            "count for any of its levels (each is withheld as a small cell).")
    value = codes[int(np.argmax(counts))]  # ties: the smallest level
    return int(value) if value.is_integer() else float(value)
