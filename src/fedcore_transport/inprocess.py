"""``inproc://name``: many nodes and a researcher in one process.

Frames are bytes, encoded and decoded by the same core path as on a network; only the
delivery is a queue. Endpoints may live on different event loops (threads): delivery uses
``call_soon_threadsafe`` onto the receiver's loop. Between endpoints of one loop (a
simulation) the message goes straight into the receiver's queue: no callback and no wake-up
of the loop's self-pipe per frame. A message is handed over by reference,
never copied, so the receiver's queue is not bounded: it holds no memory of its own. A
message sent in parts (:meth:`send_parts`, as the core sends every frame) is not joined
either: :meth:`receive_parts` (the core's way) gives it as :class:`~fedcore.transport.Parts`,
whose pieces that were immutable already (a model snapshot shared by the requests of a
round) are the sender's own memory, the others copies made as it was sent; :meth:`receive`
joins them.
``max_frame_size`` (2 GiB by default) is the largest message; give a small one to exercise
the core's chunking in simulation. :class:`InProcessRelay` is an endpoint for relays: what it
is sent goes on at once to a callback instead of into its queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fedcore.errors import ConfigurationError, TransportError
from fedcore.transport import Capabilities, Inbox, Parts, Role, Transport

if TYPE_CHECKING:
    from typing_extensions import Buffer

_hubs: dict[str, _Hub] = {}
_hubs_lock = threading.Lock()


class _Hub:
    def __init__(self) -> None:
        self.endpoints: dict[str, InProcessTransport] = {}
        self.lock = threading.Lock()


class InProcessTransport(Transport):
    """An endpoint on the in-process hub named by the URL's host (``inproc://demo``)."""

    capabilities = Capabilities(max_frame_size=1 << 31, ordered=True, broadcast=False,
                                networked=False, send_waits=False)

    def __init__(self, url: str, *, role: Role, identity: str, max_frame_size: int = 1 << 31):
        super().__init__(url, role=role, identity=identity)
        if max_frame_size != self.capabilities.max_frame_size:
            self.capabilities = Capabilities(max_frame_size=max_frame_size, ordered=True,
                                              broadcast=False, networked=False,
                                              send_waits=False)
        name = urlsplit(url).netloc or urlsplit(url).path.strip("/")
        if not name:
            raise ConfigurationError(f"Expected inproc://NAME. Received: {url!r}")
        with _hubs_lock:
            self._hub = _hubs.setdefault(name, _Hub())
        self._inbox: Inbox[bytes | Parts] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox = Inbox[bytes | Parts](self.identity)
        with self._hub.lock:
            other = self._hub.endpoints.get(self.identity)
            if other is not None and other is not self:
                raise TransportError(
                    f"{self.identity!r} is already connected to {self.url}. Give each node "
                    "its own identity."
                )
            self._hub.endpoints[self.identity] = self

    def _deliver(self, sender: str, frame: bytes | Parts,
                 loop: asyncio.AbstractEventLoop | None) -> None:
        """Queue ``frame``; ``loop`` is the sender's (running) loop."""
        if self._loop is None or self._inbox is None or self._loop.is_closed():
            raise TransportError(f"{self.identity!r} is not connected to {self.url}.")
        if loop is self._loop:  # same thread: the queue is ours to touch now
            self._inbox.put_nowait(sender, frame)
        else:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, sender, frame)

    async def send(self, peer: str, frame: bytes) -> None:
        await self._send(peer, bytes(frame))

    async def send_parts(self, peer: str, parts: Sequence[Buffer]) -> None:
        """Send ``parts`` as one message, unjoined (see :class:`~fedcore.transport.Parts`).

        To a relay, which forwards one buffer, they are joined at once (a copy, as
        :class:`~fedcore.transport.Parts` would make of them and the relay then join).
        """
        with self._hub.lock:
            relay = isinstance(self._hub.endpoints.get(peer), InProcessRelay)
        await self._send(peer, b"".join(parts) if relay else Parts(parts))

    async def _send(self, peer: str, frame: bytes | Parts) -> None:
        self._target(peer, frame)._deliver(self.identity, frame, asyncio.get_running_loop())

    def _target(self, peer: str, frame: bytes | Parts) -> InProcessTransport:
        """The endpoint of ``peer``, once ``frame`` is checked against the size limit."""
        if len(frame) > self.capabilities.max_frame_size:
            raise TransportError(f"Frame of {len(frame)} bytes is too large for {self.url} "
                                 f"(at most {self.capabilities.max_frame_size}).")
        with self._hub.lock:
            target = self._hub.endpoints.get(peer)
        if target is None:
            raise TransportError(f"No peer {peer!r} on {self.url}.")
        return target

    async def receive(self) -> tuple[str, bytes]:
        peer, frame = await self.receive_parts()
        return peer, frame.join() if isinstance(frame, Parts) else frame

    async def receive_parts(self) -> tuple[str, bytes | Parts]:
        if self._inbox is None:
            raise TransportError(f"{self.identity!r} is not started on {self.url}.")
        return await self._inbox.get()

    async def close(self) -> None:
        with self._hub.lock:
            if self._hub.endpoints.get(self.identity) is self:
                del self._hub.endpoints[self.identity]
        if self._inbox is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._inbox.close)

    def peers(self) -> set[str]:
        with self._hub.lock:
            return {
                identity for identity, ep in self._hub.endpoints.items()
                if identity != self.identity and ep.role != self.role
            }


class InProcessRelay(InProcessTransport):
    """An endpoint that hands each frame it is sent to ``forward(sender, frame)`` at once.

    For relays that carry frames on to somewhere else (a simulation's nodes in other
    processes): the frame goes on within the sender's own ``send``, on the sender's thread,
    with no queue, task or wake-up of a loop per frame. ``forward`` must not block; it may
    raise :class:`~fedcore.errors.TransportError` to fail the send. Its :meth:`receive`
    raises: nothing waits in it.
    """

    def __init__(self, url: str, *, role: Role, identity: str,
                 forward: Callable[[str, bytes], None], max_frame_size: int = 1 << 31):
        super().__init__(url, role=role, identity=identity, max_frame_size=max_frame_size)
        self._forward = forward

    def _deliver(self, sender: str, frame: bytes | Parts,
                 loop: asyncio.AbstractEventLoop | None) -> None:
        if self._loop is None or self._loop.is_closed():
            raise TransportError(f"{self.identity!r} is not connected to {self.url}.")
        # What is forwarded leaves for another process: one buffer.
        self._forward(sender, frame.join() if isinstance(frame, Parts) else frame)

    async def receive_parts(self) -> tuple[str, bytes | Parts]:
        raise TransportError(f"{self.identity!r} on {self.url} forwards what it is sent; "
                             "nothing is received from it.")

    def relay(self, peer: str, frame: bytes) -> None:
        """:meth:`send` as a plain call, on this endpoint's own loop (no coroutine per frame).

        For a relay that hands on a burst of frames from one callback of its loop.
        """
        self._target(peer, frame)._deliver(self.identity, frame, self._loop)
