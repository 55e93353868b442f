"""The Transport interface (bytes in, bytes out) and URL resolution.

A transport only moves messages between named peers, each at most
``capabilities.max_frame_size`` bytes. Encoding, chunking of larger frames, signing,
correlation of replies, timeouts and retries live once in the core
(:mod:`fedcore.wire.chunks`, :mod:`fedcore.wire.rpc`), not in each transport.
"""

from __future__ import annotations

import abc
import asyncio
import re
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

from fedcore import plugins
from fedcore.errors import ConfigurationError, TransportError
from fedcore.wire.parts import Parts

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["REDACTED", "Capabilities", "Inbox", "Parts", "Role", "Transport", "open_transport",
           "redact_url"]

Role = Literal["researcher", "node"]


@dataclass(frozen=True)
class Capabilities:
    """What a transport guarantees; the core reads these flags, never the transport's name.

    ``max_frame_size`` is the largest message the transport carries in one piece; the core
    (:mod:`fedcore.wire.chunks`) cuts larger frames into chunks that fit, so a transport never
    does.
    """

    max_frame_size: int
    ordered: bool = True
    broadcast: bool = False
    networked: bool = True
    #: Whether a send may wait for the peer to take the message (a socket's flow control):
    #: the core then sends to several peers side by side, so a slow one holds up no other.
    #: ``False`` when a send only queues the message (in process).
    send_waits: bool = True


M = TypeVar("M", bytes, bytes | Parts)  # what an inbox holds: in process, Parts too


class Inbox(Generic[M]):
    """Messages received and not yet taken by :meth:`Transport.receive`.

    Every transport needs the same behaviour: messages wait in arrival order, and closing
    wakes every pending ``receive`` with ``TransportError``. With ``max_bytes``, the inbox
    is bounded: :meth:`put` waits while ``max_bytes`` or more are queued (one message is
    always let in), so a reader that awaits it stops reading from its socket when the
    consumer lags, and the sender is slowed by the network's own flow control. Create it
    inside the loop the transport runs on; from another thread, deliver with
    :meth:`put_threadsafe`.
    """

    def __init__(self, identity: str, max_bytes: int | None = None):
        self.identity = identity
        #: The bound, in bytes (``None``: unbounded).
        self.max_bytes = max_bytes
        #: Bytes queued now.
        self.queued_bytes = 0
        self._items: deque[tuple[str, M]] = deque()
        self._closed = False
        self._handed = 0  # bytes handed over by another thread, not yet queued
        self._lock = threading.Lock()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def full(self) -> bool:
        """Whether a :meth:`put` would wait now."""
        return self.max_bytes is not None and self.queued_bytes >= self.max_bytes \
            and bool(self._items)

    def put_nowait(self, peer: str, frame: M) -> None:
        """Queue one message from ``peer``, whatever the bound (the caller waited already)."""
        if self._closed:
            return
        self._items.append((peer, frame))
        self.queued_bytes += len(frame)
        self._readable.set()
        if self.full():
            self._room.clear()

    async def put(self, peer: str, frame: M) -> None:
        """Queue one message, first waiting while the inbox is full."""
        while self.full() and not self._closed:
            self._room.clear()
            await self._room.wait()
        self.put_nowait(peer, frame)

    def put_threadsafe(self, loop: asyncio.AbstractEventLoop, peer: str, frame: Any,
                       timeout: float) -> bool:
        """From another thread: queue one message, waiting up to ``timeout`` s for room.

        Returns ``False`` (nothing queued) when the inbox stayed full or the loop is gone.
        While there is room, it hands the message over without waiting for the loop.
        """
        if loop.is_closed():
            return False
        with self._lock:
            room = self.max_bytes is None or self.queued_bytes + self._handed < self.max_bytes
            if room:
                self._handed += len(frame)
        if room:
            try:
                loop.call_soon_threadsafe(self._take_handed, peer, frame)
            except RuntimeError:  # the loop closed meanwhile
                return False
            return True
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self.put(peer, frame), timeout), loop)
        try:
            future.result(timeout + 1.0)
        except Exception:  # a timeout, or the loop stopped meanwhile
            future.cancel()
            return False
        return True

    def _take_handed(self, peer: str, frame: M) -> None:
        with self._lock:
            self._handed -= len(frame)
        self.put_nowait(peer, frame)

    def close(self) -> None:
        """Wake every pending and later :meth:`get` with ``TransportError``."""
        self._closed = True
        self._readable.set()
        self._room.set()

    async def get(self) -> tuple[str, M]:
        """The next ``(peer, frame)``; ``TransportError`` once closed."""
        while not self._items:
            if self._closed:
                raise TransportError(f"{self.identity!r} was closed.")
            self._readable.clear()
            await self._readable.wait()
        peer, frame = self._items.popleft()
        self.queued_bytes -= len(frame)
        if not self.full():
            self._room.set()
        return peer, frame


