"""``ws://host:port`` and ``wss://host:port``: the researcher listens, nodes dial out.

A hospital opens no inbound port: each node connects to the researcher, says who it is in a
one-line JSON hello (a text message of at most 4 KiB: nothing larger is read from a peer
before its hello), and from then on every binary message is one message of the core, up to
``max_frame_size`` (16 MiB by default; the core cuts larger frames into chunks). The
researcher maps connections to node ids from the hellos. Received messages wait in a
bounded inbox (``inbox_bytes``, 4 messages' worth by default): when the consumer lags, the
endpoint stops reading from the socket and TCP slows the sender down. A message that the
core's screen (``Transport.screen``: no trusted key signed it) refuses is dropped as it is
read, before it is queued: junk costs no inbox room, no hop to the consumer and no reply.
Nodes reconnect by themselves, with exponential backoff and jitter, so a node can start
before its researcher and survives a researcher restart.

TLS (``wss://``) is configured by query parameters or by an ``ssl`` context:
``certfile``/``keyfile`` are this endpoint's own certificate (required on the researcher,
optional on a node: a client certificate), ``cafile`` is whom it trusts (on a node: the
researcher's CA, default the system's; on the researcher: the CA of client certificates,
which are then required).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import ssl as ssl_lib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.frames import CloseCode

from fedcore.errors import ConfigurationError, TransportError
from fedcore.transport import Capabilities, Inbox, Role, Transport, redact_url
from fedcore_transport._tls import tls_problem

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["WebSocketTransport"]

log = logging.getLogger("fedcore.transport.websocket")

_HELLO_VERSION = 1
_QUERY_KEYS = {"certfile", "keyfile", "cafile", "retry_max"}
# Large messages travel as 1 MiB fragments: websockets buffers, masks and copies a huge
# single websocket frame in one piece, which is ~3x slower on loopback.
_FRAGMENT = 1 << 20
_HELLO_MAX = 4096  # the largest message read before a peer said who it is
_MAX_FRAME = 16 << 20


class WebSocketTransport(Transport):
    """A researcher (server) or node (client) endpoint of a websocket federation."""

    capabilities = Capabilities(max_frame_size=_MAX_FRAME, ordered=True, broadcast=False,
                                networked=True)

    def __init__(self, url: str, *, role: Role, identity: str,
                 ssl: ssl_lib.SSLContext | None = None, ping_interval: float | None = 20.0,
                 ping_timeout: float | None = 20.0, hello_timeout: float = 10.0,
                 retry_initial: float = 0.1, retry_max: float = 3.0,
                 max_frame_size: int = _MAX_FRAME, inbox_bytes: int | None = None):
        super().__init__(url, role=role, identity=identity)
        if max_frame_size != _MAX_FRAME:
            self.capabilities = Capabilities(max_frame_size=max_frame_size, ordered=True,
                                              broadcast=False, networked=True)
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("ws", "wss") or not parts.hostname or port is None:
            raise ConfigurationError(
                f"Expected ws://HOST:PORT or wss://HOST:PORT. Received: {self.url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - _QUERY_KEYS)
        if unknown:
            raise ConfigurationError(
                f"Unknown option(s) {unknown} in {self.url!r}. Expected some of "
                f"{sorted(_QUERY_KEYS)}.")
        if ssl is not None and parts.scheme == "ws":
            raise ConfigurationError(f"An ssl context was given for {self.url!r}: use wss://.")
        self._host, self._port = parts.hostname, port
        self._uri = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
        self._ssl = ssl or (_ssl_context(role, query) if parts.scheme == "wss" else None)
        self._client_cert = bool(query.get("certfile")) if ssl is None else None
        # max_size is the hello's until the peer said hello; max_queue counts websocket
        # frames (1 MiB fragments) read ahead of the inbox.
        self._options: dict[str, Any] = {
            "compression": None, "max_size": _HELLO_MAX, "max_queue": 8,
            "ping_interval": ping_interval, "ping_timeout": ping_timeout,
        }
        self._inbox_bytes = inbox_bytes or 4 * self.capabilities.max_frame_size
        self._hello_timeout = hello_timeout
        self._retry = (retry_initial, float(query.get("retry_max", retry_max)))
        self._inbox = Inbox(self.identity, self._inbox_bytes)
        self._conns: dict[str, ServerConnection] = {}  # researcher: node id -> connection
        self._server: Server | None = None
        self._dialer: asyncio.Task[None] | None = None  # node: the reconnecting loop
        self._ws: ClientConnection | None = None
        self._researcher = ""

    # --- the interface ----------------------------------------------------------------------

    async def start(self) -> None:
        """Researcher: listen (return once bound). Node: start dialling (return at once)."""
        self._inbox = Inbox(self.identity, self._inbox_bytes)
        if self.role == "node":
            self._dialer = asyncio.create_task(self._dial_forever())
            return
        try:
            self._server = await serve(self._handle, self._host, self._port, ssl=self._ssl,
                                       **self._options)
        except OSError as exc:
            raise TransportError(f"Cannot listen on {self.url}: {exc}") from exc
        if self._port == 0:  # tell the caller which port the system chose
            self._port = self._server.sockets[0].getsockname()[1]
            parts = urlsplit(self.url)
            host = f"[{self._host}]" if ":" in str(self._host) else self._host
            self.url = parts._replace(netloc=f"{host}:{self._port}").geturl()

    async def send(self, peer: str, frame: bytes) -> None:
        await self.send_parts(peer, [frame])

    async def send_parts(self, peer: str, parts: Sequence[Buffer]) -> None:
        """Send ``parts`` as one message, in fragments of 1 MiB, without joining them."""
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        if total > self.capabilities.max_frame_size:
            raise TransportError(f"Frame of {total} bytes is too large for {self.url} "
                                 f"(at most {self.capabilities.max_frame_size}).")
        ws: ServerConnection | ClientConnection | None
        if self.role == "node":
            ws = self._ws if peer == self._researcher else None
        else:
            ws = self._conns.get(peer)
        if ws is None:
            raise TransportError(f"No peer {peer!r} is connected to {self.url}. "
                                 f"Connected: {sorted(self.peers())}")
        try:
            if total <= _FRAGMENT:
                await ws.send(views[0] if len(views) == 1 else b"".join(views))
            else:  # one message in fragments: 3x faster than one huge websocket frame
                await ws.send(_fragments(views))
        except ConnectionClosed as exc:
            raise TransportError(f"The connection to {peer!r} was lost: {exc}") from exc

    async def receive(self) -> tuple[str, bytes]:
        return await self._inbox.get()

    async def close(self) -> None:
        if self._dialer is not None:
            self._dialer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dialer
            self._dialer = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._conns.clear()
        self._inbox.close()

    def peers(self) -> set[str]:
        if self.role == "node":
            return {self._researcher} if self._ws is not None else set()
        return set(self._conns)

    # --- researcher side --------------------------------------------------------------------

    def _hello(self) -> str:
        return json.dumps({"fedcore": _HELLO_VERSION, "role": self.role,
                           "identity": self.identity})

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            raw = await asyncio.wait_for(ws.recv(), self._hello_timeout)
            peer = _check_hello(raw, "node")
            await ws.send(self._hello())
        except ConnectionClosed as exc:
            _log_too_big(f"{ws.remote_address} (before its hello)", exc, _HELLO_MAX)
            return
        except TimeoutError:
            return
        except ValueError as exc:
            log.warning("Refused a connection from %s: %s", ws.remote_address, exc)
            await ws.close(1008, str(exc)[:120])
            return
        ws.protocol.max_message_size = self.capabilities.max_frame_size
        old, self._conns[peer] = self._conns.get(peer), ws
        if old is not None:  # a restarted node whose old connection is not yet known dead
            log.warning("Node %r connected again; its previous connection is dropped.", peer)
            await old.close(1000, "replaced by a new connection")
        log.info("Node %r connected from %s", peer, ws.remote_address)
        try:
            async for message in ws:
                await self._put(peer, message)
        except ConnectionClosed as exc:
            _log_too_big(peer, exc, self.capabilities.max_frame_size)
        finally:
            if self._conns.get(peer) is ws:
                del self._conns[peer]
                log.info("Node %r disconnected", peer)

    async def _put(self, peer: str, message: str | bytes) -> None:
        if isinstance(message, str):
            log.warning("Ignored a text message from %s: frames are binary.", peer)
            return
        screen = self.screen
        if screen is not None and not screen(peer, message):
            return  # junk: dropped (and counted) where it was read, never queued
        # waits while the inbox is full: the socket is not read meanwhile
        await self._inbox.put(peer, message)

    # --- node side --------------------------------------------------------------------------

    async def _dial_forever(self) -> None:
        initial, most = self._retry
        delay = initial
        told: str | None = None  # the TLS problem last logged as a warning
        while True:
            try:
                async with connect(self._uri, ssl=self._ssl, proxy=None,
                                   open_timeout=self._hello_timeout, **self._options) as ws:
                    await ws.send(self._hello())
                    raw = await asyncio.wait_for(ws.recv(), self._hello_timeout)
                    self._researcher = _check_hello(raw, "researcher")
                    ws.protocol.max_message_size = self.capabilities.max_frame_size
                    self._ws, delay = ws, initial
                    log.info("Connected to %s as %r", self.url, self.identity)
                    async for message in ws:
                        await self._put(self._researcher, message)
                    log.info("The researcher at %s closed the connection", self.url)
            except ConnectionClosed as exc:
                _log_too_big(self._researcher, exc, self.capabilities.max_frame_size)
                log.info("Lost the researcher at %s (%s); reconnecting in %.1f s", self.url,
                         redact_url(str(exc)), delay)
            except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
                problem = None
                if self._ssl is not None:  # "no valid HTTP response" hides a TLS refusal
                    problem = await asyncio.get_running_loop().run_in_executor(
                        None, functools.partial(tls_problem, self._host, self._port, self._ssl,
                                            client_cert=self._client_cert))
                if problem and problem != told:
                    log.warning("Cannot connect to the researcher at %s: %s. Retrying.",
                                self.url, problem)
                else:
                    log.info("Cannot reach the researcher at %s (%s); retrying in %.1f s",
                             self.url, redact_url(str(exc)) or type(exc).__name__, delay)
                told = problem
            finally:
                self._ws = None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, most)


def _fragments(views: list[memoryview]) -> Iterator[memoryview]:
    for view in views:
        for i in range(0, len(view), _FRAGMENT):
            yield view[i:i + _FRAGMENT]


def _log_too_big(peer: str, exc: ConnectionClosed, limit: int) -> None:
    if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
        log.warning("Refused a message of more than %d bytes from %r and closed its "
                    "connection: messages are at most max_frame_size bytes.", limit, peer)


def _check_hello(raw: str | bytes, role: str) -> str:
    """The identity in a hello from a ``role`` peer; ``ValueError`` when it is not one."""
    try:
        hello = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        hello = None
    if not isinstance(hello, dict) or hello.get("fedcore") != _HELLO_VERSION:
        raise ValueError(f"expected a fedcore hello (version {_HELLO_VERSION})")
    identity = hello.get("identity")
    if hello.get("role") != role or not isinstance(identity, str) or not 0 < len(
            identity) <= 256:
        raise ValueError(f"expected the hello of a {role} with an identity")
    return identity


def _ssl_context(role: Role, query: dict[str, str]) -> ssl_lib.SSLContext:
    certfile, keyfile, cafile = (query.get(k) for k in ("certfile", "keyfile", "cafile"))
    try:
        if role == "researcher":
            if not certfile:
                raise ConfigurationError(
                    "A wss:// researcher needs its certificate: add ?certfile=...&keyfile=... "
                    "to the URL, or pass ssl=.")
            ctx = ssl_lib.SSLContext(ssl_lib.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            if cafile:  # client certificates are then required
                ctx.load_verify_locations(cafile)
                ctx.verify_mode = ssl_lib.CERT_REQUIRED
            return ctx
        ctx = ssl_lib.create_default_context(cafile=cafile)
        if certfile:
            ctx.load_cert_chain(certfile, keyfile)
        return ctx
    except (OSError, ssl_lib.SSLError) as exc:
        raise ConfigurationError(f"Cannot load the TLS files {query}: {exc}") from exc
