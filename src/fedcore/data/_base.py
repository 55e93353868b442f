from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError

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

    def items(self, features: Sequence[str] | None = None, target: str | None = None,
              **options: Any) -> Items:
        """The samples one at a time, as a map-style dataset of ``(x, y)`` pairs.

        Give it to a DataLoader (a torch plan's ``training_data`` may return it). Datasets
        that read files (medical folders, image folders) load each item on demand; others
        hold ``arrays(features, target)``. ``options`` are dataset-specific (a medical
        folder takes ``covariates``).
        """
        if options:
            raise ConfigurationError(
                f"{type(self).__name__}.items() takes no options {sorted(options)}."
            )
        return _ArrayItems(*self.arrays(features=features, target=target))

    def _arrays_at(self, indices: np.ndarray, features: Sequence[str] | None,
                   target: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        # What a Subset reads. Datasets that load from files override it to read only the
        # samples at ``indices`` (a training split does not load its test samples).
        X, y = self.arrays(features=features, target=target)
        return X[indices], (None if y is None else y[indices])

    def subset(self, indices: Sequence[int] | np.ndarray) -> Subset:
        """A view of the samples at ``indices``."""
        return Subset(self, np.asarray(indices, dtype=np.int64))

    def split(self, test_ratio: float, seed: int) -> tuple[Subset, Subset]:
        """A reproducible ``(train, test)`` split; the same seed gives the same split."""
        if not 0.0 <= test_ratio < 1.0:
            raise ConfigurationError(f"test_ratio must be in [0, 1). Received: {test_ratio}")
        n = len(self)
        # The same split is asked for every round: kept (a few per dataset) rather than drawn
        # again (seeding a generator costs more than a small node's training step).
        splits: dict[tuple[float, int, int], tuple[Subset, Subset]] | None = getattr(
            self, "_splits", None)
        if splits is None:
            splits = {}
            with contextlib.suppress(AttributeError):  # a dataset with __slots__
                self._splits = splits
        found = splits.get((test_ratio, seed, n))
        if found is not None:
            return found
        n_test = int(round(n * test_ratio))
        if test_ratio > 0 and n > 1:
            n_test = min(max(n_test, 1), n - 1)
        if 0 < n_test < n:
            order = np.random.default_rng(seed).permutation(n)
            found = self.subset(np.sort(order[n_test:])), self.subset(np.sort(order[:n_test]))
        else:  # one side has every sample, in order whatever the draw: none is drawn
            every, empty = np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
            found = (self.subset(every), self.subset(empty)) if n_test == 0 else (
                self.subset(empty), self.subset(every))
        if len(splits) >= 8:
            splits.pop(next(iter(splits)))
        splits[(test_ratio, seed, n)] = found
        return found


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
        return self.parent._arrays_at(self.indices, features, target)

    def items(self, features=None, target=None, **options):  # noqa: D102
        return _IndexedItems(self.parent.items(features, target, **options), self.indices)

    def _arrays_at(self, indices, features, target):
        return self.parent._arrays_at(self.indices[indices], features, target)

    def subset(self, indices):  # noqa: D102
        return Subset(self.parent, self.indices[np.asarray(indices, dtype=np.int64)])


class Items(abc.ABC):
    """A map-style dataset: ``len(items)`` samples, ``items[i]`` is the pair ``(x, y)``.

    It has the shape torch's ``DataLoader`` expects, without importing torch.
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Sample ``index`` as ``(x, y)``."""


class _ArrayItems(Items):
    def __init__(self, X: np.ndarray, y: np.ndarray | None):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.X[index], (None if self.y is None else self.y[index])


class _IndexedItems(Items):
    def __init__(self, items: Items, indices: np.ndarray):
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self.indices) <= index < len(self.indices):
            raise IndexError(f"index {index} out of range for {len(self.indices)} items")
        return self.items[int(self.indices[index])]


def without_root(exc: BaseException, root: Path) -> str:
    """An error's text with the dataset folder's location cut out (paths stay on the node)."""
    text = str(exc)
    for prefix in sorted({str(root), str(root.resolve())}, key=len, reverse=True):
        text = text.replace(prefix + "/", "").replace(prefix, "<root>")
    return text


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
