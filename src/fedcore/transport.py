"""The Transport interface (bytes in, bytes out) and URL resolution.

A transport only moves frames between named peers. Encoding, correlation of replies,
timeouts and retries live once in the core (:mod:`fedcore._rpc`), not in each transport.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from . import plugins
from .errors import ConfigurationError, TransportError

__all__ = ["Capabilities", "Inbox", "Role", "Transport", "open_transport"]

Role = Literal["researcher", "node"]


@dataclass(frozen=True)
class Capabilities:
    """What a transport guarantees; the core reads these flags, never the transport's name."""

    max_frame_size: int
    ordered: bool = True
    broadcast: bool = False
    networked: bool = True


_CLOSED = object()


class Inbox:
    """Frames received and not yet taken by :meth:`Transport.receive`.

    Every transport needs the same behaviour: frames wait in arrival order, and closing
    wakes every pending ``receive`` with ``TransportError``. Create it inside the loop the
    transport runs on; from another thread, deliver with ``loop.call_soon_threadsafe``.
    """

    def __init__(self, identity: str):
        self.identity = identity
        self._queue: asyncio.Queue[tuple[str, bytes] | object] = asyncio.Queue()

    def put(self, peer: str, frame: bytes) -> None:
        """Queue one frame from ``peer``."""
        self._queue.put_nowait((peer, frame))

    def close(self) -> None:
        """Wake every pending and later :meth:`get` with ``TransportError``."""
        self._queue.put_nowait(_CLOSED)

    async def get(self) -> tuple[str, bytes]:
        """The next ``(peer, frame)``; ``TransportError`` once closed."""
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # wake every other receiver too
            raise TransportError(f"{self.identity!r} was closed.")
        return item  # type: ignore[return-value]


class Transport(abc.ABC):
    """Moves frames between this endpoint and its peers.

    A researcher endpoint talks to many nodes; a node endpoint talks to its researcher(s).
    Implementations are async and live on one event loop, the one ``start`` runs on.
    """

    capabilities: Capabilities

    def __init__(self, url: str, *, role: Role, identity: str):
        self.url = url
        self.role = role
        self.identity = identity

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect or bind; return once frames can flow."""

    @abc.abstractmethod
    async def send(self, peer: str, frame: bytes) -> None:
        """Send one frame to ``peer``; raise ``TransportError`` when it cannot be delivered."""

    @abc.abstractmethod
    async def receive(self) -> tuple[str, bytes]:
        """Wait for the next frame; return ``(peer, frame)``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource; pending ``receive`` calls raise ``TransportError``."""

    @abc.abstractmethod
    def peers(self) -> set[str]:
        """The peers currently connected (for a researcher: the nodes)."""


def open_transport(url: str, *, role: Role, identity: str) -> Transport:
    """Build the transport that serves ``url`` (``inproc://name``, ``ws://...``, ...)."""
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ConfigurationError(
            f"Expected a federation URL such as 'inproc://demo' or 'ws://host:port'. "
            f"Received: {url!r}"
        )
    cls = plugins.load("transports", scheme)
    return cls(url, role=role, identity=identity)
