from __future__ import annotations

import builtins
import contextlib
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tinydb import Query, TinyDB

from fedcore.data._base import Dataset
from fedcore.errors import ConfigurationError, DatasetError
from fedcore.node._spawn import entry_paths as entry_paths  # the node reads it from here

if TYPE_CHECKING:
    from fedcore.data.loading_plan import DataLoadingPlan

# The dataset kinds' modules (pandas, nibabel, pydicom, Pillow) are imported when a dataset
# of that kind is opened: a node daemon connects without them.

Opener = Callable[[Path, dict[str, Any], "DataLoadingPlan | None"], Dataset]


@dataclass(frozen=True)
class _Kind:
    """How to open one kind of dataset, and what its registration may carry."""

    open: Opener
    options: frozenset[str]
    folder: bool = False  # the path is a directory rather than a file
    suffix: str = ""  # a file with this suffix is of this kind unless told otherwise


def _open_csv(path: Path, opts: dict[str, Any], plan: DataLoadingPlan | None) -> Dataset:
    from fedcore.data.tabular import TabularDataset

    dataset = TabularDataset(path, read_csv_kwargs=opts.get("read_csv"))
    if not plan:
        return dataset
    if plan.modalities or plan.keep_modalities:
        raise ConfigurationError(
            "A CSV dataset has no modalities: drop 'modalities' and 'keep_modalities' from "
            "its DataLoadingPlan."
        )
    return TabularDataset.from_frame(plan.apply_frame(dataset.frame, source=path.name))


def _open_npz(path: Path, opts: dict[str, Any], plan: DataLoadingPlan | None) -> Dataset:
    if plan:
        raise ConfigurationError(
            "An array (.npz) dataset has no named modalities, columns or values for a "
            "DataLoadingPlan to map."
        )
    from fedcore.data.array import ArrayDataset

    return ArrayDataset.load(path)


def _open_medical(path: Path, opts: dict[str, Any],
                  plan: DataLoadingPlan | None) -> Dataset:
    from fedcore.data.medical_folder import MedicalFolderDataset

    return MedicalFolderDataset(
        path, demographics=opts.get("demographics"),
        subject_column=opts.get("subject_column", "subject"),
        modalities=_names(opts.get("modalities")), loading_plan=plan,
        read_csv_kwargs=opts.get("read_csv"),
    )


def _open_dicom(path: Path, opts: dict[str, Any], plan: DataLoadingPlan | None) -> Dataset:
    from fedcore.data.dicom import DicomDataset

    return DicomDataset(
        path, demographics=opts.get("demographics"),
        subject_column=opts.get("subject_column", "subject"),
        modalities=_names(opts.get("modalities")),
        dicom_modality=_names(opts.get("dicom_modality")), loading_plan=plan,
        read_csv_kwargs=opts.get("read_csv"),
    )


def _open_images(path: Path, opts: dict[str, Any], plan: DataLoadingPlan | None) -> Dataset:
    from fedcore.data.image_folder import ImageFolderDataset

    size = opts.get("size")
    if isinstance(size, str):
        size = [int(s) for s in size.lower().replace("x", ",").split(",") if s.strip()]
    return ImageFolderDataset(path, mode=opts.get("mode"), size=size, loading_plan=plan)


#: Dataset kinds a node registers: ``csv`` and ``npz`` files, ``medical-folder``,
#: ``image-folder`` and ``dicom`` directories.
_LOADERS: dict[str, _Kind] = {
    "csv": _Kind(_open_csv, frozenset({"read_csv"}), suffix=".csv"),
    "npz": _Kind(_open_npz, frozenset(), suffix=".npz"),
    "medical-folder": _Kind(_open_medical, frozenset(
        {"demographics", "subject_column", "modalities", "read_csv"}), folder=True),
    "image-folder": _Kind(_open_images, frozenset({"mode", "size"}), folder=True),
    "dicom": _Kind(_open_dicom, frozenset(
        {"demographics", "subject_column", "modalities", "dicom_modality", "read_csv"}),
        folder=True),
}


