"""The node's audit log: append-only JSON lines, chained by SHA-256.

Every record carries ``seq`` (1, 2, 3...) and ``prev``, the SHA-256 of the line before it
(64 zeros for the first), so an edited, inserted or deleted line breaks the chain where it
happened. A small head file (``audit.head``) holds the sequence number, hash and file size
after the last record the node wrote, which catches a change to the last line, and lets an
append continue the chain without reading the log. :func:`verify` reads the log once.

A record never holds a credential: the password or token of any URL in a record's text is
replaced by ``***`` before the record is written (:func:`fedcore.transport.redact_url`), since
nothing can be removed from the chain afterwards.

The chain is not keyed: whoever can rewrite the log and the head from some line on can make
a consistent forgery. Keep a copy of the head hash that ``fedcore-node audit verify`` prints
somewhere else now and then, and compare.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import json.encoder
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedcore.transport import redact_url

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one writing process only
    fcntl = None  # type: ignore[assignment]

__all__ = ["GENESIS", "AuditLog", "AuditProblem", "AuditReport", "verify"]

GENESIS = "0" * 64
_HEAD_SIZE = 200


def _sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _record_encoder() -> Callable[[Any], str]:
    """What ``json.dumps(record, default=str)`` writes, without building an encoder per record.

    ``JSONEncoder.encode`` builds its C encoder anew at every call (a fifth of the time of a
    record); this one is built once, with the same arguments. It leaves out the check for
    circular references: a record is a tree of the node's own values (one that held a
    cycle would raise RecursionError instead of ValueError). Without the C accelerator:
    the encoder's own ``encode``.
    """
    encoder = json.JSONEncoder(default=str)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython ships the accelerator
        return encoder.encode
    chunks = make(None, encoder.default, json.encoder.encode_basestring_ascii, None,
                  encoder.key_separator, encoder.item_separator, False, False, True)
    return lambda record: "".join(chunks(record, 0))


_encode = _record_encoder()
_Line = tuple[int, dict[str, Any], str]  # (seq, the record as written, prev) of one line


def _full(line: _Line) -> dict[str, Any]:
    """The record of ``line`` as written: with its ``seq`` first and ``prev`` last."""
    seq, record, prev = line
    return {"seq": seq, **record, "prev": prev}


if fcntl is not None:  # an exclusive flock of the log while a process appends
    _flock, _LOCK_EX, _LOCK_UN = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
else:  # pragma: no cover - Windows: one writing process only
    def _flock(fd: int, operation: int) -> None:
        pass

    _LOCK_EX = _LOCK_UN = 0
# Every string a record holds (keys, values, what ``default=str`` makes of other objects) is
# written as it is into the line, so a line with neither "://" nor "=" holds no text that
# redact_url would change: the record is scrubbed (a copy, recursively) only otherwise.

_PLAIN = frozenset({int, float, bool, type(None)})  # values that hold no text


def _scrubbed(value: Any) -> Any:
    """``value`` with the credentials of URLs in its strings (and keys) redacted."""
    kind = type(value)
    if kind is str:  # most values: only text that may hold a URL is parsed
        return redact_url(value) if "://" in value or "=" in value else value
    if value is None or kind is bool or kind is int or kind is float:
        return value
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):  # a record: plain keys and numbers are kept without a call
        return {k if type(k) is str and "://" not in k and "=" not in k else _scrubbed(k):
                v if type(v) in _PLAIN else _scrubbed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(v) for v in value]
    if isinstance(value, (bool, int, float)):
        return value
    return redact_url(str(value))  # what json.dumps(default=str) would write


def _line(seq: int, record: dict[str, Any], prev: str) -> tuple[str, dict[str, Any]]:
    """What :func:`_merged_line` returns, for an int ``seq`` and an alphanumeric ``prev``.

    ``prev`` is of ASCII letters and digits (a SHA-256 in hex): json writes it as it is,
    between quotes. The line is built from the record's own text: ``seq`` and ``prev`` hold
    no character the scan for credentials looks for, and a dict without the keys ``seq`` and
    ``prev`` keeps its items, in order, between the two (json writes each item alone).
    Other records are merged.
    """
    if type(record) is not dict or "seq" in record or "prev" in record:
        return _merged_line(seq, record, prev)
    body = _encode(record)
    if "://" in body or "=" in body:  # the text may hold a credential: scrubbed
        scrubbed = _scrubbed(record)
        if "seq" in scrubbed or "prev" in scrubbed:  # a key that its redaction made one
            return _merged_line(seq, record, prev)
        record, body = scrubbed, _encode(scrubbed)
    if len(body) == 2:  # {}
        return f'{{"seq": {seq}, "prev": "{prev}"}}', record
    return f'{{"seq": {seq}, {body[1:-1]}, "prev": "{prev}"}}', record


def _merged_line(seq: Any, record: dict[str, Any], prev: Any) -> tuple[str, dict[str, Any]]:
    """The text of ``{"seq": seq, **record, "prev": prev}``'s line, and the record it holds.

    The record is scrubbed (a copy) when the line's text may hold a credential.
    """
    text = _encode(_full((seq, record, prev)))
    if "://" in text or "=" in text:
        record = _scrubbed(record)
        text = _encode(_full((seq, record, prev)))
    return text, record


class AuditLog:
    """Appends records to ``path``; safe across threads and across processes on one host.

    The file stays open between records (reopened when log rotation moved it away); an
    append takes an exclusive ``flock`` so a CLI command and the serving node can both
    write without breaking the chain.

    ``durable=False`` leaves out the ``fsync`` of :meth:`append_all`: for a log that
    nothing outlives (a simulation's temporary home), where surviving a crash of the
    machine buys nothing.
    """

    def __init__(self, path: str | Path, *, durable: bool = True):
        self.path = Path(path)
        self.durable = durable
        self.head_path = self.path.with_suffix(".head")
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._ino = 0  # the inode of _file
        self._head_fd: int | None = None
        self._deferred: list[dict[str, Any]] = []
        # (size, seq, sha256) after this handle's last write: while the file still has that
        # size, nobody appended since (appends only grow it) and the head need not be read.
        self._last: tuple[int, int, str] | None = None

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one record (``seq`` and ``prev`` added); returns it as written.

        Records deferred before it (:meth:`defer`) are written first, in order.
        """
        with self._lock:
            return _full(self._commit([record], sync=False)[-1])

    def append_all(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write ``records`` one after the other and flush them to disk (``fsync``).

        What a change of the node's database is recorded with: once this returns, its
        records survive a crash of the machine too (unless the log is not ``durable``).
        Records deferred before them (:meth:`defer`) are written first, in order.
        """
        with self._lock:  # the head is not fsync'd: a stale one is found and rewritten
            lines = self._commit(records, sync=self.durable)
        return [_full(line) for line in lines[len(lines) - len(records):]]

    def defer(self, record: dict[str, Any]) -> None:
        """Keep ``record`` to be written by the next :meth:`flush` (or append), in order.

        A group commit: the node defers the records of a request while it handles it and
        flushes them, in one write, before the request's reply leaves (and while its work
        runs, if that takes long), so every record a reply depends on is in the log before
        the reply (as with :meth:`append`), at one lock, write and head update per request
        instead of one per record.
        """
        with self._lock:
            self._deferred.append(record)

    def flush(self) -> None:
        """Write the deferred records (one write; nothing to do when there are none)."""
        with self._lock:
            if self._deferred:
                self._commit([], sync=False)

    def _take_deferred(self) -> list[dict[str, Any]]:
        records, self._deferred = self._deferred, []
        return records

    def size(self) -> int:
        """The log's size in bytes (0 when there is none yet)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def count_txn(self, txn: str, offset: int = 0) -> int:
        """How many records of database change ``txn`` the log holds from byte ``offset``."""
        try:
            with open(self.path, "rb") as f:
                if offset <= os.fstat(f.fileno()).st_size:
                    f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        needle = f'"txn": "{txn}"'.encode()
        count = 0
        for line in data.splitlines():
            if needle in line:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    count += isinstance(record, dict) and record.get("txn") == txn
        return count

    def _commit(self, records: list[dict[str, Any]], *, sync: bool) -> list[_Line]:
        """Write the deferred records, then ``records``, holding the file's lock; their lines.

        Under the lock, one ``stat`` of the path both notices a rotated log (another inode)
        and gives the size of the file (its inode's: nobody appends while the lock is held).
        ``sync``: ``fsync`` the log before the lock is released.
        """
        f = self._file
        if f is not None:
            fd = f.fileno()
            _flock(fd, _LOCK_EX)
            try:
                try:
                    st = os.stat(self.path)
                except OSError:
                    st = None
                if st is not None and st.st_ino == self._ino:  # not moved away (rotated)
                    return self._write(f, st.st_size, records, sync)
            finally:
                _flock(fd, _LOCK_UN)
            self._file = None
            f.close()
        f = self._open()
        fd = f.fileno()
        _flock(fd, _LOCK_EX)
        try:
            return self._write(f, os.fstat(fd).st_size, records, sync)
        finally:
            _flock(fd, _LOCK_UN)

    def _write(self, f: IO[bytes], size: int, records: list[dict[str, Any]],
               sync: bool) -> list[_Line]:
        records = self._take_deferred() + records
        seq, prev, torn = self._tail(f, size)
        # Lines are built from each record's own JSON text (_line) after a tail of ours;
        # after anything else a head may hold (a hand edit), from the merged dict.
        make = (_line if type(seq) is int and type(prev) is str and prev.isalnum()
                and prev.isascii() else _merged_line)
        lines: list[_Line] = []
        chunks = [b"\n"] if torn else []
        for record in records:
            seq += 1
            text, record = make(seq, record, prev)
            lines.append((seq, record, prev))
            line = text.encode()
            prev = _sha(line)
            chunks += [line, b"\n"]
        data = b"".join(chunks)
        # One write of every line, then the head: a process killed between the two leaves
        # the head one step behind, which verify() reports and the next append repairs.
        self._last = None  # until the head says what is written
        f.write(data)
        f.flush()
        self._write_head(seq, prev, size + len(data))
        self._last = (size + len(data), seq, prev)
        if sync:
            os.fsync(f.fileno())
        return lines

    def close(self) -> None:
        """Write the deferred records and close the files (the next append reopens them)."""
        self.flush()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._head_fd is not None:
                os.close(self._head_fd)
                self._head_fd = None

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, oldest first.

        A credential that a record written by an older version holds is shown as ``***``.
        """
        self.flush()
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(_scrubbed(record))
        return out

    # --- internals --------------------------------------------------------------------------

    def _open(self) -> IO[bytes]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = f = open(self.path, "ab")  # noqa: SIM115 - kept open between records
        self._ino = os.fstat(f.fileno()).st_ino  # an open file keeps its inode
        self._last = None  # another file (rotated): its head is read
        if self._head_fd is not None:
            os.close(self._head_fd)
        self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT, 0o644)
        return f

    def _tail(self, f: IO[bytes], size: int) -> tuple[int, str, bool]:
        """``(seq, sha256)`` of the last record, and whether the file lacks a final newline."""
        mine = self._last
        if mine is not None and mine[0] == size:
            return mine[1], mine[2], False
        head = read_head(self.head_path, self._head_fd)
        if head is not None and head["size"] == size:
            return head["seq"], head["sha256"], False
        if size == 0:
            return 0, GENESIS, False
        # The head is missing or stale (a crash between line and head, or a hand edit):
        # read the log's last line instead.
        with open(self.path, "rb") as r:
            data = r.read()
        lines = data.splitlines()
        last = lines[-1] if lines else b""
        try:
            seq = int(json.loads(last)["seq"])
        except (ValueError, KeyError, TypeError):
            seq = len(lines)
        return seq, _sha(last), not data.endswith(b"\n")

    def _write_head(self, seq: int, sha: str, size: int) -> None:
        text = f'{{"seq": {seq}, "sha256": "{sha}", "size": {size}}}'.encode()  # as json.dumps
        assert self._head_fd is not None
        os.pwrite(self._head_fd, text.ljust(_HEAD_SIZE - 1) + b"\n", 0)


def read_head(path: Path, fd: int | None = None) -> dict[str, Any] | None:
    """The head file's ``{"seq", "sha256", "size"}``, or ``None`` if absent or unreadable."""
    try:
        if fd is not None:
            raw = os.pread(fd, _HEAD_SIZE, 0)
        else:
            raw = path.read_bytes()[:_HEAD_SIZE]
        head = json.loads(raw)
        if isinstance(head, dict) and {"seq", "sha256", "size"} <= head.keys():
            return head
    except (OSError, ValueError):
        pass
    return None


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditProblem:
    """One break of the chain: where (line number, and ``seq``/``event`` when readable)."""

    line: int
    message: str
    seq: int | None = None
    event: str = ""

    def __str__(self) -> str:
        what = f"line {self.line}"
        if self.seq is not None:
            what += f" (record {self.seq}" + (f", {self.event!r}" if self.event else "") + ")"
        return f"{what}: {self.message}"


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify` found; true when the log is intact.

    ``mismatches`` are disagreements between the node's database and the log (filled by
    ``Node.verify_audit``, which checks both): a plan, dataset or account the database
    holds without the record of its change, or a recorded change the database lacks.
    """

    path: Path
    records: int
    head: str
    problems: list[AuditProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no record was edited, inserted or deleted, and the database agrees."""
        return not self.problems and not self.mismatches

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if not self.problems:
            text = (f"{self.path}: intact, {self.records} records, head "
                    f"{self.head}")
        else:
            text = f"{self.path}: {len(self.problems)} problem(s) in {self.records} lines\n"
            text += "\n".join(f"  {p}" for p in self.problems)
        if self.mismatches:
            text += (f"\nThe database disagrees with the audit log ({len(self.mismatches)} "
                     "mismatch(es)):\n" + "\n".join(f"  {m}" for m in self.mismatches))
        return "\n".join([text, *self.notes])


def verify(path: str | Path) -> AuditReport:
    """Check the chain of the audit log at ``path`` (and its head file, when there is one)."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    n = len(lines)
    hashes = [GENESIS] + [_sha(line) for line in lines]
    recs: list[dict[str, Any] | None] = [None]
    recs += [_parse(line) for line in lines]
    problems: dict[int, str] = {}

    def seq(i: int) -> int | None:
        r = recs[i]
        return 0 if i == 0 else int(r["seq"]) if r is not None else None

    p, pp = 0, -1  # the last two lines taken as genuine (0: the start of the log)
    i = 1
    while i <= n:
        r = recs[i]
        if r is None:
            problems.setdefault(i, "not a valid audit record (edited, or a torn write)")
            pp, p, i = p, i, i + 1
            continue
        before = seq(p)
        if r["prev"] == hashes[p]:
            if before is not None and r["seq"] != before + 1:
                problems.setdefault(i, f"sequence number {r['seq']} after {before}: edited")
            pp, p, i = p, i, i + 1
            continue
        nxt = recs[i + 1] if i < n else None
        if pp >= 0 and r["prev"] == hashes[pp]:
            problems.setdefault(p, "inserted: the next record chains to the one before it")
        elif nxt is not None and nxt["prev"] == hashes[p]:
            problems.setdefault(i, "inserted: the next record chains to the one before it")
            i += 1  # line i+1 follows p: go on from there
            continue
        elif before is not None and r["seq"] > before + 1:
            problems.setdefault(i, f"{_records(before + 1, r['seq'] - 1)} deleted before "
                                   "this line")
        elif p == 0:
            problems.setdefault(i, "edited: the first record must chain to the start")
        else:
            problems.setdefault(p, "edited: its hash no longer matches the next record's prev")
        pp, p, i = p, i, i + 1

    notes = _check_head(read_head(path.with_suffix(".head")), n, seq(n) or 0, hashes[n],
                        problems)
    report = [AuditProblem(line, msg, *(_where(recs[line]) if line <= n else (None, "")))
              for line, msg in sorted(problems.items())]
    return AuditReport(path, n, hashes[n], report, notes)


def _check_head(head: dict[str, Any] | None, n: int, last_seq: int, last_hash: str,
                problems: dict[int, str]) -> list[str]:
    """Compare the log's last record (line ``n``) with its head file; notes to report.

    A break is added to ``problems`` (by line, ``n + 1`` for records deleted from the end).
    """
    if head is None:
        return ["No head file: a change to the last record cannot be detected."] if n else []
    if head["seq"] > last_seq:
        problems.setdefault(n + 1, f"{_records(last_seq + 1, head['seq'])} deleted from the "
                                   "end (the head file records the node wrote them)")
    elif head["seq"] == last_seq and n and head["sha256"] != last_hash:
        problems.setdefault(n, "edited: the last record no longer matches the head file")
    elif head["seq"] < last_seq:
        problems.setdefault(n, f"appended after record {head['seq']}, the last the head file "
                               "records (by hand, or the node was killed while writing it)")
    return []


def _records(first: int, last: int) -> str:
    return f"record {first}" if first == last else f"records {first} to {last}"


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if (isinstance(record, dict) and isinstance(record.get("seq"), int)
            and isinstance(record.get("prev"), str)):
        return record
    return None


def _where(record: dict[str, Any] | None) -> tuple[int | None, str]:
    if record is None:
        return None, ""
    return int(record["seq"]), str(record.get("event", ""))
