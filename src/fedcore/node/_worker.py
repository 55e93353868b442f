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
built plans between rounds. When it dies the round fails for this node with a clear reply,
and the next round starts a new one. What comes back is decoded and checked like a message
from the network; the node keeps the algorithms' state files.
"""

from __future__ import annotations

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

from fedcore.aggregators._local import LocalState
from fedcore.errors import FedcoreError
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
_MAX_REPLY = codec.DEFAULT_MAX_FRAME
_CMD = "from fedcore.node._sandbox import main; main()"


def worker_environment(environ: Mapping[str, str], scratch: Path) -> dict[str, str]:
    """The environment of a worker: the node's, without its secrets, homed in ``scratch``."""
    env = {k: v for k, v in environ.items()
           if not k.upper().startswith("FEDCORE_") and not _SECRET.search(k)}
    env.update(HOME=str(scratch), TMPDIR=str(scratch), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(_import_path()))
    return env


def describe(mode: str) -> str:
    """One line on where a node with ``plan_isolation = mode`` runs researchers' code."""
    from fedcore.node._landlock import abi_version

    abi = abi_version()
    worker = (f"a worker process with Landlock file rules (ABI {abi})" if abi else
              "a worker process without the key or secrets, but this "
              "kernel has no Landlock: file permissions are the only barrier to the home")
    return {"process": worker, "none": "in the node process (unsafe for a deployed node)",
            "auto": f"{worker} on a network; in the node process in simulation"}.get(
                mode, f"unknown plan_isolation {mode!r}")


def _import_path() -> list[str]:
    return [os.path.abspath(p or os.curdir) for p in sys.path if os.path.exists(p or os.curdir)]


def _package_folders() -> list[str]:
    """The folders of fedcore and of every installed plug-in's top-level package.

    An editable install is imported through a finder, not from a ``sys.path`` entry, so
    these folders are not always under the import path.
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
    return folders


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
            [sys.executable, "-c", _CMD, str(theirs.fileno())], cwd=scratch,
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

    def receive(self) -> Body:
        """The next message (``EOFError`` when the process ended)."""
        return codec.decode(self.conn.recv_bytes(_MAX_REPLY), max_size=_MAX_REPLY).body

    def close(self) -> None:
        self.conn.close()  # the worker reads the end of the socket and exits
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
            self.landlock = worker.landlock
        self._workers[key] = worker  # most recently used last
        while len(self._workers) > _WORKERS:
            self._workers.pop(next(iter(self._workers))).close()
        return worker

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
            try:
                worker.conn.send_bytes(codec.encode(Envelope(
                    Checkpoint(state={**job, "entry": dict(entry), "state": values}),
                    sender=self.node_id)))
                worker.conn.send_bytes(codec.encode(request))
                return self._answer(worker, request, state, progress)
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

    def _answer(self, worker: _Worker, request: Envelope, state: LocalState,
                progress: Callable[..., None] | None) -> TrainReply | ErrorReply:
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
            elif isinstance(body, ErrorReply):
                return body
            elif isinstance(body, TrainReply):
                assert isinstance(request.body, TrainRequest)
                _check_layout(body.params, request.body.params)
                return body
            else:
                raise FedcoreError(f"unexpected {type(body).__name__}")

    def close(self) -> None:
        """End every worker (the node stops; a round still running in one fails)."""
        workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.close()


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
