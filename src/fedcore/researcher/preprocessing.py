"""Fitting a :class:`~fedcore.data.preprocessing.Preprocessing` on federated statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedcore.data.preprocessing import Preprocessing, plain
from fedcore.errors import ConfigurationError

if TYPE_CHECKING:
    from fedcore.researcher.statistics import FederatedStatistics

__all__ = ["fit"]


def fit(stats: FederatedStatistics, *, standardize: Sequence[str] = (),
        impute: Sequence[str] = (), categorical: Sequence[str] = ()) -> Preprocessing:
    """See :meth:`FederatedStatistics.fit_preprocessing`."""
    for name, value in (("standardize", standardize), ("impute", impute),
                        ("categorical", categorical)):
        if isinstance(value, str) or not all(isinstance(c, str) for c in value):
            raise ConfigurationError(
                f"Expected {name} to list column names. Received: {value!r}")
    numeric = sorted({*standardize, *impute})
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
    vocabularies: dict[str, list[Any]] = {}
    if categorical:
        categories = stats.metadata().get("categories") or {}
        for column in categorical:
            found = categories.get(column)
            if not found:
                raise ConfigurationError(
                    f"Cannot build a vocabulary for {column!r}: the nodes' metadata lists "
                    "no categories for it (too many distinct values, or values held by too "
                    "few records to be shown).")
            vocabularies[column] = [plain(v) for v in found]
    return Preprocessing(impute={c: moments[c][0] for c in impute},
                         standardize={c: moments[c] for c in standardize},
                         vocabularies=vocabularies)
