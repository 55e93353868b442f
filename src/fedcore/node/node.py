from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
import tomllib
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from tinydb import TinyDB

from .. import _runtime, codec, plugins
from ..errors import ConfigurationError, DatasetError, ProtocolError, TransportError
from ..messages import (
    Body,
    Envelope,
    ErrorReply,
    Ping,
    Pong,
    SearchReply,
    SearchRequest,
    TrainRequest,
)
from ..plan import PlanBundle, TrainingPlan
from ..transport import Transport, open_transport
from ._storage import AtomicJSONStorage
from .executor import plan_key, run_round
from .registry import DatasetRegistry

log = logging.getLogger("fedcore.node")

_VERSION = "0.1.0"
_WARM_PLANS = 8


class Node:
    """A data site: its home folder, datasets, and the loop that answers researchers.

    The home folder holds ``config.toml`` (identity and settings), ``db.json`` (TinyDB:
    datasets), ``audit.jsonl`` (append-only log of every request and its outcome) and
    ``data/`` for files the node owns. Creating a ``Node`` on an existing home reopens it.
    """

    def __init__(
        self,
        home: str | Path,
        *,
        name: str | None = None,
        node_id: str | None = None,
        executor: concurrent.futures.Executor | None = None,
        max_frame_size: int = codec.DEFAULT_MAX_FRAME,
    ):
        self.home = Path(home).expanduser()
        self.home.mkdir(parents=True, exist_ok=True)
        self.config = self._load_config(name=name, node_id=node_id)
        self.db = TinyDB(self.home / "db.json", storage=AtomicJSONStorage)
        self.datasets = DatasetRegistry(self.db, self.home / "data")
        self.max_frame_size = max_frame_size
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"fedcore-node-{self.node_id}"
        )
        self._plans: dict[str, type[TrainingPlan]] = {}
        self._warm: dict[str, TrainingPlan] = {}  # built plans kept between rounds
        self._bundles: dict[str, PlanBundle] = {}  # verified bundles, by their SHA-256
        self._audit_lock = threading.Lock()
        self._audit_file: IO[str] | None = None
        self._handlers: dict[type[Body], Callable[[Envelope], Any]] = {
            Ping: self._on_ping,
            SearchRequest: self._on_search,
            TrainRequest: self._on_train,
        }
        self._serving: concurrent.futures.Future[None] | None = None
        self._transport: Transport | None = None

    @property
    def node_id(self) -> str:
        """The node's identity on the network."""
        return str(self.config["node_id"])

    def __repr__(self) -> str:
        return f"Node({self.node_id!r}, home={str(self.home)!r})"

    # --- configuration and audit -----------------------------------------------------------

    def _load_config(self, *, name: str | None, node_id: str | None) -> dict[str, Any]:
        path = self.home / "config.toml"
        if path.exists():
            with open(path, "rb") as f:
                config = tomllib.load(f)
            if node_id and node_id != config.get("node_id"):
                raise ConfigurationError(
                    f"{path} belongs to node {config.get('node_id')!r}, not {node_id!r}. "
                    "Use another home folder for another node."
                )
            return config
        node_id = node_id or f"node-{uuid.uuid4().hex[:8]}"
        config = {"node_id": node_id, "name": name or node_id, "created": time.time()}
        lines = [f"{k} = {json.dumps(v)}" for k, v in config.items()]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("# fedcore node configuration\n" + "\n".join(lines) + "\n")
        tmp.replace(path)
        return config

    def audit(self, event: str, **fields: Any) -> None:
        """Append one event to the audit log (JSON lines, never rewritten)."""
        record = {"time": time.time(), "node": self.node_id, "event": event, **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._audit_lock:
            f = self._audit_handle()
            f.write(line)
            f.flush()

    def _audit_handle(self) -> IO[str]:
        # The log stays open between events (opening it cost more than a round's
        # bookkeeping); it is reopened when someone moved or deleted it (log rotation).
        path = self.home / "audit.jsonl"
        f = self._audit_file
        if f is not None:
            try:
                if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                    return f
            except OSError:
                pass
            f.close()
        self._audit_file = f = open(path, "a", encoding="utf-8")
        return f

    def _close_audit(self) -> None:
        with self._audit_lock:
            if self._audit_file is not None:
                self._audit_file.close()
                self._audit_file = None

    def audit_log(self) -> list[dict[str, Any]]:
        """Every audit record, oldest first."""
        path = self.home / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # --- serving ----------------------------------------------------------------------------

    async def serve(self, transport: Transport) -> None:
        """Answer requests arriving on ``transport`` until it closes."""
        await transport.start()
        self._transport = transport
        tasks: set[asyncio.Task[None]] = set()
        self.audit("started", transport=transport.url)
        try:
            while True:
                try:
                    peer, frame = await transport.receive()
                except TransportError:
                    break
                task = asyncio.create_task(self._process(transport, peer, frame))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            await transport.close()
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
        if self._transport is not None:
            _runtime.run(self._transport.close())
        if self._serving is not None:
            try:
                self._serving.result(timeout=10)
            except concurrent.futures.CancelledError:
                pass
        self._serving = None

    async def _process(self, transport: Transport, peer: str, frame: bytes) -> None:
        try:
            env = codec.decode(frame, max_size=self.max_frame_size)
        except ProtocolError as exc:
            log.warning("Refused a frame from %s: %s", peer, exc)
            self.audit("refused-frame", peer=peer, reason=str(exc))
            reply_to = ""
            try:
                reply_to = str(codec.peek_header(frame, max_size=self.max_frame_size)["id"])
            except (ProtocolError, KeyError):
                pass
            reply = Envelope(ErrorReply(kind="protocol", message=str(exc),
                                        exc_type="ProtocolError"),
                             sender=self.node_id, recipient=peer, reply_to=reply_to)
        else:
            body = await self._dispatch(env)
            reply = env.reply(body, sender=self.node_id)
        try:
            await transport.send(peer, codec.encode(reply, max_size=self.max_frame_size))
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
        found = self.datasets.search(request.tags)
        self.audit("search", researcher=env.sender, tags=request.tags, found=len(found))
        return SearchReply(node_id=self.node_id,
                           datasets=[self.datasets.public(e) for e in found],
                           available_tags=self.datasets.all_tags())

    def _bundle(self, wire: Any) -> tuple[PlanBundle, str]:
        """The shipped bundle and its SHA-256, verified once per plan rather than per round."""
        declared = wire.get("sha256") if isinstance(wire, Mapping) else None
        if isinstance(declared, str):
            known = self._bundles.get(declared)
            if known is not None and (wire.get("files"), wire.get("entry"), wire.get(
                    "backend")) == (known.files, known.entry, known.backend):
                return known, declared  # the same files as a bundle whose hash was checked
        bundle = PlanBundle.from_wire(wire)
        sha = bundle.sha256
        if len(self._bundles) >= 64:
            self._bundles.pop(next(iter(self._bundles)))
        self._bundles[sha] = bundle
        return bundle, sha

    async def _on_train(self, env: Envelope) -> Body:
        request: TrainRequest = env.body  # type: ignore[assignment]
        base = {"researcher": env.sender, "experiment": env.experiment, "round": env.round,
                "dataset": request.dataset_id}
        try:
            bundle, sha = self._bundle(request.plan)
            plugins.load("backends", bundle.backend)
            dataset = self.datasets.load(request.dataset_id)
        except DatasetError as exc:
            self.audit("train-refused", **base, reason=str(exc))
            return ErrorReply(kind="dataset", message=str(exc), exc_type="DatasetError")
        except ConfigurationError as exc:
            self.audit("train-refused", **base, reason=str(exc))
            return ErrorReply(kind="configuration", message=str(exc),
                              exc_type="ConfigurationError")
        base["plan"] = sha
        loop = asyncio.get_running_loop()
        try:
            plan_class = self._plans.get(sha) or bundle.load()
            self._plans[sha] = plan_class
            key = plan_key(env.experiment, sha, request) if plan_class.reusable else ""
            warm = self._warm.pop(key, None)  # taken out: one round uses it at a time
            reply, plan = await loop.run_in_executor(
                self._executor, run_round, plan_class, request, dataset, self.node_id,
                env.round, {"allow_gpu": bool(self.config.get("allow_gpu", True))}, warm,
            )
            if key:
                self._warm[key] = plan
                while len(self._warm) > _WARM_PLANS:
                    self._warm.pop(next(iter(self._warm)))
        except DatasetError as exc:
            self.audit("train-failed", **base, reason=str(exc))
            return ErrorReply(kind="dataset", message=str(exc), exc_type="DatasetError")
        except Exception as exc:  # the researcher's code failed: report it, keep serving
            self.audit("train-failed", **base, error=f"{type(exc).__name__}: {exc}")
            return ErrorReply(kind="plan", message=str(exc), exc_type=type(exc).__name__,
                              traceback=traceback.format_exc())
        self.audit("trained", **base, n_samples=reply.n_samples,
                   seconds=round(reply.timings.get("total_s", 0.0), 4))
        return reply
