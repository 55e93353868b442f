"""DataLoadingPlan: a node's own mapping from its local names to the federation's names."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fedcore.errors import ConfigurationError, DatasetError

_PARTS = ("modalities", "columns", "values", "units", "keep_modalities")


@dataclass(frozen=True)
class DataLoadingPlan:
    """How one node's dataset is presented under the federation's (harmonised) names.

    A node administrator writes it; it is stored with the dataset in the node's database and
    applied every time the dataset is loaded, so plans and researchers see only the
    harmonised names, values and units. Every part is optional:

    - ``modalities``: harmonised modality name -> local folder name
      (``{"T1": "t1_mprage"}``), for medical folders;
    - ``columns``: harmonised column name -> local column name (``{"sex": "gender"}``);
    - ``values``: harmonised column -> ``{local value: harmonised value}``
      (``{"sex": {"1": "M", "2": "F"}}``). Every value present in the column must be mapped
      (missing values stay missing); for an image folder, ``values["target"]`` renames
      classes (local folder name -> harmonised class);
    - ``units``: harmonised column -> ``{"scale": s, "offset": o}``: the harmonised value is
      ``local * scale + offset`` (months to years: ``{"scale": 1 / 12}``);
    - ``keep_modalities``: the modalities (harmonised names) the dataset offers, the others
      being dropped (``["T1"]``: a site that also has FLAIR offers T1 only, and keeps the
      subjects that lack FLAIR). Changing it needs no re-registration.

    Columns are renamed first, then values mapped, then units converted; ``values`` and
    ``units`` are keyed by harmonised names. Local values are matched by their text
    (``1``, ``1.0`` and ``"1"`` are the same key), since the plan is stored as JSON.
    """

    modalities: Mapping[str, str] = field(default_factory=dict)
    columns: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    units: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    keep_modalities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        keep = self.keep_modalities
        if keep is None:
            keep = ()
        if isinstance(keep, str) or not all(isinstance(m, str) and m for m in keep):
            raise ConfigurationError(
                f"keep_modalities is a list of modality names. Received: {keep!r}")
        object.__setattr__(self, "keep_modalities", tuple(dict.fromkeys(keep)))
        object.__setattr__(self, "modalities", _renames("modalities", self.modalities))
        object.__setattr__(self, "columns", _renames("columns", self.columns))
        values: dict[str, dict[str, Any]] = {}
        for column, table in _mapping("values", self.values).items():
            inner = _mapping(f"values[{column!r}]", table)
            values[str(column)] = {value_key(k): _json_scalar(column, v)
                                   for k, v in inner.items()}
        object.__setattr__(self, "values", values)
        units: dict[str, dict[str, float]] = {}
        for column, conv in _mapping("units", self.units).items():
            conv = _mapping(f"units[{column!r}]", conv)
            unknown = set(conv) - {"scale", "offset"}
            if unknown:
                raise ConfigurationError(
                    f"units[{column!r}] may hold 'scale' and 'offset'. Received: "
                    f"{sorted(unknown)}"
                )
            try:
                scale, offset = float(conv.get("scale", 1.0)), float(conv.get("offset", 0.0))
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(
                    f"units[{column!r}] must be numbers. Received: {dict(conv)}"
                ) from exc
            if not (math.isfinite(scale) and math.isfinite(offset)) or scale == 0:
                raise ConfigurationError(
                    f"units[{column!r}] needs a finite, non-zero scale and a finite offset. "
                    f"Received: scale={scale}, offset={offset}"
                )
            units[str(column)] = {"scale": scale, "offset": offset}
        object.__setattr__(self, "units", units)

    # --- storage ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what the node's database stores)."""
        out: dict[str, Any] = {
            "modalities": dict(self.modalities), "columns": dict(self.columns),
            "values": {c: dict(m) for c, m in self.values.items()},
            "units": {c: dict(u) for c, u in self.units.items()}}
        if self.keep_modalities:  # additive: plans stored before it read the same
            out["keep_modalities"] = list(self.keep_modalities)
        return out

    @classmethod
    def from_dict(cls, data: DataLoadingPlan | Mapping[str, Any]) -> DataLoadingPlan:
        """The plan :meth:`to_dict` wrote (unknown keys are refused, to catch typos)."""
        if isinstance(data, DataLoadingPlan):
            return data
        data = _mapping("A DataLoadingPlan", data)
        unknown = set(data) - set(_PARTS)
        if unknown:
            raise ConfigurationError(
                f"Unknown DataLoadingPlan keys {sorted(unknown)}. Expected some of {list(_PARTS)}."
            )
        parts: dict[str, Any] = {k: data.get(k) or {} for k in _PARTS[:-1]}
        return cls(**parts, keep_modalities=data.get("keep_modalities") or ())

    def __bool__(self) -> bool:
        return any(getattr(self, part) for part in _PARTS)

    # --- application ------------------------------------------------------------------------

    def modality_names(self, local: Iterable[str]) -> dict[str, str]:
        """``{local folder: harmonised name}`` for the local modality folders ``local``.

        Folders the plan does not name keep their names. ``DatasetError`` when the plan
        names a folder that is not there, or a harmonised name collides with another folder.
        """
        local = sorted(local)
        missing = {h: f for h, f in self.modalities.items() if f not in local}
        if missing:
            harmonised, folder = next(iter(missing.items()))
            raise DatasetError(
                f"The DataLoadingPlan maps modality {harmonised!r} to the folder {folder!r}, "
                f"which is not among the dataset's modality folders {local}. Fix the plan's "
                f"'modalities' entry for {harmonised!r}."
            )
        names = {folder: harmonised for harmonised, folder in self.modalities.items()}
        named = {f: names.get(f, f) for f in local}
        _check_unique("modality", named)
        return named

    def apply_frame(self, frame: pd.DataFrame, *, source: str = "the table") -> pd.DataFrame:
        """A copy of ``frame`` under harmonised column names, values and units.

        ``DatasetError`` names the key when the plan names a column the table lacks, when a
        column holds a value the plan does not map, or when a converted column is not
        numeric. ``source`` names the table in messages (a file name, never a path).
        """
        if not self:
            return frame
        local = [str(c) for c in frame.columns]
        for harmonised, column in self.columns.items():
            if column not in local:
                raise DatasetError(
                    f"The DataLoadingPlan maps column {harmonised!r} to {column!r}, which "
                    f"{source} does not have. Its columns: {local}. Fix the plan's 'columns' "
                    f"entry for {harmonised!r}."
                )
        renames = {column: harmonised for harmonised, column in self.columns.items()}
        named = {c: renames.get(c, c) for c in local}
        _check_unique("column", named)
        out = frame.rename(columns=lambda c: named[str(c)])
        for column, table in self.values.items():
            _require(out, column, "values", source)
            out[column] = map_values(out[column], table, column=column, source=source)
        for column, conv in self.units.items():
            _require(out, column, "units", source)
            if out[column].dtype.kind not in "iuf":
                raise DatasetError(
                    f"The DataLoadingPlan converts the units of column {column!r}, but "
                    f"{source} holds non-numeric values there (dtype {out[column].dtype})."
                )
            out[column] = out[column].astype(np.float64) * conv["scale"] + conv["offset"]
        return out


