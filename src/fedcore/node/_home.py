"""A node's home folder and what its administrator changes in it.

``NodeHome`` holds the node's identity, ``config.toml``, the database, the audit log, the
trusted researchers and peers, and the policy with the governance built from it: what the
CLI and the GUI change while the daemon serves. ``Node`` (``node.py``) adds the loop that
answers researchers; ``_rounds.py`` its training requests.
"""
from __future__ import annotations

import base64
import contextvars
import logging
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedcore import plugins
from fedcore.errors import ConfigurationError
from fedcore.governance import Decision, Governance, PlanStore, Policy, Request, build_governance
from fedcore.governance.ledger import PrivacyLedger
from fedcore.governance.policies import Refuse
from fedcore.governance.statistics_log import QueryLog
from fedcore.node._config import NodeConfig, request_scope
from fedcore.node._reconcile import verify_home
from fedcore.node._storage import LOCK_FILE, HomeLock, NodeDatabase, file_sha256
from fedcore.node._worker import describe as describe_isolation
from fedcore.node.audit import AuditLog, AuditReport
from fedcore.node.registry import DatasetRegistry
from fedcore.node.users import Users
from fedcore.transport import redact_url
from fedcore.wire.identity import Identity, fingerprint, parse_public_key
from fedcore.wire.messages import Envelope

log = logging.getLogger("fedcore.node")
# Who sent the request being handled, as the node verified it (set per request task): the
# name under which the node trusts the key that signed it, and that key's full fingerprint.
_caller: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "caller", default=None)


class NodeHome:
    """A node's home folder: identity, configuration, database, audit log, policy.

    The administrator's side of a :class:`~fedcore.node.Node`, which adds serving.
    """

    def __init__(self, home: str | Path, *, name: str | None = None,
                 node_id: str | None = None, approval_required: bool | None = None,
                 policies: Iterable[Policy] = (), durable: bool = True):
        self.home = Path(home).expanduser()
        self.home.mkdir(parents=True, exist_ok=True)
        #: Whether the home's files are flushed to disk (``fsync``) as they are written.
        self.durable = durable
        # One writer at a time changes db.json or config.toml, in any process.
        lock = HomeLock(self.home / LOCK_FILE)
        self._config = NodeConfig(self.home / "config.toml", name=name, node_id=node_id,
                                  approval_required=approval_required, lock=lock,
                                  durable=durable)
        self._node_id = str(self._config.data["node_id"])
        #: The node's key pair (``identity.key`` in its home, created on first use).
        self.identity = Identity(self.home / "identity.key")
        self._audit = AuditLog(self.home / "audit.jsonl", durable=durable)
        #: The database (TinyDB); ``with node.db.transaction():`` makes one change of it.
        self.db = NodeDatabase(self.home / "db.json", lock=lock, journal=self._audit,
                               durable=durable)
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
        record = {"time": time.time(), "node": self.node_id, "event": event, **fields}
        caller = _caller.get()
        if caller:
            record["researcher_key"] = caller[1]
        # While a request is handled (request_scope: set by the node for each), its records
        # are written together before its reply leaves.
        if request_scope.get() is not None and not self.db.storage.in_transaction():
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

    @property
    def min_count(self) -> int:
        """The fewest records a shared count or listed value may single out.

        The policy's ``min_count``; its default (5) while the policy cannot be read.
        """
        try:
            return int(self._config.setting("min_count"))
        except ConfigurationError:
            return 5

    def plan_isolation_summary(self) -> str:
        """Where researchers' code runs on this node, in words (``fedcore-node status``)."""
        try:
            mode = str(self._config.setting("plan_isolation"))
        except ConfigurationError:
            mode = "auto"
        return describe_isolation(mode)

    def _allow_gpu(self) -> bool:
        try:
            return bool(self._config.setting("allow_gpu"))
        except ConfigurationError:
            return False
