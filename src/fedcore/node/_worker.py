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
the first round costs no cold import. ``fedcore-node start`` starts them first of all,
before the node process imports its own runtime (:func:`fedcore.node._spawn.start_ahead`):
the node takes each one whose read rules are those it computes itself, and ends the
others. When a worker dies the round
fails for this node with a clear reply, and the next round starts a new one. What comes
back is decoded and checked like a message from the network; the node keeps the
algorithms' state files.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedcore._files import write_atomic
from fedcore.aggregators._local import LocalState
from fedcore.errors import FedcoreError
from fedcore.node import _landlock, _spawn
from fedcore.node._spawn import (
    _MODULE,
    _MODULES,
    MEMORY,
    names,
    readable,
    rules,
    worker_environment,
    worker_key,
)
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

__all__ = ["MEMORY", "PlanWorkers", "describe", "readable", "worker_environment"]

log = logging.getLogger("fedcore.node")

_WORKERS = 4  # datasets with a live worker; the least recently used one ends beyond this
_PRELOAD_S = 600.0  # the longest a worker may take to import what it is told to
_MAX_REPLY = codec.DEFAULT_MAX_FRAME


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


class _Worker:
    """One worker process, for one dataset: a :class:`~._spawn.Launched` once it said hello.

    If the launch named modules to preload, this returns once the worker imported them.
    """

    def __init__(self, launched: _spawn.Launched):
        self.process, self.conn = launched.process, launched.conn
        #: Whether it imported, ahead of time, what earlier rounds on its dataset imported.
        self.warm = False
        #: Whether a round runs in it now (a stopping node ends it at once, not after 2 s).
        self.busy = False
        try:
            hello = self.receive()
            if not isinstance(hello, Checkpoint) or "landlock" not in hello.state:
                raise FedcoreError(f"The plan worker could not start: {_said(hello)}")
            if launched.preload:
                if not self.conn.poll(_PRELOAD_S):
                    raise FedcoreError(f"the worker took over {_PRELOAD_S:g} s to import its "
                                       "modules")
                done = self.receive()
                if not isinstance(done, Checkpoint) or "preloaded" not in done.state:
                    raise FedcoreError(f"unexpected {_said(done)}")
                self.warm = True
        except BaseException:
            launched.end()
            raise
        self.landlock = int(hello.state["landlock"])
        #: How the worker is kept off the network: ``namespace`` (a network namespace of
        #: its own), ``tcp`` (Landlock refuses TCP connect and bind), both, or ``open``.
        self.network = str(hello.state.get("network", "open"))

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

    def _worker(self, entry: Mapping[str, Any], forbidden: list[str],
                preload: Mapping[str, list[str]] | None = None) -> _Worker:
        read, write = rules(entry, forbidden)
        key = worker_key(str(entry["id"]), read + write)
        worker = self._workers.pop(key, None)
        if worker is None or worker.process.poll() is not None:
            # One this process started before the node existed, if it reads the same files.
            launched = _spawn.take(self.home, key) or _spawn.Launched(
                self.home / "scratch" / key, self.node_id, read, write, preload)
            worker = _Worker(launched)
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
        """``{dataset id: {"backends": [...], "modules": [...]}}`` of earlier worker rounds."""
        return _spawn.remembered(self.home)

    def remember(self, dataset: str, backend: str, modules: Iterable[str] = ()) -> None:
        """Note that ``backend`` ran on ``dataset`` and imported ``modules`` (when new)."""
        used = self._used if self._used is not None else self.remembered()
        self._used = used
        mine = used.setdefault(dataset, {"backends": [], "modules": []})
        new = [m for m in names(list(modules)) if m not in set(mine["modules"])]
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
            try:
                worker = self._worker(entry, forbidden, used)
            except (EOFError, OSError, FedcoreError) as exc:
                log.warning("Could not start the plan worker of dataset %s ahead of time "
                            "(%r); its first round starts one.", entry.get("id"), exc)
                return
            if closes != self._closes:  # the node stopped meanwhile: no worker outlives it
                self._workers = {k: w for k, w in self._workers.items() if w is not worker}
                worker.close()

    def drop_unused(self) -> None:
        """End the workers started ahead of this node that it did not take (see ``_spawn``)."""
        _spawn.drop(self.home)

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
                modules = names(imported)
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
