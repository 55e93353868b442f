"""Request/reply over any Transport: correlation by message id, timeouts, scatter/gather.

Frames go through the core's chunk layer (:class:`fedcore.wire.chunks.ChunkedTransport`), which
cuts them to the transport's message size and, on a network, signs and verifies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedcore._runtime import Deadlines
from fedcore.errors import ConfigurationError, GovernanceError, ProtocolError, TransportError
from fedcore.transport import Parts, Transport
from fedcore.wire import codec
from fedcore.wire.chunks import ChunkedTransport, Delivery
from fedcore.wire.identity import Identity, enrolled_nodes, researcher_identity
from fedcore.wire.messages import (
    PROTOCOL_VERSION,
    Body,
    Envelope,
    ErrorReply,
    TrainProgress,
    assemble,
    new_id,
    new_ids,
)
from fedcore.wire.signing import Guard

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("fedcore.rpc")
B = TypeVar("B", bound=Body)

_ENROLL_HINT = ("Enroll a node with its key, printed by `fedcore-node identity` on the node: "
                "fedcore enroll NODE_ID KEY, or Experiment(enrolled=...).")
_WATCH_S = 0.2  # how often pending requests are checked against the connected peers


def credentials(transport: Transport, identity: str | Path | None,
                enrolled: Mapping[str, str] | str | Path | None) -> dict[str, Any]:
    """The researcher's key and enrolled nodes, loaded only for a networked transport.

    On a network a researcher accepts only enrolled nodes and refuses to start without any.
    """
    if not transport.capabilities.networked:
        return {}
    nodes = enrolled_nodes(enrolled)
    if not nodes:
        raise ConfigurationError(f"No node is enrolled, so every node would be refused. "
                                 f"{_ENROLL_HINT}")
    return {"key": researcher_identity(identity), "enrolled": nodes}


@dataclass(frozen=True)
class Reply:
    """One node's answer to a request of :meth:`Client.scatter`.

    ``body`` is the answer (``None`` when the node failed or never answered); ``error`` is
    then a one-line account, for logs and history rows, and ``kind`` says what went wrong:
    ``"transport"`` (no answer: the node is gone or too late), ``"protocol"``,
    ``"governance"``, or the kind of the node's own error reply (``"plan"``, ``"dataset"``,
    ``"configuration"``...); ``remote`` is true when the node itself answered with an error
    (rather than the researcher's side failing to get an answer), and ``message`` is then
    the node's own words. ``seconds`` counts from the start of the scatter.
    """

    node: str
    body: Body | None
    error: str | None
    seconds: float
    kind: str = ""
    remote: bool = False
    message: str = ""

    @property
    def missing(self) -> bool:
        """True when the node never answered (gone, disconnected or too late)."""
        return self.kind == "transport"

    def expect(self, cls: type[B]) -> B | None:
        """The body if it is a ``cls``, else ``None`` (an unexpected body is an error)."""
        return self.body if isinstance(self.body, cls) else None

    def why(self) -> str:
        """Why there is no usable answer: :attr:`error`, or the unexpected body's tag."""
        if self.error is not None:
            return self.error
        return f"unexpected reply {getattr(self.body, 'TAG', type(self.body).__name__)!r}"

    @classmethod
    def of(cls, node: str, result: Envelope | Exception, seconds: float) -> Reply:
        """The reply for a received envelope or the exception that stood in its place."""
        if isinstance(result, Exception):
            kind = ("transport" if isinstance(result, TransportError)
                    else "governance" if isinstance(result, GovernanceError) else "protocol")
            return cls(node, None, f"{type(result).__name__}: {result}", seconds, kind)
        body = result.body
        if isinstance(body, ErrorReply):
            prefix = f"{body.exc_type}: " if body.exc_type else ""
            return cls(node, None, f"{prefix}{body.message} ({body.kind} error)", seconds,
                       body.kind, remote=True, message=body.message)
        return cls(node, body, None, seconds)


class Client:
    """The researcher's side of the conversation with nodes.

    On a network, the counters of the nodes' accepted frames are kept next to the
    researcher's key (``<key file>.replay``), so a reply captured before a restart is refused
    after it.
    """

    def __init__(self, transport: Transport, *, max_frame_size: int = codec.DEFAULT_MAX_FRAME,
                 key: Identity | None = None, enrolled: Mapping[str, bytes] | None = None):
        networked = transport.capabilities.networked
        if networked and key is None:
            raise ConfigurationError("A networked federation needs the researcher's key: "
                                     "pass identity= (`fedcore identity` shows it).")
        self.transport = transport
        self.identity = transport.identity
        self.max_frame_size = max_frame_size
        #: The nodes accepted on a networked transport (``{node_id: public key}``).
        self.enrolled = dict(enrolled or {})
        replay = key.path.with_name(key.path.name + ".replay") if key is not None else None
        self._guard = Guard(key, lambda: self.enrolled, networked=networked,
                            max_size=max_frame_size, untrusted_hint=_ENROLL_HINT,
                            replay_file=replay)
        self._link = ChunkedTransport(transport, self._guard, max_frame_size=max_frame_size)
        self._unenrolled_seen: set[str] = set()
        self._pending: dict[str, asyncio.Future[Envelope]] = {}
        self._awaiting: dict[str, str] = {}  # request id -> the peer that should answer
        #: When each peer was last heard from (``time.time()`` of its latest frame).
        self.last_heard: dict[str, float] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        #: Called with ``(peer, envelope)`` for each TrainProgress a node sends mid-request.
        self.on_progress: Callable[[str, Envelope], None] | None = None

    async def start(self) -> None:
        """Open the transport and start reading replies."""
        await self._link.start()
        self._reader = asyncio.create_task(self._read())
        self._watcher = asyncio.create_task(self._watch_peers())

    async def close(self) -> None:
        """Close the transport; pending requests fail with ``TransportError``."""
        await self._link.close()
        self._guard.close()
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await task
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransportError("The connection was closed."))
        self._pending.clear()

    async def _read(self) -> None:
        """Hand each reply to its request; no frame, however made, stops this loop."""
        while True:
            got = await self._link.deliver()
            try:
                self._take(got)
            except Exception:  # a bug here must not lose every later reply
                log.exception("Internal error reading a frame from %s", got.peer)

    def _take(self, got: Delivery) -> None:
        peer = got.peer
        if got.error is not None:  # not verified: nothing in it can be believed
            log.warning("Refused a frame from %s: %s", peer, got.error)
            return
        if self._guard.networked and got.signer != peer:
            log.warning("Refused a frame from %s signed with the key enrolled for %r.", peer,
                        got.signer)
            return
        try:
            env = codec.decode(got.frame, max_size=self.max_frame_size)
        except ProtocolError as exc:  # a verified node sent a bad reply: fail that request
            self._bad_reply(peer, got.frame, exc)
            return
        self.last_heard[peer] = time.time()
        if self._awaiting.get(env.reply_to) != peer:
            log.debug("Ignored an unsolicited %s from %s", env.tag, peer)
            return
        if isinstance(env.body, TrainProgress):  # news of a request still running
            if self.on_progress is not None:
                try:
                    self.on_progress(peer, env)
                except Exception:
                    log.exception("The progress callback failed on news from %s", peer)
            return
        fut = self._pending.pop(env.reply_to, None)
        if fut is not None and not fut.done():
            fut.set_result(env)

    def _bad_reply(self, peer: str, frame: Buffer | Parts, exc: ProtocolError) -> None:
        """A malformed frame from ``peer``: the request it answers fails, no other."""
        _, reply_to = codec.reply_id(frame, max_size=self.max_frame_size)
        fut = self._pending.get(reply_to) if self._awaiting.get(reply_to) == peer else None
        log.warning("Node %s sent a malformed frame%s: %s", peer,
                    " (its request fails)" if fut is not None else "", exc)
        if fut is not None and not fut.done():
            fut.set_exception(ProtocolError(f"Node {peer!r} sent a malformed reply: {exc}"))

    async def _watch_peers(self) -> None:
        """Fail the requests of a peer whose connection dropped, instead of waiting them out.

        A node that dies mid-request never answers; polling the transport's peer set (a
        cheap in-memory lookup) notices it within ``_WATCH_S``.
        """
        while True:
            await asyncio.sleep(_WATCH_S)
            if not self._awaiting:
                continue
            connected = self.peers()
            for req_id, peer in list(self._awaiting.items()):
                fut = self._pending.get(req_id)
                if peer not in connected and fut is not None and not fut.done():
                    fut.set_exception(TransportError(
                        f"Node {peer!r} disconnected before it answered."))

    def peers(self) -> set[str]:
        """Nodes connected now (on a network: only the enrolled ones)."""
        peers = self.transport.peers()
        if not self._guard.networked:
            return peers
        for peer in peers - self.enrolled.keys() - self._unenrolled_seen:
            self._unenrolled_seen.add(peer)
            log.warning("Refused node %r: it is not enrolled. %s", peer, _ENROLL_HINT)
        return peers & self.enrolled.keys()

    async def wait_for_peers(self, wanted: int, timeout: float, *, settle: float = 0.0
                             ) -> set[str]:
        """Wait until ``wanted`` nodes are connected or ``timeout`` passes; return them.

        With ``settle``, keep waiting (within ``timeout``) until no new node has arrived for
        that many seconds: on a network, nodes dial in one after another.
        """
        deadline = time.monotonic() + timeout
        while len(self.peers()) < wanted and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        seen, quiet_since = self.peers(), time.monotonic()
        while settle and time.monotonic() < min(deadline, quiet_since + settle):
            await asyncio.sleep(0.02)
            if self.peers() - seen:
                seen, quiet_since = self.peers(), time.monotonic()
        return self.peers()

    def _register(self, peer: str, body: Body, experiment: str, round: int,
                  req_id: str | None = None) -> tuple[Envelope, asyncio.Future[Envelope]]:
        """The envelope of a request to ``peer`` and the future its reply will fill.

        ``req_id`` is the request's id (default: a new one).
        """
        env = assemble(Envelope, {
            "body": body, "sender": self.identity, "recipient": peer, "experiment": experiment,
            "round": round, "id": req_id or new_id(), "reply_to": "",
            "version": PROTOCOL_VERSION})
        if self._guard.networked and peer not in self.enrolled:
            raise GovernanceError(f"Node {peer!r} is not enrolled, so it is refused. "
                                  f"{_ENROLL_HINT}")
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._pending[env.id] = fut
        self._awaiting[env.id] = peer  # only this peer's answer is taken
        return env, fut

    def _forget(self, req_id: str) -> None:
        self._pending.pop(req_id, None)
        self._awaiting.pop(req_id, None)

    async def request(self, peer: str, body: Body, *, experiment: str = "", round: int = 0,
                      timeout: float = 60.0) -> Envelope:
        """Send ``body`` to ``peer`` and wait for its reply."""
        env, fut = self._register(peer, body, experiment, round)
        try:
            await self._link.send_parts(peer, codec.encode_parts(
                env, max_size=self.max_frame_size))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TransportError(
                f"Node {peer!r} did not answer {body.TAG} within {timeout:g} s."
            ) from None
        finally:
            self._forget(env.id)

    async def scatter(
        self, bodies: Mapping[str, Body], *, experiment: str = "", round: int = 0,
        timeout: float = 60.0,
    ) -> AsyncIterator[Reply]:
        """Send one body per peer; yield each peer's :class:`Reply` as it ends.

        Each peer has ``timeout`` seconds to answer once its request is sent. Replies are
        taken by callbacks on their futures, with one timer per request, not by a task per
        peer. Where a send may wait on its peer (``capabilities.send_waits``), the sends
        run side by side, so that a slow peer holds up no other; in process, one by one.
        """
        start = time.perf_counter()
        gather = _Gather(self, timeout)
        waits = self.transport.capabilities.send_waits
        try:
            # Every frame first, in one go: what the bodies share (the model, the plan...)
            # is packed once, and nothing can change it between two frames.
            encoder = codec.BatchEncoder(max_size=self.max_frame_size)
            frames: list[tuple[str, Envelope, asyncio.Future[Envelope], list[Buffer]]] = []
            for peer, body, req_id in zip(bodies, bodies.values(), new_ids(len(bodies)),
                                          strict=True):
                try:
                    env, fut = self._register(peer, body, experiment, round, req_id)
                except GovernanceError as exc:
                    gather.done.append((peer, exc))
                    continue
                gather.watch(peer, env.id, fut)
                try:
                    frames.append((peer, env, fut, encoder.encode_parts(env)))
                except Exception as exc:  # that request fails, the scatter goes on
                    fut.set_exception(exc)
            del encoder
            for peer, env, fut, parts in frames:
                if waits:
                    gather.sending.append(asyncio.create_task(
                        gather.send(peer, env, fut, parts)))
                else:
                    await gather.send(peer, env, fut, parts)
            del frames
            for _ in range(len(bodies)):
                peer, result = await gather.next()
                if not isinstance(result, (Envelope, TransportError, ProtocolError,
                                           GovernanceError)):
                    raise result  # not a failure of the request: a bug, said as it is
                yield Reply.of(peer, result, time.perf_counter() - start)
        finally:
            gather.close()


