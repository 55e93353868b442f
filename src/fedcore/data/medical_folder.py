"""MedicalFolderDataset: ``subject/modality/*.nii(.gz)`` volumes joined to a demographics CSV."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore.data._base import Dataset, Items, categories, without_root
from fedcore.data.loading_plan import DataLoadingPlan
from fedcore.errors import ConfigurationError, DatasetError

__all__ = ["MedicalFolderDataset"]

_NIFTI = (".nii", ".nii.gz")


def _nibabel() -> Any:
    # Imported on first use: nibabel takes 0.2 s to import, and `import fedcore` should not.
    import nibabel

    return nibabel


def _read_errors() -> tuple[type[BaseException], ...]:
    from nibabel.filebasedimages import ImageFileError

    return (OSError, EOFError, ValueError, ImageFileError, zlib.error)


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(_NIFTI) and not name.startswith(".")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class _Index:
    """What a scan of the folder found; file names are relative to the root."""

    subjects: list[str]  # kept subjects, sorted
    files: dict[str, list[str]]  # harmonised modality -> one file per kept subject
    shapes: dict[str, list[tuple[int, ...]]]
    spacings: dict[str, list[tuple[float, ...]]]
    skipped: dict[str, str]  # subject -> why it was skipped
    demographics: pd.DataFrame  # index: kept subjects; columns: harmonised, sorted
    lacking: dict[str, int]  # harmonised modality -> subjects without a volume of it


class MedicalFolderDataset(Dataset):
    """Imaging subjects laid out as ``root/<subject>/<modality>/<one file>.nii[.gz]``.

    ``demographics`` is a CSV file with one row per subject, found by ``subject_column``
    (values are matched to the subject folder names as text). ``modalities`` restricts the
    modality folders used (local names; default: every modality folder of any subject).
    ``loading_plan`` maps local folder names, columns, values and units to the federation's
    names (see :class:`~fedcore.data.DataLoadingPlan`); everything this object shows is
    harmonised.

    The rule for incomplete subjects: a subject is kept when it holds one NIfTI file for
    every modality the dataset uses; a subject lacking one (no folder, or no NIfTI file in
    it) is skipped and listed in :attr:`skipped` with the reason. A modality folder holding
    several NIfTI files, a file that does not open, or a kept subject without a demographics
    row is a ``DatasetError`` naming the file or subject.

    The folder is scanned on first use (NIfTI headers only); volumes are read from disk on
    every request, as ``float32``. Plans choose modalities as ``features``, a demographics
    column or a modality as ``target``, and demographic ``covariates`` through :meth:`items`.
    Metadata shows subject counts, modalities, shapes, voxel spacings and columns, never
    paths; errors name files relative to the root.
    """

    _KIND = "medical-folder"
    _WHAT = "medical folder"
    _LAYOUT = "<subject>/<modality>/<volume>.nii(.gz)"

    def __init__(
        self,
        root: str | Path,
        *,
        demographics: str | Path | None = None,
        subject_column: str = "subject",
        modalities: Sequence[str] | None = None,
        loading_plan: DataLoadingPlan | None = None,
        read_csv_kwargs: dict[str, Any] | None = None,
    ):
        self.root = Path(root)
        self.demographics_path = None if demographics is None else Path(demographics)
        self.subject_column = str(subject_column)
        if isinstance(modalities, str):
            modalities = [modalities]
        self._local_modalities = None if modalities is None else [str(m) for m in modalities]
        self.loading_plan = loading_plan or DataLoadingPlan()
        self.read_csv_kwargs = dict(read_csv_kwargs or {})

    # --- the scan ---------------------------------------------------------------------------

    @functools.cached_property
    def _ix(self) -> _Index:
        return self._scan()  # on first use, once

    def _scan(self) -> _Index:
        if not self.root.is_dir():
            raise DatasetError(
                f"The {self._WHAT} is unavailable (it was moved or deleted). The node "
                "administrator can re-register it."
            )
        found = self._discover()
        if not found:
            raise DatasetError(
                f"The {self._WHAT} holds no subject folders: expected {self._LAYOUT}."
            )
        local = self._used_modalities(found)
        names = self.loading_plan.modality_names(local)  # local -> harmonised
        keep = self.loading_plan.keep_modalities
        if keep:
            absent = [m for m in keep if m not in names.values()]
            if absent:
                raise DatasetError(
                    f"The DataLoadingPlan keeps modality {absent[0]!r}, which this dataset "
                    f"does not have. Its modalities: {sorted(names.values())}. Fix the "
                    "plan's 'keep_modalities'.")
            local = [m for m in local if names[m] in keep]
            names = {m: names[m] for m in local}
        for subject, mods in found.items():
            for mod in local:
                if len(mods.get(mod, ())) > 1:
                    shown = ", ".join(v.rsplit("/", 1)[1] for v in mods[mod][:3])
                    raise DatasetError(
                        f"{subject}/{mod} holds {len(mods[mod])} NIfTI files ({shown}): "
                        "expected one volume per subject and modality. Move the others out."
                    )

        without = {names[m]: sum(1 for mods in found.values() if not mods.get(m))
                   for m in local}
        kept: list[str] = []
        skipped: dict[str, str] = {}
        for subject, mods in found.items():
            lacking = sorted(names[m] for m in local if not mods.get(m))
            if lacking:
                skipped[subject] = f"no {', '.join(lacking)} volume"
            else:
                kept.append(subject)
        if not kept:
            example = next(iter(skipped.items()))
            raise DatasetError(
                f"No subject has a volume for every modality {sorted(names.values())} "
                f"(e.g. {example[0]}: {example[1]}). Register fewer modalities."
            )
        demographics = self._demographics(kept)
        files = {names[m]: [found[s][m][0] for s in kept] for m in local}
        shapes: dict[str, list[tuple[int, ...]]] = {}
        spacings: dict[str, list[tuple[float, ...]]] = {}
        for mod, rels in sorted(files.items()):
            headers = [self._header(rel) for rel in rels]
            shapes[mod] = [h[0] for h in headers]
            spacings[mod] = [h[1] for h in headers]
        return _Index(kept, dict(sorted(files.items())), shapes, spacings, skipped,
                      demographics, dict(sorted(without.items())))

    def _discover(self) -> dict[str, dict[str, list[str]]]:
        """Subject -> local modality -> its volumes (names relative to the root)."""
        found: dict[str, dict[str, list[str]]] = {}
        for subject_dir in _subdirs(self.root):
            found[subject_dir.name] = {
                mod_dir.name: sorted(f"{subject_dir.name}/{mod_dir.name}/{f.name}"
                                     for f in mod_dir.iterdir()
                                     if _is_nifti(f.name) and f.is_file())
                for mod_dir in _subdirs(subject_dir)
            }
        return found

    def _used_modalities(self, found: dict[str, dict[str, list[str]]]) -> list[str]:
        present = sorted({m for mods in found.values() for m in mods})
        if self._local_modalities is None:
            if not present:
                raise DatasetError(
                    f"The subject folders hold no modalities: expected {self._LAYOUT}."
                )
            return present
        absent = [m for m in self._local_modalities if m not in present]
        if absent:
            raise DatasetError(
                f"No subject has a modality named {absent[0]!r}. Modalities found: "
                f"{present}."
            )
        return sorted(set(self._local_modalities))

    def _demographics(self, kept: list[str]) -> pd.DataFrame:
        plan = self.loading_plan
        if self.demographics_path is None:
            if plan.columns or plan.values or plan.units:
                raise DatasetError(
                    "The DataLoadingPlan maps demographic columns, but this dataset has no "
                    "demographics file."
                )
            return pd.DataFrame(index=pd.Index(kept, name="subject"))
        name = self.demographics_path.name
        col = self.subject_column
        if not self.demographics_path.is_file():
            raise DatasetError(
                f"The demographics file {name} is unavailable (moved or deleted). The node "
                "administrator can re-register the dataset."
            )
        kwargs = {**self.read_csv_kwargs}
        kwargs["dtype"] = {**(kwargs.get("dtype") or {}), col: str}
        try:
            frame = pd.read_csv(self.demographics_path, **kwargs)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise DatasetError(f"The demographics file {name} cannot be read: {exc}") from exc
        if col not in frame.columns:
            raise DatasetError(
                f"The demographics file {name} has no subject column {col!r}. Its columns: "
                f"{[str(c) for c in frame.columns]}. Register the dataset with the right "
                "subject_column."
            )
        ids = frame[col].astype("string").str.strip()
        frame = frame.drop(columns=[col])
        frame.index = pd.Index(ids.to_numpy(dtype=object), name="subject")
        wanted = frame.index.isin(kept)
        repeated = sorted(set(frame.index[wanted & frame.index.duplicated()]))
        if repeated:
            raise DatasetError(
                f"Subject {repeated[0]!r} has {int((frame.index == repeated[0]).sum())} rows "
                f"in {name} (column {col!r}): expected one row per subject."
            )
        absent = [s for s in kept if s not in set(frame.index[wanted])]
        if absent:
            shown = ", ".join(repr(s) for s in absent[:5]) + (" ..." if len(absent) > 5 else "")
            raise DatasetError(
                f"Subject {shown} has image folders but no row in {name} (column {col!r}). "
                "Add the rows, or move the subject folders out of the dataset's root."
            )
        frame = plan.apply_frame(frame.loc[kept], source=name)
        return frame[sorted(str(c) for c in frame.columns)]

    def _header(self, rel: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        nib = _nibabel()
        try:
            img = nib.load(self.root / rel)
            shape = tuple(int(n) for n in img.shape)
            zooms = img.header.get_zooms()[: min(3, len(shape))]
        except _read_errors() as exc:
            raise DatasetError(
                f"The volume {rel} cannot be opened as NIfTI: {without_root(exc, self.root)}"
            ) from exc
        return shape, tuple(round(float(z), 6) for z in zooms)

    @staticmethod
    def _buffer(lead: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        """An empty float32 array for volumes of ``shape``, laid out as files store them."""
        return _volume_buffer(lead, shape)

    def _read(self, rel: str, out: np.ndarray | None = None) -> np.ndarray:
        """The volume at ``rel`` as float32, read into ``out`` (Fortran-ordered) if given."""
        nib = _nibabel()
        try:
            proxy = nib.load(self.root / rel, mmap=False).dataobj
            shape = tuple(int(n) for n in proxy.shape)
            if out is None:
                out = _volume_buffer((), shape)
            elif shape != out.shape:
                raise DatasetError(
                    f"The volume {rel} has shape {list(shape)}; its header said "
                    f"{list(out.shape)} at registration. Re-register the dataset."
                )
            if not _read_raw(proxy, out):
                out[...] = np.asarray(proxy, dtype=np.float32)
        except FileNotFoundError as exc:
            raise DatasetError(
                f"The volume {rel} is missing (moved or deleted since registration). The node "
                "administrator can restore it or re-register the dataset."
            ) from exc
        except _read_errors() as exc:
            raise DatasetError(
                f"The volume {rel} cannot be read ({without_root(exc, self.root)}). Check "
                "that it is a complete NIfTI file, or move the subject out of the dataset."
            ) from exc
        return out

    # --- what the node and the statistics see -----------------------------------------------

    @property
    def modalities(self) -> list[str]:
        """The modalities (harmonised names), sorted."""
        return list(self._ix.files)

    @property
    def subjects(self) -> list[str]:
        """The kept subjects, sorted; item ``i`` of the dataset is subject ``i``."""
        return list(self._ix.subjects)

    @property
    def skipped(self) -> dict[str, str]:
        """Subjects left out for lacking a modality, with the reason."""
        return dict(self._ix.skipped)

    @property
    def missing_volumes(self) -> dict[str, int]:
        """Per modality used, how many subject folders lack a volume of it (0s left out)."""
        return {m: n for m, n in self._ix.lacking.items() if n}

    @property
    def demographics(self) -> pd.DataFrame:
        """One row per kept subject (index ``subject``), harmonised columns, sorted."""
        return self._ix.demographics

    def iter_volumes(self, modality: str) -> Iterator[np.ndarray]:
        """The volumes of ``modality`` (harmonised name), one per kept subject, as float32."""
        for rel in self._files(modality):
            yield self._read(rel)

    def covariates(self, columns: Sequence[str]) -> np.ndarray:
        """Numeric demographic ``columns`` as a float32 array of shape (n, len(columns))."""
        return self._covariates_at(np.arange(len(self)), columns)

    def __len__(self) -> int:
        return len(self._ix.subjects)

    def metadata(self) -> dict[str, Any]:
        idx = self._ix
        demo = idx.demographics
        shapes = {m: _summary(s) for m, s in idx.shapes.items()}
        meta: dict[str, Any] = {
            "kind": self._KIND,
            "n_samples": len(idx.subjects),
            "n_skipped": len(idx.skipped),
            "modalities": list(idx.files),
            "shapes": shapes,
            "voxel_spacing": {m: _summary(s) for m, s in idx.spacings.items()},
            "columns": [str(c) for c in demo.columns],
            "dtypes": {**{m: "float32" for m in idx.files},
                       **{str(c): str(t) for c, t in demo.dtypes.items()}},
            "categories": {str(c): cats for c in demo.columns  # missing values left out
                           if (cats := categories(demo[c].dropna().to_numpy())) is not None},
        }
        uniform = {tuple(s) for s in shapes.values() if isinstance(s, list)}
        if len(uniform) == 1 and all(isinstance(s, list) for s in shapes.values()):
            meta["feature_shape"] = [len(shapes), *next(iter(uniform))]
        return meta

    # --- arrays and items -------------------------------------------------------------------

    def arrays(
        self, features: Sequence[str] | None = None, target: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``X`` of shape (n, n_modalities, *volume) and ``y`` from a column or a modality.

        ``features`` are modalities (default: every one but the target); ``target`` is a
        demographics column or a modality (for segmentation), or ``None``.
        """
        return self._arrays_at(np.arange(len(self)), features, target)

    def _arrays_at(self, indices, features, target):
        mods = self._features(features, target)
        X = self._stack(mods, indices)
        if target is None:
            return X, None
        if target in self._ix.files:
            return X, self._stack([target], indices)[:, 0]
        return X, self._column(target, indices)

    def items(self, features: Sequence[str] | None = None, target: str | None = None,
              covariates: Sequence[str] | None = None, **options: Any) -> Items:
        """Subjects one at a time as ``(x, y)``, each read from disk when asked for.

        ``x`` is the volumes, float32 of shape (n_modalities, *volume); with ``covariates``
        (numeric demographics columns) it is the pair ``(volumes, covariates)``, the latter
        float32 of shape (len(covariates),). ``y`` is an int64 or float32 scalar from a
        numeric column, the value itself from another, or a volume for a target modality.
        """
        if options:
            raise ConfigurationError(
                f"MedicalFolderDataset.items() takes features, target and covariates. "
                f"Received: {sorted(options)}"
            )
        return _SubjectItems(self, self._features(features, target), target,
                             None if covariates is None else list(covariates))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.items()[index]

    # --- helpers ----------------------------------------------------------------------------

    def _files(self, modality: str) -> list[str]:
        files = self._ix.files
        if modality not in files:
            raise ConfigurationError(
                f"No modality {modality!r} in this dataset. Modalities: {list(files)}"
            )
        return files[modality]

    def _features(self, features: Sequence[str] | None, target: str | None) -> list[str]:
        mods = self._ix.files
        columns = [str(c) for c in self._ix.demographics.columns]
        if target is not None and target not in mods and target not in columns:
            raise ConfigurationError(
                f"The target {target!r} is neither a modality nor a demographics column. "
                f"Modalities: {list(mods)}; columns: {columns}"
            )
        if isinstance(features, str):
            features = [features]
        wanted = list(features) if features is not None else [m for m in mods if m != target]
        unknown = [m for m in wanted if m not in mods]
        if unknown:
            raise ConfigurationError(
                f"Features {unknown} are not modalities of this dataset. Modalities: "
                f"{list(mods)}. Demographic columns are taken as `target`, or as "
                "`covariates` of items()."
            )
        if not wanted:
            raise ConfigurationError("No modality left to use as features.")
        return wanted

    def _shape(self, mods: Sequence[str], indices: np.ndarray) -> tuple[int, ...]:
        shapes = self._ix.shapes
        seen = {shapes[m][int(i)] for m in mods for i in indices} or {shapes[m][0] for m in mods}
        if len(seen) > 1:
            raise DatasetError(
                f"The volumes of {list(mods)} differ in shape ({sorted(seen)[:3]}): they must "
                "be resampled to one grid before they can be stacked."
            )
        return seen.pop()

    def _stack(self, mods: Sequence[str], indices: np.ndarray) -> np.ndarray:
        shape = self._shape(mods, indices)
        X = self._buffer((len(indices), len(mods)), shape)
        for row, i in enumerate(indices):
            for col, mod in enumerate(mods):
                self._read(self._ix.files[mod][int(i)], out=X[row, col])
        return X

    def _column(self, column: str, indices: np.ndarray) -> np.ndarray:
        values = self._ix.demographics[column].iloc[indices]
        missing = values.index[values.isna()].tolist()
        if missing:
            raise DatasetError(
                f"Column {column!r} has no value for subject {missing[0]!r}"
                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}. The node "
                "administrator can fill it in; the plan can choose another column."
            )
        return values.to_numpy()

    def _covariates_at(self, indices: np.ndarray, columns: Sequence[str]) -> np.ndarray:
        columns = [columns] if isinstance(columns, str) else list(columns)
        demo = self._ix.demographics
        unknown = [c for c in columns if c not in demo.columns]
        if unknown:
            raise ConfigurationError(
                f"Covariates {unknown} are not demographics columns. Columns: "
                f"{[str(c) for c in demo.columns]}"
            )
        out = np.empty((len(indices), len(columns)), np.float32)
        for j, col in enumerate(columns):
            values = self._column(col, indices)
            if values.dtype.kind not in "iufb":
                raise ConfigurationError(
                    f"Covariate {col!r} is not numeric (values like {values[:3].tolist()}). "
                    "Use numeric columns as covariates, or encode this one in the plan."
                )
            out[:, j] = values
        return out


