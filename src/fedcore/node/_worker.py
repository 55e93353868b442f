"""The node's side of the plan workers: researchers' code runs apart from the node's secrets.

A worker is a separate Python process (``subprocess``, never a fork of the node: a fork
would copy the identity key in memory) started with

- an environment without the node's secrets (every ``FEDCORE_*`` variable and any variable
  named like a password, token, key or credential),
- an empty scratch folder as its working directory, ``HOME`` and ``TMPDIR``,
- Linux Landlock rules (:mod:`fedcore.node._landlock`) that let it read the Python
  installation and import path, the system libraries, and the files of one dataset, and
  write only its scratch folder: not the node home (``identity.key``, ``config.toml``,
  ``db.json``, ``audit.jsonl``), not the node's other datasets.

A worker serves one dataset (the rules name its files), lives as long as the node and keeps
built plans between rounds. The node remembers which backends ran on which dataset, and
which installed modules (the frameworks' and the libraries') their rounds imported
(``plan-workers.json`` in its home). When it starts serving a network it starts those
workers ahead of time: each locks itself to its files, then imports those modules, so that
the first round costs no cold import. When a worker dies the round
fails for this node with a clear reply, and the next round starts a new one. What comes
back is decoded and checked like a message from the network; the node keeps the
algorithms' state files.
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
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedcore._files import write_atomic
from fedcore.aggregators._local import LocalState
from fedcore.errors import FedcoreError
from fedcore.node import _landlock
from fedcore.node.registry import entry_paths
from fedcore.params import ParameterSet
from fedcore.wire import codec
from fedcore.wire.messages import (
    Body,
    Checkpoint,
    Envelope,
    ErrorReply,
    TrainProgress,
    TrainReply,
    TrainRequest,
)

log = logging.getLogger("fedcore.node")

_SECRET = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)
# Not /proc as a whole: /proc/PID/environ and /proc/PID/mem of the node are files there.
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/sys", "/dev",
                "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/loadavg", "/proc/sys")
_SYSTEM_WRITE = ("/dev/null", "/dev/shm", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0",
                 "/dev/dri")
_WORKERS = 4  # datasets with a live worker; the least recently used one ends beyond this
MEMORY = "plan-workers.json"  # in the node home: {dataset id: {backends, modules}}
_MODULES = 4000  # installed modules remembered per dataset, at most
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PRELOAD_S = 600.0  # the longest a worker may take to import what it is told to
_MAX_REPLY = codec.DEFAULT_MAX_FRAME
# The worker leaves the host's network first, before any import starts a thread (numpy's
# BLAS does): _landlock.py is loaded from its file, without fedcore's package imports.
_CMD = ("import importlib.util as u, sys\n"
        "s = u.spec_from_file_location('_fedcore_landlock', sys.argv[2])\n"
        "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
        "offline = m.leave_network()\n"
        "from fedcore.node._sandbox import main; main(offline)")


def worker_environment(environ: Mapping[str, str], scratch: Path) -> dict[str, str]:
    """The environment of a worker: the node's, without its secrets, homed in ``scratch``."""
    env = {k: v for k, v in environ.items()
           if not k.upper().startswith("FEDCORE_") and not _SECRET.search(k)}
    env.update(HOME=str(scratch), TMPDIR=str(scratch), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(_import_path()))
    return env


def describe(mode: str) -> str:
    """One line on where a node with ``plan_isolation = mode`` runs researchers' code."""
    abi = _landlock.abi_version()
    net = ", no TCP connections" if abi >= 4 else ""
    worker = (f"a worker process with Landlock file rules (ABI {abi}){net}" if abi else
              "a worker process without the key or secrets, but this "
              "kernel has no Landlock: file permissions are the only barrier to the home")
    return {"process": worker, "none": "in the node process (unsafe for a deployed node)",
            "auto": f"{worker} on a network; in the node process in simulation"}.get(
                mode, f"unknown plan_isolation {mode!r}")


