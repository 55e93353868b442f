"""Starting plan worker processes: their environment, what they may read, their launch.

Only the standard library and :mod:`fedcore.node._landlock` (loaded from its file): a node
process starts the workers its datasets will want (:func:`start_ahead`) before it imports
its own runtime, so that they import their frameworks while it imports the node. The node
adopts such a worker (:func:`take`) only if what it computes for the dataset, from its
registry, names the same files (the key of the worker is a hash of its dataset and its
read rules); any other is ended (:func:`drop`). See :mod:`fedcore.node._worker`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger("fedcore.node")

_SECRET = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)
# Not /proc as a whole: /proc/PID/environ and /proc/PID/mem of the node are files there.
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/sys", "/dev",
                "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/loadavg", "/proc/sys")
_SYSTEM_WRITE = ("/dev/null", "/dev/shm", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0",
                 "/dev/dri")
MEMORY = "plan-workers.json"  # in the node home: {dataset id: {backends, modules}}
_MODULES = 4000  # installed modules remembered per dataset, at most
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# The worker leaves the host's network first, before any import starts a thread (numpy's
# BLAS does): _landlock.py is loaded from its file, without fedcore's package imports. The
# garbage collector stays off until it imported what it needs (_sandbox._imported).
_CMD = ("import gc; gc.disable()\n"
        "import importlib.util as u, sys\n"
        "s = u.spec_from_file_location('_fedcore_landlock', sys.argv[2])\n"
        "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
        "offline = m.leave_network()\n"
        "from fedcore.node._sandbox import main; main(offline)")
_LANDLOCK = str(Path(__file__).with_name("_landlock.py"))


def worker_environment(environ: Mapping[str, str], scratch: Path) -> dict[str, str]:
    """The environment of a worker: the node's, without its secrets, homed in ``scratch``."""
    env = {k: v for k, v in environ.items()
           if not k.upper().startswith("FEDCORE_") and not _SECRET.search(k)}
    env.update(HOME=str(scratch), TMPDIR=str(scratch), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(_import_path()))
    return env


def _import_path(entries: Iterable[str] | None = None) -> list[str]:
    """``entries`` (default: ``sys.path``) as absolute paths, those that exist."""
    return [os.path.abspath(p or os.curdir) for p in (sys.path if entries is None else entries)
            if os.path.exists(p or os.curdir)]


@functools.cache
def _package_folders() -> tuple[str, ...]:
    """The folders of fedcore and of every installed plug-in's top-level package.

    An editable install is imported through a finder, not from a ``sys.path`` entry, so
    these folders are not always under the import path. Read once per process: scanning
    every installed distribution's entry points took ~10 ms, and the node asks at every
    round (a plug-in installed later is served after the node restarts, as its code is).
    """
    names = {"fedcore"}
    for group in ("backends", "transports", "aggregators", "secagg"):
        for ep in importlib.metadata.entry_points(group=f"fedcore.{group}"):
            names.add(ep.value.split(":")[0].split(".")[0])
    folders = []
    for name in sorted(names):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            folders += list(spec.submodule_search_locations or ())
            if spec.origin and not spec.submodule_search_locations:
                folders.append(os.path.dirname(spec.origin))
    return tuple(folders)


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def entry_paths(entry: Mapping[str, Any]) -> list[str]:
    """The files and folders a dataset entry reads (its path, a medical folder's demographics)."""
    paths = [str(entry["path"])]
    demographics = (entry.get("options") or {}).get("demographics")
    if demographics:
        paths.append(str(demographics))
    return paths


def forbidden(home: Path, entries: Iterable[Mapping[str, Any]], dataset: str) -> list[str]:
    """What the worker of ``dataset`` may not touch: the node home and the other datasets.

    The node and :func:`start_ahead` both compute a worker's rules from this, so that a
    worker started ahead has the rules the node would give it.
    """
    return [str(home), *(p for e in entries if str(e["id"]) != str(dataset)
                         for p in entry_paths(e))]


def rules(dataset: Mapping[str, Any], forbidden: Iterable[str]) -> tuple[list[str], list[str]]:
    """:func:`readable` and :func:`writable` of a worker, the ``forbidden`` paths resolved once."""
    banned = _resolved(forbidden)
    return _readable(dataset, banned), list(_system_writable(banned))


def readable(dataset: Mapping[str, Any], forbidden: Iterable[str]) -> list[str]:
    """What the worker for ``dataset`` may read: Python, the system, that dataset's files.

    A folder that holds a ``forbidden`` path (the node home, another dataset) is left out,
    whatever it is (a sys.path entry such as the folder the node was started from).
    """
    return _readable(dataset, _resolved(forbidden))


def writable(forbidden: Iterable[str]) -> list[str]:
    """The system files the worker may write (``/dev/null``, ``/dev/shm``, GPU devices).

    One that holds a ``forbidden`` path is left out: a node home under ``/dev/shm`` must not
    become writable to the plans of its worker. The worker's own scratch folder comes on top.
    """
    return list(_system_writable(_resolved(forbidden)))


def _resolved(forbidden: Iterable[str]) -> tuple[str, ...]:
    """The real paths of ``forbidden``, resolved at every call (the registry may change)."""
    return tuple(os.path.realpath(p) for p in forbidden)


def _readable(dataset: Mapping[str, Any], banned: tuple[str, ...]) -> list[str]:
    own = [q for p in entry_paths(dataset) for q in {os.path.abspath(p), os.path.realpath(p)}]
    return [*_installed_readable(banned, tuple(sys.path)), *own]