#: What stands in for a credential that :func:`redact_url` removed.
REDACTED = "***"

# user:PASSWORD@ after a scheme (the password runs to the last '@' before the path).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*):"
                       r"(?P<secret>[^\s/?#]*)@")
# ?password=... or &token=... (any option whose name says it is a secret).
_QUERY = re.compile(r"(?P<head>[?&;](?:[A-Za-z0-9_.-]*?)"
                    r"(?:password|passwd|pwd|secret|token|api_?key|auth)=)(?P<secret>[^&#\s]*)",
                    re.IGNORECASE)


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    A password in the user information (``mqtt://user:PASSWORD@host``) and the value of any
    option whose name says it is a secret (``?password=``, ``token=``, ``secret=``,
    ``api_key=``...) are replaced; the rest stays readable. ``text`` may be one URL or a
    message that contains URLs (a log line, an error). Everything that shows, logs, audits
    or stores a federation URL goes through this function. Example::

        >>> redact_url("mqtts://site-a:s3cret@broker:8883/study?cafile=ca.pem&password=x")
        'mqtts://site-a:***@broker:8883/study?cafile=ca.pem&password=***'
    """
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{REDACTED}" if m["secret"] else m[0], text)


class Transport(abc.ABC):
    """Moves frames between this endpoint and its peers.

    A researcher endpoint talks to many nodes; a node endpoint talks to its researcher(s).
    Implementations are async and live on one event loop, the one ``start`` runs on.
    ``url`` is the address as it may be shown: without credentials (:func:`redact_url`); an
    implementation reads credentials from the ``url`` its constructor received.
    """

    capabilities: Capabilities
    #: A cheap check the core installs (:mod:`fedcore.wire.chunks`): a transport that can
    #: calls it, on its receiving thread, with ``(peer, message)`` before it queues a
    #: message, and drops the message when it returns false (the core counted it). Junk on
    #: a broker then costs no hop to the event loop.
    screen: Callable[[str, bytes | bytearray], bool] | None = None
    #: Installed by the core with ``screen``: a transport calls it on the event loop with the
    #: number of messages it dropped unread since it last did (the MQTT transport: what was
    #: on its way when it shut strangers out), so that the core's summaries count them.
    shed: Callable[[int], None] | None = None

    def __init__(self, url: str, *, role: Role, identity: str):
        #: The URL without its credentials, safe to log, audit and show.
        self.url = redact_url(url)
        self.role = role
        self.identity = identity

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect or bind; return once frames can flow."""

    @abc.abstractmethod
    async def send(self, peer: str, frame: bytes) -> None:
        """Send one message to ``peer``; raise ``TransportError`` when it cannot be delivered.

        A message larger than ``capabilities.max_frame_size`` raises ``TransportError``.
        """

    async def send_parts(self, peer: str, parts: Sequence[Buffer]) -> None:
        """Send the concatenation of ``parts`` as one message.

        The default joins them; a transport that can write vectored I/O overrides this to
        send the parts without copying them.
        """
        await self.send(peer, b"".join(parts))

    @abc.abstractmethod
    async def receive(self) -> tuple[str, bytes]:
        """Wait for the next frame; return ``(peer, frame)``."""

    async def receive_parts(self) -> tuple[str, bytes | Parts]:
        """:meth:`receive`, or the message as :class:`Parts` when it came unjoined.

        The core receives this way. The default is :meth:`receive`; a transport that hands
        messages over by reference (in process) returns them as they were sent, where
        :meth:`receive` joins them.
        """
        return await self.receive()

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource; pending ``receive`` calls raise ``TransportError``."""

    @abc.abstractmethod
    def peers(self) -> set[str]:
        """The peers currently connected (for a researcher: the nodes)."""

    def verified(self, peer: str) -> None:  # noqa: B027  (optional: most transports need not)
        """The core verified a message that came from ``peer`` (under a key it trusts).

        Called on the event loop for every verified message, so it must be cheap. A
        transport whose senders share one stream with strangers (a broker) may use it to
        keep hearing the senders it verified while strangers flood it (the MQTT transport
        then listens to those senders alone for a while). The default does nothing.
        """


def open_transport(url: str, *, role: Role, identity: str) -> Transport:
    """Build the transport that serves ``url`` (``inproc://name``, ``ws://...``, ...)."""
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ConfigurationError(
            f"Expected a federation URL such as 'inproc://demo' or 'ws://host:port'. "
            f"Received: {redact_url(url)!r}"
        )
    cls = plugins.load("transports", scheme)
    return cls(url, role=role, identity=identity)
