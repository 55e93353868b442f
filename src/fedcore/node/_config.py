"""Reading and writing a node's ``config.toml`` (atomically, so a crash never truncates it)."""

from __future__ import annotations

import contextvars
import time
import tomllib
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedcore._files import write_atomic
from fedcore.errors import ConfigurationError
from fedcore.governance.policies import SETTINGS, effective_policy, validate_policy
from fedcore.node._storage import (
    LOCK_FILE,
    HomeLock,
    NodeStorage,
    file_stamp,
    remove_stale_temporaries,
)

_HEADER = ("# fedcore node configuration: identity and policy.\n"
           "# Policy keys are explained by `fedcore-node policy show` and in "
           "docs/node-administration.md.\n")


def read_config(path: Path) -> dict[str, Any]:
    """The parsed file; ``ConfigurationError`` naming the file when it is not valid TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}. Fix it by hand (or "
                                 "restore it), then try again.") from exc


def config_text(config: Mapping[str, Any]) -> str:
    """The text of ``config.toml`` holding ``config``."""
    return _HEADER + tomli_w.dumps(dict(config))


def write_config(path: Path, config: Mapping[str, Any], *, durable: bool = True) -> None:
    """Replace ``path`` atomically: a reader sees the old file or the new one, whole.

    ``durable``: flushed to disk (``fsync``) before it replaces the old file.
    """
    write_atomic(path, config_text(config), durable=durable)


#: The request a node is answering (a new object for each, set by the node). The file is
#: checked for a change at the request's first read of the configuration, not at every read
#: while the request runs: a request sees one version of the policy, and the next request
#: sees a change. The node also defers the request's audit records while it is set.
request_scope: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "config_request_scope", default=None)


def stamp(path: Path) -> tuple[int, int, int]:
    """What changes when the file is replaced or edited (inode, size, mtime); zeros: no file."""
    return file_stamp(path) or (0, 0, 0)


class NodeConfig:
    """A node's ``config.toml``: identity and policy, reread whenever the file changes.

    An administrator may change the policy with ``fedcore-node policy set`` (another
    process), the GUI or an editor while the node serves; the next request sees it. Every
    change rereads the file and writes it under ``lock`` (the home's), so two processes
    changing different keys at once both keep their change. With ``storage`` (the node's
    database), a change made inside one of its transactions is written by that transaction,
    together with its audit record (:meth:`NodeStorage.stage`). ``durable=False`` writes
    the file without ``fsync`` (still replaced whole), for a home that nothing outlives.
    """

    #: The database whose transactions write changes with their audit records.
    storage: NodeStorage | None = None

    def __init__(self, path: Path, *, name: str | None = None, node_id: str | None = None,
                 approval_required: bool | None = None, lock: HomeLock | None = None,
                 durable: bool = True):
        self.path = path
        self.durable = durable
        self._lock = lock or HomeLock(path.parent / LOCK_FILE)
        remove_stale_temporaries(path)
        with self._lock.hold():
            self._open(name, node_id, approval_required)
            self._stamp = stamp(path)
        self._error = ""
        self._checked: object | None = None  # the request scope whose first read checked
        #: Goes up by one each time the configuration is reread or written.
        self.version = 0
        self._policy: tuple[int, dict[str, Any]] | None = None  # (version, policy)
        if "node_id" not in self._data:
            raise ConfigurationError(f"{path} has no node_id. Add node_id = \"...\" to it.")

    def _open(self, name: str | None, node_id: str | None,
              approval_required: bool | None) -> None:
        path = self.path
        if path.exists():
            self._data = read_config(path)
            if node_id and node_id != self._data.get("node_id"):
                raise ConfigurationError(
                    f"{path} belongs to node {self._data.get('node_id')!r}, not {node_id!r}. "
                    "Use another home folder for another node.")
        else:
            node_id = node_id or f"node-{uuid.uuid4().hex[:8]}"
            self._data = {"node_id": node_id, "name": name or node_id, "created": time.time(),
                          **{k: s.default for k, s in SETTINGS.items() if s.default is not None}}
            if approval_required is not None:
                self._data["approval_required"] = bool(approval_required)
            write_config(path, self._data, durable=self.durable)

    @property
    def data(self) -> dict[str, Any]:
        """The whole configuration as last read (reread when the file changed)."""
        self.refresh()
        return self._data

    def refresh(self) -> bool:
        """Reread the file if it changed since it was read; returns whether it did.

        Within a request (:data:`request_scope`), only its first call looks at the file.
        """
        scope = request_scope.get()
        if scope is not None and scope is self._checked:
            return False
        now = stamp(self.path)
        self._checked = scope
        if now == self._stamp:
            return False
        self._stamp = now
        self.version += 1
        try:
            data = read_config(self.path)
        except (OSError, ConfigurationError) as exc:
            # Keep the identity; the policy fails closed until the file is fixed.
            self._error = str(exc)
            self._data = {k: self._data[k] for k in ("node_id", "name", "created")
                          if k in self._data}
            return True
        self._error = ""
        self._data = data
        return True

    def policy(self) -> dict[str, Any]:
        """Every policy setting, defaults filled; ``ConfigurationError`` if the file is bad."""
        self.refresh()
        if self._error:
            raise ConfigurationError(self._error)
        cached = self._policy
        if cached is not None and cached[0] == self.version:  # checked once per version
            return dict(cached[1])
        try:
            policy = effective_policy(self._data)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{self.path}: {exc}") from None
        self._policy = (self.version, policy)
        return dict(policy)

    def setting(self, key: str) -> Any:
        """One policy setting: :meth:`policy` without copying them all (read per request)."""
        self.refresh()
        cached = self._policy
        if self._error or cached is None or cached[0] != self.version:
            self.policy()  # raises while the file is bad; checks a new version once
            cached = self._policy
            assert cached is not None
        return cached[1][key]

    def set_policy(self, changes: Mapping[str, Any], *, replace: bool = False
                   ) -> dict[str, Any]:
        """Change policy keys (a value of ``None`` removes the key: back to the default).

        With ``replace``, ``changes`` is the whole policy: keys it lacks are removed.
        Everything is checked before the file is written. Returns the keys that changed,
        as ``{key: [old, new]}``.
        """
        with self._lock.hold():
            return self._set_policy(changes, replace)

    def _set_policy(self, changes: Mapping[str, Any], replace: bool) -> dict[str, Any]:
        self.refresh()
        current = {k: v for k, v in self._data.items() if k in SETTINGS}
        wanted = {} if replace else dict(current)
        for key, value in changes.items():
            if value is None:
                wanted.pop(key, None)
            else:
                wanted[key] = value
        validate_policy({k: v for k, v in changes.items() if v is not None})
        # Settings already in the file that are wrong stay as they are (the node refuses
        # every request until they are fixed), so that fixing one key at a time works.
        wanted = {**wanted, **validate_policy({k: v for k, v in wanted.items()
                                               if replace or _valid(k, v)})}
        data = {k: v for k, v in self._data.items() if k not in SETTINGS}
        data.update(wanted)
        self._write(data)
        self._error = ""
        return {k: [current.get(k), wanted.get(k)] for k in sorted(set(current) | set(wanted))
                if current.get(k) != wanted.get(k)}

    def set_value(self, key: str, value: Any) -> None:
        """Write one setting that is not a policy key (such as ``federation``)."""
        if key in SETTINGS or key == "node_id":
            raise ConfigurationError(f"{key!r} is not set this way.")
        with self._lock.hold():
            self.refresh()
            self._write({**self._data, key: value})

    def _write(self, data: dict[str, Any]) -> None:
        """Replace the file with ``data`` (under the lock): with the open transaction, if any."""
        txn = self.storage is not None and self.storage.in_transaction()
        self._data = data
        self.version += 1
        self._checked = None
        if not txn:
            write_config(self.path, data, durable=self.durable)
            self._stamp = stamp(self.path)
            return
        assert self.storage is not None
        self._stamp = stamp(self.path)  # the file as it is: reads in the transaction see data

        def done(committed: bool) -> None:
            # Committed: the file is what this object holds. Not: reread it when next asked.
            self._stamp = stamp(self.path) if committed else (0, 0, 0)
            self._checked = None

        self.storage.stage(self.path, config_text(data), done)

    def policy_toml(self) -> str:
        """The policy keys present in the file, as TOML text (for an editor)."""
        self.refresh()
        return tomli_w.dumps({k: v for k, v in self._data.items() if k in SETTINGS})


def _valid(key: str, value: Any) -> bool:
    try:
        validate_policy({key: value})
    except ConfigurationError:
        return False
    return True
