"""The node's database: one writer at a time across processes, each change audited with it.

The daemon, ``fedcore-node`` commands and the web GUI are separate processes that all change
``db.json``. TinyDB rewrites the whole file on every change, so two processes that read,
change and write it at the same time lose one of the changes. Here:

- :class:`HomeLock` is an exclusive ``flock`` on ``write.lock`` in the node home (and a
  thread lock), taken around every read-modify-write of ``db.json`` and ``config.toml``.
- :meth:`NodeStorage.transaction` takes the lock, reads the file afresh, lets the change
  happen in memory, writes the file once (atomically, fsynced unless the home is not
  ``durable``: a simulation's temporary one) and releases the lock. Every
  TinyDB table write runs inside one; a logical change spanning several reads and writes
  (check the tags, then insert) opens one around them all: ``with node.db.transaction():``.
- Audit records made during a transaction (``Node.audit``) are written *with* the change:
  they go into ``db.json`` (key ``_audit_pending``) in the same atomic write, and are then
  appended to the audit log (fsynced) while the lock is still held. A process killed between
  the two leaves them in ``db.json``: the next transaction, in any process, finds them,
  appends those the log lacks (marked ``"recovered": true``) and goes on. So a crash leaves
  the change and its record, or neither.
- A transaction may also replace a small file of the home (``config.toml``:
  :meth:`NodeStorage.stage`). The new text goes into the same ``db.json`` write as the
  records, with the SHA-256 of the file before and after; the file is then written, then the
  records (each carries ``config_sha256``, the new file's hash). Recovery finishes what a
  crash interrupted: a file still as it was before is written, and the records appended. So
  a ``config.toml`` change and its audit record are also both there, or neither, and
  ``audit verify`` can compare the file with the last hash the log recorded.

Reads outside a transaction take no lock: the file is replaced atomically, so a reader sees
one whole version, the latest committed one (a parsed copy is kept per version of the file,
known by its inode, size and modification time: every commit replaces the file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from fedcore._files import write_atomic
from fedcore.node.audit import AuditLog

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one writing process only
    fcntl = None  # type: ignore[assignment]

__all__ = ["CONFIG_HASH", "PENDING", "HomeLock", "NodeDatabase", "NodeStorage", "NodeTable",
           "file_sha256"]

#: The key of ``db.json`` holding the audit records of the last change, until they are
#: known to be in the audit log.
PENDING = "_audit_pending"
LOCK_FILE = "write.lock"


class HomeLock:
    """An exclusive lock on a node home, across processes (``flock``) and threads.

    Re-entrant within a thread: a transaction may call code that takes it again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the ``with`` block (waits while another writer holds it)."""
        with self._thread_lock:
            if self._depth == 0:
                self._fd = _flock(self.path)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    os.close(self._fd)  # closing the file releases the flock
                    self._fd = None


def _flock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    return fd


#: The record field that holds the SHA-256 of ``config.toml`` as a change left it.
CONFIG_HASH = "config_sha256"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (of no bytes when it does not exist)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return hashlib.sha256(b"").hexdigest()


@dataclass
class _Staged:
    text: str
    done: Callable[[bool], None] | None


@dataclass
class _Transaction:
    data: dict[str, Any]
    dirty: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, _Staged] = field(default_factory=dict)


class NodeStorage(Storage):
    """TinyDB storage of ``db.json`` with transactions; see the module's docstring.

    ``lock`` defaults to ``write.lock`` beside the file; ``journal`` is the audit log that
    records made in a transaction go to (without one, records are refused).
    ``durable=False`` writes the files without ``fsync`` (each still replaced whole): for
    a home that nothing outlives (a simulation's temporary folder).
    """

    def __init__(self, path: str | Path, lock: HomeLock | None = None,
                 journal: AuditLog | None = None, *, durable: bool = True):
        self.path = Path(path)
        self.durable = durable
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self.lock = lock or HomeLock(self.path.parent / LOCK_FILE)
        self.journal = journal
        self._local = threading.local()
        self._known: deque[str] = deque(maxlen=64)  # transactions known to be in the log
        self._parsed: tuple[tuple[int, int, int] | None, dict[str, Any]] | None = None

    # --- transactions -----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One logical change: read afresh under the lock, change, write once, audit.

        Nested calls join the transaction already open in this thread. An exception leaves
        the file (and the audit log) as they were.
        """
        if self._current() is not None:
            yield
            return
        with self.lock.hold():
            raw = self._load()
            pending = raw.pop(PENDING, None)
            if pending:
                self._recover(pending)
            txn = self._local.txn = _Transaction(raw)
            committed = False
            try:
                yield
                self._commit(txn)
                committed = True
            finally:
                self._local.txn = None
                for staged in txn.files.values():
                    if staged.done is not None:
                        staged.done(committed)

    def stage(self, path: str | Path, text: str,
              done: Callable[[bool], None] | None = None) -> None:
        """Replace the file ``path`` with ``text`` when the open transaction commits.

        The file and the transaction's audit records are written together (see the module's
        docstring). ``done(committed)`` is called when the transaction ends.
        """
        txn = self._current()
        if txn is None:
            raise RuntimeError("NodeStorage.stage needs an open transaction")
        txn.files[str(Path(path).resolve())] = _Staged(text, done)
        txn.dirty = True

    def record(self, record: dict[str, Any]) -> None:
        """Audit ``record``: with the open transaction's change, or at once without one."""
        txn = self._current()
        if txn is not None:
            txn.records.append(record)
        elif self.journal is not None:
            self.journal.append(record)

    def in_transaction(self) -> bool:
        """Whether this thread has a transaction open (its records go with its change)."""
        return self._current() is not None

    def recover(self) -> None:
        """Append to the audit log the records of a change a crash left unaudited."""
        with self.transaction():
            pass

    def _current(self) -> _Transaction | None:
        return getattr(self._local, "txn", None)

    def _commit(self, txn: _Transaction) -> None:
        records = txn.records
        if txn.dirty:
            data = dict(txn.data)
            files = {path: {"old": file_sha256(path),
                            "new": hashlib.sha256(staged.text.encode()).hexdigest(),
                            "text": staged.text} for path, staged in txn.files.items()}
            if records:
                if self.journal is None:
                    raise RuntimeError("NodeStorage has no audit log to write records to")
                tid = uuid.uuid4().hex
                for record in records:
                    record["txn"] = tid
                    for path, change in files.items():
                        if Path(path).name == "config.toml":
                            record[CONFIG_HASH] = change["new"]
                data[PENDING] = {"1": {"txn": tid, "offset": self.journal.size(),
                                       "records": records, "files": files}}
            self._parsed = None  # this process's copy is stale once it commits
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True, default=str),
                         durable=self.durable)
            for path, staged in txn.files.items():
                write_atomic(path, staged.text, durable=self.durable)
            if records:
                assert self.journal is not None
                self.journal.append_all(records)
                self._known.append(records[0]["txn"])
        elif self.journal is not None:  # nothing in db.json to tie them to
            for record in records:
                self.journal.append(record)

    def _recover(self, pending: dict[str, Any]) -> None:
        for entry in pending.values():
            tid = entry.get("txn") if isinstance(entry, dict) else None
            if not isinstance(tid, str) or tid in self._known or self.journal is None:
                continue
            records = [r for r in entry.get("records") or [] if isinstance(r, dict)]
            logged = self.journal.count_txn(tid, int(entry.get("offset") or 0))
            if logged < len(records):
                _finish_files(entry.get("files"), durable=self.durable)
                self.journal.append_all([{**r, "recovered": True} for r in records[logged:]])
            self._known.append(tid)

    # --- TinyDB's storage interface ---------------------------------------------------------

    def read(self) -> dict[str, dict[str, Any]] | None:
        """The database: the open transaction's copy, else the file as last committed."""
        txn = self._current()
        if txn is not None:
            return _copy(txn.data)
        # Parsed once per version of the file: every commit, in any process, replaces it
        # (a new inode), so its stamp tells a version from the next without reading it.
        now = file_stamp(self.path)
        cached = self._parsed
        if cached is None or cached[0] != now or now is None:
            data = self._load()
            data.pop(PENDING, None)
            cached = self._parsed = (now, data)
        return _copy(cached[1]) or None

    def version(self) -> tuple[int, int, int] | None:
        """What tells the committed file's versions apart (see :meth:`read`).

        ``None`` inside a transaction (its copy changes without a commit) and when there is
        no file: nothing read then may be kept.
        """
        return None if self._current() is not None else file_stamp(self.path)

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        """Replace the database (inside a transaction: written when it commits)."""
        txn = self._current()
        if txn is None:
            with self.transaction():
                self.write(data)
            return
        txn.data = data
        txn.dirty = True

    def close(self) -> None:
        """Nothing stays open between transactions."""

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        data = json.loads(text) if text.strip() else {}
        return data if isinstance(data, dict) else {}


