from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigurationError

#: Columns or targets with at most this many distinct values publish them as ``categories``.
MAX_CATEGORIES = 64


class Dataset(abc.ABC):
    """What a node exposes to a plan: length, arrays or items, and metadata.

    ``metadata()`` is what the researcher may see: sample count, columns, dtypes, shapes and
    the categories of low-cardinality columns. It never contains the file path.
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """Shareable description of the dataset (no path, no samples)."""

    @abc.abstractmethod
    def arrays(
        self, features: Sequence[str] | None = None, target: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """All samples as ``(X, y)``; ``y`` is ``None`` for unlabelled data."""

    def __getitem__(self, index: int) -> tuple[np.ndarray, Any]:
        X, y = self.arrays()
        return X[index], (None if y is None else y[index])

    def subset(self, indices: Sequence[int] | np.ndarray) -> Subset:
        """A view of the samples at ``indices``."""
        return Subset(self, np.asarray(indices, dtype=np.int64))

    def split(self, test_ratio: float, seed: int) -> tuple[Subset, Subset]:
        """A reproducible ``(train, test)`` split; the same seed gives the same split."""
        if not 0.0 <= test_ratio < 1.0:
            raise ConfigurationError(f"test_ratio must be in [0, 1). Received: {test_ratio}")
        n = len(self)
        order = np.random.default_rng(seed).permutation(n)
        n_test = int(round(n * test_ratio))
        if test_ratio > 0 and n > 1:
            n_test = min(max(n_test, 1), n - 1)
        return self.subset(np.sort(order[n_test:])), self.subset(np.sort(order[:n_test]))


class Subset(Dataset):
    """The samples of ``parent`` at ``indices``."""

    def __init__(self, parent: Dataset, indices: np.ndarray):
        self.parent = parent
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def metadata(self) -> dict[str, Any]:
        return {**self.parent.metadata(), "n_samples": len(self)}

    def arrays(self, features=None, target=None):  # noqa: D102 - inherits the doc
        X, y = self.parent.arrays(features=features, target=target)
        return X[self.indices], (None if y is None else y[self.indices])

    def subset(self, indices):  # noqa: D102
        return Subset(self.parent, self.indices[np.asarray(indices, dtype=np.int64)])


def categories(values: np.ndarray) -> list[Any] | None:
    """Sorted distinct values of a discrete column, or ``None`` if continuous or too many."""
    if values.dtype.kind in "f" or values.ndim != 1:
        return None
    uniq = np.unique(values)
    if len(uniq) > MAX_CATEGORIES:
        return None
    return [u.item() if hasattr(u, "item") else u for u in uniq]


def merge_metadata(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One description of several nodes' datasets: summed counts, united categories.

    Plans read it as ``data_info``: the classes of a target come from the union over every
    node, so a node lacking a class still builds a model of the right shape.
    """
    if not items:
        return {}
    merged = dict(items[0])
    merged["n_samples"] = sum(int(m.get("n_samples", 0)) for m in items)
    cats: dict[str, set[Any]] = {}
    for m in items:
        for col, values in (m.get("categories") or {}).items():
            if values is not None:
                cats.setdefault(col, set()).update(values)
    merged["categories"] = {c: sorted(v, key=lambda x: (str(type(x)), x)) for c, v in
                            cats.items()}
    for key in ("columns", "feature_shape"):
        differing = {tuple(m.get(key) or ()) for m in items}
        if len(differing) > 1:
            raise ConfigurationError(
                f"The nodes' datasets disagree on {key}: {sorted(differing)}. Train on "
                "datasets with the same layout, or map them with a DataLoadingPlan."
            )
    return merged
