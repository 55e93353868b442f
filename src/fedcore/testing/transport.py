"""The transport conformance suite: the same tests for every :class:`~fedcore.transport.Transport`.

Subclass :class:`TransportConformance` in a test module (its name must start with ``Test``)
and give it an ``endpoints`` fixture: the URLs its researcher and nodes use. Every test runs a
scenario between a researcher and real node endpoints built by
:func:`fedcore.transport.open_transport` (override :meth:`TransportConformance.open_raw` to
pass constructor options). The scenarios go through the core's chunk layer
(:class:`fedcore.wire.chunks.ChunkedTransport`, unsigned), as every frame of fedcore does, so
they move frames larger than the transport's own messages; a few tests check the transport
alone against its declared ``max_frame_size``. A known gap is declared, never skipped::

    class TestCarrierPigeon(TransportConformance):
        @pytest.fixture
        def endpoints(self):
            return Endpoints.same("pigeon://loft")

        @pytest.mark.xfail(reason="a pigeon carries at most 1 MB", strict=True)
        def test_large_frames(self, endpoints):
            super().test_large_frames(endpoints)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from fedcore.errors import TransportError
from fedcore.transport import Role, Transport, open_transport
from fedcore.wire.chunks import CHUNK_HEADER, ChunkedTransport

__all__ = ["Endpoints", "Federation", "TransportConformance", "wait_until"]

RESEARCHER = "researcher"


@dataclass(frozen=True)
class Endpoints:
    """The URLs where a researcher and its nodes meet (they differ with TLS, say)."""

    researcher: str
    node: str

    @classmethod
    def same(cls, url: str) -> Endpoints:
        """Both roles use ``url``."""
        return cls(url, url)


@dataclass
class Federation:
    """A started researcher endpoint and its connected node endpoints, by node id."""

    researcher: Transport
    nodes: dict[str, Transport] = field(default_factory=dict)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Waited {timeout:g} s for {what}.")
        await asyncio.sleep(0.01)


class TransportConformance:
    """Tests every transport passes. Subclasses provide the ``endpoints`` fixture."""

    #: Seconds one scenario may take.
    timeout: float = 60.0
    #: Seconds a connection change (a node joining or leaving) may take to show.
    settle: float = 10.0
    #: Size of the frame of :meth:`test_large_frames`.
    large_frame: int = 64 << 20
    #: Number of frames of :meth:`test_frames_keep_their_order`.
    many_frames: int = 2000

    @pytest.fixture
    def endpoints(self) -> Endpoints:
        """The URLs to test; subclasses override this fixture."""
        raise NotImplementedError("Give the conformance subclass an `endpoints` fixture.")

    # --- helpers for subclasses and scenarios ------------------------------------------------

    def open_raw(self, url: str, role: Role, identity: str) -> Transport:
        """Build one endpoint of the transport itself; override to pass constructor options."""
        return open_transport(url, role=role, identity=identity)

    def open(self, url: str, role: Role, identity: str) -> Transport:
        """One endpoint behind the core's chunk layer, as fedcore uses every transport."""
        return ChunkedTransport(self.open_raw(url, role, identity))

    @staticmethod
    def limit(endpoint: Transport) -> int:
        """The largest message the transport under ``endpoint`` carries in one piece."""
        inner = endpoint.inner if isinstance(endpoint, ChunkedTransport) else endpoint
        return inner.capabilities.max_frame_size

    def run(self, scenario: Coroutine[Any, Any, None]) -> None:
        """Run ``scenario`` on a fresh event loop, failing it after :attr:`timeout`."""
        asyncio.run(asyncio.wait_for(scenario, self.timeout))

    async def start_node(self, endpoints: Endpoints, node_id: str) -> Transport:
        """A started node endpoint."""
        node = self.open(endpoints.node, "node", node_id)
        await node.start()
        return node

    async def connected(self, researcher: Transport, node: Transport) -> None:
        """Wait until ``researcher`` and ``node`` see each other."""
        await wait_until(lambda: node.identity in researcher.peers()
                         and researcher.identity in node.peers(),
                         f"{node.identity!r} and the researcher to connect", self.settle)

    @asynccontextmanager
    async def federation(self, endpoints: Endpoints, n_nodes: int = 1
                         ) -> AsyncIterator[Federation]:
        """A researcher and ``n_nodes`` connected nodes (``node-0``...), closed on exit."""
        fed = Federation(self.open(endpoints.researcher, "researcher", RESEARCHER))
        await fed.researcher.start()
        try:
            for i in range(n_nodes):
                fed.nodes[f"node-{i}"] = await self.start_node(endpoints, f"node-{i}")
            for node in fed.nodes.values():
                await self.connected(fed.researcher, node)
            yield fed
        finally:
            for endpoint in [*fed.nodes.values(), fed.researcher]:
                await endpoint.close()

    # --- the suite ---------------------------------------------------------------------------

    def test_nodes_appear_in_peers(self, endpoints: Endpoints) -> None:
        """The researcher sees every node in ``peers()``; each node sees the researcher."""
        async def scenario() -> None:
            async with self.federation(endpoints, 2) as fed:
                assert fed.researcher.peers() == {"node-0", "node-1"}
                for node in fed.nodes.values():
                    assert node.peers() == {RESEARCHER}
        self.run(scenario())

    def test_frames_travel_both_ways_unchanged(self, endpoints: Endpoints) -> None:
        """Frames (empty ones too) arrive byte for byte, both ways, with their sender."""
        async def scenario() -> None:
            async with self.federation(endpoints) as fed:
                node = fed.nodes["node-0"]
                for frame in (b"ping", bytes(range(256)), b""):
                    await fed.researcher.send("node-0", frame)
                    assert await node.receive() == (RESEARCHER, frame)
                    await node.send(RESEARCHER, frame[::-1])
                    assert await fed.researcher.receive() == ("node-0", frame[::-1])
        self.run(scenario())

    def test_each_node_gets_its_own_frames(self, endpoints: Endpoints) -> None:
        """With several nodes, each gets the frames sent to it; replies name their node."""
        async def scenario() -> None:
            async with self.federation(endpoints, 3) as fed:
                for name in fed.nodes:
                    await fed.researcher.send(name, f"to {name}".encode())
                for name, node in fed.nodes.items():
                    assert await node.receive() == (RESEARCHER, f"to {name}".encode())
                    await node.send(RESEARCHER, f"from {name}".encode())
                replies = dict([await fed.researcher.receive() for _ in fed.nodes])
                assert replies == {name: f"from {name}".encode() for name in fed.nodes}
        self.run(scenario())

    def test_large_frames(self, endpoints: Endpoints) -> None:
        """A frame of :attr:`large_frame` bytes arrives intact, both ways."""
        frame = np.random.default_rng(0).bytes(self.large_frame)

        async def scenario() -> None:
            async with self.federation(endpoints) as fed:
                await fed.researcher.send("node-0", frame)
                peer, got = await fed.nodes["node-0"].receive()
                assert peer == RESEARCHER and got == frame
                await fed.nodes["node-0"].send(RESEARCHER, got)
                peer, back = await fed.researcher.receive()
                assert peer == "node-0" and back == frame
        self.run(scenario())

    def test_frames_keep_their_order(self, endpoints: Endpoints) -> None:
        """Many frames sent both ways at once arrive in the order they were sent."""
        n = self.many_frames

        def frame(i: int) -> bytes:
            return i.to_bytes(4, "big") * (1 + i % 97)  # sizes vary from 4 to 388 bytes

        async def scenario() -> None:
            async with self.federation(endpoints) as fed:
                if not fed.researcher.capabilities.ordered:
                    pytest.xfail("the transport declares ordered=False")
                node = fed.nodes["node-0"]

                async def pump(src: Transport, peer: str) -> None:
                    for i in range(n):
                        await src.send(peer, frame(i))

                async def drain(dst: Transport) -> list[bytes]:
                    return [(await dst.receive())[1] for _ in range(n)]

                _, _, down, up = await asyncio.gather(
                    pump(fed.researcher, "node-0"), pump(node, RESEARCHER),
                    drain(node), drain(fed.researcher))
                expected = [frame(i) for i in range(n)]
                assert down == expected and up == expected
        self.run(scenario())

    def test_close_wakes_a_pending_receive(self, endpoints: Endpoints) -> None:
        """Closing an endpoint makes its pending and later ``receive`` raise ``TransportError``."""
        async def scenario() -> None:
            async with self.federation(endpoints) as fed:
                for endpoint in (fed.nodes["node-0"], fed.researcher):
                    pending = asyncio.create_task(endpoint.receive())
                    await asyncio.sleep(0.05)
                    await endpoint.close()
                    with pytest.raises(TransportError):
                        await asyncio.wait_for(pending, self.settle)
                    with pytest.raises(TransportError):
                        await endpoint.receive()  # and every later one
        self.run(scenario())

    def test_a_lost_node_leaves_peers(self, endpoints: Endpoints) -> None:
        """A node that closes leaves ``peers()``; a frame to it raises ``TransportError``."""
        async def scenario() -> None:
            async with self.federation(endpoints, 2) as fed:
                await fed.nodes["node-0"].close()
                await wait_until(lambda: fed.researcher.peers() == {"node-1"},
                                 "node-0 to leave the researcher's peers", self.settle)
                with pytest.raises(TransportError):
                    await fed.researcher.send("node-0", b"anyone there?")
                await fed.researcher.send("node-1", b"still here")  # the others still are
                assert await fed.nodes["node-1"].receive() == (RESEARCHER, b"still here")
        self.run(scenario())

    def test_a_restarted_node_is_reachable_again(self, endpoints: Endpoints) -> None:
        """A node that closes and starts again (same identity) is reachable again."""
        async def scenario() -> None:
            async with self.federation(endpoints) as fed:
                await fed.nodes["node-0"].close()
                await wait_until(lambda: not fed.researcher.peers(),
                                 "node-0 to leave the researcher's peers", self.settle)
                node = fed.nodes["node-0"] = await self.start_node(endpoints, "node-0")
                await self.connected(fed.researcher, node)
                await fed.researcher.send("node-0", b"welcome back")
                assert await node.receive() == (RESEARCHER, b"welcome back")
                await node.send(RESEARCHER, b"thanks")
                assert await fed.researcher.receive() == ("node-0", b"thanks")
        self.run(scenario())

    def test_a_node_may_start_before_its_researcher(self, endpoints: Endpoints) -> None:
        """A node started before the researcher connects once the researcher is up."""
        async def scenario() -> None:
            node = await self.start_node(endpoints, "early")
            researcher = self.open(endpoints.researcher, "researcher", RESEARCHER)
            try:
                await asyncio.sleep(0.2)
                assert node.peers() == set()
                await researcher.start()
                await self.connected(researcher, node)
                await node.send(RESEARCHER, b"been waiting")
                assert await researcher.receive() == ("early", b"been waiting")
            finally:
                await node.close()
                await researcher.close()
        self.run(scenario())

    def test_nodes_survive_a_researcher_restart(self, endpoints: Endpoints) -> None:
        """After a researcher restart its nodes come back by themselves."""
        async def scenario() -> None:
            async with self.federation(endpoints) as fed:
                node = fed.nodes["node-0"]
                await fed.researcher.close()
                await wait_until(lambda: not node.peers(), "the node to see the researcher go",
                                 self.settle)
                with pytest.raises(TransportError):
                    await node.send(RESEARCHER, b"hello?")
                fed.researcher = self.open(endpoints.researcher, "researcher", RESEARCHER)
                await fed.researcher.start()
                await self.connected(fed.researcher, node)  # the node itself came back
                await fed.researcher.send("node-0", b"restarted")
                assert await node.receive() == (RESEARCHER, b"restarted")
        self.run(scenario())

    def test_a_frame_to_an_unknown_peer_is_refused(self, endpoints: Endpoints) -> None:
        """A frame to a peer that is not connected raises ``TransportError``."""
        async def scenario() -> None:
            async with self.federation(endpoints) as fed:
                with pytest.raises(TransportError):
                    await fed.researcher.send("nobody", b"x")
                with pytest.raises(TransportError):
                    await fed.nodes["node-0"].send("nobody", b"x")
        self.run(scenario())

    # --- the transport's own messages, and the core's chunks over them ---------------------

    def test_a_message_of_the_declared_size_crosses_and_a_larger_one_is_refused(
            self, endpoints: Endpoints) -> None:
        """The transport alone carries ``max_frame_size`` bytes in one message, not one more."""
        async def scenario() -> None:
            researcher = self.open_raw(endpoints.researcher, "researcher", RESEARCHER)
            node = self.open_raw(endpoints.node, "node", "node-0")
            await researcher.start()
            await node.start()
            try:
                await self.connected(researcher, node)
                size = researcher.capabilities.max_frame_size
                message = bytes(range(256)) * (size // 256) + bytes(size % 256)
                await researcher.send("node-0", message)
                assert await node.receive() == (RESEARCHER, message)
                with pytest.raises(TransportError):
                    await node.send(RESEARCHER, message + b"!")
            finally:
                await node.close()
                await researcher.close()
        self.run(scenario())

    def test_chunk_boundaries(self, endpoints: Endpoints) -> None:
        """Frames exactly at one message, one byte over, at whole chunks, and empty, arrive."""
        async def scenario() -> None:
            async with self.federation(endpoints) as fed:
                node = fed.nodes["node-0"]
                limit = self.limit(node)
                piece = limit - CHUNK_HEADER
                rng = np.random.default_rng(3)
                for size in (limit, limit + 1, 2 * piece, 2 * piece + 1, 0, 1):
                    frame = rng.bytes(size)
                    await fed.researcher.send("node-0", frame)
                    assert await node.receive() == (RESEARCHER, frame), size
                    await node.send(RESEARCHER, frame)
                    assert await fed.researcher.receive() == ("node-0", frame), size
        self.run(scenario())

    def test_interleaved_large_frames(self, endpoints: Endpoints) -> None:
        """Large frames sent at once by two nodes, and two at once by one node, all arrive."""
        async def scenario() -> None:
            async with self.federation(endpoints, 2) as fed:
                size = 3 * self.limit(fed.researcher) + 17
                rng = np.random.default_rng(4)
                frames = {(name, i): rng.bytes(size) for name in fed.nodes for i in range(2)}
                # Read while they are sent: a receiver that does not read slows its senders.
                receiving = asyncio.gather(*(fed.researcher.receive() for _ in frames))
                await asyncio.gather(*(fed.nodes[name].send(RESEARCHER, frame)
                                       for (name, _), frame in frames.items()))
                got = await receiving
                expected = sorted((name, frame) for (name, _), frame in frames.items())
                assert sorted((peer, bytes(frame)) for peer, frame in got) == expected
        self.run(scenario())
