"""How a node answers a training request: admit, train (here or in a worker), charge, protect.

A mixin of :class:`~fedcore.node.Node`: the attributes it reads that the node's own
constructor sets are declared on the class below.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from fedcore import plugins
from fedcore.aggregators._local import LocalState, local_algorithm
from fedcore.errors import (
    ConfigurationError,
    DatasetError,
    FedcoreError,
    GovernanceError,
    MissingDependencyError,
    ProtocolError,
    TransportError,
    lacking,
)
from fedcore.governance import Decision, PrivacyBudget, Request
from fedcore.node import _spawn
from fedcore.node._home import NodeHome, _caller
from fedcore.node._secagg import Binding, SecaggSessions
from fedcore.node._turns import FlushIfLong
from fedcore.node._worker import PlanWorkers
from fedcore.node.executor import plan_key, private_training, run_round
from fedcore.node.protection import update_protection
from fedcore.plan import PlanBundle, TrainingPlan, check_training_args
from fedcore.privacy.accountant import Event, epsilon
from fedcore.privacy.mechanisms import UpdateDP
from fedcore.privacy.spec import PrivacySpec, train_size
from fedcore.secagg import NodeContext, NodeFloors
from fedcore.wire import codec
from fedcore.wire.chunks import ChunkedTransport
from fedcore.wire.messages import (
    Body,
    Envelope,
    ErrorReply,
    TrainProgress,
    TrainReply,
    TrainRequest,
)

log = logging.getLogger("fedcore.node")
#: Where the request being handled came from, for messages sent before its reply (progress).
_origin: contextvars.ContextVar[tuple[ChunkedTransport, str] | None] = contextvars.ContextVar(
    "origin", default=None)
_PROGRESS_S = 1.0  # at most one training-progress report a second per round
_WARM_PLANS = 8

#: A refused training request's error kind, by the exception that refused it (in order).
_REFUSALS: dict[str, type[FedcoreError]] = {
    "governance": GovernanceError, "dataset": DatasetError, "configuration": ConfigurationError}


class _Progress:
    """The progress callback of one training request (see :meth:`_Rounds._progress`).

    One object per request rather than closures: a simulated round keeps one per node alive
    until its training is done.
    """

    __slots__ = ("env", "last", "link", "loop", "node_id", "peer", "started")

    def __init__(self, env: Envelope, node_id: str, link: ChunkedTransport, peer: str):
        self.env, self.node_id, self.link, self.peer = env, node_id, link, peer
        self.loop = asyncio.get_running_loop()
        self.started = self.last = time.monotonic()

    def __call__(self, **fields: Any) -> None:
        """Report progress (on the training thread): at most one message a second."""
        now = time.monotonic()
        if now - self.last < _PROGRESS_S:
            return
        self.last = now
        message = self.env.reply(TrainProgress(elapsed_s=now - self.started, **fields),
                                 sender=self.node_id)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._send(message)))

    async def _send(self, message: Envelope) -> None:
        try:
            await self.link.send_parts(self.peer, codec.encode_parts(message))
        except (TransportError, ProtocolError) as exc:
            log.debug("Could not send training progress to %s: %s", self.peer, exc)


class _Admitted:
    """A training request the node accepted: the verified plan, the decision, the data.

    ``dataset`` is ``None`` under process isolation (``apart``): the plan's worker opens it.
    (A plain class: one per request, built without a frozen dataclass's call per field.)
    """

    __slots__ = ("apart", "bundle", "dataset", "decision", "entry", "sha")

    def __init__(self, bundle: PlanBundle, sha: str, entry: dict[str, Any],
                 decision: Decision, dataset: Any, apart: bool = False):
        self.bundle, self.sha, self.entry = bundle, sha, entry
        self.decision, self.dataset, self.apart = decision, dataset, apart


class _Rounds(NodeHome):
    """The training requests of a node (see :class:`~fedcore.node.Node`)."""

    _secagg: SecaggSessions
    _executor: FlushIfLong
    _plans: dict[str, type[TrainingPlan]]
    _warm: dict[str, TrainingPlan]
    _bundles: dict[str, PlanBundle]
    _workers: PlanWorkers
    _networked: bool

    def _secagg_context(self, binding: Binding) -> NodeContext:
        """The node's terms for a new secure-aggregation session: policy, key, peers."""
        policy = self.policy
        floors = NodeFloors(min_members=policy["secagg_min_members"],
                            min_key_bits=policy["secagg_min_key_bits"],
                            jl_moduli=frozenset(policy["secagg_jl_moduli"] or ()))
        return NodeContext(floors=floors, signer=self.identity, peers=self.peers,
                           experiment=binding.experiment)

    def _secagg_binding(self, env: Envelope) -> Binding:
        """What a secure-aggregation session of this request is bound to (verified parts)."""
        caller = _caller.get()
        researcher = caller[1] if caller else f"in-process sender {env.sender!r}"
        return Binding(researcher, env.experiment, env.round)

    def _bundle(self, wire: Any) -> tuple[PlanBundle, str]:
        """The shipped bundle and its SHA-256, verified once per plan rather than per round.

        ``GovernanceError`` when the files do not hash to the declared SHA-256: the source
        was changed after it was hashed (say, after it was approved).
        """
        declared = wire.get("sha256") if isinstance(wire, Mapping) else None
        if isinstance(declared, str):
            known = self._bundles.get(declared)
            if known is not None and (wire.get("files"), wire.get("entry"), wire.get(
                    "backend")) == (known.files, known.entry, known.backend):
                return known, declared  # the same files as a bundle whose hash was checked
        bundle = PlanBundle.from_wire(
            {k: v for k, v in wire.items() if k != "sha256"} if isinstance(wire, Mapping)
            else wire)
        sha = bundle.sha256
        if declared is not None and declared != sha:
            raise GovernanceError(
                f"The plan's files do not match its declared hash {declared} (they hash to "
                f"{sha}): its source was changed after it was hashed. Refused.")
        if len(self._bundles) >= 64:
            self._bundles.pop(next(iter(self._bundles)))
        self._bundles[sha] = bundle
        return bundle, sha

    async def _on_train(self, env: Envelope) -> Body:
        request: TrainRequest = env.body  # type: ignore[assignment]
        base = {"researcher": self.researcher(env), "experiment": env.experiment,
                "round": env.round, "dataset": request.dataset_id}
        self.audit("train-request", **base)
        try:  # the session the node holds decides the protection, and what governance sees
            protection = update_protection(self._secagg, request.secagg,
                                           functools.partial(self._secagg_binding, env))
        except FedcoreError as exc:
            self.audit("secagg-refused", **base, phase="train", reason=str(exc))
            return ErrorReply(kind="protocol", message=str(exc), exc_type=type(exc).__name__)
        admitted = await self._admit(env, request, protection.scheme, base)
        if isinstance(admitted, ErrorReply):
            return admitted
        if admitted.decision.overrides or admitted.decision.privacy:
            request = dataclasses.replace(request, training_args={
                **request.training_args, **admitted.decision.overrides},
                privacy=admitted.decision.privacy or request.privacy)
        protection.prepare(request.params)
        # Where the policy said when the request was admitted: a worker process, or here.
        reply = await (self._train_apart(env, request, admitted, base) if admitted.apart
                       else self._train_here(env, request, admitted, base))
        if isinstance(reply, ErrorReply):
            return reply
        if request.privacy:  # spent: on record before the update leaves the node
            reply = self._charge_privacy(request, admitted.entry, reply, base)
            if isinstance(reply, ErrorReply):
                return reply
        try:
            reply = await protection.protect(reply, self._executor)
        except FedcoreError as exc:
            self.audit("train-failed", **base, error=f"secure aggregation: {exc}")
            return ErrorReply(kind="protocol", message=str(exc), exc_type=type(exc).__name__)
        self.audit("trained", **base, n_samples=reply.n_samples,
                   seconds=round(reply.timings.get("total_s", 0.0), 4))
        if admitted.decision.overrides or admitted.decision.privacy:
            reply = dataclasses.replace(reply, overrides=dict(admitted.decision.overrides),
                                        policy_notes=list(admitted.decision.notes))
        return reply

    async def _admit(self, env: Envelope, request: TrainRequest, scheme: str | None,
                     base: dict[str, Any]) -> _Admitted | ErrorReply:
        """Verify the plan, review the request, load the backend and open the dataset."""
        try:
            bundle, sha = self._bundle(request.plan)
            base["plan"] = sha
            entry = self.datasets.get(request.dataset_id)
            decision = self.review(self._train_request(env, request, bundle, sha, entry,
                                                       scheme))
            if not decision.allowed:  # the decision is in the audit log already
                return ErrorReply(kind="governance", message=decision.reason,
                                  exc_type="GovernanceError")
            local_algorithm(request.algorithm)  # an unknown aggregator is refused here
            if self.plan_isolation == "process":
                # The plan's worker imports its framework and opens the dataset: the node
                # only checks that the backend is one it knows, without importing it.
                if bundle.backend not in plugins.available("backends"):
                    plugins.load("backends", bundle.backend)  # the error names close ones
                return _Admitted(bundle, sha, entry, decision, None, apart=True)
            if not plugins.loaded("backends", bundle.backend):
                # Importing a framework takes seconds: off the loop, which keeps serving.
                # Once this process imported it (this node or another simulated one did),
                # later rounds skip the thread hop (it costs milliseconds when the machine
                # is busy).
                self._audit.flush()
                await asyncio.get_running_loop().run_in_executor(
                    None, plugins.load, "backends", bundle.backend)
            return _Admitted(bundle, sha, entry, decision, self.datasets.open(entry))
        except asyncio.CancelledError:  # the node stops while loading the framework
            self.audit("train-abandoned", **base, reason="the node stopped mid-round")
            raise
        except (GovernanceError, DatasetError, ConfigurationError) as exc:
            self.audit("train-refused", **base, reason=str(exc))
            kind = next(k for k, cls in _REFUSALS.items() if isinstance(exc, cls))
            return ErrorReply(kind=kind, message=str(exc), exc_type=_REFUSALS[kind].__name__)

    @property
    def plan_isolation(self) -> str:
        """Where this node runs researchers' code now: ``"process"`` or ``"none"`` (in-thread).

        The policy's ``plan_isolation``: ``auto`` (the default) is a worker process on a
        networked transport and the training thread in-process (simulation).
        """
        try:
            mode = str(self._config.setting("plan_isolation"))
        except ConfigurationError:
            mode = "auto"
        if mode == "auto":
            return "process" if self._networked else "none"
        return mode

    async def _train_apart(self, env: Envelope, request: TrainRequest, admitted: _Admitted,
                           base: dict[str, Any]) -> TrainReply | ErrorReply:
        """Run the round in the dataset's worker process (docs: "What approval means")."""
        job = {"bundle": admitted.bundle.to_wire(), "allow_gpu": self._allow_gpu(),
               "backend": admitted.bundle.backend,
               "warm_key": plan_key(env.experiment, admitted.sha, request)}
        entry = admitted.entry
        forbidden = self._forbidden(entry)
        state = LocalState(self.home / "algorithms", env.experiment, request.dataset_id,
                           env.round)
        sent = Envelope(request, sender=env.sender, experiment=env.experiment, round=env.round)
        try:
            reply = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._workers.run, job, sent, entry, forbidden, state,
                self._progress(env))
        except asyncio.CancelledError:
            self.audit("train-abandoned", **base, reason="the node stopped mid-round")
            raise
        if isinstance(reply, ErrorReply):
            if reply.kind in ("governance", "configuration"):
                self.audit("train-refused", **base, reason=reply.message)
            else:
                self.audit("train-failed", **base, error=f"{reply.exc_type}: {reply.message}")
            return reply
        spec = PrivacySpec.parse(request.privacy)
        if spec is not None:
            # The charge is the node's, from the spec and schedule it enforced; the count the
            # researcher's code reported (it runs in the plan worker) can only raise it.
            reply = dataclasses.replace(reply, privacy=spec.reply(
                self._privacy_events(spec, request, admitted.entry, reply)))
        return reply

    def _forbidden(self, entry: Mapping[str, Any]) -> list[str]:
        """What the worker of ``entry`` may not read: the home and the other datasets."""
        return _spawn.forbidden(self.home, self.datasets.list(), str(entry["id"]))

    def _prestart_workers(self) -> None:
        """Start the workers of the datasets that ran plans before, importing their backends.

        Runs on the training thread as the node starts serving: a round that comes meanwhile
        waits for it, then finds its worker warm.
        """
        try:
            entries = {str(e["id"]): e for e in self.datasets.list()}
            for dataset, used in self._workers.remembered().items():
                if dataset in entries:
                    self._workers.prestart(entries[dataset], self._forbidden(entries[dataset]),
                                           used)
        except Exception:  # noqa: BLE001 - never fatal: the first round starts a worker
            log.exception("Could not start plan workers ahead of time")
        finally:  # those `fedcore-node start` started that read other files than computed
            self._workers.drop_unused()

    def _privacy_events(self, spec: PrivacySpec, request: TrainRequest,
                        entry: dict[str, Any], reply: TrainReply) -> list[Event]:
        """What the round costs by the node's own accounting (the larger of two counts).

        Update-level DP: one release at the enforced noise. DP-SGD: the Poisson schedule of
        the enforced epochs, batch size and step cap over the node's own training-set size,
        or what the worker counted if that costs more (it never costs less).
        """
        if spec.mechanism == "update":
            return [UpdateDP.from_spec(spec).event()]
        mine = spec.events(n_train=train_size(self._n_samples(entry), request.test_ratio),
                           training_args=request.training_args)
        try:
            counted = [Event.coerce(e) for e in (reply.privacy or {}).get("events") or ()]
        except (TypeError, ValueError, FedcoreError):
            counted = []
        delta = spec.delta
        return counted if epsilon(counted, delta) > epsilon(mine, delta) else mine

    async def _train_here(self, env: Envelope, request: TrainRequest, admitted: _Admitted,
                          base: dict[str, Any]) -> TrainReply | ErrorReply:
        """Run the plan on the training thread; a failure is the plan's, and is reported."""
        loop = asyncio.get_running_loop()
        sha = admitted.sha
        try:
            plan_class = self._plans.get(sha)
            if plan_class is None and admitted.bundle.ran_before:
                # This process ran these files already (another simulated node): their
                # imports are done and loading takes microseconds, no thread hop. The plan
                # still runs in a module of this node's own and gives a class of its own.
                plan_class = admitted.bundle.load()
            elif plan_class is None:  # a first load may import a framework: off the loop
                self._audit.flush()
                plan_class = await loop.run_in_executor(None, admitted.bundle.load)
            self._plans[sha] = plan_class
            try:
                # A misspelt or mistyped training argument is the researcher's to fix; DP-SGD
                # the node's backend cannot run around this plan is refused.
                check_training_args(plan_class, request.training_args)
                private_training(plan_class, PrivacySpec.parse(request.privacy))
            except MissingDependencyError as exc:
                self.audit("train-refused", **base, reason=str(exc))
                return ErrorReply(kind="dependency", message=lacking(self.node_id, exc),
                                  exc_type="MissingDependencyError")
            except (ConfigurationError, GovernanceError) as exc:
                self.audit("train-refused", **base, reason=str(exc))
                kind = next(k for k, cls in _REFUSALS.items() if isinstance(exc, cls))
                return ErrorReply(kind=kind, message=str(exc),
                                  exc_type=_REFUSALS[kind].__name__)
            key = plan_key(env.experiment, sha, request) if plan_class.reusable else ""
            warm = self._warm.pop(key, None)  # taken out: one round uses it at a time
            reply, plan = await self._executor.run(
                run_round, plan_class, request, admitted.dataset,
                self.node_id, env.round,
                {"allow_gpu": self._allow_gpu(), "progress": self._progress(env)}, warm,
                LocalState(self.home / "algorithms", env.experiment, request.dataset_id,
                           env.round)
                if request.algorithm or request.fine_tune or plan_class.local_parameters
                else None,  # only what keeps values between rounds needs one
            )
            if key:
                self._warm[key] = plan
                while len(self._warm) > _WARM_PLANS:
                    self._warm.pop(next(iter(self._warm)))
            return reply
        except DatasetError as exc:
            self.audit("train-failed", **base, reason=str(exc))
            return ErrorReply(kind="dataset", message=str(exc), exc_type="DatasetError")
        except asyncio.CancelledError:  # the node stops: the round is given up, on record
            self.audit("train-abandoned", **base, reason="the node stopped mid-round")
            raise
        except MissingDependencyError as exc:  # this node's installation lacks a package
            self.audit("train-failed", **base, error=f"{type(exc).__name__}: {exc}")
            return ErrorReply(kind="dependency", message=lacking(self.node_id, exc),
                              exc_type="MissingDependencyError")
        except Exception as exc:  # the researcher's code failed: report it, keep serving
            self.audit("train-failed", **base, error=f"{type(exc).__name__}: {exc}")
            return ErrorReply(kind="plan", message=str(exc), exc_type=type(exc).__name__,
                              traceback=traceback.format_exc())

    def _charge_privacy(self, request: TrainRequest, entry: dict[str, Any], reply: TrainReply,
                        base: dict[str, Any]) -> TrainReply | ErrorReply:
        """Charge what the round spent to the dataset's budget, or withhold an overspend."""
        events = reply.privacy["events"]
        overspent = next((reason for p in self.governance.policies
                          if isinstance(p, PrivacyBudget)
                          and (reason := p.overspent(entry, events))), None)
        if overspent:
            self.audit("train-refused", **base, reason=overspent)
            return ErrorReply(kind="governance", message=overspent, exc_type="GovernanceError")
        self.ledger.record(request.dataset_id, events, delta=reply.privacy["delta"])
        total = self.ledger.events(request.dataset_id)
        spec = PrivacySpec.parse(request.privacy)
        assert spec is not None
        reply = dataclasses.replace(reply, privacy=spec.reply(events, total))
        base["epsilon"] = reply.privacy["epsilon"]
        return reply

    def _progress(self, env: Envelope) -> Callable[..., None] | None:
        """A callback for the training thread: throttled progress messages to the researcher.

        They are sent on the node's loop; ``None`` when the request came from nowhere.
        """
        origin = _origin.get()
        if origin is None:
            return None
        return _Progress(env, self.node_id, *origin)

    def _n_samples(self, entry: dict[str, Any]) -> int:
        """The dataset's size: from its registered metadata, else by opening it."""
        n = (entry.get("metadata") or {}).get("n_samples")
        return int(n) if n is not None else len(self.datasets.open(entry))

    def _train_request(self, env: Envelope, request: TrainRequest, bundle: PlanBundle,
                       sha: str, entry: dict[str, Any], scheme: str | None) -> Request:
        return Request(kind="train", researcher=self.researcher(env), experiment=env.experiment,
                       round=env.round, dataset=entry, n_samples=self._n_samples(entry),
                       plan_hash=sha,
                       plan_name=bundle.entry, training_args=dict(request.training_args),
                       privacy=dict(request.privacy), test_ratio=request.test_ratio,
                       secagg=scheme)