class _Gather:
    """The requests of one :meth:`Client.scatter`: their futures, timers and outcomes."""

    def __init__(self, client: Client, timeout: float):
        self.client = client
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        #: ``(peer, reply or exception)`` of the requests that ended, not yet taken.
        self.done: deque[tuple[str, Envelope | BaseException]] = deque()
        self.sending: list[asyncio.Task[None]] = []
        self._wake: asyncio.Future[None] | None = None
        self._deadlines = Deadlines(self.loop, timeout)  # one timer for every request
        self._futures: dict[str, asyncio.Future[Envelope]] = {}

    def watch(self, peer: str, req_id: str, fut: asyncio.Future[Envelope]) -> None:
        """Take the outcome of the request ``req_id`` to ``peer`` once ``fut`` is done."""
        self._futures[req_id] = fut
        fut.add_done_callback(functools.partial(self._finished, peer, req_id))

    async def send(self, peer: str, env: Envelope, fut: asyncio.Future[Envelope],
                   parts: list[Buffer]) -> None:
        """Send the request (its frame's ``parts``); its timeout starts once it is sent."""
        try:
            await self.client._link.send_parts(peer, parts)
        except Exception as exc:  # the request fails, the scatter goes on
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            self._deadlines.add(fut, functools.partial(self._expire, peer, env.tag, fut))

    async def next(self) -> tuple[str, Envelope | BaseException]:
        """The next request's outcome, once there is one."""
        while not self.done:
            self._wake = self.loop.create_future()
            await self._wake
        return self.done.popleft()

    def close(self) -> None:
        """Stop what is still running; forget every request."""
        for task in self.sending:
            task.cancel()
        self._deadlines.clear()
        for req_id, fut in self._futures.items():
            if not fut.done():
                fut.cancel()
            self.client._forget(req_id)

    def _finished(self, peer: str, req_id: str, fut: asyncio.Future[Envelope]) -> None:
        self.client._forget(req_id)
        self._deadlines.discard(fut)
        if not fut.cancelled():
            self.done.append((peer, fut.exception() or fut.result()))
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)

    def _expire(self, peer: str, tag: str, fut: asyncio.Future[Envelope]) -> None:
        if not fut.done():
            fut.set_exception(TransportError(
                f"Node {peer!r} did not answer {tag} within {self.timeout:g} s."))