def _import_path() -> list[str]:
    return [os.path.abspath(p or os.curdir) for p in sys.path if os.path.exists(p or os.curdir)]


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


def readable(dataset: Mapping[str, Any], forbidden: Iterable[str]) -> list[str]:
    """What the worker for ``dataset`` may read: Python, the system, that dataset's files.

    A folder that holds a ``forbidden`` path (the node home, another dataset) is left out,
    whatever it is (a sys.path entry such as the folder the node was started from).
    """
    banned = [os.path.realpath(p) for p in forbidden]
    wanted = [sys.prefix, sys.base_prefix, sys.exec_prefix, *_import_path(),
              *_package_folders(), *_SYSTEM_READ]
    out: list[str] = []
    for path in {q for p in wanted for q in (os.path.abspath(p), os.path.realpath(p))}:
        if any(_within(b, path) for b in banned):
            log.warning("The plan worker may not read %s: it holds the node home or another "
                        "dataset.", path)
        elif os.path.exists(path):
            out.append(path)
    return sorted(out) + [q for p in entry_paths(dataset)
                          for q in {os.path.abspath(p), os.path.realpath(p)}]


class _Worker:
    """One worker process, for one dataset."""

    def __init__(self, scratch: Path, node_id: str, read: list[str]):
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, mode=0o700)
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CMD, str(theirs.fileno()), _landlock.__file__],
            cwd=scratch,
            env=worker_environment(os.environ, scratch), pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        write = [str(scratch), *_SYSTEM_WRITE]
        self.conn.send_bytes(json.dumps({"read": read, "write": write,
                                         "node_id": node_id}).encode())
        hello = self.receive()
        if not isinstance(hello, Checkpoint) or "landlock" not in hello.state:
            raise FedcoreError(f"The plan worker could not start: {_said(hello)}")
        self.landlock = int(hello.state["landlock"])
        #: How the worker is kept off the network: ``namespace`` (a network namespace of
        #: its own), ``tcp`` (Landlock refuses TCP connect and bind), both, or ``open``.
        self.network = str(hello.state.get("network", "open"))
        #: Whether it imported, ahead of time, what earlier rounds on its dataset imported.
        self.warm = False
        #: Whether a round runs in it now (a stopping node ends it at once, not after 2 s).
        self.busy = False

    def preload(self, backends: list[str], modules: list[str]) -> None:
        """Have the worker import these backends and installed modules; wait until it did."""
        self.conn.send_bytes(codec.encode(Envelope(
            Checkpoint(state={"preload": backends, "modules": modules}), sender="node")))
        if not self.conn.poll(_PRELOAD_S):
            raise FedcoreError(f"the worker took over {_PRELOAD_S:g} s to import its modules")
        done = self.receive()
        if not isinstance(done, Checkpoint) or "preloaded" not in done.state:
            raise FedcoreError(f"unexpected {_said(done)}")

    def receive(self) -> Body:
        """The next message (``EOFError`` when the process ended)."""
        return codec.decode(self.conn.recv_bytes(_MAX_REPLY), max_size=_MAX_REPLY).body

    def close(self) -> None:
        if self.busy:  # the round is abandoned: the plan would not read the socket's end
            self.process.kill()
        self.conn.close()  # an idle worker reads the end of the socket and exits
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _said(body: Body) -> str:
    return body.message if isinstance(body, ErrorReply) else type(body).__name__


