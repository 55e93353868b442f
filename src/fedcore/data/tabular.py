from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore.data._base import Dataset, categories
from fedcore.errors import ConfigurationError, DatasetError


class TabularDataset(Dataset):
    """A CSV file read with pandas; the plan picks the feature and target columns.

    The file is read lazily, once, on first use. Its path stays on the node: metadata lists
    columns, dtypes, the sample count and the categories of discrete columns.
    """

    def __init__(self, path: str | Path, *, read_csv_kwargs: dict[str, Any] | None = None):
        self.path = Path(path)
        self.read_csv_kwargs = dict(read_csv_kwargs or {})
        self._frame: pd.DataFrame | None = None

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> TabularDataset:
        """A dataset over an in-memory DataFrame (not persisted)."""
        ds = cls(Path("<memory>"))
        ds._frame = frame
        return ds

    @property
    def frame(self) -> pd.DataFrame:
        """The table, read on first access."""
        if self._frame is None:
            if not self.path.is_file():
                raise DatasetError(
                    "The dataset's CSV file is unavailable (it was moved or deleted). "
                    "The node administrator can re-register it."
                )
            try:
                self._frame = pd.read_csv(self.path, **self.read_csv_kwargs)
            except (OSError, ValueError, pd.errors.ParserError) as exc:
                raise DatasetError(f"The dataset's CSV file cannot be read: {exc}") from exc
        return self._frame

    def __len__(self) -> int:
        return len(self.frame)

    def metadata(self) -> dict[str, Any]:
        df = self.frame
        return {
            "kind": "tabular",
            "n_samples": len(df),
            "columns": [str(c) for c in df.columns],
            "dtypes": {str(c): str(t) for c, t in df.dtypes.items()},
            "categories": {
                str(c): cats for c in df.columns
                if (cats := categories(df[c].to_numpy())) is not None
            },
        }

    def arrays(
        self, features: Sequence[str] | None = None, target: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``X`` from ``features`` (default: every column but ``target``), ``y`` from ``target``."""
        df = self.frame
        wanted = list(features) if features is not None else [c for c in df.columns
                                                              if c != target]
        missing = [c for c in [*wanted, *([target] if target else [])] if c not in df.columns]
        if missing:
            raise ConfigurationError(
                f"Columns {missing} are not in the dataset. Available columns: "
                f"{[str(c) for c in df.columns]}"
            )
        X = df[wanted].to_numpy()
        y = df[target].to_numpy() if target else None
        return X, y