def map_values(series: pd.Series, table: Mapping[str, Any], *, column: str,
               source: str = "the table") -> pd.Series:
    """``series`` with local values replaced by ``table[value_key(value)]``.

    Missing values stay missing; any other value absent from ``table`` is a ``DatasetError``
    naming the column and the values.
    """
    present = pd.unique(series.dropna())
    unmapped = sorted({value_key(v) for v in present} - set(table))
    if unmapped:
        raise DatasetError(
            f"Column {column!r} of {source} holds values {unmapped} that the "
            f"DataLoadingPlan's 'values' entry for {column!r} does not map (it maps "
            f"{sorted(table)}). Add them to the plan."
        )
    lookup = {v: table[value_key(v)] for v in present}
    return series.map(lookup)


def value_key(value: Any) -> str:
    """The text under which a local value is looked up (``1``, ``1.0`` and ``"1"`` agree)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _mapping(what: str, value: Any) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{what} must be a mapping. Received: {value!r}")
    return value


def _renames(part: str, value: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for harmonised, local in _mapping(part, value).items():
        if not (isinstance(harmonised, str) and isinstance(local, str) and harmonised
                and local):
            raise ConfigurationError(
                f"{part} maps harmonised names to local names, both non-empty strings. "
                f"Received: {harmonised!r} -> {local!r}"
            )
        out[harmonised] = local
    reused = sorted({v for v in out.values() if list(out.values()).count(v) > 1})
    if reused:
        raise ConfigurationError(
            f"{part} maps several harmonised names to the same local name {reused[0]!r}: "
            "each local name may be mapped once."
        )
    return out


def _json_scalar(column: Any, value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigurationError(
        f"values[{column!r}] maps to strings, numbers or None. Received: {value!r}"
    )


def _check_unique(what: str, named: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for local, harmonised in named.items():
        if harmonised in seen:
            raise DatasetError(
                f"The DataLoadingPlan names the {what} {harmonised!r} twice: the local "
                f"{what}s {seen[harmonised]!r} and {local!r} would both carry it. Map one of "
                "them to another name."
            )
        seen[harmonised] = local


def _require(frame: pd.DataFrame, column: str, part: str, source: str) -> None:
    if column not in frame.columns:
        raise DatasetError(
            f"The DataLoadingPlan's {part!r} entry names column {column!r}, which {source} "
            f"does not have (after renaming). Its columns: {[str(c) for c in frame.columns]}."
        )
