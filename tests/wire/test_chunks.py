"""The core's chunk layer: signed chunks, what it refuses, pre-authentication limits, and
backpressure when the consumer lags.

Chunk-level scenarios run over the in-process transport with small messages (4 KiB), signed
as on a network: an attacker's view is a researcher endpoint that replays, alters, reorders or
splices chunk messages it captured. The limits before authentication and the backpressure
run over real websockets.
"""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore import Node
from fedcore.params import ParameterSet
from fedcore.testing.transport import wait_until
from fedcore.transport import Transport
from fedcore.wire import codec
from fedcore.wire.chunks import CHUNK_HEADER, ChunkedTransport, Delivery
from fedcore.wire.identity import Identity, public_key, researcher_identity
from fedcore.wire.messages import Envelope, Ping, Pong, TrainReply
from fedcore.wire.rpc import Client
from fedcore.wire.signing import TRAILER, Guard
from fedcore_transport.inprocess import InProcessTransport
from tests._support.net import free_port  # noqa: E402

LIMIT = 4096  # the in-process transport's message size in these tests
PIECE = LIMIT - CHUNK_HEADER - TRAILER


class Pair:
    """Keys, guards and endpoint factories for a researcher and a node on one hub."""

    def __init__(self, tmp_path: Path):
        self.url = f"inproc://chunks-{uuid.uuid4().hex[:8]}"
        self.r_key = Identity(tmp_path / "researcher.key")
        self.n_key = Identity(tmp_path / "node.key")

    def raw(self, role: str) -> Transport:
        identity = "researcher" if role == "researcher" else "node"
        return InProcessTransport(self.url, role=role, identity=identity,  # type: ignore[arg-type]
                                  max_frame_size=LIMIT)

    def researcher(self) -> ChunkedTransport:
        guard = Guard(self.r_key, lambda: {"node": self.n_key.public_bytes}, networked=True,
                      max_size=codec.DEFAULT_MAX_FRAME)
        return ChunkedTransport(self.raw("researcher"), guard)

    def node(self, **options: Any) -> ChunkedTransport:
        guard = Guard(self.n_key, lambda: {"researcher": self.r_key.public_bytes},
                      networked=True, max_size=codec.DEFAULT_MAX_FRAME)
        max_frame_size = int(options.pop("max_frame_size", 1 << 20))
        return ChunkedTransport(self.raw("node"), guard, max_frame_size=max_frame_size,
                                **options)  # type: ignore[arg-type]

    async def capture(self, frames: list[bytes]) -> list[list[bytes]]:
        """The chunk messages a signing researcher sends for each of ``frames``."""
        sender, spy = self.researcher(), self.raw("node")
        await sender.start()
        await spy.start()
        try:
            captured = []
            for frame in frames:
                await sender.send("node", frame)
                count = -(-len(frame) // PIECE)
                captured.append([(await spy.receive())[1] for _ in range(count)])
            return captured
        finally:
            await spy.close()
            await sender.close()


def test_signed_chunks_make_a_frame_decoded_without_a_copy(tmp_path):
    pair = Pair(tmp_path)
    params = ParameterSet({"w": np.arange(50_000, dtype=np.float32), "b": np.ones(3)})

    async def scenario() -> Delivery:
        researcher, node = pair.researcher(), pair.node()
        await node.start()
        await researcher.start()
        try:
            env = Envelope(TrainReply(params=params, n_samples=1), sender="researcher")
            await researcher.send_parts("node", codec.encode_parts(env))
            return await node.deliver()
        finally:
            await researcher.close()
            await node.close()

    got = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert got.error is None and got.signer == "researcher"
    assert got.key == pair.r_key.public_bytes
    received = codec.decode(got.frame).body.params  # type: ignore[attr-defined]
    assert received.equal(params)
    assert np.shares_memory(received["w"], np.frombuffer(got.frame, np.uint8))
    assert not received["w"].flags.writeable


def test_altered_reordered_spliced_or_replayed_chunks_never_make_a_frame(tmp_path, caplog):
    pair = Pair(tmp_path)
    rng = np.random.default_rng(0)
    frames = [rng.bytes(3 * PIECE) for _ in range(5)]

    async def scenario() -> list[Delivery]:
        a, b, c, d, e = await pair.capture(frames)
        node = pair.node(timeout=0.4)
        attacker = pair.raw("researcher")
        await node.start()
        await attacker.start()
        got: list[Delivery] = []
        reader = asyncio.create_task(_collect(node, got))
        try:
            altered = bytearray(c[1])
            altered[CHUNK_HEADER + 5] ^= 1
            script = [
                *b,  # a whole frame: delivered
                b[1], b[0],  # replayed: dropped as a duplicate, then refused
                c[0], bytes(altered), c[2],  # an altered chunk: the frame never completes
                e[1], e[0], e[2],  # reordered: the first is orphaned, the frame is cut
                d[0], a[1],  # spliced: a chunk of another frame does not continue d
            ]
            for message in script:
                await attacker.send("node", message)
            await wait_until(lambda: "Dropped an incomplete frame" in caplog.text,
                             "the unfinished frame to time out")
            return got
        finally:
            reader.cancel()
            await attacker.close()
            await node.close()

    with caplog.at_level(logging.INFO, logger="fedcore.chunks"):
        got = asyncio.run(asyncio.wait_for(scenario(), 30))
    frames_got = [bytes(g.frame) for g in got if g.error is None]
    assert frames_got == [frames[1]]  # only the untouched frame b
    errors = [str(g.error) for g in got if g.error is not None]
    assert len(errors) == 1 and "Replayed" in errors[0]  # b's first chunk, replayed
    for line in ("a chunk was lost", "the frame's start was lost",
                 "Dropped an incomplete frame"):
        assert line in caplog.text, line
    # the messages that failed verification are counted, not logged one by one
    assert "{'replayed': 1, 'bad signature': 1}" in caplog.text  # a summary at close


def test_a_frame_whose_first_chunk_comes_twice_still_arrives(tmp_path):
    # A broker may deliver a message twice: a QoS 1 resend after a reconnection, or the
    # instant an MQTT node switches between its wildcard and exact inbox subscriptions
    # (fedcore_transport._door). The copy is dropped; the frame it started is not.
    pair = Pair(tmp_path)
    frame = np.random.default_rng(1).bytes(3 * PIECE)

    async def scenario() -> list[Delivery]:
        [chunks] = await pair.capture([frame])
        node, broker = pair.node(), pair.raw("researcher")
        await node.start()
        await broker.start()
        got: list[Delivery] = []
        reader = asyncio.create_task(_collect(node, got))
        try:
            for message in (chunks[0], chunks[0], chunks[1], chunks[1], chunks[2]):
                await broker.send("node", message)
            await wait_until(lambda: any(g.error is None for g in got), "the frame")
            return got
        finally:
            reader.cancel()
            await broker.close()
            await node.close()

    got = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [bytes(g.frame) for g in got if g.error is None] == [frame]


def test_oversized_frames_and_too_many_frames_in_flight_are_refused(tmp_path):
    pair = Pair(tmp_path)
    rng = np.random.default_rng(1)
    big = rng.bytes(80 << 10)
    frames = [rng.bytes(2 * PIECE) for _ in range(5)]

    async def scenario() -> list[Delivery]:
        [oversized] = await pair.capture([big])
        split = await pair.capture(frames)
        node = pair.node(max_frame_size=64 << 10, in_flight=4)
        attacker = pair.raw("researcher")
        await node.start()
        await attacker.start()
        try:
            await attacker.send("node", oversized[0])  # announces 80 KiB: refused unread
            for chunks in split:
                await attacker.send("node", chunks[0])  # five frames begun, none finished
            return [await asyncio.wait_for(node.deliver(), 5) for _ in range(2)]
        finally:
            await attacker.close()
            await node.close()

    first, second = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "exceeds the limit of 65536" in str(first.error)
    assert "Too many frames in flight" in str(second.error)


def test_frames_in_flight_count_per_key_whatever_names_it_claims(tmp_path):
    """One key may not hold more partial frames by sending under more names (one key once
    held 200 GiB of announced frames under 25 names)."""
    pair = Pair(tmp_path)
    frames = [np.random.default_rng(i).bytes(2 * PIECE) for i in range(5)]

    async def scenario() -> Delivery:
        split = await pair.capture(frames)
        node = pair.node(in_flight=4)
        aliases = [InProcessTransport(pair.url, role="researcher", identity=f"alias-{i}",
                                      max_frame_size=LIMIT) for i in range(5)]
        await node.start()
        for alias in aliases:
            await alias.start()
        try:
            for alias, chunks in zip(aliases, split, strict=True):
                await alias.send("node", chunks[0])  # five frames begun under five names
            return await asyncio.wait_for(node.deliver(), 5)
        finally:
            for alias in aliases:
                await alias.close()
            await node.close()

    refused = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert refused.peer == "alias-4" and not refused.summarized
    assert "Too many frames in flight from 'researcher'" in str(refused.error)  # its key


def test_frames_beyond_a_keys_rate_are_refused_and_counted(tmp_path):
    """At most ``request_rate`` frames a second (bursts of twice that) from one verified key:
    the rest are counted in the summary, a few answered, none handed on as a request."""
    pair = Pair(tmp_path)
    sealer = Guard(pair.r_key, dict, networked=True, max_size=codec.DEFAULT_MAX_FRAME)
    summaries: list[dict] = []

    async def scenario() -> list[Delivery]:
        node = pair.node(on_dropped=summaries.append, request_rate=lambda: 5.0)
        assert node.admission is not None
        researcher = pair.raw("researcher")
        await node.start()
        await researcher.start()
        got: list[Delivery] = []
        reader = asyncio.create_task(_collect(node, got))
        try:
            for _ in range(30):
                await researcher.send("node", sealer.seal(Envelope(Ping(), recipient="node")))
            admission = node.admission
            await wait_until(lambda: admission.drops.total >= 20, "the refusals")
            return got
        finally:
            reader.cancel()
            await researcher.close()
            await node.close()

    got = asyncio.run(asyncio.wait_for(scenario(), 30))
    accepted = [g for g in got if g.error is None]
    refused = [g for g in got if g.error is not None]
    assert len(accepted) == 10  # the burst: twice the rate
    assert refused and all(g.summarized and "Too many frames from 'researcher'" in str(g.error)
                           for g in refused)
    assert sum(s["reasons"].get("rate limited", 0) for s in summaries) == 20


async def _collect(endpoint: ChunkedTransport, into: list[Delivery]) -> None:
    while True:
        into.append(await endpoint.deliver())


# --- limits before authentication, and backpressure, over websockets -----------------------

def test_a_100_mb_junk_frame_from_an_unknown_sender_is_dropped_unbuffered(tmp_path, caplog):
    """A rogue node (not enrolled) pushes 100 MB, signed with its own key in chunks, then as
    one websocket message: the first chunk is refused (its key is unknown, checked before
    any hashing), the rest are dropped unread, the oversized message closes the rogue's
    connection after 1 MiB, and the researcher answers as before, its memory never holding
    the junk."""
    pytest.importorskip("websockets")
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from fedcore_transport.websocket import WebSocketTransport

    url = f"ws://127.0.0.1:{free_port()}"
    node = Node(tmp_path / "site", node_id="site")
    node.trust("tests", public_key())
    node.start(url)
    rogue_key = Identity(tmp_path / "rogue.key")
    junk = np.random.default_rng(2).bytes(100 << 20)
    mib = 1 << 20

    async def scenario() -> int:
        client = Client(WebSocketTransport(url, role="researcher", identity="researcher",
                                           max_frame_size=mib),
                        key=researcher_identity(), enrolled={"site": node.identity.public_bytes})
        await client.start()
        rogue = ChunkedTransport(WebSocketTransport(url, role="node", identity="rogue",
                                                    max_frame_size=mib),
                                 Guard(rogue_key, dict, networked=True, max_size=1 << 31))
        await rogue.start()
        tracemalloc.start()
        try:
            await wait_until(lambda: {"site", "rogue"} <= client.transport.peers(), "peers")
            await rogue.send("researcher", junk)  # 100 chunks of 1 MiB, all refused
            async with connect(url, proxy=None, max_size=4096) as raw:
                await raw.send('{"fedcore": 1, "role": "node", "identity": "rogue-2"}')
                await raw.recv()
                view = memoryview(junk)
                with pytest.raises(ConnectionClosed):  # closed by the researcher: too big
                    await raw.send(view[i:i + mib] for i in range(0, len(view), mib))
                    await raw.recv()
            reply = await client.request("site", Ping(), timeout=10)  # still serving
            assert isinstance(reply.body, Pong)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            await rogue.close()
            await client.close()

    with caplog.at_level(logging.INFO):
        try:
            peak = asyncio.run(asyncio.wait_for(scenario(), 120))
        finally:
            node.stop()
    assert "Refused a frame from rogue" in caplog.text and "unknown key" in caplog.text
    assert "Refused a message of more than 1048576 bytes from 'rogue-2'" in caplog.text
    assert peak < 40 << 20, f"{peak / 2**20:.0f} MiB traced while 200 MB of junk arrived"


def test_a_consumer_that_does_not_read_slows_its_sender_and_memory_stays_bounded(tmp_path):
    """A node that stops reading: its inbox fills (256 KiB), it stops reading its socket,
    TCP fills, and the researcher's sends wait; nothing piles up in memory. Once it reads
    again, every frame arrives, in order."""
    pytest.importorskip("websockets")
    from fedcore_transport.websocket import WebSocketTransport

    url = f"ws://127.0.0.1:{free_port()}"
    message = 64 << 10
    frames = 1000  # 64 MB, far more than the socket buffers, the queues and the inbox
    data = np.random.default_rng(3).bytes(message - 8)

    async def scenario() -> None:
        researcher = ChunkedTransport(WebSocketTransport(
            url, role="researcher", identity="researcher", max_frame_size=message))
        node = ChunkedTransport(WebSocketTransport(
            url, role="node", identity="n", max_frame_size=message, inbox_bytes=256 << 10))
        await researcher.start()
        await node.start()
        sent = [0]

        async def pump() -> None:
            for i in range(frames):
                await researcher.send("n", i.to_bytes(8, "big") + data)
                sent[0] += 1

        try:
            await wait_until(lambda: node.peers() == {"researcher"}, "the node to connect")
            tracemalloc.start()
            sender = asyncio.create_task(pump())
            progress = -1
            while progress != sent[0]:  # until the sender stops making progress
                progress = sent[0]
                await asyncio.sleep(0.5)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert not sender.done() and sent[0] < frames // 2, sent[0]
            assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB held for a stalled reader"
            for i in range(frames):
                peer, frame = await node.receive()
                assert peer == "researcher" and int.from_bytes(bytes(frame)[:8], "big") == i
            await sender
        finally:
            await node.close()
            await researcher.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))