def _finish_files(files: Any, *, durable: bool) -> None:
    """Write the files of an interrupted transaction that are still as they were before it.

    A file that is neither as before nor as after was changed by hand since: it is left
    alone (``audit verify`` then reports it).
    """
    for path, change in (files or {}).items() if isinstance(files, dict) else ():
        if not isinstance(change, dict) or not isinstance(change.get("text"), str):
            continue
        now = file_sha256(path)
        if now == change.get("old") and now != change.get("new"):
            write_atomic(path, change["text"], durable=durable)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced (inode, size, mtime); ``None``: no file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    """A copy down to each document (what TinyDB's updaters change in place)."""
    return {name: {k: dict(d) if isinstance(d, dict) else d for k, d in table.items()}
            if isinstance(table, dict) else table for name, table in data.items()}


class NodeTable(Table):
    """A TinyDB table whose every write is a :meth:`NodeStorage.transaction`.

    No query cache (another process may change the file at any time), and a new
    document's id is computed under the lock, from the file as it is then.
    """

    default_query_cache_capacity = 0

    def _update_table(self, updater: Any) -> None:
        with self._transaction():
            super()._update_table(updater)

    def insert(self, document: Any) -> int:
        with self._transaction():
            self._next_id = None  # another process may have inserted since
            return super().insert(document)

    def insert_multiple(self, documents: Any) -> list[int]:
        with self._transaction():
            self._next_id = None
            return super().insert_multiple(documents)

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        begin = getattr(self._storage, "transaction", None)
        return begin() if begin is not None else contextlib.nullcontext()


class NodeDatabase(TinyDB):
    """The node's TinyDB (``db.json``) on a :class:`NodeStorage`."""

    table_class = NodeTable

    def __init__(self, path: str | Path, *, lock: HomeLock | None = None,
                 journal: AuditLog | None = None, durable: bool = True):
        super().__init__(path, storage=NodeStorage, lock=lock, journal=journal,
                         durable=durable)

    @property
    def storage(self) -> NodeStorage:
        """The storage, with its transactions."""
        return self._storage  # type: ignore[return-value]

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Hold the home's lock for one logical change; see :meth:`NodeStorage.transaction`."""
        return self.storage.transaction()


def remove_stale_temporaries(path: Path, age_s: float = 300.0) -> None:
    """Delete temporary files an atomic write of ``path`` left when its process was killed.

    A write takes milliseconds: a temporary older than ``age_s`` belongs to no live writer.
    """
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()
        except OSError:
            pass
