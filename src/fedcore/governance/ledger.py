"""The privacy each dataset has spent, kept in the node's database (table ``privacy``).

One entry per dataset: its accountant events (``[[noise_multiplier, sample_rate, steps],
...]``), the delta of the last round, the number of DP rounds and when the last one ran.
Events, not epsilons, are stored: composing them again gives the total at any delta, and
the total survives node restarts. Reads go to the database file every time, so
``fedcore-node budget`` and the GUI see a round as soon as the node records it.
"""

from __future__ import annotations

import builtins
import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from tinydb import Query, TinyDB
from tinydb.table import Table

from fedcore.privacy.accountant import Accountant, Event, check_delta
from fedcore.privacy.spec import DEFAULT_DELTA

__all__ = ["PrivacyLedger"]

TABLE = "privacy"


class PrivacyLedger:
    """Spent privacy per dataset, persisted as accountant events in the node's TinyDB.

    ``record`` after every successful DP round; ``spent`` for the total. Example::

        ledger = PrivacyLedger(node.db)
        ledger.record("ds-1234", [(1.1, 0.01, 300)], delta=1e-5)
        epsilon, delta = ledger.spent("ds-1234")
    """

    def __init__(self, db: TinyDB | Table):
        # No query cache: the node, the CLI and the GUI may be different processes.
        self._table = db if isinstance(db, Table) else db.table(TABLE, cache_size=0)
        self._lock = threading.Lock()

    @classmethod
    def on_storage(cls, storage: Any) -> PrivacyLedger:
        """A ledger on an open TinyDB storage (what a table of the same database uses)."""
        return cls(Table(storage, TABLE, cache_size=0))

    def _entry(self, dataset_id: str) -> dict[str, Any] | None:
        found = self._table.search(Query().dataset == dataset_id)
        return dict(found[0]) if found else None

    def record(self, dataset_id: str, events: Iterable[Event | Sequence[Any]], *,
               delta: float | None = None) -> tuple[float, float]:
        """Add a round's events to ``dataset_id``; returns the new ``spent`` total.

        ``delta`` is the round's (kept as the dataset's default for :meth:`spent`).
        Invalid events raise ``ConfigurationError`` and nothing is written.
        """
        new = [Event.coerce(e) for e in events]
        if delta is not None:
            delta = check_delta(delta)
        begin = getattr(self._table.storage, "transaction", None)  # the node's: cross-process
        with begin() if callable(begin) else contextlib.nullcontext(), self._lock:
            entry = self._entry(dataset_id)
            acc = Accountant((entry or {}).get("events") or [])
            acc.extend(new)
            doc = {"dataset": dataset_id, "events": acc.state_dict()["events"],
                   "delta": delta if delta is not None else (entry or {}).get(
                       "delta", DEFAULT_DELTA),
                   "rounds": int((entry or {}).get("rounds", 0)) + 1,
                   "updated_at": time.time()}
            self._table.upsert(doc, Query().dataset == dataset_id)
        return self.spent(dataset_id)

    def events(self, dataset_id: str) -> builtins.list[Event]:
        """The dataset's accountant events (empty when it never ran a DP round)."""
        entry = self._entry(dataset_id) or {}
        return [Event.coerce(e) for e in entry.get("events") or []]

    def accountant(self, dataset_id: str) -> Accountant:
        """An :class:`~fedcore.privacy.Accountant` holding the dataset's events."""
        return Accountant(self.events(dataset_id))

    def spent(self, dataset_id: str, delta: float | None = None) -> tuple[float, float]:
        """``(epsilon, delta)`` spent on ``dataset_id`` so far (``(0.0, delta)`` for none).

        ``delta`` defaults to the one of the dataset's last round (or 1e-5).
        """
        entry = self._entry(dataset_id) or {}
        delta = check_delta(delta if delta is not None else entry.get("delta", DEFAULT_DELTA))
        return Accountant(entry.get("events") or []).epsilon(delta), delta

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every dataset's entry (``dataset``, ``events``, ``delta``, ``rounds``, ...)."""
        return [dict(e) for e in self._table.all()]

