"""The in-process transport passes the transport conformance suite."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from fedcore.testing.transport import Endpoints, TransportConformance
from fedcore.transport import Role, Transport
from fedcore_transport.inprocess import InProcessTransport


class TestInProcessTransport(TransportConformance):
    """In-process messages of 256 KiB: the suite's large frames cross as chunks."""

    @pytest.fixture
    def endpoints(self) -> Endpoints:
        return Endpoints.same(f"inproc://conformance-{uuid.uuid4().hex[:8]}")

    def open_raw(self, url: str, role: Role, identity: str) -> Transport:
        return InProcessTransport(url, role=role, identity=identity, max_frame_size=256 << 10)


def test_import_fedcore_leaves_the_testing_toolkit_alone():
    code = ("import sys, fedcore; "
            "print(sorted(m for m in sys.modules if m.startswith(('fedcore.testing', 'pytest'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_relay_endpoint_hands_on_each_frame_within_the_send():
    import asyncio

    from fedcore_transport.inprocess import InProcessRelay

    url = f"inproc://relay-{uuid.uuid4().hex[:8]}"
    got: list[tuple[str, bytes]] = []

    async def main() -> None:
        relay = InProcessRelay(url, role="node", identity="node-01",
                               forward=lambda sender, frame: got.append((sender, frame)))
        researcher = InProcessTransport(url, role="researcher", identity="alice")
        await relay.start()
        await researcher.start()
        assert researcher.peers() == {"node-01"}  # a node like any other, to the researcher
        for i in range(3):
            await researcher.send("node-01", b"frame %d" % i)
            assert len(got) == i + 1  # already handed on: no queue, no turn of the loop
        with pytest.raises(Exception, match="forwards what it is sent"):
            await relay.receive()
        await relay.close()
        with pytest.raises(Exception, match="No peer 'node-01'"):
            await researcher.send("node-01", b"late")
        await researcher.close()

    asyncio.run(main())
    assert got == [("alice", b"frame 0"), ("alice", b"frame 1"), ("alice", b"frame 2")]


def _link(url: str, role: Role, identity: str):
    from fedcore.wire.chunks import ChunkedTransport

    return ChunkedTransport(InProcessTransport(url, role=role, identity=identity))


def test_a_broadcast_model_is_read_where_it_is_and_a_live_one_as_it_was_sent():
    """The round's snapshot reaches every node without a copy; anything else is copied."""
    import asyncio

    import numpy as np

    from fedcore.params import ParameterSet
    from fedcore.wire import codec
    from fedcore.wire.messages import Envelope, TrainReply

    url = f"inproc://broadcast-{uuid.uuid4().hex[:8]}"
    live = ParameterSet({"w": np.arange(40_000, dtype=np.float32), "b": np.ones(3)})
    snapshot = live.snapshot()

    async def main() -> list[ParameterSet]:
        researcher = _link(url, "researcher", "alice")
        nodes = [_link(url, "node", f"node-{i}") for i in range(2)]
        for endpoint in (researcher, *nodes):
            await endpoint.start()
        received = []
        for params in (snapshot, live):
            for node in nodes:
                env = Envelope(TrainReply(params=params, n_samples=1), sender="alice",
                               recipient=node.identity)
                await researcher.send_parts(node.identity, codec.encode_parts(env))
                got = await node.deliver()
                env = codec.decode(got.frame)
                assert env.recipient == node.identity  # each its own message
                received.append(env.body.params)  # type: ignore[attr-defined]
        live["w"][0] = -1.0  # changed after it was sent: the nodes got it as it was
        # A program that reads the raw transport still gets one buffer (bytes).
        await researcher.send_parts("node-0", [b"ab", memoryview(b"cd")])
        assert await nodes[0].receive() == ("alice", b"abcd")
        for endpoint in (researcher, *nodes):
            await endpoint.close()
        return received

    shared_a, shared_b, copied_a, copied_b = asyncio.run(main())
    for got in (shared_a, shared_b):
        assert got.equal(snapshot) and not got["w"].flags.writeable
        assert np.shares_memory(got["w"], snapshot["w"])  # one model, read by every node
    for got in (copied_a, copied_b):
        assert got["w"][0] == 0.0 and not got["w"].flags.writeable
        assert not np.shares_memory(got["w"], live["w"])
    assert not np.shares_memory(copied_a["w"], copied_b["w"])