class DatasetRegistry:
    """The node's datasets, kept in its TinyDB database (table ``datasets``).

    Each entry has an id, a name, tags, a kind (``csv``, ``npz``, ``medical-folder``,
    ``image-folder``, ``dicom``), the path and loader options (which never leave the node),
    the node's DataLoadingPlan if any, and the metadata shared with researchers (under harmonised
    names). A dataset is opened and checked before its entry is written. Tag sets must not
    overlap: a new dataset whose tags are a subset or superset of an existing one's is
    refused, so a researcher's search by a dataset's tags finds exactly that dataset.
    Each change is written to the audit log through ``audit`` (``dataset-added``,
    ``dataset-removed``, ``loading-plan-set``), in the same transaction as the change.

    Options by kind: ``csv``: ``read_csv`` (keyword arguments of ``pandas.read_csv``);
    ``medical-folder``: ``demographics`` (CSV path), ``subject_column`` (default
    ``"subject"``), ``modalities`` (local folder names to use; default all), ``read_csv``;
    ``image-folder``: ``mode`` (Pillow mode, e.g. ``"L"``), ``size`` (``[height, width]``);
    ``dicom``: as ``medical-folder`` (``modalities`` are series descriptions), plus
    ``dicom_modality`` (DICOM modalities to keep, e.g. ``["MR"]``).
    """

    def __init__(self, db: TinyDB, data_dir: Path, *,
                 audit: Callable[..., None] | None = None):
        # No query cache: another process (the CLI, the GUI) may change the file at any time.
        self._db = db
        self._table = db.table("datasets", cache_size=0)
        self._data_dir = data_dir
        self._audit = audit or (lambda event, **fields: None)
        self._lock = threading.Lock()
        # id -> ((_open_key, files_version), dataset): opened datasets, while both stay the same.
        self._cache: dict[str, tuple[tuple[Any, ...], Dataset]] = {}
        # Entries read, by id, with the version of db.json they were read from.
        self._entries: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        storage = getattr(db, "storage", None)
        self._version: Callable[[], tuple[int, int, int] | None] = getattr(
            storage, "version", lambda: None)

    # --- administration --------------------------------------------------------------------

    def add(
        self,
        name: str,
        tags: Iterable[str],
        path: str | Path,
        *,
        kind: str | None = None,
        description: str = "",
        options: dict[str, Any] | None = None,
        loading_plan: DataLoadingPlan | Mapping[str, Any] | None = None,
        by: str = "",
    ) -> dict[str, Any]:
        """Register the file or folder at ``path``; returns the new entry (with its ``id``).

        The dataset is opened and checked first (files read, headers and the
        ``loading_plan`` applied): a ``DatasetError`` or ``ConfigurationError`` says what is
        wrong, and nothing is written. ``by`` names the administrator, for the audit log.
        """
        return self._add(name, tags, path, kind=kind, description=description,
                         options=options, loading_plan=loading_plan, by=by)

    def _add(self, name: str, tags: Iterable[str], path: str | Path, *, kind: str | None,
             description: str = "", options: dict[str, Any] | None = None,
             loading_plan: DataLoadingPlan | Mapping[str, Any] | None = None, by: str = "",
             written: tuple[Dataset, tuple[int, ...]] | None = None) -> dict[str, Any]:
        """:meth:`add`, or with ``written``: the dataset this process just wrote at ``path``.

        ``written`` holds it and the version of the file as written (:func:`files_version`);
        it is used instead of reading the file back (unless a loading plan is given).
        """
        tags = _clean_tags(tags)
        path = Path(path).expanduser().resolve()
        kind = kind or _infer_kind(path)
        if kind not in _LOADERS:
            raise ConfigurationError(
                f"Unknown dataset kind {kind!r}. Expected one of {sorted(_LOADERS)}."
            )
        spec = _LOADERS[kind]
        if spec.folder and not path.is_dir():
            raise DatasetError(f"No folder at {path}. Expected the root folder of a {kind}.")
        if not spec.folder and not path.is_file():
            raise DatasetError(f"No file at {path}. Expected an existing {kind} file.")
        options = _clean_options(kind, options)
        plan = _plan(loading_plan)
        version: tuple[Any, ...] | None
        if written is not None and not plan:
            dataset, version = written
        else:  # the version first: a change while the file is read is seen next time
            version = files_version({"kind": kind, "path": str(path), "options": options})
            dataset = spec.open(path, options, plan)
        metadata = dataset.metadata()
        with self._transaction(), self._lock:
            for other in self._table.all():
                if _overlap(tags, other["tags"]):
                    raise ConfigurationError(
                        f"Tags {tags} overlap those of dataset {other['name']!r} "
                        f"({other['tags']}): one set contains the other, so a search could "
                        "not tell them apart. Add a distinguishing tag."
                    )
            entry: dict[str, Any] = {
                "id": f"ds-{uuid.uuid4().hex[:12]}",
                "name": name,
                "tags": tags,
                "kind": kind,
                "path": str(path),
                "description": description,
                "options": options,
                "loading_plan": plan.to_dict() if plan else None,
                "metadata": metadata,
                "category_counts": _category_counts(dataset, metadata),
                "report": _report(dataset),
                "added_at": time.time(),
            }
            self._table.insert(entry)
            self._audit("dataset-added", dataset=entry["id"], name=name, tags=tags, by=by)
            self._cache[entry["id"]] = ((_open_key(entry), version), dataset)
        return entry

    def add_arrays(self, name: str, tags: Iterable[str], X: Any, y: Any = None,
                   **kwargs: Any) -> dict[str, Any]:
        """Save arrays as an ``.npz`` file in the node home and register it.

        The node keeps a copy of the arrays as written instead of reading the file back
        (until the file changes: then it is read). Arrays of Python objects are refused
        (``DatasetError``): their file could not be read without pickle.
        """
        from fedcore.data.array import ArrayDataset

        dataset = ArrayDataset(np.array(X), None if y is None else np.array(y))  # copies
        if dataset.X.dtype.hasobject or (dataset.y is not None and dataset.y.dtype.hasobject):
            raise DatasetError("Cannot register arrays of Python objects (dtype object): a "
                               "node reads datasets without pickle. Convert them to numbers "
                               "or strings first.")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        path = (self._data_dir / f"{uuid.uuid4().hex[:12]}.npz").resolve()
        with open(path, "wb") as f:
            dataset.save(f)
            f.flush()
            version = _version(os.fstat(f.fileno()))  # the file as written, whoever writes next
        return self._add(name, tags, path, kind="npz", written=(dataset, version), **kwargs)

    def remove(self, dataset_id: str, *, by: str = "") -> None:
        """Forget a dataset (files the node copied into its home are deleted too)."""
        with self._transaction(), self._lock:
            entry = self.get(dataset_id)
            self._table.remove(Query().id == dataset_id)
            self._audit("dataset-removed", dataset=dataset_id, by=by)
            self._cache.pop(dataset_id, None)
        path = Path(entry["path"])
        if path.parent == self._data_dir.resolve() and path.is_file():
            path.unlink()

    def set_loading_plan(
        self, dataset_id: str, plan: DataLoadingPlan | Mapping[str, Any] | None, *,
        by: str = "",
    ) -> dict[str, Any]:
        """Attach ``plan`` to a dataset (``None`` removes it); returns the updated entry.

        The dataset is reopened through the plan first, so a plan naming a folder, column
        or value the data lacks is refused with a ``DatasetError`` naming it, and the stored
        entry is left as it was. On success the metadata researchers see is recomputed
        under the harmonised names.
        """
        with self._transaction(), self._lock:
            entry = self.get(dataset_id)
            loading_plan = _plan(plan)
            spec = _LOADERS[entry["kind"]]
            version = files_version(entry)
            dataset = spec.open(Path(entry["path"]), dict(entry["options"]), loading_plan)
            metadata = dataset.metadata()
            changes = {"loading_plan": loading_plan.to_dict() if loading_plan else None,
                       "metadata": metadata, "report": _report(dataset),
                       "category_counts": _category_counts(dataset, metadata)}
            self._table.update(changes, Query().id == dataset_id)
            self._audit("loading-plan-set", dataset=dataset_id, plan=changes["loading_plan"],
                        by=by)
            self._cache[dataset_id] = ((_open_key({**entry, **changes}), version), dataset)
        return {**entry, **changes}

    def get_loading_plan(self, dataset_id: str) -> DataLoadingPlan | None:
        """The DataLoadingPlan attached to a dataset, or ``None``."""
        from fedcore.data.loading_plan import DataLoadingPlan

        stored = self.get(dataset_id).get("loading_plan")
        return DataLoadingPlan.from_dict(stored) if stored else None

    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        begin = getattr(self._db, "transaction", None)
        return begin() if callable(begin) else contextlib.nullcontext()

    # --- queries ----------------------------------------------------------------------------

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every entry, each with ``available`` telling whether its files are still there."""
        version = self._version()
        entries = self._table.all()
        if version is not None:  # what get() keeps: a search is followed by its requests
            for e in entries:
                self._entries[e["id"]] = (version, dict(e))
        return [{**e, "available": _available(e)} for e in entries]

    def get(self, dataset_id: str) -> dict[str, Any]:
        """The entry of ``dataset_id``; ``DatasetError`` when there is none.

        Read once per version of ``db.json`` (a request reads its dataset's entry; another
        process's change replaces the file, and the next read finds it).
        """
        version = self._version()
        known = self._entries.get(dataset_id)
        if known is not None and version is not None and known[0] == version:
            return dict(known[1])
        found = self._table.search(Query().id == dataset_id)
        if not found:
            self._entries.pop(dataset_id, None)
            raise DatasetError(f"No dataset with id {dataset_id!r} on this node.")
        if version is not None:  # read no earlier than `version`: a later one is not kept
            self._entries[dataset_id] = (version, dict(found[0]))
        return dict(found[0])

    def search(self, tags: Sequence[str]) -> builtins.list[dict[str, Any]]:
        """Entries carrying every tag in ``tags``."""
        wanted = set(tags)
        return [e for e in self.list() if wanted <= set(e["tags"])]

    def all_tags(self) -> builtins.list[str]:
        """Every tag of every dataset."""
        return sorted({t for e in self._table.all() for t in e["tags"]})

    def load(self, dataset_id: str) -> Dataset:
        """Open the dataset for training, through its DataLoadingPlan.

        ``DatasetError`` if its files are gone or no longer fit the plan.
        """
        return self.open(self.get(dataset_id))

    def open(self, entry: dict[str, Any]) -> Dataset:
        """:meth:`load` for an entry already read (one database read per request).

        Opened datasets are kept while the entry's path, options and DataLoadingPlan are
        unchanged, so a plan set from another process (the CLI, the GUI) is seen at once,
        and while its file, folder and demographics file are (:func:`files_version`), so a
        file replaced or edited is read again.
        """
        version = files_version(entry)
        if version is None:
            self._cache.pop(entry["id"], None)
            raise DatasetError(
                f"Dataset {entry['name']!r} is unavailable on this node: its files were "
                "moved or deleted. The node administrator can re-register it."
            )
        key = (_open_key(entry), version)
        cached = self._cache.get(entry["id"])
        if cached is None or cached[0] != key:
            cached = self._cache[entry["id"]] = (key, open_entry(entry))
        return cached[1]

    def public(self, entry: dict[str, Any], *, min_count: int = 5) -> dict[str, Any]:
        """What a researcher may see of an entry: no path, no loader options.

        A value of a discrete column (``metadata["categories"]``) is listed only when at
        least ``min_count`` records hold it (the node's policy): a rare value would single
        its records out. A column with values left out is named in
        ``metadata["categories_withheld"]`` (which values, and how many, is not said);
        per-class counts are dropped when one is below ``min_count``.
        """
        public: dict[str, Any] = {k: entry[k] for k in (
            "id", "name", "tags", "description", "metadata", "available") if k in entry}
        meta = dict(public.get("metadata") or {})
        if min_count > 1 and (meta.get("categories") or meta.get("class_counts")):
            counts = entry.get("category_counts")
            if counts is None:
                counts = self._count_categories(entry)
            cats, withheld = {}, []
            for column, values in (meta.get("categories") or {}).items():
                n = counts.get(column) or []
                kept = [v for i, v in enumerate(values or [])
                        if i < len(n) and int(n[i]) >= min_count]
                cats[column] = kept
                if len(kept) < len(values or []):
                    withheld.append(column)
            meta["categories"] = cats
            if withheld:
                meta["categories_withheld"] = sorted(withheld)
            if any(int(n) < min_count for n in (meta.get("class_counts") or {}).values()):
                meta.pop("class_counts")
            public["metadata"] = meta
        return public

    def _count_categories(self, entry: dict[str, Any]) -> dict[str, builtins.list[int]]:
        """The fewest records per value of each discrete column of an older entry.

        Entries registered before these counts were kept get them now (stored); none when
        the data cannot be opened, and then no values are listed.
        """
        try:
            dataset = self.open(entry)
        except (ConfigurationError, DatasetError):
            return {}
        counts = _category_counts(dataset, entry.get("metadata") or {})
        with self._lock:
            self._table.update({"category_counts": counts}, Query().id == entry["id"])
        return counts


def open_entry(entry: Mapping[str, Any]) -> Dataset:
    """Open one dataset entry through its DataLoadingPlan (no database needed).

    The plan worker opens the one dataset of its round with this, from the entry alone.
    """
    plan = _plan(entry.get("loading_plan"))
    return _LOADERS[entry["kind"]].open(Path(entry["path"]), dict(entry["options"]), plan)


def _open_key(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """What an opened dataset depends on: reopen it when any of this changes (``!=``)."""
    return (entry["kind"], entry["path"], entry["options"], entry.get("loading_plan"))


def _clean_tags(tags: Iterable[str]) -> builtins.list[str]:
    if isinstance(tags, str):
        tags = [tags]
    cleaned = sorted({str(t).strip() for t in tags if str(t).strip()})
    if not cleaned:
        raise ConfigurationError("A dataset needs at least one non-empty tag.")
    return cleaned


def _overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    sa, sb = set(a), set(b)
    return sa <= sb or sb <= sa


def _infer_kind(path: Path) -> str:
    for kind, spec in _LOADERS.items():
        if spec.suffix and path.suffix.lower() == spec.suffix:
            return kind
    folders = sorted(k for k, spec in _LOADERS.items() if spec.folder)
    hint = f" A folder is a {' or '.join(folders)}." if path.is_dir() else ""
    raise ConfigurationError(
        f"Cannot tell the dataset kind of {path.name!r}. Expected kind one of "
        f"{sorted(_LOADERS)} (or a .csv / .npz file).{hint}"
    )


def _clean_options(kind: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    unknown = sorted(set(options) - _LOADERS[kind].options)
    if unknown:
        raise ConfigurationError(
            f"Unknown options {unknown} for a {kind} dataset. Expected some of "
            f"{sorted(_LOADERS[kind].options)}."
        )
    if "demographics" in options:
        demographics = Path(str(options["demographics"])).expanduser().resolve()
        if not demographics.is_file():
            raise DatasetError(f"No demographics file at {demographics}.")
        options["demographics"] = str(demographics)
    for key in ("modalities", "dicom_modality"):
        if key in options:
            options[key] = _names(options[key])
    return options


def _names(value: Any) -> builtins.list[str] | None:
    """A list of names from a list or a comma-separated string (as a CLI passes it)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _plan(plan: DataLoadingPlan | Mapping[str, Any] | None) -> DataLoadingPlan | None:
    if plan is None:
        return None
    from fedcore.data.loading_plan import DataLoadingPlan

    plan = DataLoadingPlan.from_dict(plan)
    return plan if plan else None


def _available(entry: Mapping[str, Any]) -> bool:
    return files_version(entry) is not None


def files_version(entry: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The inode, size and modification time of an entry's files; ``None``: one is missing.

    What changes when its file or folder, or its demographics file, is replaced or edited.
    Read for every request (one ``stat`` per file). A folder's own version changes when
    entries are added to it or removed, not when a file deeper in it is edited.
    """
    spec = _LOADERS.get(entry["kind"])
    if spec is None:
        return None
    try:
        st = os.stat(str(entry["path"]))
    except OSError:
        return None
    if not (stat.S_ISDIR(st.st_mode) if spec.folder else stat.S_ISREG(st.st_mode)):
        return None
    demographics = (entry.get("options") or {}).get("demographics")
    if demographics is None:
        return _version(st)
    try:
        other = os.stat(demographics)
    except OSError:
        return None
    return _version(st) + _version(other) if stat.S_ISREG(other.st_mode) else None


def _version(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _category_counts(dataset: Dataset, metadata: Mapping[str, Any]) -> dict[str, list[int]]:
    """How many records hold each value listed in ``metadata["categories"]`` (in order).

    Never shared: it decides which values may be listed. A column it cannot count gets no
    counts, and then none of its values is listed.
    """
    import pandas as pd

    out: dict[str, list[int]] = {}
    classes = metadata.get("class_counts") or {}
    table = next((t for name in ("frame", "demographics")
                  if isinstance(t := getattr(dataset, name, None), pd.DataFrame)), None)
    for column, values in (metadata.get("categories") or {}).items():
        if table is not None and column in table.columns:
            found = table[column].dropna().value_counts()
            counted = {_plain(k): int(n) for k, n in found.items()}
        elif classes and column == "target":
            counted = {str(k): int(n) for k, n in classes.items()}
        elif (y := getattr(dataset, "y", None)) is not None and column == "target":
            uniq, n = np.unique(np.asarray(y), return_counts=True)
            counted = {_plain(k): int(c) for k, c in zip(uniq, n, strict=True)}
        else:
            counted = {}
        out[column] = [counted.get(_plain(v), 0) for v in values or []]
    return out


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _report(dataset: Dataset) -> dict[str, Any]:
    """What the node administrator should know about a registration (never shared).

    Subjects skipped and why, volumes missing per modality, and missing values (NaN or
    empty) per column, for the administrator to fix the export or choose a
    DataLoadingPlan.
    """
    import pandas as pd

    from fedcore.data.medical_folder import MedicalFolderDataset

    report: dict[str, Any] = {}
    table = next((t for name in ("frame", "demographics")
                  if isinstance(t := getattr(dataset, name, None), pd.DataFrame)), None)
    if isinstance(dataset, MedicalFolderDataset):
        report["skipped_subjects"] = dataset.skipped
        report["missing_volumes"] = dataset.missing_volumes
    if table is not None:
        report["missing_values"] = {str(c): int(n) for c, n in table.isna().sum().items()
                                    if n}
    return report