class _SubjectItems(Items):
    def __init__(self, dataset: MedicalFolderDataset, mods: list[str], target: str | None,
                 covariates: list[str] | None):
        self.dataset, self.mods, self.target = dataset, mods, target
        n = len(dataset)
        everyone = np.arange(n)
        self.shape = dataset._shape(mods, everyone)
        self.covariates = (None if covariates is None
                           else dataset._covariates_at(everyone, covariates))
        self.y: np.ndarray | None = None
        if target is not None and target not in dataset._ix.files:
            y = dataset._column(target, everyone)
            kind = y.dtype.kind
            self.y = y.astype(np.int64) if kind in "iub" else (
                y.astype(np.float32) if kind == "f" else y)
        elif target is not None:
            self.target_shape = dataset._shape([target], everyone)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} subjects")
        files = self.dataset._ix.files
        x = self.dataset._buffer((len(self.mods),), self.shape)
        for j, mod in enumerate(self.mods):
            self.dataset._read(files[mod][index], out=x[j])
        y: Any = None
        if self.y is not None:
            y = self.y[index]
        elif self.target is not None:
            y = self.dataset._read(files[self.target][index])
        if self.covariates is not None:
            return (x, self.covariates[index]), y
        return x, y


def _volume_buffer(lead: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """An empty float32 array of shape ``lead + shape`` whose volumes are Fortran-ordered.

    NIfTI volumes are stored in Fortran order, so copying each one into such a slot is a
    plain memory copy; into a C-ordered array it would be a transpose, twice as slow.
    """
    buf = np.empty((*lead, *shape[::-1]), dtype=np.float32)
    k = len(lead)
    return buf.transpose(*range(k), *range(buf.ndim - 1, k - 1, -1))


def _read_raw(proxy: Any, out: np.ndarray) -> bool:
    """Read the voxels straight into ``out`` when they need no conversion; else False.

    That is the common case of float32 volumes without intensity scaling: the file's bytes
    go into their final place (decompressed if need be) without an intermediate array,
    which keeps a stacked load as fast as reading the files one by one.
    """
    if not (getattr(proxy, "is_proxy", False) and proxy.dtype == out.dtype
            and proxy.slope == 1.0 and proxy.inter == 0.0 and proxy.order == "F"
            and isinstance(proxy.file_like, (str, Path)) and out.T.flags.c_contiguous):
        return False
    from nibabel.openers import ImageOpener

    target = out.T.data.cast("B")  # out is Fortran-ordered: out.T is C-ordered
    done = 0
    with ImageOpener(str(proxy.file_like)) as f:
        f.seek(proxy.offset)
        while done < len(target):
            n = f.readinto(target[done:])
            if not n:
                break
            done += n
    if done < len(target):
        raise OSError(f"Expected {len(target)} bytes, got {done}: the file is truncated")
    return True


def _summary(values: Sequence[tuple[Any, ...]]) -> Any:
    """The common value as a list, or ``{"min": [...], "max": [...]}`` when values differ."""
    distinct = set(values)
    if len(distinct) <= 1:
        return list(next(iter(distinct))) if distinct else None
    if len({len(v) for v in distinct}) > 1:
        return {"min": None, "max": None}
    arr = np.array(sorted(distinct))
    return {"min": arr.min(axis=0).tolist(), "max": arr.max(axis=0).tolist()}
