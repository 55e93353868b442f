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
from collections.abc import Iterable
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
    """The node's per-researcher statistics query log, persisted in its TinyDB."""

    def __init__(self, db: TinyDB | Table):
        # No query cache: the CLI may clear a researcher's log from another process.
        self._table = db if isinstance(db, Table) else db.table(TABLE, cache_size=0)
        self._lock = threading.Lock()

    @staticmethod
    def _where(researcher: str, dataset: str, variable: str) -> Any:
        q = Query()
        return (q.researcher == researcher) & (q.dataset == dataset) & (q.variable == variable)

    def get(self, researcher: str, dataset: str, variable: str) -> VariableLog:
        """The researcher's history on ``variable`` (empty when it never asked)."""
        found = self._table.search(self._where(researcher, dataset, variable))
        if not found:
            return VariableLog()
        doc = found[0]
        last = doc.get("last")
        return VariableLog(
            asked=_partition(doc.get("asked")), answered=set(doc.get("answered") or ()),
            last=None if not last else Measure(
                records=int(last["records"]), missing=int(last["missing"]),
                digest=str(last["digest"]), partition=_partition(last.get("partition")),
                atoms=np.asarray(last.get("atoms") or [], dtype=np.int64)))

    def put(self, researcher: str, dataset: str, variable: str, entry: VariableLog) -> None:
        """Store ``entry`` (replacing the researcher's history on ``variable``)."""
        last = entry.last
        doc = {"researcher": researcher, "dataset": dataset, "variable": variable,
               "asked": _plain(entry.asked), "answered": sorted(entry.answered),
               "last": None if last is None else {
                   "records": last.records, "missing": last.missing, "digest": last.digest,
                   "partition": _plain(last.partition), "atoms": last.atoms.tolist()},
               "updated_at": time.time()}
        with self._lock:
            self._table.upsert(doc, self._where(researcher, dataset, variable))

    def list(self, researcher: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every entry (``researcher``, ``dataset``, ``variable``...), or one researcher's."""
        docs = self._table.all() if researcher is None else self._table.search(
            Query().researcher == researcher)
        return [dict(d) for d in docs]

    def forget(self, researcher: str, datasets: Iterable[str] | None = None) -> int:
        """Clear a researcher's history (on ``datasets`` only, if given); how many entries.

        For a node administrator who decides that a researcher's earlier answers no longer
        matter (e.g. the data was replaced): the node then answers as to a newcomer.
        """
        q = Query().researcher == researcher
        if datasets is not None:
            q = q & Query().dataset.one_of(list(datasets))
        with self._lock:
            return len(self._table.remove(q))


def _plain(p: Partition) -> dict[str, list[float]]:
    return {"edges": list(p.edges), "points": list(p.points)}


def _partition(doc: Any) -> Partition:
    if not doc:
        return Partition()
    return Partition(tuple(float(e) for e in doc.get("edges") or ()),
                     tuple(float(p) for p in doc.get("points") or ()))
