from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedcore.data._base import Dataset, categories
from fedcore.errors import ConfigurationError, DatasetError


class ArrayDataset(Dataset):
    """Samples held as numpy arrays ``X`` (any shape) and optional targets ``y``.

    Persisted as a ``.npz`` file with arrays ``X`` and ``y`` by :meth:`save`; a node
    registers that file, so simulated hospitals keep their data on disk like real ones.
    """

    TARGET = "target"

    def __init__(self, X: Any, y: Any = None):
        self.X = np.asarray(X)
        self.y = None if y is None else np.asarray(y)
        if self.y is not None and len(self.y) != len(self.X):
            raise ConfigurationError(
                f"X and y must have the same length. Received: {len(self.X)} and {len(self.y)}"
            )

    @classmethod
    def load(cls, path: str | Path) -> ArrayDataset:
        """Read a dataset written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["X"], data["y"] if "y" in data else None)
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetError(f"Cannot read the array dataset: {exc}") from exc

    def save(self, path: str | Path | BinaryIO) -> Path | BinaryIO:
        """Write ``X`` and ``y`` into an ``.npz`` file (a path, or a file open for writing)."""
        if not isinstance(path, (str, Path)):
            self._write(path)
            return path
        path = Path(path)
        with open(path, "wb") as f:
            self._write(f)
        return path

    def _write(self, f: BinaryIO) -> None:
        if self.y is None:
            np.savez(f, X=self.X)
        else:
            np.savez(f, X=self.X, y=self.y)

    def __len__(self) -> int:
        return len(self.X)

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "kind": "array",
            "n_samples": len(self),
            "feature_shape": list(self.X.shape[1:]),
            "dtypes": {"X": self.X.dtype.str},
            "categories": {},
        }
        if self.y is not None:
            meta["dtypes"][self.TARGET] = self.y.dtype.str
            meta["categories"][self.TARGET] = categories(self.y)
        return meta

    def arrays(self, features=None, target=None):  # noqa: D102 - inherits the doc
        if features is not None:
            raise ConfigurationError(
                "This dataset holds arrays, not named columns: drop `features` from model_args."
            )
        return self.X, self.y
