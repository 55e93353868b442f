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
