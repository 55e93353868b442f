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
import struct
import time
import uuid

import msgpack
import numpy as np
import pytest

from fedcore import Node
from fedcore.params import ParameterSet
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



def test_after_a_malformed_signed_reply_the_experiment_completes_with_the_other_nodes(
        tmp_path):
    """A node the researcher enrolled (so its frames verify) answers every training request
    with a correctly signed frame the decoder refuses (dtype "f3"). Its rows fail with a
    protocol error; the honest nodes' rounds all complete."""
    pytest.importorskip("sklearn")
    pytest.importorskip("websockets")
    from fedcore import Experiment
    from tests._support.deployment import write_csv
    from tests._support.net import free_port
    from tests._support.sklearn_plans import SleepWhenToldPlan
    from tests._support.trust import enroll

    url = f"ws://127.0.0.1:{free_port()}"
    nodes = []
    for i, node_id in enumerate(["honest-a", "honest-b"]):
        node = Node(tmp_path / node_id, node_id=node_id, approval_required=False)
        node.datasets.add("cohort", ["fuzz"], write_csv(tmp_path / f"{node_id}.csv", i))
        nodes.append(node)
    enrolled = enroll(nodes)
    rogue = _RogueNode(url, tmp_path / "rogue.key", nodes[0].datasets.public(
        nodes[0].datasets.list()[0]))
    enrolled["rogue"] = rogue.identity.public_key
    for node in nodes:
        node.start(url)
    rogue.start()
    exp = Experiment(SleepWhenToldPlan, tags=["fuzz"], federation=url, progress=False,
                     model_args={"target": "label"}, connect_timeout=10, enrolled=enrolled,
                     nodes=["honest-a", "honest-b", "rogue"], round_limit=2)
    try:
        exp.run()
        history = exp.history
    finally:
        exp.close()
        rogue.stop()
        for node in nodes:
            node.stop()
    assert rogue.malformed_sent >= 1
    done = history[history["status"] == "ok"]
    assert sorted(set(done["node"])) == ["honest-a", "honest-b"]
    assert sorted(set(done["round"])) == [1, 2]
    failed = history[history["node"] == "rogue"]
    assert (failed["status"] != "ok").all()
    assert failed["error"].str.contains("malformed reply").all(), failed["error"].tolist()


class _RogueNode:
    """An enrolled node that answers pings and searches honestly, training requests with a
    signed but malformed frame."""

    def __init__(self, url: str, key_file, dataset: dict):
        from fedcore.wire.identity import Identity

        self.url = url
        self.identity = Identity(key_file)
        self.dataset = {**dataset, "id": "rogue-ds"}
        self.malformed_sent = 0
        self._task = None

    def start(self) -> None:
        from fedcore import _runtime

        self._future = _runtime.submit(self._serve())

    def stop(self) -> None:
        self._future.cancel()

    async def _serve(self) -> None:
        from fedcore.wire.identity import public_key
        from fedcore.wire.messages import Pong, SearchReply, SearchRequest, TrainReply
        from fedcore.wire.signing import Guard

        transport = open_transport(self.url, role="node", identity="rogue")
        guard = Guard(self.identity, lambda: {"tests": _raw(public_key())}, networked=True,
                      max_size=codec.DEFAULT_MAX_FRAME)
        await transport.start()
        try:
            while True:
                peer, frame = await transport.receive()
                request, _ = guard.open(frame)
                if isinstance(request.body, SearchRequest):
                    body = SearchReply(node_id="rogue", datasets=[self.dataset],
                                       available_tags=["fuzz"])
                elif isinstance(request.body, Ping):
                    body = Pong(node_id="rogue")
                else:  # a training request: a well-signed reply the decoder refuses
                    reply = codec.encode(request.reply(TrainReply(
                        params=ParameterSet({"w": np.zeros(3)}), n_samples=10),
                        sender="rogue"))
                    bad = _rewrite(reply, lambda header: header["a"][0].__setitem__(0, "f3"))
                    await transport.send(peer, bad + guard.trailer([bad]))
                    self.malformed_sent += 1
                    continue
                await transport.send(peer, guard.seal(request.reply(body, sender="rogue")))
        finally:
            await transport.close()


def _raw(key: str) -> bytes:
    from fedcore.wire.identity import parse_public_key

    return parse_public_key(key)


def _rewrite(frame: bytes, change) -> bytes:
    """``frame`` with its msgpack header changed by ``change(header)`` (arrays kept)."""
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8:8 + hlen])
    change(header)
    new = msgpack.packb(header)
    return codec.MAGIC + struct.pack("<I", len(new)) + new + frame[8 + hlen:]
