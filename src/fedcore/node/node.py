from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedcore import _runtime, plugins
from fedcore.errors import (
    ConfigurationError,
    FedcoreError,
    GovernanceError,
    ProtocolError,
    TransportError,
)
from fedcore.governance import Policy, Request
from fedcore.governance.policies import DatasetAccess
from fedcore.node._config import request_scope
from fedcore.node._home import _caller
from fedcore.node._rounds import _origin, _Rounds
from fedcore.node._secagg import SecaggSessions
from fedcore.node._turns import FlushIfLong
from fedcore.node._worker import PlanWorkers
from fedcore.node.statistics import answer_statistics
from fedcore.plan import PlanBundle, TrainingPlan
from fedcore.transport import Transport, open_transport, redact_url
from fedcore.wire import codec
from fedcore.wire.chunks import ChunkedTransport, Delivery
from fedcore.wire.identity import full_fingerprint
from fedcore.wire.messages import (
    Body,
    Envelope,
    ErrorReply,
    Ping,
    PlanStatus,
    PlanStatusRequest,
    PlanSubmit,
    Pong,
    SearchReply,
    SearchRequest,
    SecaggRequest,
    StatsRequest,
    TrainRequest,
)
from fedcore.wire.signing import Guard, ReplayedFrame

log = logging.getLogger("fedcore.node")

_VERSION = "0.1.0"
_TRUST_HINT = ("This node answers only the researchers its administrator trusts: on the node, "
               "run `fedcore-node trust add NAME KEY` with the researcher's public key "
               "(printed by `fedcore identity`).")


