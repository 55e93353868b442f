from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextvars
import dataclasses
import logging
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedcore import _runtime, plugins
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
from fedcore.governance import (
    Decision,
    Governance,
    PlanStore,
    Policy,
    PrivacyBudget,
    Request,
    build_governance,
)
from fedcore.governance.ledger import PrivacyLedger
from fedcore.governance.policies import DatasetAccess, Refuse
from fedcore.governance.statistics_log import QueryLog
from fedcore.node._config import NodeConfig
from fedcore.node._reconcile import verify_home
from fedcore.node._secagg import Binding, SecaggSessions
from fedcore.node._storage import LOCK_FILE, HomeLock, NodeDatabase, file_sha256
from fedcore.node._turns import FlushIfLong
from fedcore.node._worker import PlanWorkers
from fedcore.node._worker import describe as describe_isolation
from fedcore.node.audit import AuditLog, AuditReport
from fedcore.node.executor import plan_key, private_training, run_round
from fedcore.node.protection import update_protection
from fedcore.node.registry import DatasetRegistry, entry_paths
from fedcore.node.statistics import answer_statistics
from fedcore.node.users import Users
from fedcore.plan import PlanBundle, TrainingPlan, check_training_args
from fedcore.privacy.accountant import Event, epsilon
from fedcore.privacy.mechanisms import UpdateDP
from fedcore.privacy.spec import PrivacySpec, train_size
from fedcore.secagg import NodeContext, NodeFloors
from fedcore.transport import Transport, open_transport, redact_url
from fedcore.wire import codec
from fedcore.wire.chunks import ChunkedTransport, Delivery
from fedcore.wire.identity import Identity, fingerprint, full_fingerprint, parse_public_key
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
    TrainProgress,
    TrainReply,
    TrainRequest,
)
from fedcore.wire.signing import Guard, ReplayedFrame

log = logging.getLogger("fedcore.node")
# Who sent the request being handled, as the node verified it (set per request task): the
# name under which the node trusts the key that signed it, and that key's full fingerprint.
_caller: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "caller", default=None)
#: Where the request being handled came from, for messages sent before its reply (progress).
_origin: contextvars.ContextVar[tuple[ChunkedTransport, str] | None] = contextvars.ContextVar(
    "origin", default=None)
#: Set while a request is handled: its audit records are written together before its reply.
_deferring: contextvars.ContextVar[bool] = contextvars.ContextVar("deferring", default=False)
_PROGRESS_S = 1.0  # at most one training-progress report a second per round

_VERSION = "0.1.0"
_WARM_PLANS = 8
_TRUST_HINT = ("This node answers only the researchers its administrator trusts: on the node, "
               "run `fedcore-node trust add NAME KEY` with the researcher's public key "
               "(printed by `fedcore identity`).")


#: A refused training request's error kind, by the exception that refused it (in order).
_REFUSALS: dict[str, type[FedcoreError]] = {
    "governance": GovernanceError, "dataset": DatasetError, "configuration": ConfigurationError}


@dataclasses.dataclass(frozen=True)
class _Admitted:
    """A training request the node accepted: the verified plan, the decision, the data.

    ``dataset`` is ``None`` under process isolation (``apart``): the plan's worker opens it.
    """

    bundle: PlanBundle
    sha: str
    entry: dict[str, Any]
    decision: Decision
    dataset: Any
    apart: bool = False


