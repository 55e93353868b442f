"""Seeded fuzzing of both receive paths: a real node, and the researcher's reader.

100,000 mutated frames of every message type (tests/_support/fuzz.py), seeded: half go to a
real node over the in-process transport (the same core receive path as on a network, after
verification), half to a researcher's real :class:`~fedcore.wire.rpc.Client`. Nothing but a
``FedcoreError`` may come out, every frame must get an answer or a record, and both sides
must keep serving. Then a researcher runs an experiment with two honest nodes and one whose
(correctly signed) replies are malformed: it completes with the honest two.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from fedcore import Node
from fedcore.transport import open_transport
from fedcore.wire import codec
from fedcore.wire.messages import Envelope, Ping, Pong
from fedcore.wire.rpc import Client
from tests._support import fuzz
from tests.wire.test_codec import SAMPLES

FRAMES = int(os.environ.get("FUZZ_FRAMES", 50_000))  # per receive path
BATCH = 1000


def test_a_node_answers_every_one_of_50000_mutated_frames(tmp_path):
    url = f"inproc://fuzz-{uuid.uuid4().hex[:8]}"
    node = Node(tmp_path / "site", node_id="site").start(url)
    sent = answered = 0

    async def scenario() -> None:
        nonlocal sent, answered
        researcher = open_transport(url, role="researcher", identity="fuzzer")
        await researcher.start()
        try:
            await _wait_for_peer(researcher, "site")
            frames = fuzz.frames(SAMPLES, FRAMES, seed=15)
            while sent < FRAMES:
                batch = [next(frames) for _ in range(min(BATCH, FRAMES - sent))]
                for frame in batch:
                    await researcher.send("site", frame)
                sent += len(batch)
                while answered < sent:  # every frame is answered, one by one
                    _, reply = await asyncio.wait_for(researcher.receive(), 30)
                    answered += 1
            ping = Envelope(Ping(), sender="fuzzer", recipient="site")
            await researcher.send("site", codec.encode(ping))
            _, reply = await asyncio.wait_for(researcher.receive(), 30)
            assert isinstance(codec.decode(reply).body, Pong)  # still serving
        finally:
            await researcher.close()

    started = time.perf_counter()
    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        node.stop()
    print(f"node: {FRAMES} mutated frames answered in {time.perf_counter() - started:.1f} s")
    assert answered == sent == FRAMES
    events = [r["event"] for r in node.audit_log()]
    assert "internal-error" not in events
    assert events.count("refused-frame") > FRAMES // 2  # each refusal is on record
    assert node.verify_audit()


async def _wait_for_peer(transport, peer: str) -> None:
    for _ in range(500):
        if peer in transport.peers():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{peer} never connected")


def test_the_researchers_reader_survives_50000_mutated_replies(tmp_path):
    """Every frame is refused or ignored on record (a log line), none escapes as an
    exception, and the reader still hands the next honest reply to its request."""
    url = f"inproc://fuzz-{uuid.uuid4().hex[:8]}"
    node = Node(tmp_path / "honest", node_id="honest").start(url)

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    rpc_log = logging.getLogger("fedcore.rpc")

    async def scenario() -> None:
        client = Client(open_transport(url, role="researcher", identity="researcher"))
        rogue = open_transport(url, role="node", identity="rogue")
        await client.start()
        await rogue.start()
        try:
            await _wait_for_peer(rogue, "researcher")
            for i, frame in enumerate(fuzz.frames(SAMPLES, FRAMES, seed=16), 1):
                await rogue.send("researcher", frame)
                while i % BATCH == 0 and len(records) < i:  # let the reader keep up
                    await asyncio.sleep(0.001)
            reply = await client.request("honest", Ping(), timeout=30)
            assert isinstance(reply.body, Pong)  # the reader still serves requests
        finally:
            await rogue.close()
            await client.close()

    rpc_log.addHandler(handler)
    level, rpc_log.level = rpc_log.level, logging.DEBUG
    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        rpc_log.removeHandler(handler)
        rpc_log.setLevel(level)
        node.stop()
    assert not [r for r in records if r.levelno >= logging.ERROR]  # no internal error
    accounted = [r for r in records if r.getMessage().startswith(
        ("Ignored an unsolicited", "Node rogue sent a malformed frame"))]
    assert len(accounted) == FRAMES

