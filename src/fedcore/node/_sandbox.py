"""The plan worker's side: a process that runs researchers' code apart from the node.

Started by :mod:`fedcore.node._worker` as ``python -c "...main()" FD`` with a scrubbed
environment, in an empty scratch folder, and connected to the node by a socket (file
descriptor ``FD``). Its first message from the node says which files it may read and write;
it locks itself to them with Landlock before it reads anything else (and, before it imports
anything, leaves the host's network: a network namespace of its own where unprivileged
Linux allows one, and Landlock's TCP rules from ABI 4 on), then answers rounds: it imports
the plan bundle (module-level code runs here), opens the one dataset of the
round, and runs :func:`fedcore.node.executor.run_round`. The first message may also name
backends and installed modules to import before the first round (``preload``), once the
rules hold.

Every message in both directions is a frame of fedcore's codec (no pickle): the node decodes
what comes back as it would a message from the network, and checks it.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.connection import Connection
from typing import Any

from fedcore import plugins
from fedcore.aggregators._local import LocalState
from fedcore.data import Dataset
from fedcore.errors import (
    ConfigurationError,
    DatasetError,
    GovernanceError,
    MissingDependencyError,
    lacking,
)
from fedcore.node import _landlock
from fedcore.node.executor import private_training, run_round
from fedcore.node.registry import _open_key, files_version, open_entry
from fedcore.plan import PlanBundle, TrainingPlan, check_training_args
from fedcore.privacy.spec import PrivacySpec
from fedcore.wire import codec
from fedcore.wire.messages import (
    Body,
    Checkpoint,
    Envelope,
    ErrorReply,
    TrainProgress,
    TrainRequest,
)

_WARM_PLANS = 8
_PROGRESS_S = 0.5  # the node forwards at most one report a second; send it a little more


def frame(body: Body) -> bytes:
    """One message of the worker protocol."""
    return codec.encode(Envelope(body, sender="plan-worker"))


class _HeldState(LocalState):
    """A :class:`LocalState` whose files the node reads and writes (not this process).

    The node sends the saved values of the round's experiment and dataset; what the
    algorithm saves goes back to the node in the reply.
    """

    def __init__(self, values: Mapping[str, Any], experiment: str, dataset: str, round: int):
        super().__init__(".", experiment, dataset, round)
        self.values = dict(values)
        self.saved: dict[str, Any] = {}

    def load(self, algorithm: str) -> dict[str, Any] | None:  # noqa: D102
        value = self.values.get(algorithm)
        return dict(value) if isinstance(value, Mapping) else None

    def save(self, algorithm: str, value: Mapping[str, Any]) -> Any:  # noqa: D102
        self.saved[algorithm] = dict(value)
        return None


class _Runner:
    """What the worker keeps between rounds: loaded plan classes, built plans, the dataset."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.plans: dict[str, type[TrainingPlan]] = {}
        self.warm: dict[str, TrainingPlan] = {}
        self.dataset: tuple[Any, Dataset] | None = None

    def open(self, entry: Mapping[str, Any]) -> Dataset:
        key = (_open_key(entry), files_version(entry))  # as the node's registry keeps it
        if self.dataset is None or self.dataset[0] != key:
            self.dataset = (key, open_entry(entry))
        return self.dataset[1]

    def round(self, job: Mapping[str, Any], request_frame: bytes,
              send: Callable[[Body], None]) -> Body:
        env = codec.decode(request_frame)
        request = env.body
        if not isinstance(request, TrainRequest):
            raise ConfigurationError(f"Expected a TrainRequest. Received: {env.tag!r}")
        before = set(sys.modules)
        try:
            return self._round(job, send, env, request)
        finally:  # what the round imported, for the next start of this worker
            if new := _installed(set(sys.modules) - before):
                send(Checkpoint(state={"modules": new}))

    def _round(self, job: Mapping[str, Any], send: Callable[[Body], None], env: Envelope,
               request: TrainRequest) -> Body:
        bundle = PlanBundle.from_wire(job["bundle"])
        sha = bundle.sha256
        plan_class = self.plans.get(sha) or bundle.load()  # the plan's module code runs here
        self.plans[sha] = plan_class
        try:  # refusals, as on the node's training thread
            check_training_args(plan_class, request.training_args)
            private_training(plan_class, PrivacySpec.parse(request.privacy))
            dataset = self.open(job["entry"])
        except (ConfigurationError, GovernanceError, DatasetError) as exc:
            return _refusal(exc, self.node_id)
        key = str(job["warm_key"]) if plan_class.reusable else ""
        warm = self.warm.pop(key, None)
        state = _HeldState(job["state"], env.experiment, str(job["entry"]["id"]), env.round)
        reply, plan = run_round(plan_class, request, dataset, self.node_id, env.round,
                                {"allow_gpu": bool(job["allow_gpu"]),
                                 "progress": _progress(send)}, warm, state)
        if key:
            self.warm[key] = plan
            while len(self.warm) > _WARM_PLANS:
                self.warm.pop(next(iter(self.warm)))
        if state.saved:
            send(Checkpoint(state={"algorithm_state": state.saved}))
        return reply