class Node(_Rounds):
    """A data site: its home folder, datasets, and the loop that answers researchers.

    The home folder holds ``identity.key`` (the node's Ed25519 key, 0600), ``config.toml``
    (identity, trusted researchers and policy), ``db.json`` (TinyDB:
    datasets, submitted plans, GUI users), ``audit.jsonl`` (append-only, hash-chained log of
    every request, decision and change) and ``data/`` for files the node owns. Creating a
    ``Node`` on an existing home reopens it.

    Every request goes through :attr:`governance`, the chain of policies built from
    ``config.toml`` (plus ``policies``, the site's own). ``approval_required`` sets that key
    of a new home (default ``True``: only plans an administrator approved run;
    :mod:`fedcore.simulate` turns it off); given for an existing home, it changes it.

    ``durable`` (default ``True``): every change of ``config.toml``, ``db.json`` and the
    audit log is flushed to disk (``fsync``) before it counts as made, so it survives a
    crash of the machine. ``durable=False`` leaves the flushes out; each file is still
    replaced whole (written beside it, then renamed), so no reader and no killed process
    ever sees half a change. It is for a home that nothing outlives: a simulation's
    temporary folder (:mod:`fedcore.simulate`), deleted when the simulation closes.
    """

    def __init__(
        self,
        home: str | Path,
        *,
        name: str | None = None,
        node_id: str | None = None,
        executor: concurrent.futures.Executor | None = None,
        max_frame_size: int = codec.DEFAULT_MAX_FRAME,
        approval_required: bool | None = None,
        policies: Iterable[Policy] = (),
        durable: bool = True,
    ):
        super().__init__(home, name=name, node_id=node_id,
                         approval_required=approval_required, policies=policies,
                         durable=durable)
        self._secagg = SecaggSessions(self.node_id, self._secagg_context)
        self.max_frame_size = max_frame_size
        # What the node records while it handles a request is written before the reply
        # leaves, and while its work runs on this thread if that takes over a second.
        self._executor = FlushIfLong(executor or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"fedcore-node-{self.node_id}"), self._audit.flush)
        self._in_flight = 0  # requests being handled
        self._plans: dict[str, type[TrainingPlan]] = {}
        self._warm: dict[str, TrainingPlan] = {}  # built plans kept between rounds
        self._bundles: dict[str, PlanBundle] = {}  # verified bundles, by their SHA-256
        self._workers = PlanWorkers(self.home, self.node_id)  # researcher code runs there
        self._networked = False  # whether serve()'s transport is a network (not in-process)
        self._handlers: dict[type[Body], Callable[[Envelope], Any]] = {
            Ping: self._on_ping,
            SearchRequest: self._on_search,
            TrainRequest: self._on_train,
            PlanSubmit: self._on_plan_submit,
            PlanStatusRequest: self._on_plan_status,
            StatsRequest: self._on_stats,
            SecaggRequest: self._on_secagg,
        }
        self._serving: concurrent.futures.Future[None] | None = None
        self._transport: Transport | None = None
        self._halting = False  # stop() was called while serve() was starting

    # --- serving ----------------------------------------------------------------------------

    async def serve(self, transport: Transport) -> None:
        """Answer requests arriving on ``transport`` until it closes."""
        self._halting = False
        self._networked = transport.capabilities.networked
        guard = Guard(self.identity, lambda: self.trusted_researchers,
                      networked=transport.capabilities.networked,
                      max_size=self.max_frame_size, untrusted_hint=_TRUST_HINT,
                      replay_file=self.home / "replay.log")
        if guard.networked and not self.trusted_researchers:
            log.warning("Node %s trusts no researcher yet. %s", self.node_id, _TRUST_HINT)
        link = ChunkedTransport(transport, guard, max_frame_size=self.max_frame_size,
                                on_dropped=self._dropped, request_rate=self._request_rate)
        await link.start()
        self._transport = transport
        if self._halting:  # stop() came while the transport was starting
            await transport.close()
        elif self.plan_isolation == "process":  # warm workers before the first round
            asyncio.get_running_loop().run_in_executor(self._executor, self._prestart_workers)
        tasks: set[asyncio.Task[None]] = set()
        self.audit("started", transport=redact_url(transport.url))
        try:
            while True:
                try:
                    got = await link.deliver()
                except TransportError:
                    break
                # The task leaves the set itself as it ends (no done-callback per frame).
                tasks.add(asyncio.create_task(self._process(link, got, tasks)))
        finally:
            for task in tasks:
                task.cancel()
            # Let cancelled requests write their audit records before the log is closed.
            await asyncio.gather(*tasks, return_exceptions=True)
            await link.close()
            guard.close()
            await asyncio.get_running_loop().run_in_executor(None, self._workers.close)
            self.audit("stopped")
            self._close_audit()

    def start(self, url: str) -> Node:
        """Serve ``url`` in the background (on fedcore's runtime loop); returns ``self``."""
        if self._serving is not None and not self._serving.done():
            raise ConfigurationError(f"{self} is already serving.")
        transport = open_transport(url, role="node", identity=self.node_id)
        self._serving = _runtime.submit(self.serve(transport))
        return self

    def stop(self) -> None:
        """Stop serving (after :meth:`start`)."""
        if self._serving is not None or self._transport is not None:
            _runtime.run(self._halt())
        if self._serving is not None:
            try:
                self._serving.result(timeout=10)
            except concurrent.futures.CancelledError:
                pass
        self._serving = None

    async def _halt(self) -> None:
        # On the loop that runs serve(), after serve() began: either its transport is up and
        # is closed here, or serve() is still starting it and closes it once it is up (a
        # SIGTERM right after `fedcore-node start` used to find no transport to close, and
        # the node waited 10 s and exited with an error).
        self._halting = True
        if self._transport is not None:
            await self._transport.close()

    def _dropped(self, summary: dict[str, Any]) -> None:
        """A summary of frames the transport dropped unanswered: one record, one line."""
        log.warning("Dropped %d frame(s) in %.0f s that failed verification or came too fast: "
                    "%s", summary["dropped"], summary["seconds"], summary["reasons"])
        self.audit("frames-dropped", **summary)

    def _request_rate(self) -> float | None:
        try:
            return float(self._config.setting("max_requests_per_s"))
        except (ConfigurationError, KeyError, TypeError):
            return 1.0  # a broken policy fails closed (governance refuses anyway)

    async def _process(self, link: ChunkedTransport, got: Delivery,
                       tasks: set[asyncio.Task[None]] | None = None) -> None:
        # This task's audit records are written before its reply is sent, and config.toml
        # is checked once while it runs.
        request_scope.set(object())
        self._in_flight += 1
        try:
            await self._answer(link, got)
        except Exception as exc:  # a node bug must neither stop the node nor go unrecorded
            log.exception("Internal error answering a frame from %s", got.peer)
            self.audit("internal-error", peer=got.peer, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._audit.flush()
            self._in_flight -= 1
            if not self._in_flight:
                self._executor.settle()
            if tasks is not None:
                tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _answer(self, link: ChunkedTransport, got: Delivery) -> None:
        peer, frame = got.peer, got.frame
        try:
            if got.error is not None:
                raise got.error
            env = codec.decode(frame, max_size=self.max_frame_size)
            if link.guard is not None and env.recipient != self.node_id:  # no cross-node replays
                raise ProtocolError(f"Refused a frame addressed to {env.recipient!r}, not to "
                                    f"this node ({self.node_id!r}).")
        except (ProtocolError, GovernanceError) as exc:
            log.warning("Refused a frame from %s: %s", peer, exc)
            if not got.summarized:  # else it is counted in a `frames-dropped` record
                self.audit("refused-frame", peer=peer, reason=str(exc))
            if isinstance(exc, ReplayedFrame):  # the original was answered: say nothing
                return
            reply_to = codec.reply_id(frame, max_size=self.max_frame_size)[0]
            kind = "governance" if isinstance(exc, GovernanceError) else "protocol"
            reply = Envelope(ErrorReply(kind=kind, message=str(exc),
                                        exc_type=type(exc).__name__),
                             sender=self.node_id, recipient=peer, reply_to=reply_to)
        else:
            started = time.perf_counter()
            if got.key:  # governance and the audit use the verified name and key
                _caller.set((got.signer, full_fingerprint(got.key)))
            _origin.set((link, peer))
            body = await self._dispatch(env)
            reply = env.reply(body, sender=self.node_id)
            if log.isEnabledFor(logging.INFO):  # one line per request: built when shown
                outcome = (f"{body.kind} error: {body.message}"
                           if isinstance(body, ErrorReply) else "ok")
                log.info("%s %s: %s (%.2f s)", self.researcher(env), env.tag, outcome[:200],
                         time.perf_counter() - started)
        self._audit.flush()  # the records the reply depends on are in the log before it leaves
        try:
            await link.send_parts(peer, codec.encode_parts(reply, max_size=self.max_frame_size))
        except (TransportError, ProtocolError) as exc:
            log.warning("Could not answer %s: %s", peer, exc)

    async def _dispatch(self, env: Envelope) -> Body:
        handler = self._handlers.get(type(env.body))
        if handler is None:
            return ErrorReply(kind="protocol", message=f"A node does not handle {env.tag!r}.")
        try:
            result = handler(env)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except Exception as exc:  # a node bug must not stop the node
            log.exception("Internal error handling %s", env.tag)
            return ErrorReply(kind="internal", message=str(exc), exc_type=type(exc).__name__,
                              traceback=traceback.format_exc())

    # --- handlers ---------------------------------------------------------------------------

    def _on_ping(self, env: Envelope) -> Body:
        return Pong(node_id=self.node_id, name=str(self.config.get("name", "")),
                    fedcore_version=_VERSION, backends=plugins.available("backends"))

    def _on_search(self, env: Envelope) -> Body:
        request: SearchRequest = env.body  # type: ignore[assignment]
        researcher = self.researcher(env)
        # A researcher finds only the datasets this node lets them use (policy dataset_access).
        access = [p for p in self.governance.policies if isinstance(p, DatasetAccess)]
        found = [entry for entry in self.datasets.search(request.tags)
                 if all(p.review(Request(kind="search", researcher=researcher, dataset=entry))
                        .allowed for p in access)]
        self.audit("search", researcher=researcher, tags=request.tags, found=len(found))
        min_count = self.min_count
        return SearchReply(node_id=self.node_id,
                           datasets=[self.datasets.public(e, min_count=min_count)
                                     for e in found],
                           available_tags=self.datasets.all_tags())

    def _on_secagg(self, env: Envelope) -> Body:
        request: SecaggRequest = env.body  # type: ignore[assignment]
        try:
            return self._secagg.answer(request, self._secagg_binding(env))
        except FedcoreError as exc:
            self.audit("secagg-refused", researcher=self.researcher(env),
                       experiment=env.experiment, round=env.round, phase=request.phase,
                       reason=str(exc))
            return ErrorReply(kind="protocol", message=str(exc), exc_type=type(exc).__name__)

    def _on_plan_submit(self, env: Envelope) -> Body:
        body: PlanSubmit = env.body  # type: ignore[assignment]
        try:
            bundle, sha = self._bundle(body.plan)
        except (ConfigurationError, GovernanceError) as exc:
            self.audit("plan-submit-refused", researcher=self.researcher(env), reason=str(exc))
            return ErrorReply(kind="configuration", message=str(exc),
                              exc_type=type(exc).__name__)
        self.plans.submit(bundle, submitter=self.researcher(env), message=body.message)
        return self._plan_status(env, sha)

    def _on_plan_status(self, env: Envelope) -> Body:
        body: PlanStatusRequest = env.body  # type: ignore[assignment]
        return self._plan_status(env, body.plan_hash)

    def _plan_status(self, env: Envelope, sha: str) -> PlanStatus:
        entry = self.plans.find(sha) or {}
        try:
            required = bool(self._config.setting("approval_required"))
        except ConfigurationError:
            required = True
        status = str(entry.get("status", "unknown"))
        self.audit("plan-status", researcher=self.researcher(env), plan=sha, status=status)
        return PlanStatus(node_id=self.node_id, plan_hash=sha, status=status,
                          note=str(entry.get("note", "")), approval_required=required,
                          submitted_at=entry.get("submitted_at"),
                          reviewed_at=entry.get("reviewed_at"))

    async def _on_stats(self, env: Envelope) -> Body:
        # Policy check, audit and computation (on the executor) live in node/statistics.py.
        return await answer_statistics(self, env, self._executor)
