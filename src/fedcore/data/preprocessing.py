"""Federated preprocessing: a transform fitted on federated statistics, applied on every node.

:class:`Preprocessing` is plain data (numbers and category lists, never code): per column, a
value that fills missing entries (imputation), a ``(mean, std)`` that standardises, or a
vocabulary that maps categories to the same index on every node (a category outside it,
or a missing one, becomes ``-1``). ``FederatedStatistics.fit_preprocessing`` fits it
(pooled means and standard deviations, under secure aggregation too; vocabularies from the
merged metadata, which lists only categories every node may show). The experiment ships it
in every training request (``Experiment(preprocessing=...)``), keeps it in its checkpoints,
and each node applies it to its tabular dataset before splitting, training and evaluating
(:class:`PreprocessedDataset`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.data._base import Dataset
from fedcore.errors import ConfigurationError, DatasetError

if TYPE_CHECKING:  # imported where a frame is transformed: the node imports this module early
    import pandas as pd

__all__ = ["PreprocessedDataset", "Preprocessing"]

_Category = str | int | float | bool


@dataclass(frozen=True)
class Preprocessing:
    """Column transforms applied in this order: impute, standardise, encode categories."""

    impute: dict[str, float] = field(default_factory=dict)
    standardize: dict[str, tuple[float, float]] = field(default_factory=dict)
    vocabularies: dict[str, list[_Category]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for column, value in self.impute.items():
            _number(f"impute[{column!r}]", value)
        for column, pair in self.standardize.items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ConfigurationError(
                    f"Expected standardize[{column!r}] = (mean, std). Received: {pair!r}")
            _number(f"standardize[{column!r}] mean", pair[0])
            if not _number(f"standardize[{column!r}] std", pair[1]) > 0:
                raise ConfigurationError(
                    f"standardize[{column!r}]: the std must be > 0 (a constant column "
                    f"cannot be standardised: leave it out). Received: {pair[1]!r}")
        for column, vocab in self.vocabularies.items():
            if not (isinstance(vocab, (list, tuple)) and all(
                    isinstance(v, (str, int, float, bool)) for v in vocab)):
                raise ConfigurationError(
                    f"Expected vocabularies[{column!r}] to list categories (strings or "
                    f"numbers). Received: {vocab!r}")
            if len(set(vocab)) != len(vocab):
                raise ConfigurationError(f"vocabularies[{column!r}] lists a category twice.")
        both = set(self.standardize) & set(self.vocabularies)
        if both:
            raise ConfigurationError(f"Columns {sorted(both)} are both standardised and "
                                     "encoded as categories: choose one.")

    @property
    def columns(self) -> list[str]:
        """Every column the transform touches."""
        return sorted({*self.impute, *self.standardize, *self.vocabularies})

    def to_wire(self) -> dict[str, Any]:
        """Plain data for a message or a checkpoint."""
        return {"impute": {k: float(v) for k, v in self.impute.items()},
                "standardize": {k: [float(m), float(s)] for k, (m, s) in
                                self.standardize.items()},
                "vocabularies": {k: list(v) for k, v in self.vocabularies.items()}}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Rebuild (and check) a transform from :meth:`to_wire`'s data."""
        if not isinstance(data, Mapping) or set(data) - {"impute", "standardize",
                                                         "vocabularies"}:
            raise ConfigurationError(
                "Expected preprocessing as {'impute': ..., 'standardize': ..., "
                f"'vocabularies': ...}}. Received: {data!r}")
        parts = {k: data.get(k) or {} for k in ("impute", "standardize", "vocabularies")}
        if not all(isinstance(v, Mapping) and all(isinstance(c, str) for c in v)
                   for v in parts.values()):
            raise ConfigurationError("Expected preprocessing maps keyed by column names.")
        return cls(impute=dict(parts["impute"]),
                   standardize={k: (v[0], v[1]) if isinstance(v, (list, tuple)) and len(v)
                                == 2 else v for k, v in parts["standardize"].items()},
                   vocabularies={k: list(v) if isinstance(v, (list, tuple)) else v
                                 for k, v in parts["vocabularies"].items()})

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` transformed (a copy); a column it needs that is absent is an error."""
        import pandas as pd

        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise DatasetError(
                f"The experiment's preprocessing uses columns {missing}, which this "
                f"dataset lacks. Its columns are {[str(c) for c in frame.columns]}.")
        out = frame.copy()
        for column, value in self.impute.items():
            out[column] = pd.to_numeric(out[column], errors="raise").fillna(value)
        for column, (mean, std) in self.standardize.items():
            out[column] = (pd.to_numeric(out[column], errors="raise").astype(np.float64)
                           - mean) / std
        for column, vocab in self.vocabularies.items():
            index = {v: float(i) for i, v in enumerate(vocab)}
            out[column] = [index.get(plain(v), -1.0) if not _missing(v) else -1.0
                           for v in out[column].tolist()]
        return out


class PreprocessedDataset(Dataset):
    """A tabular dataset seen through a :class:`Preprocessing` (same samples, same order)."""

    def __init__(self, parent: Dataset, transform: Preprocessing):
        import pandas as pd

        frame = getattr(parent, "frame", None)
        if not isinstance(frame, pd.DataFrame):
            raise ConfigurationError(
                f"Federated preprocessing applies to tabular datasets; this one is "
                f"{type(parent).__name__}. Run the experiment without preprocessing, or "
                "transform the data in the plan's training_data().")
        self.parent = parent
        self.transform = transform
        self.frame = transform.apply(frame)

    def __len__(self) -> int:
        return len(self.frame)

    def metadata(self) -> dict[str, Any]:  # noqa: D102 - the parent's: what the node shows
        return self.parent.metadata()

    def arrays(self, features: Sequence[str] | None = None, target: str | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(X, y)`` after the transform; ``X`` defaults to every column but ``target``."""
        df = self.frame
        wanted = list(features) if features is not None else [c for c in df.columns
                                                              if c != target]
        absent = [c for c in [*wanted, *([target] if target else [])] if c not in df.columns]
        if absent:
            raise ConfigurationError(f"Columns {absent} are not in the dataset. Available "
                                     f"columns: {[str(c) for c in df.columns]}")
        return df[wanted].to_numpy(), (df[target].to_numpy() if target else None)


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(float(value)):
        raise ConfigurationError(f"{what} must be a finite number. Received: {value!r}")
    return float(value)


def plain(value: Any) -> _Category:
    return value.item() if isinstance(value, np.generic) else value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