def _progress(send: Callable[[Body], None]) -> Callable[..., None]:
    last = time.monotonic()

    def report(**fields: Any) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= _PROGRESS_S:
            last = now
            send(TrainProgress(**fields))

    return report


def _refusal(exc: Exception, node: str) -> ErrorReply:
    if isinstance(exc, MissingDependencyError):
        return _failure(exc, node)
    kind = ("dataset" if isinstance(exc, DatasetError) else "governance"
            if isinstance(exc, GovernanceError) else "configuration")
    return ErrorReply(kind=kind, message=str(exc), exc_type=type(exc).__name__)


def _failure(exc: BaseException, node: str = "") -> ErrorReply:
    """The round failed in the plan's code (or the node's code around it): kind ``plan``.

    A package the node's installation lacks is kind ``dependency``, for its administrator.
    """
    if isinstance(exc, MissingDependencyError):
        return ErrorReply(kind="dependency", message=lacking(node or "this node", exc),
                          exc_type="MissingDependencyError")
    kind = "dataset" if isinstance(exc, DatasetError) else "plan"
    return ErrorReply(kind=kind, message=str(exc), exc_type=type(exc).__name__,
                      traceback=traceback.format_exc())


def _preload(backends: Any, modules: Any) -> None:
    """Import what earlier rounds imported (backends, installed modules), ahead of a round.

    It runs after Landlock's rules: every thread a framework starts is under them too.
    """
    for name in backends if isinstance(backends, list) else ():
        try:
            plugins.load("backends", str(name))
        except Exception:  # noqa: BLE001 - a round with this backend reports it
            pass
    for name in modules if isinstance(modules, list) else ():
        try:
            importlib.import_module(str(name))
        except Exception:  # noqa: BLE001 - gone or changed since: the round imports its own
            pass


def _imported() -> None:
    """Switch the cyclic garbage collector back on, leaving out what the imports built.

    The worker starts with it off (:data:`fedcore.node._spawn._CMD`): importing a
    framework builds millions of objects that live as long as the process, and the
    collections they triggered went over them again and again (a fifth of the CPU of
    importing torch, scikit-learn and what their first rounds import). Frozen
    (:func:`gc.freeze`), they are left out of the collections during rounds as well (the
    first one after such imports took ~0.2 s).
    """
    gc.freeze()
    gc.enable()


def _installed(names: Iterable[str]) -> list[str]:
    """Of ``names`` (in ``sys.modules``), those imported from the Python installation.

    Not the plan's own modules, nor anything from the scratch folder or a dataset.
    """
    paths = sysconfig.get_paths()
    roots = tuple({os.path.join(os.path.realpath(paths[k]), "")
                   for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths})
    out = []
    for name in sorted(names):
        origin = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(origin, str) and os.path.realpath(origin).startswith(roots):
            out.append(name)
    return out


def serve(conn: Connection, offline: bool = False) -> None:
    """Lock this process to its files, then answer rounds until the node closes the socket.

    ``offline``: the process already left the host's network (:func:`_landlock.leave_network`).
    """
    setup = json.loads(conn.recv_bytes())
    try:
        # /proc/self resolves to this process's own folder when the rule is made.
        abi = _landlock.restrict([*setup["read"], "/proc/self"], setup["write"])
    except OSError as exc:  # Landlock is there but refused: say so, run nothing
        conn.send_bytes(frame(ErrorReply(kind="internal", message=str(exc))))
        return
    network = ("namespace" if offline else "") + ("+tcp" if abi >= 4 else "")
    conn.send_bytes(frame(Checkpoint(state={"landlock": abi,
                                            "network": network.lstrip("+") or "open"})))
    preload = setup.get("preload")
    if isinstance(preload, dict):  # what earlier rounds on this dataset imported
        _preload(preload.get("backends"), preload.get("modules"))
    _imported()  # the plan's own imports run with the collector on
    if isinstance(preload, dict):
        conn.send_bytes(frame(Checkpoint(state={"preloaded": len(sys.modules)})))
    runner = _Runner(str(setup["node_id"]))
    while True:
        try:
            job = codec.decode(conn.recv_bytes()).body
            request = conn.recv_bytes()
        except EOFError:
            return
        try:
            assert isinstance(job, Checkpoint)
            reply = runner.round(job.state, request, lambda body: conn.send_bytes(frame(body)))
        except Exception as exc:  # the plan's failure is the round's answer
            reply = _failure(exc, str(setup["node_id"]))
        conn.send_bytes(frame(reply))


def main(offline: bool = False) -> None:
    """Entry point of the worker process (``sys.argv[1]``: the socket's descriptor).

    ``offline``: whether the process left the host's network before it imported anything
    (:data:`fedcore.node._spawn._CMD`: a user namespace needs a process without threads,
    and numpy starts some).
    """
    conn = Connection(int(sys.argv[1]))
    try:
        serve(conn, offline)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass
