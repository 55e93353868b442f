"""Frames of any size over a transport's messages: split, sign, reassemble, verify. Once.

A transport declares the largest message it carries in one piece
(``capabilities.max_frame_size``); :class:`ChunkedTransport` wraps it and moves frames up to
its own ``max_frame_size`` (2 GiB by default). A frame that fits travels as one message, as
it is (and, on a networked transport, followed by its signature trailer). A larger frame
travels as chunks, each one message::

    b"FCC1" | u32 reserved | frame id u64 | offset u64 | total length u64 | data [| trailer]

The sender slices the codec's buffers with memoryviews and never joins the frame; on a
networked transport it signs each chunk (:mod:`fedcore.wire.signing`), hashing the next chunk on
a worker thread while the current one is written. The receiver verifies every chunk before
it touches it: the trailer's key must be trusted (checked before any hashing), the signature
covers the chunk's header, so its frame, position and the frame's length cannot be changed,
spliced from another frame or reordered, and its counter is checked against replays. Only
then does the first chunk of a frame take one buffer of the announced length (at most
``max_frame_size``; an earlier frame's once nothing views that frame any more, see
:mod:`fedcore.wire.buffers`); every chunk is copied into place, and the frame is handed on,
whole, as a read-only view of that buffer (decoded without a copy). At most ``in_flight`` frames per
signing key are reassembled at a time, whatever sender names it claims; one that receives
no chunk for ``timeout`` seconds is dropped with a log line. Anything malformed is refused;
the endpoint keeps serving.

What a refusal costs is bounded (:mod:`fedcore.wire.admission`): a message that fails
verification (unsigned, unknown key, bad signature, stale, replayed, oversized) is counted
in a summary reported at most every ``Drops.interval`` seconds, and only a few such
refusals are handed on one by one (to be answered); frames from one verified key beyond
``request_rate`` a second are refused the same way; per-name state is capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.errors import FedcoreError, GovernanceError, ProtocolError, TransportError
from fedcore.transport import Capabilities, Parts, Transport
from fedcore.wire import codec
from fedcore.wire.admission import NAMES, Admission
from fedcore.wire.buffers import FrameBuffers
from fedcore.wire.limits import Bounded
from fedcore.wire.parts import head
from fedcore.wire.signing import TRAILER, Guard, ReplayedFrame

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["CHUNK_HEADER", "ChunkedTransport", "Delivery"]

log = logging.getLogger("fedcore.chunks")

_HEADER = struct.Struct("<4sIQQQ")
_MAGIC = b"FCC1"
_BYTES = frozenset({bytes})
CHUNK_HEADER = _HEADER.size  #: bytes of a chunk's header
# Hash and copy larger messages on a worker thread, so that the event loop keeps moving
# bytes meanwhile. Measured against 2 MiB (1 MiB MQTT messages hashed on the loop): less CPU
# per hand-over saved, but 40% less throughput, as the loop stalled while it hashed.
_THREAD_BYTES = 256 << 10
_HEAD = 64 << 10  # bytes of a refused frame kept, to read its header for an error reply


@dataclass(frozen=True)
class Delivery:
    """One frame received whole, or one refusal.

    ``frame`` is the frame (for a refusal: its first bytes when known, else empty; in
    process, :class:`~fedcore.transport.Parts` that :func:`~fedcore.wire.codec.decode` reads),
    ``signer`` the trusted name and ``key`` the raw public key that signed it (empty on an
    unsigned transport), ``error`` why it was refused (``None`` when it was not).
    ``summarized`` is true for a refusal already counted in the dropped-frame summaries
    (its sender was not verified, or sent too much): it needs no record of its own.
    """

    peer: str
    frame: Buffer | Parts
    signer: str = ""
    key: bytes = b""
    error: FedcoreError | None = None
    summarized: bool = False


@dataclass
class _Partial:
    buffer: np.ndarray  # uint8, from FrameBuffers: every byte is written before delivery
    total: int
    signer: str
    key: bytes
    filled: int = 0
    touched: float = field(default_factory=time.monotonic)


class ChunkedTransport(Transport):
    """``inner`` carrying frames of any size up to ``max_frame_size``, signed with ``guard``.

    Without a guard nothing is signed or verified (the in-process transport, or tests of a
    transport). :meth:`deliver` also reports refusals; :meth:`receive` skips them.
    ``on_dropped`` receives each summary of dropped frames (default: a log line; see
    :class:`~fedcore.wire.limits.Drops`); ``request_rate`` returns the most frames a second
    taken from one verified key (``None``: no limit), read as each frame starts.
    """

    def __init__(self, inner: Transport, guard: Guard | None = None, *,
                 max_frame_size: int = codec.DEFAULT_MAX_FRAME, in_flight: int = 4,
                 timeout: float = 120.0,
                 on_dropped: Callable[[dict[str, Any]], None] | None = None,
                 request_rate: Callable[[], float | None] | None = None):
        super().__init__(inner.url, role=inner.role, identity=inner.identity)
        if guard is not None and not guard.networked:
            guard = None
        self.inner = inner
        self.guard = guard
        self.max_frame_size = max_frame_size
        self.in_flight = in_flight
        self.timeout = timeout
        self._ids = itertools.count(random.getrandbits(62))
        self._partials: dict[str, dict[int, _Partial]] = {}
        self._flight: Counter[bytes | str] = Counter()  # partial frames per key (or peer)
        # frames whose first chunk was refused, by sender name
        self._refused: Bounded[str, set[int]] = Bounded(NAMES)
        self._sending: Bounded[str, asyncio.Semaphore] = Bounded(NAMES)
        #: The limits on what is received (``None`` without a guard: nothing is verified).
        self.admission = (Admission(guard, on_dropped, request_rate) if guard is not None
                          else None)
        if self.admission is not None:
            inner.screen = self.admission.screen
            inner.shed = self._shed
        #: Frame buffers, reused once nothing views the frame they held.
        self.buffers = FrameBuffers()
        self._receiving = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """The inner transport's, with this layer's ``max_frame_size``."""
        inner = self.inner.capabilities
        return dataclasses.replace(inner, max_frame_size=self.max_frame_size)

    async def start(self) -> None:
        """Start the inner transport and the sweeper of stale partial frames."""
        await self.inner.start()
        self.url = self.inner.url
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        """Close the inner transport and drop every partial frame."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.inner.close()
        self._partials.clear()
        self._flight.clear()
        self.buffers.clear()
        if self.admission is not None:
            self.admission.drops.flush()

    def peers(self) -> set[str]:
        """The inner transport's peers."""
        return self.inner.peers()

    # --- sending ----------------------------------------------------------------------------

    async def send(self, peer: str, frame: bytes) -> None:
        """Send one frame of any size up to ``max_frame_size``."""
        await self.send_parts(peer, [frame])

    async def send_parts(self, peer: str, parts: Sequence[Buffer]) -> None:
        """Send the frame made of ``parts`` (as :func:`fedcore.wire.codec.encode_parts` gives)."""
        # encode_parts' pieces are bytes as a rule: their lengths are their sizes as they are.
        views: Sequence[Any] = parts if _BYTES.issuperset(map(type, parts)) else [
            memoryview(p).cast("B") for p in parts]
        total = sum(map(len, views))
        if total > self.max_frame_size:
            raise TransportError(f"Frame of {total} bytes exceeds the limit of "
                                 f"{self.max_frame_size} bytes (max_frame_size) for "
                                 f"{self.url}.")
        limit = self.inner.capabilities.max_frame_size
        signature = TRAILER if self.guard is not None else 0
        # A frame that fits goes whole, unless it starts like a chunk (raw bytes could).
        if total + signature <= limit and head(views, 4) != _MAGIC:
            message: list[Buffer] = list(views)
            if self.guard is not None:
                message.append(await self._sign(message, total))
            await self.inner.send_parts(peer, message)
            return
        piece = limit - CHUNK_HEADER - signature
        if piece < 1024:
            raise TransportError(f"{self.url} carries messages of {limit} bytes at most: too "
                                 "small to carry chunks.")
        gate = self._sending.get_or_add(peer, lambda: asyncio.Semaphore(self.in_flight))
        async with gate:  # never more frames in flight to a peer than it reassembles
            # bytes, or byte views already: a view of each, without casting again
            await self._send_chunks(peer, [memoryview(p) for p in views], total, piece)

    async def _send_chunks(self, peer: str, views: list[memoryview], total: int,
                           piece: int) -> None:
        frame_id = next(self._ids)
        ready: asyncio.Future[bytes] | None = None
        previous: list[Buffer] = []
        for offset, data in _pieces(views, piece):
            message: list[Buffer] = [_HEADER.pack(_MAGIC, 0, frame_id, offset, total), *data]
            # Sign this chunk on a worker thread while the previous one is written.
            size = CHUNK_HEADER + sum(len(d) for d in data)
            signing = (asyncio.ensure_future(self._sign(message, size))
                       if self.guard is not None else None)
            try:
                if ready is not None:
                    await self.inner.send_parts(peer, [*previous, await ready])
                elif previous:
                    await self.inner.send_parts(peer, previous)
            except BaseException:
                if signing is not None:
                    signing.cancel()
                raise
            ready, previous = signing, message
        if ready is not None:
            await self.inner.send_parts(peer, [*previous, await ready])
        elif previous:
            await self.inner.send_parts(peer, previous)

    async def _sign(self, message: list[Buffer], size: int) -> bytes:
        assert self.guard is not None
        if size > _THREAD_BYTES:  # hashlib releases the GIL: the loop keeps moving bytes
            return await asyncio.to_thread(self.guard.trailer, message)
        return self.guard.trailer(message)

    # --- receiving --------------------------------------------------------------------------

    async def receive(self) -> tuple[str, Buffer]:  # type: ignore[override]
        """The next whole frame: ``(peer, frame)``; refusals are logged and skipped."""
        while True:
            got = await self.deliver()
            if got.error is None:
                frame = got.frame
                return got.peer, frame.join() if isinstance(frame, Parts) else frame
            log.warning("Refused a frame from %s: %s", got.peer, got.error)

    async def deliver(self) -> Delivery:
        """The next whole frame, or the next refusal of a frame's first message."""
        async with self._receiving:
            while True:
                peer, message = await self.inner.receive_parts()
                got = await self._accept(peer, message)
                if got is not None:
                    return got

    async def _accept(self, peer: str, message: bytes | Parts) -> Delivery | None:
        if isinstance(message, Parts):  # in process: a frame handed over unjoined
            if self.guard is None and message.head(4) != _MAGIC \
                    and len(message) <= self.max_frame_size:
                return Delivery(peer, message)  # decoded as it is (codec.decode)
            message = message.join()
        view = memoryview(message).cast("B")
        header = self._chunk_header(view)
        if header is None and len(view) > self.max_frame_size + TRAILER * bool(self.guard):
            return self._junk(peer, view[:_HEAD], ProtocolError(
                f"Frame of {len(view)} bytes exceeds the limit of {self.max_frame_size} "
                "bytes. Refused unread."))
        if self.guard is None or self.admission is None:
            if header is None:
                return Delivery(peer, message)
            return await self._chunk(peer, header, view[CHUNK_HEADER:], "", b"")
        if header is not None and self._continues_refused(peer, header):
            return None  # the rest of a frame whose first chunk was refused
        try:
            claimed = self.guard.signer(view)  # cheap: before any hashing
            self.admission.check_claim(peer, claimed)
            partial = self._continued(peer, header, len(view) - CHUNK_HEADER - TRAILER)
            if partial is not None and len(view) > _THREAD_BYTES \
                    and claimed == (partial.signer, partial.key):
                # The next chunk of a frame: verify it and copy it into place on one
                # worker thread (hashlib and numpy release the GIL).
                assert header is not None
                end = await asyncio.to_thread(self._verify_into, view, claimed, partial,
                                              header[1])
                return self._advance(peer, header[0], partial, end)
            signed = (await asyncio.to_thread(self.guard.verify, view, claimed)
                      if len(view) > _THREAD_BYTES else self.guard.verify(view, claimed))
            self.admission.vouch(peer, claimed[1])
            self.inner.verified(peer)
            if header is None or header[1] == 0:  # a new frame
                self.admission.check_rate(claimed)
        except (ProtocolError, GovernanceError) as exc:
            return self._refuse(peer, view, header, exc)
        if header is None:
            return Delivery(peer, signed.body.toreadonly(), *claimed)
        return await self._chunk(peer, header, signed.body[CHUNK_HEADER:], *claimed)

    def _shed(self, count: int) -> None:
        """Count ``count`` messages the transport dropped unread."""
        assert self.admission is not None
        for _ in range(count):  # a few hundred, once per shut-out
            self.admission.drops.drop("(strangers)", "shut out", "Dropped unread: strangers "
                                      "flooded this endpoint, which heard only the senders "
                                      "it verified.")

    def _junk(self, peer: str, head: memoryview, exc: FedcoreError) -> Delivery | None:
        """Count a refused frame; hand it on (to be answered) only while reports are cheap."""
        if self.admission is None:  # nothing is verified: every refusal is handed on
            return Delivery(peer, head, error=exc)
        if self.admission.refused(peer, exc):
            return Delivery(peer, head, error=exc, summarized=True)
        return None

    def _continued(self, peer: str, header: tuple[int, int, int] | None, size: int
                   ) -> _Partial | None:
        """The partial frame that the chunk ``header`` (unverified) would continue, if any."""
        if header is None:
            return None
        frame_id, offset, total = header
        partial = self._partials.get(peer, {}).get(frame_id)
        if partial is None or offset != partial.filled or offset + size > partial.total \
                or total != partial.total or size <= 0:
            return None
        return partial

    def _verify_into(self, view: memoryview, claimed: tuple[str, bytes], partial: _Partial,
                     offset: int) -> int:
        """On a worker thread: verify a chunk, then copy its data into place; its end."""
        assert self.guard is not None
        data = self.guard.verify(view, claimed).body[CHUNK_HEADER:]
        end = offset + len(data)
        np.copyto(partial.buffer[offset:end], np.frombuffer(data, np.uint8))
        return end

    def _chunk_header(self, view: memoryview) -> tuple[int, int, int] | None:
        """``(frame id, offset, total)`` when ``view`` is a chunk (unverified), else ``None``."""
        if len(view) < CHUNK_HEADER or bytes(view[:4]) != _MAGIC:
            return None
        _, _, frame_id, offset, total = _HEADER.unpack_from(view)
        return frame_id, offset, total

    def _continues_refused(self, peer: str, header: tuple[int, int, int]) -> bool:
        frame_id, offset, _ = header
        return offset > 0 and frame_id in self._refused.get(peer, ())

    def _refuse(self, peer: str, view: memoryview, header: tuple[int, int, int] | None,
                exc: FedcoreError) -> Delivery | None:
        """A refused message: a :class:`Delivery` for a frame's first one, else a log line."""
        if header is None:
            return self._junk(peer, view[:_HEAD], exc)
        frame_id, offset, _ = header
        if offset > 0:  # counted; only a frame's first message is ever answered
            if self.admission is not None:
                self.admission.count(peer, exc)
            return None
        # A replayed first message is a copy of one taken (a QoS 1 resend, or overlapping
        # subscriptions of a broker endpoint): the frame it started goes on.
        if not isinstance(exc, ReplayedFrame):
            refused = self._refused.get_or_add(peer, set)
            if len(refused) > 64:
                refused.clear()
            refused.add(frame_id)
            self._drop(peer, frame_id)
        return self._junk(peer, view[CHUNK_HEADER:CHUNK_HEADER + _HEAD], exc)

    async def _chunk(self, peer: str, header: tuple[int, int, int], data: memoryview,
                     signer: str, key: bytes) -> Delivery | None:
        """Check a (verified) chunk against its frame, copy it into place."""
        frame_id, offset, total = header
        partial = self._partials.get(peer, {}).get(frame_id)
        owner = key or peer  # frames in flight count per verified key
        problem = ""
        if total > self.max_frame_size:
            problem = (f"Frame of {total} bytes exceeds the limit of {self.max_frame_size} "
                       "bytes. Refused unread.")
        elif offset + len(data) > total or (not data and total):
            problem = f"Malformed chunk: {len(data)} bytes at {offset} of a {total}-byte frame."
        elif partial is None and offset != 0:
            log.warning("Dropped a chunk of frame %d from %s: the frame's start was lost or "
                        "refused.", frame_id, peer)
            return None
        elif partial is None and self._flight[owner] >= self.in_flight:
            problem = (f"Too many frames in flight from {signer or peer!r} (at most "
                       f"{self.in_flight} per key are reassembled at a time).")
        elif partial is not None and (signer, key) != (partial.signer, partial.key):
            problem = "A chunk of a frame signed by another key."
        if problem:
            if offset == 0:
                self._drop(peer, frame_id)
                return Delivery(peer, data[:_HEAD], error=ProtocolError(problem))
            log.warning("Refused a chunk from %s: %s", peer, problem)
            return None
        if partial is None:
            partial = _Partial(self.buffers.take(total), total, signer, key)
            self._partials.setdefault(peer, {})[frame_id] = partial
            self._flight[owner] += 1
        elif offset < partial.filled:
            log.info("Dropped a duplicated chunk of frame %d from %s.", frame_id, peer)
            return None
        elif offset > partial.filled:
            log.warning("Dropped an incomplete frame of %d bytes from %s: a chunk was lost.",
                        total, peer)
            self._drop(peer, frame_id)
            return None
        end = offset + len(data)
        target = partial.buffer[offset:end]
        if len(data) > _THREAD_BYTES:  # numpy copies without the GIL
            await asyncio.to_thread(np.copyto, target, np.frombuffer(data, np.uint8))
        else:
            target[:] = np.frombuffer(data, np.uint8)
        return self._advance(peer, frame_id, partial, end)

    def _advance(self, peer: str, frame_id: int, partial: _Partial, end: int
                 ) -> Delivery | None:
        """Record that ``partial`` is filled up to ``end``; the frame once it is whole."""
        partial.filled, partial.touched = end, time.monotonic()
        if end < partial.total:
            return None
        self._drop(peer, frame_id)
        return Delivery(peer, partial.buffer.data.toreadonly(), partial.signer, partial.key)

    def _drop(self, peer: str, frame_id: int) -> None:
        partials = self._partials.get(peer)
        if partials is not None:
            partial = partials.pop(frame_id, None)
            if partial is not None:
                owner = partial.key or peer
                self._flight[owner] -= 1
                if self._flight[owner] <= 0:
                    del self._flight[owner]
            if not partials:
                del self._partials[peer]

    async def _sweep(self) -> None:
        """Drop partial frames that received nothing for ``timeout`` seconds."""
        while True:
            await asyncio.sleep(max(0.05, min(self.timeout / 4, 5.0)))
            if self.admission is not None:
                self.admission.drops.tick()
            now = time.monotonic()
            self.buffers.sweep(now)
            stale = now - self.timeout
            for peer, partials in list(self._partials.items()):
                for frame_id, partial in list(partials.items()):
                    if partial.touched < stale:
                        log.warning("Dropped an incomplete frame from %s: %d of %d bytes "
                                    "arrived, then nothing for %g s.", peer, partial.filled,
                                    partial.total, self.timeout)
                        self._drop(peer, frame_id)


def _pieces(views: list[memoryview], piece: int) -> list[tuple[int, list[memoryview]]]:
    """``(offset, data views)`` of each chunk of the frame made of ``views``."""
    out: list[tuple[int, list[memoryview]]] = []
    current: list[memoryview] = []
    room, offset = piece, 0
    for view in views:
        pos = 0
        while pos < len(view):
            take = min(room, len(view) - pos)
            current.append(view[pos:pos + take])
            pos += take
            room -= take
            if room == 0:
                out.append((offset, current))
                offset += piece
                current, room = [], piece
    if current or not out:
        out.append((offset, current))
    return out