@functools.lru_cache(maxsize=64)
def _installed_readable(banned: tuple[str, ...], import_path: tuple[str, ...]
                        ) -> tuple[str, ...]:
    """The folders of Python and the system a worker may read, none holding a ``banned`` path.

    The node asks at every round, to give a worker whose rules changed a new process: ~0.6 ms
    of path resolution each time. It is kept per ``banned`` (the real paths of the node home
    and of the other datasets, resolved at every call, so a dataset registered meanwhile
    is taken out at once) and per ``import_path`` (``sys.path``). What is resolved from the
    installation's own folders (their real paths, whether they exist) is read once per
    process, as :func:`_package_folders` is.
    """
    wanted = [sys.prefix, sys.base_prefix, sys.exec_prefix, *_import_path(import_path),
              *_package_folders(), *_SYSTEM_READ]
    out: list[str] = []
    for path in {q for p in wanted for q in (os.path.abspath(p), os.path.realpath(p))}:
        if any(_within(b, path) for b in banned):
            log.warning("The plan worker may not read %s: it holds the node home or another "
                        "dataset.", path)
        elif os.path.exists(path):
            out.append(path)
    return tuple(sorted(out))


@functools.lru_cache(maxsize=64)
def _system_writable(banned: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`writable` for the real paths ``banned``, once per process (see above)."""
    return tuple(w for w in _SYSTEM_WRITE
                 if not any(_within(b, q) for b in banned
                            for q in {os.path.abspath(w), os.path.realpath(w)}))


def worker_key(dataset: str, read: list[str]) -> str:
    """The name of a worker (and of its scratch folder): its dataset and its read rules."""
    return hashlib.sha256(json.dumps([dataset, read]).encode()).hexdigest()[:24]


def names(value: Any) -> list[str]:
    """The valid module names of a list (at most :data:`_MODULES`), in order."""
    items = value if isinstance(value, list) else []
    return [str(v) for v in items if isinstance(v, str) and len(v) < 200
            and _MODULE.fullmatch(v)][:_MODULES]


def remembered(home: Path) -> dict[str, dict[str, list[str]]]:
    """``{dataset id: {"backends": [...], "modules": [...]}}`` of earlier worker rounds.

    Oldest first; what is not a valid module name is left out.
    """
    try:
        data = json.loads((home / MEMORY).read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, dict[str, list[str]]] = {}
    for dataset, used in data.items() if isinstance(data, dict) else ():
        if isinstance(used, dict):
            out[str(dataset)] = {k: names(used.get(k)) for k in ("backends", "modules")}
    return out


class Launched:
    """A worker process just started, its setup sent; :class:`~._worker._Worker` talks to it.

    The setup (JSON, the worker's first message) names what it may read and write, and what
    it imports once it locked itself to those files (``preload``: backends and installed
    modules; the worker then says ``preloaded``).
    """

    def __init__(self, scratch: Path, node_id: str, read: list[str], write: list[str],
                 preload: Mapping[str, list[str]] | None = None):
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, mode=0o700)
        wanted = {k: list((preload or {}).get(k, ())) for k in ("backends", "modules")}
        #: What the worker imports before its first round (``None``: nothing).
        self.preload = wanted if any(wanted.values()) else None
        self.read = read
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CMD, str(theirs.fileno()), _LANDLOCK], cwd=scratch,
                env=worker_environment(os.environ, scratch), pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        write = [str(scratch), *write]
        self.conn.send_bytes(json.dumps({"read": read, "write": write, "node_id": node_id,
                                         "preload": self.preload}).encode())

    def end(self) -> None:
        """End the process at once (it never ran a plan: nothing of it is kept)."""
        self.process.kill()
        self.process.wait()
        self.conn.close()


# Workers started ahead of their node, by realpath of the node home, then by worker key.
_AHEAD: dict[str, dict[str, Launched]] = {}
_AHEAD_LOCK = threading.Lock()


def start_ahead(home: Path) -> int:
    """Start the workers that the node of ``home`` would start as it begins to serve.

    For each dataset that ran plans in a worker before (:data:`MEMORY`) and is still
    registered, with the read rules the node computes (from ``db.json`` as committed now),
    and with what its rounds imported to preload. Best effort: on any doubt (an unreadable
    file, ``plan_isolation = "none"``) it starts none, and the node starts them itself.
    Returns how many it started; a second call for the same home starts none.
    """
    where = os.path.realpath(home)
    with _AHEAD_LOCK:
        if where in _AHEAD:
            return 0
        started = _AHEAD[where] = {}
    try:
        config = tomllib.loads((home / "config.toml").read_text(encoding="utf-8"))
        used = remembered(home)
        if config.get("plan_isolation", "auto") == "none" or not used:
            return 0
        node_id = str(config["node_id"])
        data = json.loads((home / "db.json").read_text(encoding="utf-8"))
        entries = {str(e["id"]): e for e in (data.get("datasets") or {}).values()}
        for dataset, preload in used.items():
            entry = entries.get(dataset)
            if entry is None:
                continue
            banned = forbidden(home, entries.values(), dataset)
            read, write = rules(entry, banned)
            key = worker_key(dataset, read + write)
            started[key] = Launched(home / "scratch" / key, node_id, read, write, preload)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.debug("Plan workers not started ahead (%r): the node starts them.", exc)
    return len(started)


def take(home: Path, key: str) -> Launched | None:
    """The worker started ahead for ``home`` under ``key``, if it is still running."""
    with _AHEAD_LOCK:
        launched = _AHEAD.get(os.path.realpath(home), {}).pop(key, None)
    if launched is not None and launched.process.poll() is not None:
        launched.end()
        return None
    return launched


def drop(home: Path) -> None:
    """End the workers started ahead for ``home`` that its node did not take."""
    with _AHEAD_LOCK:
        left = _AHEAD.pop(os.path.realpath(home), {})
    for launched in left.values():
        launched.end()