class PlanWorkers:
    """The node's plan workers, one per dataset in use; :meth:`run` runs one round in one."""

    def __init__(self, home: Path, node_id: str):
        self.home = home
        self.node_id = node_id
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self.landlock: int | None = None  # the ABI the last worker applied (0: none)
        self.network: str | None = None  # how the last worker was kept off the network
        self._used: dict[str, dict[str, list[str]]] | None = None  # MEMORY, once read
        self._closes = 0  # calls of close(): a worker started meanwhile is closed at once

    def _worker(self, entry: Mapping[str, Any], forbidden: list[str]) -> _Worker:
        read = readable(entry, forbidden)
        key = hashlib.sha256(json.dumps([str(entry["id"]), read]).encode()).hexdigest()[:24]
        worker = self._workers.pop(key, None)
        if worker is None or worker.process.poll() is not None:
            worker = _Worker(self.home / "scratch" / key, self.node_id, read)
            if worker.landlock == 0 and self.landlock != 0:
                log.warning("This kernel has no Landlock: plans run in a worker process "
                            "without the node's key and secrets in memory, but file "
                            "permissions are the only barrier to the node home's files.")
            if worker.network == "open" and self.network != "open":
                log.warning("Plans run in a worker process that can reach the network: this "
                            "kernel allows neither an unprivileged network namespace nor "
                            "Landlock's TCP rules (ABI 4+). Block the node user's outgoing "
                            "connections at the host (docs/node-administration.md).")
            self.landlock, self.network = worker.landlock, worker.network
        self._workers[key] = worker  # most recently used last
        while len(self._workers) > _WORKERS:
            self._workers.pop(next(iter(self._workers))).close()
        return worker

    def remembered(self) -> dict[str, dict[str, list[str]]]:
        """``{dataset id: {"backends": [...], "modules": [...]}}`` of earlier worker rounds.

        Oldest first; what is not a valid module name is left out.
        """
        try:
            data = json.loads((self.home / MEMORY).read_text())
        except (OSError, ValueError):
            return {}
        out: dict[str, dict[str, list[str]]] = {}
        for dataset, used in data.items() if isinstance(data, dict) else ():
            if isinstance(used, dict):
                out[str(dataset)] = {k: _names(used.get(k)) for k in ("backends", "modules")}
        return out

    def remember(self, dataset: str, backend: str, modules: Iterable[str] = ()) -> None:
        """Note that ``backend`` ran on ``dataset`` and imported ``modules`` (when new)."""
        used = self._used if self._used is not None else self.remembered()
        self._used = used
        mine = used.setdefault(dataset, {"backends": [], "modules": []})
        new = [m for m in _names(list(modules)) if m not in set(mine["modules"])]
        if backend in mine["backends"] and not new:
            return
        if backend not in mine["backends"] and _MODULE.fullmatch(backend):
            mine["backends"].append(backend)
        mine["modules"] = (mine["modules"] + new)[:_MODULES]
        while len(used) > _WORKERS:
            used.pop(next(iter(used)))
        try:
            write_atomic(self.home / MEMORY, json.dumps(used))
        except OSError as exc:
            log.warning("Could not remember the plan workers' backends in %s: %s",
                        self.home / MEMORY, exc)

    def prestart(self, entry: Mapping[str, Any], forbidden: list[str],
                 used: Mapping[str, list[str]]) -> None:
        """Start the worker of ``entry`` now; return once it imported what ``used`` lists.

        ``used`` is what :meth:`remembered` holds for the dataset.
        """
        with self._lock:
            closes = self._closes
            worker = None
            try:
                worker = self._worker(entry, forbidden)
                worker.preload(list(used.get("backends", ())), list(used.get("modules", ())))
                worker.warm = True
            except (EOFError, OSError, FedcoreError) as exc:
                log.warning("Could not start the plan worker of dataset %s ahead of time "
                            "(%r); its first round starts one.", entry.get("id"), exc)
                if worker is not None:
                    self._workers = {k: w for k, w in self._workers.items() if w is not worker}
                    worker.process.kill()
                    worker.close()
                return
            if closes != self._closes:  # the node stopped meanwhile: no worker outlives it
                self._workers = {k: w for k, w in self._workers.items() if w is not worker}
                worker.close()

    def run(self, job: Mapping[str, Any], request: Envelope, entry: Mapping[str, Any],
            forbidden: list[str], state: LocalState,
            progress: Callable[..., None] | None) -> TrainReply | ErrorReply:
        """Run one round in the dataset's worker; blocking (call it off the event loop)."""
        with self._lock:
            try:
                worker = self._worker(entry, forbidden)
            except (EOFError, OSError, FedcoreError) as exc:
                return ErrorReply(kind="internal", exc_type="WorkerError", message=(
                    f"This node could not start a plan worker process ({exc!r}); its "
                    "administrator finds why in the node's log."))
            values = {name: value for name in _algorithms(state)
                      if (value := state.load(name)) is not None}
            worker.busy = True
            try:
                worker.conn.send_bytes(codec.encode(Envelope(
                    Checkpoint(state={**job, "entry": dict(entry), "state": values}),
                    sender=self.node_id)))
                worker.conn.send_bytes(codec.encode(request))
                reply, modules = self._answer(worker, request, state, progress)
            except (EOFError, OSError, FedcoreError) as exc:
                self._workers = {k: w for k, w in self._workers.items() if w is not worker}
                worker.process.kill()
                code = worker.process.wait()
                worker.conn.close()
                what = (f"ended during the round (exit code {code})"
                        if isinstance(exc, (EOFError, OSError)) else f"sent a bad reply ({exc})")
                return ErrorReply(kind="plan", exc_type="WorkerError", message=(
                    f"The plan's worker process {what}. The node keeps serving and starts a "
                    "new worker for the next round; fix the plan (it may have exited, "
                    "crashed, or run out of memory)."))
            finally:
                worker.busy = False
            if isinstance(reply, TrainReply) or reply.kind == "plan":
                self.remember(str(entry["id"]), str(job.get("backend", "")), modules)
            return reply

    def _answer(self, worker: _Worker, request: Envelope, state: LocalState,
                progress: Callable[..., None] | None
                ) -> tuple[TrainReply | ErrorReply, list[str]]:
        """The round's reply, and the installed modules the worker says it imported."""
        modules: list[str] = []
        while True:
            body = worker.receive()
            if isinstance(body, TrainProgress):
                if progress is not None:
                    progress(step=body.step, epoch=body.epoch, loss=body.loss,
                             samples=body.samples, fraction=body.fraction)
            elif isinstance(body, Checkpoint) and isinstance(
                    saved := body.state.get("algorithm_state"), dict):
                for name, value in saved.items():
                    if isinstance(value, dict):
                        state.save(str(name), value)
            elif isinstance(body, Checkpoint) and isinstance(
                    imported := body.state.get("modules"), list):
                modules = _names(imported)
            elif isinstance(body, ErrorReply):
                return body, modules
            elif isinstance(body, TrainReply):
                assert isinstance(request.body, TrainRequest)
                _check_layout(body.params, request.body.params)
                return body, modules
            else:
                raise FedcoreError(f"unexpected {type(body).__name__}")

    def close(self) -> None:
        """End every worker (the node stops; a round still running in one fails)."""
        self._closes += 1
        workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.close()


def _names(value: Any) -> list[str]:
    """The valid module names of a list (at most :data:`_MODULES`), in order."""
    items = value if isinstance(value, list) else []
    return [str(v) for v in items if isinstance(v, str) and len(v) < 200
            and _MODULE.fullmatch(v)][:_MODULES]


def _algorithms(state: LocalState) -> set[str]:
    return {p.name.split(".")[0] for p in state.path.glob("*.*.fedcore")}


def _check_layout(got: ParameterSet, sent: ParameterSet) -> None:
    """Refuse an update whose arrays do not match the global model's names and shapes.

    The update may leave out names: the plan's local parameters stay on the node, even
    when a request sent values under their names.
    """
    if not len(sent):
        return
    expected = {name: tuple(a.shape) for name, a in sent.items()}
    received = {name: tuple(a.shape) for name, a in got.items()}
    if any(expected.get(name) != shape for name, shape in received.items()):
        raise FedcoreError(f"expected the global model's arrays {expected}, received "
                           f"{received}")
