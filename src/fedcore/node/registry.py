from __future__ import annotations

import builtins
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tinydb import Query, TinyDB

from ..data import ArrayDataset, Dataset, TabularDataset
from ..errors import ConfigurationError, DatasetError

_LOADERS = {
    "csv": lambda path, opts: TabularDataset(path, read_csv_kwargs=opts.get("read_csv")),
    "npz": lambda path, opts: ArrayDataset.load(path),
}


class DatasetRegistry:
    """The node's datasets, kept in its TinyDB database (table ``datasets``).

    Each entry has an id, a name, tags, a kind (``csv``, ``npz``), the path (which never
    leaves the node) and the metadata shared with researchers. Tag sets must not overlap:
    a new dataset whose tags are a subset or superset of an existing one's is refused, so a
    researcher's search by a dataset's tags finds exactly that dataset.
    """

    def __init__(self, db: TinyDB, data_dir: Path):
        self._table = db.table("datasets")
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._cache: dict[str, Dataset] = {}

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
    ) -> dict[str, Any]:
        """Register the file at ``path``; returns the new entry (with its ``id``)."""
        tags = _clean_tags(tags)
        path = Path(path).expanduser().resolve()
        kind = kind or {".csv": "csv", ".npz": "npz"}.get(path.suffix.lower())
        if kind not in _LOADERS:
            raise ConfigurationError(
                f"Cannot tell the dataset kind of {path.name!r}. Expected kind one of "
                f"{sorted(_LOADERS)} (or a .csv / .npz file)."
            )
        if not path.is_file():
            raise DatasetError(f"No file at {path}. Expected an existing {kind} file.")
        options = dict(options or {})
        metadata = _LOADERS[kind](path, options).metadata()
        with self._lock:
            for other in self._table.all():
                if _overlap(tags, other["tags"]):
                    raise ConfigurationError(
                        f"Tags {tags} overlap those of dataset {other['name']!r} "
                        f"({other['tags']}): one set contains the other, so a search could "
                        "not tell them apart. Add a distinguishing tag."
                    )
            entry = {
                "id": f"ds-{uuid.uuid4().hex[:12]}",
                "name": name,
                "tags": tags,
                "kind": kind,
                "path": str(path),
                "description": description,
                "options": options,
                "metadata": metadata,
                "added_at": time.time(),
            }
            self._table.insert(entry)
        return entry

    def add_arrays(self, name: str, tags: Iterable[str], X: Any, y: Any = None,
                   **kwargs: Any) -> dict[str, Any]:
        """Save arrays as an ``.npz`` file in the node home and register it."""
        self._data_dir.mkdir(parents=True, exist_ok=True)
        path = self._data_dir / f"{uuid.uuid4().hex[:12]}.npz"
        ArrayDataset(X, y).save(path)
        return self.add(name, tags, path, kind="npz", **kwargs)

    def remove(self, dataset_id: str) -> None:
        """Forget a dataset (files the node copied into its home are deleted too)."""
        with self._lock:
            entry = self.get(dataset_id)
            self._table.remove(Query().id == dataset_id)
            self._cache.pop(dataset_id, None)
        path = Path(entry["path"])
        if path.parent == self._data_dir.resolve() and path.exists():
            path.unlink()

    # --- queries ----------------------------------------------------------------------------

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every entry, each with ``available`` telling whether its file is still there."""
        return [{**e, "available": Path(e["path"]).is_file()} for e in self._table.all()]

    def get(self, dataset_id: str) -> dict[str, Any]:
        """The entry of ``dataset_id``; ``DatasetError`` when there is none."""
        found = self._table.search(Query().id == dataset_id)
        if not found:
            raise DatasetError(f"No dataset with id {dataset_id!r} on this node.")
        return dict(found[0])

    def search(self, tags: Sequence[str]) -> builtins.list[dict[str, Any]]:
        """Entries carrying every tag in ``tags``."""
        wanted = set(tags)
        return [e for e in self.list() if wanted <= set(e["tags"])]

    def all_tags(self) -> builtins.list[str]:
        """Every tag of every dataset."""
        return sorted({t for e in self._table.all() for t in e["tags"]})

    def load(self, dataset_id: str) -> Dataset:
        """Open the dataset for training; ``DatasetError`` if its file is gone."""
        entry = self.get(dataset_id)
        path = Path(entry["path"])
        if not path.is_file():
            self._cache.pop(dataset_id, None)
            raise DatasetError(
                f"Dataset {entry['name']!r} is unavailable on this node: its file was moved "
                "or deleted. The node administrator can re-register it."
            )
        cached = self._cache.get(dataset_id)
        if cached is None:
            cached = self._cache[dataset_id] = _LOADERS[entry["kind"]](path, entry["options"])
        return cached

    @staticmethod
    def public(entry: dict[str, Any]) -> dict[str, Any]:
        """What a researcher may see of an entry: no path, no loader options."""
        return {k: entry[k] for k in ("id", "name", "tags", "description", "metadata",
                                      "available") if k in entry}


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
