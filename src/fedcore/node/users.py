"""Accounts of the node's web GUI: usernames, argon2-hashed passwords and roles.

Stored in the node's TinyDB database (table ``users``). There is no default account: the
first administrator is created with ``fedcore-node user add NAME --role admin``. Example::

    users = Users(node.db)
    users.add("alice", "correct horse battery", "admin")
    users.verify("alice", "correct horse battery")   # -> "admin"
    users.verify("alice", "wrong")                   # -> None
"""

from __future__ import annotations

import builtins
import contextlib
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from tinydb import Query, TinyDB

from fedcore.errors import ConfigurationError

__all__ = ["MIN_PASSWORD_LENGTH", "ROLES", "Users"]

ROLES = ("admin", "read-only")
MIN_PASSWORD_LENGTH = 10
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class Users:
    """The node's GUI accounts; passwords are stored only as argon2id hashes.

    ``audit`` (the node's :meth:`~fedcore.node.Node.audit`) receives ``user-added``,
    ``password-changed`` and ``login`` events (never a password or a hash).
    """

    def __init__(self, db: TinyDB, *, audit: Callable[..., None] | None = None):
        self._db = db
        self._table = db.table("users", cache_size=0)
        self._audit = audit or (lambda event, **fields: None)
        self._lock = threading.Lock()
        self._hasher: Any = None

    def add(self, username: str, password: str, role: str) -> None:
        """Create an account; refuses a taken name, an unknown role or a short password."""
        _check_name(username)
        if role not in ROLES:
            raise ConfigurationError(f"role must be one of {list(ROLES)}. Received: {role!r}")
        digest = self._hash(password)
        with self._transaction(), self._lock:
            if self._find(username) is not None:
                raise ConfigurationError(f"User {username!r} already exists. Change the "
                                         "password with `fedcore-node user passwd`.")
            self._table.insert({"username": username, "role": role, "password_hash": digest,
                                "created": time.time()})
            self._audit("user-added", user=username, role=role)

    def set_password(self, username: str, password: str) -> None:
        """Replace the password of an existing account."""
        digest = self._hash(password)
        with self._transaction(), self._lock:
            if self._find(username) is None:
                raise ConfigurationError(f"No user {username!r}. Users: "
                                         f"{[u['username'] for u in self.list()]}")
            self._table.update({"password_hash": digest}, Query().username == username)
            self._audit("password-changed", user=username)

    def verify(self, username: str, password: str) -> str | None:
        """The role of ``username`` when ``password`` is right, else ``None`` (audited)."""
        from argon2.exceptions import InvalidHashError, VerificationError

        entry = self._find(username)
        hasher = self._argon2()
        try:
            # An unknown user costs the same hash as a known one: no timing hint.
            hasher.verify(entry["password_hash"] if entry else _DUMMY.get(hasher), password)
            ok = entry is not None
        except (VerificationError, InvalidHashError):
            ok = False
        self._audit("login", user=username, ok=ok)
        if not ok or entry is None:
            return None
        if hasher.check_needs_rehash(entry["password_hash"]):
            self._table.update({"password_hash": hasher.hash(password)},
                               Query().username == username)
        return str(entry["role"])

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every account: ``username``, ``role``, ``created`` (never the hash)."""
        return sorted(({k: e[k] for k in ("username", "role", "created")}
                       for e in self._table.all()), key=lambda e: e["username"])

    # --- internals --------------------------------------------------------------------------

    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        begin = getattr(self._db, "transaction", None)  # a node's database: cross-process
        return begin() if callable(begin) else contextlib.nullcontext()

    def _find(self, username: str) -> dict[str, Any] | None:
        doc = self._table.get(Query().username == username)
        return dict(doc) if isinstance(doc, dict) else None

    def _argon2(self) -> Any:
        if self._hasher is None:
            try:
                from argon2 import PasswordHasher
            except ImportError as exc:  # pragma: no cover - a dependency of fedcore
                raise ConfigurationError(
                    "GUI accounts need argon2-cffi: pip install argon2-cffi") from exc
            self._hasher = PasswordHasher()
        return self._hasher

    def _hash(self, password: str) -> str:
        if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
            raise ConfigurationError(
                f"A password needs at least {MIN_PASSWORD_LENGTH} characters.")
        return str(self._argon2().hash(password))


class _Dummy:
    """A hash of a random password, made once, verified against for unknown users."""

    _hash: str | None = None

    def get(self, hasher: Any) -> str:
        if self._hash is None:
            import secrets

            self._hash = str(hasher.hash(secrets.token_hex(16)))
        return self._hash


_DUMMY = _Dummy()


def _check_name(username: str) -> None:
    if not isinstance(username, str) or not _NAME.match(username):
        raise ConfigurationError(
            "A username is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a "
            f"letter or digit. Received: {username!r}")
