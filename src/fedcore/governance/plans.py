"""Training-plan review: the plans researchers submitted, and the administrator's decisions."""

from __future__ import annotations

import builtins
import contextlib
import difflib
import time
from collections.abc import Callable
from typing import Any

from tinydb import Query, TinyDB
from tinydb.table import Table

from fedcore.errors import ConfigurationError
from fedcore.plan import PlanBundle

__all__ = ["STATUSES", "PlanStore"]

STATUSES = ("pending", "approved", "rejected")


class PlanStore:
    """Submitted plans in the node's TinyDB database (table ``plans``), one per SHA-256.

    An entry holds the plan's ``sha256``, ``entry`` (class name), ``backend``, ``files``
    (its source), ``submitter``, ``submitted_at``, the researcher's ``message``, and the
    review: ``status`` (``pending``, ``approved``, ``rejected``), ``note``, ``reviewed_by``,
    ``reviewed_at``. Every change is written to the audit log through ``audit``.

    Reads go to the database file every time (never a cached query), so a decision taken
    with ``fedcore-node plan approve`` in another process counts from the next request on.
    On a node's database (which has ``transaction()``), each change and its audit record
    are one transaction: read afresh under the home's lock, written together or not at all.
    """

    def __init__(self, db: TinyDB, *, audit: Callable[..., None] | None = None):
        self._db = db
        self._table = db.table("plans", cache_size=0)
        self._audit = audit or (lambda event, **fields: None)

    def sibling_table(self, name: str) -> Table:
        """Table ``name`` of the database the plans live in, e.g. the privacy ledger's.

        It has no query cache: the node, the CLI and the GUI may be different processes.
        """
        return self._db.table_class(self._db.storage, name, cache_size=0)

    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        begin = getattr(self._db, "transaction", None)
        return begin() if callable(begin) else contextlib.nullcontext()

    # --- researcher side --------------------------------------------------------------------

    def submit(self, bundle: PlanBundle, *, submitter: str = "", message: str = ""
               ) -> dict[str, Any]:
        """Store ``bundle`` as pending review (an already known plan keeps its status)."""
        sha = bundle.sha256
        with self._transaction():
            known = self.find(sha)
            if known is not None:
                return known
            entry = {"sha256": sha, "entry": bundle.entry, "backend": bundle.backend,
                     "files": dict(bundle.files), "submitter": submitter,
                     "submitted_at": time.time(), "message": message, "status": "pending",
                     "note": "", "reviewed_by": "", "reviewed_at": None}
            self._table.insert(entry)
            self._audit("plan-submitted", plan=sha, entry=bundle.entry, submitter=submitter)
        return dict(entry)

    def status(self, sha256: str) -> str:
        """``approved``, ``pending``, ``rejected``, or ``unknown`` for a plan never submitted."""
        entry = self.find(sha256)
        return str(entry["status"]) if entry else "unknown"

    # --- administrator side -----------------------------------------------------------------

    def approve(self, ref: str, *, by: str = "", note: str = "") -> dict[str, Any]:
        """Approve the plan ``ref`` (its hash or a unique prefix of it)."""
        return self._decide(ref, "approved", by=by, note=note)

    def reject(self, ref: str, *, by: str = "", note: str) -> dict[str, Any]:
        """Reject the plan ``ref``; ``note`` is the reason the researcher sees."""
        if not note.strip():
            raise ConfigurationError("Give a note when rejecting a plan: the researcher sees "
                                     "it as the reason.")
        return self._decide(ref, "rejected", by=by, note=note)

    def _decide(self, ref: str, status: str, *, by: str, note: str) -> dict[str, Any]:
        with self._transaction():
            entry = self.get(ref)
            changes = {"status": status, "note": note, "reviewed_by": by,
                       "reviewed_at": time.time()}
            self._table.update(changes, Query().sha256 == entry["sha256"])
            self._audit(f"plan-{status}", plan=entry["sha256"], entry=entry["entry"], by=by,
                        note=note, was=entry["status"])
        return {**entry, **changes}

    # --- queries ----------------------------------------------------------------------------

    def find(self, sha256: str) -> dict[str, Any] | None:
        """The entry with exactly this hash, or ``None``."""
        doc = self._table.get(Query().sha256 == sha256)
        return dict(doc) if isinstance(doc, dict) else None

    def get(self, ref: str) -> dict[str, Any]:
        """The entry whose hash is ``ref`` or starts with it (at least 6 characters)."""
        ref = ref.strip().lower()
        exact = self.find(ref)
        if exact is not None:
            return exact
        found = [e for e in self.list() if len(ref) >= 6 and e["sha256"].startswith(ref)]
        if len(found) == 1:
            return found[0]
        if found:
            raise ConfigurationError(
                f"{ref!r} is the start of {len(found)} plans' hashes: "
                f"{[e['sha256'][:16] for e in found]}. Give more characters.")
        raise ConfigurationError(
            f"No plan {ref!r} on this node. Expected a plan's SHA-256 (or its first 6+ "
            "characters) as listed by `fedcore-node plan list`.")

    def list(self, status: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every entry (or those of one ``status``), oldest submission first."""
        if status is not None and status not in STATUSES:
            raise ConfigurationError(f"status must be one of {list(STATUSES)}. "
                                     f"Received: {status!r}")
        entries = [dict(e) for e in self._table.all()
                   if status is None or e["status"] == status]
        return sorted(entries, key=lambda e: e["submitted_at"])

    def bundle(self, ref: str) -> PlanBundle:
        """The stored plan as a bundle (its hash is the entry's)."""
        e = self.get(ref)
        return PlanBundle(files=dict(e["files"]), entry=e["entry"], backend=e["backend"])

    def previous(self, ref: str) -> dict[str, Any] | None:
        """The latest earlier submission of a plan with the same class name, if any."""
        entry = self.get(ref)
        earlier = [e for e in self.list() if e["entry"] == entry["entry"]
                   and e["submitted_at"] < entry["submitted_at"]]
        return earlier[-1] if earlier else None

    def diff(self, ref: str, against: str | None = None) -> str:
        """Unified diff of ``ref``'s source against ``against`` (default: its previous version).

        Empty when there is nothing to compare with or the sources are the same.
        """
        new = self.get(ref)
        old = self.get(against) if against else self.previous(ref)
        if old is None:
            return ""
        lines: list[str] = []
        for name in sorted(set(old["files"]) | set(new["files"])):
            lines += difflib.unified_diff(
                old["files"].get(name, "").splitlines(keepends=True),
                new["files"].get(name, "").splitlines(keepends=True),
                f"{old['sha256'][:12]}/{name}", f"{new['sha256'][:12]}/{name}")
        return "".join(line if line.endswith("\n") else line + "\n" for line in lines)
