"""What each researcher asked and was answered, per dataset and variable (table ``statistics``).

The node's defence against differencing (:mod:`fedcore.governance.statistics`) needs to
remember, for every verified researcher, dataset and variable: the bin edges it asked for
(answered or refused), which edge sets it was answered, and what the data looked like at the
last answer (record and missing counts, a digest of the values, counts per atom of the edges
asked until then). Nothing in it is sent to anyone; it survives restarts in the node's
TinyDB, and is written only when something changed (a repeated request writes nothing).
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tinydb import Query, TinyDB
from tinydb.table import Table

from fedcore.governance.statistics import Measure, Partition

__all__ = ["QueryLog", "VariableLog"]

TABLE = "statistics"


@dataclass
class VariableLog:
    """One researcher's history on one variable of one dataset."""

    asked: Partition = field(default_factory=Partition)
    answered: set[str] = field(default_factory=set)  # edges_key of each answered edge set
    last: Measure | None = None  # the data at the last answer


class QueryLog:
    """The node's per-researcher statistics query log, persisted in its TinyDB.

    One document per researcher and dataset holds every variable's history, so a request
    costs one read and at most one write.
    """

    def __init__(self, db: TinyDB | Table):
        # No query cache: the CLI may clear a researcher's log from another process.
        self._table = db if isinstance(db, Table) else db.table(TABLE, cache_size=0)
        self._lock = threading.Lock()

    @staticmethod
    def _where(researcher: str, dataset: str) -> Any:
        return (Query().researcher == researcher) & (Query().dataset == dataset)

    def get(self, researcher: str, dataset: str) -> dict[str, VariableLog]:
        """The researcher's history on each variable of ``dataset`` it asked about."""
        found = self._table.search(self._where(researcher, dataset))
        variables = found[0].get("variables") or {} if found else {}
        return {str(v): _entry(doc) for v, doc in variables.items()}

    def put(self, researcher: str, dataset: str, entries: dict[str, VariableLog]) -> None:
        """Store the histories of ``entries`` (other variables' are kept)."""
        with self._lock:
            found = self._table.search(self._where(researcher, dataset))
            variables = dict(found[0].get("variables") or {}) if found else {}
            variables.update({v: _doc(e) for v, e in entries.items()})
            self._table.upsert({"researcher": researcher, "dataset": dataset,
                                "variables": variables, "updated_at": time.time()},
                               self._where(researcher, dataset))

    def list(self, researcher: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every document (``researcher``, ``dataset``, ``variables``), or one researcher's."""
        docs = self._table.all() if researcher is None else self._table.search(
            Query().researcher == researcher)
        return [dict(d) for d in docs]

    def forget(self, researcher: str, datasets: Iterable[str] | None = None) -> int:
        """Clear a researcher's history (on ``datasets`` only, if given); how many documents.

        For a node administrator who decides that a researcher's earlier answers no longer
        matter (e.g. the data was replaced): the node then answers as to a newcomer.
        """
        q = Query().researcher == researcher
        if datasets is not None:
            q = q & Query().dataset.one_of(list(datasets))
        with self._lock:
            return len(self._table.remove(q))


def _doc(entry: VariableLog) -> dict[str, Any]:
    last = entry.last
    return {"asked": _plain(entry.asked), "answered": sorted(entry.answered),
            "last": None if last is None else {
                "records": last.records, "missing": last.missing, "digest": last.digest,
                "partition": _plain(last.partition), "atoms": last.atoms.tolist()}}


def _entry(doc: Mapping[str, Any]) -> VariableLog:
    last = doc.get("last")
    return VariableLog(
        asked=_partition(doc.get("asked")), answered=set(doc.get("answered") or ()),
        last=None if not last else Measure(
            records=int(last["records"]), missing=int(last["missing"]),
            digest=str(last["digest"]), partition=_partition(last.get("partition")),
            atoms=np.asarray(last.get("atoms") or [], dtype=np.int64)))


def _plain(p: Partition) -> dict[str, list[float]]:
    return {"edges": list(p.edges), "points": list(p.points)}


def _partition(doc: Any) -> Partition:
    if not doc:
        return Partition()
    return Partition(tuple(float(e) for e in doc.get("edges") or ()),
                     tuple(float(p) for p in doc.get("points") or ()))