class Node:
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
    ):
        self.home = Path(home).expanduser()
        self.home.mkdir(parents=True, exist_ok=True)
        # One writer at a time changes db.json or config.toml, in any process.
        lock = HomeLock(self.home / LOCK_FILE)
        self._config = NodeConfig(self.home / "config.toml", name=name, node_id=node_id,
                                  approval_required=approval_required, lock=lock)
        self._node_id = str(self._config.data["node_id"])
        #: The node's key pair (``identity.key`` in its home, created on first use).
        self.identity = Identity(self.home / "identity.key")
        self._audit = AuditLog(self.home / "audit.jsonl")
        #: The database (TinyDB); ``with node.db.transaction():`` makes one change of it.
        self.db = NodeDatabase(self.home / "db.json", lock=lock, journal=self._audit)
        self._config.storage = self.db.storage  # config changes go with their audit record
        #: Training plans submitted for review, and the administrator's decisions.
        self.plans = PlanStore(self.db, audit=self.audit)
        #: Accounts of the node's web GUI.
        self.users = Users(self.db, audit=self.audit)
        self._policies = list(policies)
        self._chain: tuple[int, Governance] | None = None
        #: Key tables of config.toml, parsed: {table: (config version, {name: key})}.
        self._parsed_keys: dict[str, tuple[int, dict[str, bytes]]] = {}
        if approval_required is not None and self._config.data.get(
                "approval_required", True) != approval_required:
            self.set_policy(approval_required=approval_required)
        self.datasets = DatasetRegistry(self.db, self.home / "data", audit=self.audit)
        #: What each dataset spent of its differential-privacy budget.
        self.ledger = PrivacyLedger(self.db)
        #: What each researcher asked and was answered in statistics (their overlap checks).
        self.statistics_log = QueryLog(self.db)
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
        self._backends: set[str] = set()  # backends whose framework is imported
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

    @property
    def node_id(self) -> str:
        """The node's identity on the network."""
        return self._node_id

    @property
    def config(self) -> dict[str, Any]:
        """The contents of ``config.toml``, reread when the file changed."""
        return self._config.data

    def __repr__(self) -> str:
        return f"Node({self.node_id!r}, home={str(self.home)!r})"

    # --- configuration and audit -----------------------------------------------------------

    def audit(self, event: str, **fields: Any) -> None:
        """Append one event to the audit log (hash-chained JSON lines, never rewritten).

        While a request from a network is handled, the record also names the key that
        signed it (``researcher_key``: the full SHA-256 fingerprint of that key).
        Inside ``node.db.transaction()`` the record is written with the change, or not at all.
        While a request is handled, its records are written together, in one write before
        its reply leaves; those made so far are written earlier when its work has run on the
        training thread for a second (a long round shows in the log while it runs) and
        before a framework is imported.
        """
        caller = _caller.get()
        extra = {"researcher_key": caller[1]} if caller else {}
        record = {"time": time.time(), "node": self.node_id, "event": event, **fields, **extra}
        if _deferring.get() and not self.db.storage.in_transaction():
            self._audit.defer(record)
        else:
            self.db.storage.record(record)

    def _close_audit(self) -> None:
        self._audit.close()

    def audit_log(self) -> list[dict[str, Any]]:
        """Every audit record, oldest first."""
        return self._audit.records()

    def verify_audit(self) -> AuditReport:
        """Check the audit log's hash chain and the database against it.

        The report is true when the log is intact and every plan, dataset and account in
        the database has the audit records of its changes (``report.mismatches`` otherwise).
        """
        return verify_home(self.db, self._audit, self._config.path)

    def accept_config(self, *, by: str = "") -> str:
        """Record ``config.toml`` as it is now (after a reviewed hand edit); its SHA-256.

        ``audit verify`` compares the file with the hash of the last change the log
        recorded; this writes a ``config-accepted`` record with the file's current hash.
        """
        with self.db.transaction():
            try:
                text = self._config.path.read_bytes().decode("utf-8")  # exactly its bytes
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigurationError(f"Cannot read {self._config.path} as UTF-8 TOML: "
                                         f"{exc}. Fix the file first.") from None
            self.db.storage.stage(self._config.path, text)
            self.audit("config-accepted", by=by)
        return file_sha256(self._config.path)

    def set_federation(self, url: str, *, by: str = "") -> None:
        """Store the researcher's URL that ``fedcore-node start`` connects to (checked)."""
        scheme = urlsplit(url).scheme
        if not scheme or not urlsplit(url).netloc:
            raise ConfigurationError(
                f"Expected a federation URL such as ws://host:port. Received: "
                f"{redact_url(url)!r}")
        plugins.load("transports", scheme)  # an unknown scheme says which extra to install
        with self.db.transaction():
            self._config.set_value("federation", url)
            self.audit("federation-set", by=by, federation=redact_url(url))

    # --- trust ------------------------------------------------------------------------------

    @property
    def trusted_researchers(self) -> dict[str, bytes]:
        """The researchers this node answers on a network: ``{name: public key}``."""
        return self._keys("trusted_researchers")

    def trust(self, name: str, key: str, *, by: str = "") -> None:
        """Trust the researcher whose public key is ``key`` (base64 or hex) under ``name``."""
        raw = parse_public_key(key)
        self._put_key("trusted_researchers", name, raw,
                      lambda: self.audit("researcher-trusted", by=by, researcher=name,
                                         key=fingerprint(raw)))

    def untrust(self, name: str, *, by: str = "") -> None:
        """Stop trusting researcher ``name``; ``ConfigurationError`` if it was not trusted."""
        self._drop_key("trusted_researchers", name, ("trusted researcher", "Trusted"),
                       lambda: self.audit("researcher-untrusted", by=by, researcher=name))

    # --- peers (secure aggregation) ---------------------------------------------------------

    @property
    def peers(self) -> dict[str, bytes] | None:
        """The other nodes this node knows, ``{node id: identity key}``; ``None``: no list.

        With a peer list the node verifies every round member's signed keys against it and
        refuses members it does not know; without one it checks them against the identity
        keys relayed with them (docs/secure-aggregation.md says what holds in each case).
        """
        return self._keys("peers") or None

    def add_peer(self, node_id: str, key: str, *, by: str = "") -> None:
        """Know node ``node_id`` by its identity key (base64 or hex, ``fedcore-node identity``)."""
        raw = parse_public_key(key)
        if node_id == self.node_id:
            raise ConfigurationError(f"{node_id!r} is this node itself: add the other nodes "
                                     "of the federation as peers.")
        self._put_key("peers", node_id, raw,
                      lambda: self.audit("peer-added", by=by, peer=node_id,
                                         key=fingerprint(raw)))

    def remove_peer(self, node_id: str, *, by: str = "") -> None:
        """Forget peer ``node_id``; ``ConfigurationError`` if it is not in the peer list."""
        self._drop_key("peers", node_id, ("peer", "Peers"),
                       lambda: self.audit("peer-removed", by=by, peer=node_id))

    # --- the key tables of config.toml (trusted researchers, peers) --------------------------

    def _keys(self, table: str) -> dict[str, bytes]:
        """``{name: raw public key}`` of ``table``, parsed once per version of the file.

        The trusted researchers are read for every frame, the peers for every session.
        """
        listed = self.config.get(table) or {}  # rereads a changed file
        cached = self._parsed_keys.get(table)
        if cached is not None and cached[0] == self._config.version:
            return dict(cached[1])
        out: dict[str, bytes] = {}
        for name, key in listed.items() if isinstance(listed, Mapping) else ():
            try:
                out[str(name)] = parse_public_key(str(key))
            except ConfigurationError as exc:
                log.error("Ignored %r in config.toml's %s: %s", name, table, exc)
        self._parsed_keys[table] = (self._config.version, out)
        return dict(out)

    def _put_key(self, table: str, name: str, raw: bytes, record: Callable[[], None]) -> None:
        with self.db.transaction():  # read, change and write config.toml under the lock
            current = dict(self.config.get(table) or {})
            current[str(name)] = base64.b64encode(raw).decode()
            self._config.set_value(table, current)
            record()

    def _drop_key(self, table: str, name: str, what: tuple[str, str],
                  record: Callable[[], None]) -> None:
        with self.db.transaction():
            current = dict(self.config.get(table) or {})
            if name not in current:
                raise ConfigurationError(f"No {what[0]} named {name!r}. {what[1]}: "
                                         f"{sorted(current) or 'none'}.")
            del current[name]
            self._config.set_value(table, current)
            record()

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

    # --- policy and governance --------------------------------------------------------------

    @property
    def policy(self) -> dict[str, Any]:
        """Every policy setting of ``config.toml``, defaults filled (``None``: no limit)."""
        return self._config.policy()

    def set_policy(self, *, by: str = "", **changes: Any) -> dict[str, Any]:
        """Change policy settings (``None`` restores a default); checked, written, audited.

        Returns the changes as ``{key: [old, new]}``. Example:
        ``node.set_policy(max_epochs=5, on_excess="refuse")``.
        """
        with self.db.transaction():
            changed = self._config.set_policy(changes)
            if changed:
                self.audit("policy-changed", by=by, changes=changed)
        return changed

    def policy_toml(self) -> str:
        """The policy settings written in ``config.toml``, as TOML text."""
        return self._config.policy_toml()

    def set_policy_toml(self, text: str, *, by: str = "") -> dict[str, Any]:
        """Replace the whole policy with the settings of a TOML text (as edited in the GUI)."""
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"The policy is not valid TOML: {exc}") from None
        with self.db.transaction():
            changed = self._config.set_policy(values, replace=True)
            if changed:
                self.audit("policy-changed", by=by, changes=changed)
        return changed

    @property
    def governance(self) -> Governance:
        """The chain of policies every request goes through (follows ``config.toml``)."""
        self._config.refresh()
        if self._chain is None or self._chain[0] != self._config.version:
            try:
                chain = build_governance(self.policy, self.plans, self._policies,
                                         ledger=self.ledger)
            except ConfigurationError as exc:  # fail closed until the file is fixed
                log.error("Node %s refuses every request: %s", self.node_id, exc)
                self.audit("policy-invalid", error=str(exc))
                chain = Governance([Refuse(
                    "This node's policy configuration is invalid, so it refuses every "
                    "request until its administrator fixes it.")])
            self._chain = (self._config.version, chain)
        return self._chain[1]

    def review(self, request: Request) -> Decision:
        """Run ``request`` through :attr:`governance` and write the decision to the audit log."""
        decision = self.governance.review(request)
        self.audit("decision", kind=request.kind, researcher=request.researcher,
                   experiment=request.experiment, round=request.round,
                   dataset=(request.dataset or {}).get("id"), plan=request.plan_hash or None,
                   allowed=decision.allowed, reason=decision.reason,
                   overrides=decision.overrides, policy=decision.policy,
                   **({"privacy": decision.privacy} if decision.privacy else {}))
        return decision

    def researcher(self, env: Envelope) -> str:
        """The researcher who sent ``env``, as this node knows them.

        On a network it is the name under which the node trusts the key that signed the
        frame (``fedcore-node trust add NAME KEY``); the sender name written in the envelope
        is ignored, so a trusted key cannot borrow another researcher's rights. In-process
        (simulation, no keys) it is the envelope's sender.
        """
        caller = _caller.get()
        return caller[0] if caller else env.sender

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
                task = asyncio.create_task(self._process(link, got))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
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

    async def _process(self, link: ChunkedTransport, got: Delivery) -> None:
        _deferring.set(True)  # this task's records: written before its reply is sent
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
            outcome = (f"{body.kind} error: {body.message}" if isinstance(body, ErrorReply)
                       else "ok")
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
                                           self._secagg_binding(env))
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
        reply = await self._train(env, request, admitted, base)
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
            if bundle.backend not in self._backends:
                # Importing a framework takes seconds: off the loop, which keeps serving.
                # Once imported, later rounds skip the thread hop (it costs milliseconds
                # when the machine is busy).
                self._audit.flush()
                await asyncio.get_running_loop().run_in_executor(
                    None, plugins.load, "backends", bundle.backend)
                self._backends.add(bundle.backend)
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

    def plan_isolation_summary(self) -> str:
        """Where researchers' code runs on this node, in words (``fedcore-node status``)."""
        try:
            mode = str(self._config.setting("plan_isolation"))
        except ConfigurationError:
            mode = "auto"
        return describe_isolation(mode)

    async def _train(self, env: Envelope, request: TrainRequest, admitted: _Admitted,
                     base: dict[str, Any]) -> TrainReply | ErrorReply:
        """Run the plan, in a worker process or on the training thread (plan_isolation)."""
        if admitted.apart:  # where the policy said when the request was admitted
            return await self._train_apart(env, request, admitted, base)
        return await self._train_here(env, request, admitted, base)

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
        return [str(self.home), *(p for e in self.datasets.list() if e["id"] != entry["id"]
                                  for p in entry_paths(e))]

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
            if plan_class is None:
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
            reply, plan = await loop.run_in_executor(
                self._executor, run_round, plan_class, request, admitted.dataset,
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
        link, peer = origin
        loop = asyncio.get_running_loop()
        started = last = time.monotonic()

        async def send(message: Envelope) -> None:
            try:
                await link.send_parts(peer, codec.encode_parts(message))
            except (TransportError, ProtocolError) as exc:
                log.debug("Could not send training progress to %s: %s", peer, exc)

        def report(**fields: Any) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < _PROGRESS_S:
                return
            last = now
            message = env.reply(TrainProgress(elapsed_s=now - started, **fields),
                                sender=self.node_id)
            loop.call_soon_threadsafe(lambda: loop.create_task(send(message)))

        return report

    def _on_secagg(self, env: Envelope) -> Body:
        request: SecaggRequest = env.body  # type: ignore[assignment]
        try:
            return self._secagg.answer(request, self._secagg_binding(env))
        except FedcoreError as exc:
            self.audit("secagg-refused", researcher=self.researcher(env),
                       experiment=env.experiment, round=env.round, phase=request.phase,
                       reason=str(exc))
            return ErrorReply(kind="protocol", message=str(exc), exc_type=type(exc).__name__)

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

    @property
    def min_count(self) -> int:
        """The fewest records a shared count or listed value may single out.

        The policy's ``min_count``; its default (5) while the policy cannot be read.
        """
        try:
            return int(self._config.setting("min_count"))
        except ConfigurationError:
            return 5

    def _allow_gpu(self) -> bool:
        try:
            return bool(self._config.setting("allow_gpu"))
        except ConfigurationError:
            return False

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
