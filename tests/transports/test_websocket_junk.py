"""Junk on a websocket is dropped where it is read, as on MQTT (``Transport.screen``).

Over websockets a node dials out to its researcher, so only the researcher's end of the
connection (or whoever sits on a ``ws://`` path without TLS) can send it anything. The test
sends junk down a real loopback connection to a real ``fedcore-node start`` process (random
bytes, unsigned frames, frames of an unknown key, forged signatures under the trusted key)
while the trusted researcher keeps asking on the same connection: every request is
answered, and the node's audit log gains only ``frames-dropped`` summaries for the junk.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("websockets")

from fedcore import Node  # noqa: E402
from fedcore.testing.transport import wait_until  # noqa: E402
from fedcore.transport import open_transport  # noqa: E402
from fedcore.wire.identity import public_key, researcher_identity  # noqa: E402
from fedcore.wire.messages import Ping, Pong, SearchReply, SearchRequest  # noqa: E402
from fedcore.wire.rpc import Client  # noqa: E402
from fedcore_transport.websocket import WebSocketTransport  # noqa: E402
from tests._support.deployment import audit_events, node_log, start_node, stop_processes  # noqa: E402
from tests._support.flood import junk  # noqa: E402
from tests._support.net import free_port  # noqa: E402

RATE = 1000  # junk frames a second, sent from the test's own event loop
SECONDS = 5.0


def test_the_screen_drops_junk_before_it_is_queued():
    """What the screen refuses never reaches ``receive``; what it lets in does, in order."""
    seen: list[bytes] = []

    async def scenario() -> None:
        url = f"ws://127.0.0.1:{free_port()}"
        researcher = WebSocketTransport(url, role="researcher", identity="researcher")
        node = WebSocketTransport(url, role="node", identity="n")

        def screen(peer: str, message: bytes | bytearray) -> bool:
            seen.append(bytes(message))
            return not bytes(message).startswith(b"junk")

        node.screen = screen
        await researcher.start()
        await node.start()
        try:
            await wait_until(lambda: "n" in researcher.peers(), "the node")
            for i in range(50):
                await researcher.send("n", b"junk %d" % i)
            await researcher.send("n", b"good")
            assert await asyncio.wait_for(node.receive(), 10) == ("researcher", b"good")
            assert node._inbox.queued_bytes == 0  # no junk waits behind it
        finally:
            await node.close()
            await researcher.close()

    asyncio.run(scenario())
    assert len(seen) == 51  # the screen saw every message, on the reading task


def test_junk_on_a_websocket_costs_the_node_only_summaries(tmp_path):
    url = f"ws://127.0.0.1:{free_port()}"
    home = tmp_path / "site"
    node = Node(home, node_id="site")
    node.trust("tests", public_key())
    node_key = node.identity.public_bytes
    node._close_audit()
    frames = junk(4 * 64, researcher_identity().public_bytes, str(tmp_path))
    latencies: list[float] = []
    counts: dict[str, int] = {}

    async def flood(raw: WebSocketTransport, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            for _ in range(RATE // 100):
                await raw.send("site", frames[i % len(frames)])
                i += 1
            await asyncio.sleep(0.01)
        counts["sent"] = i

    async def scenario() -> None:
        raw = open_transport(url, role="researcher", identity="researcher")
        assert isinstance(raw, WebSocketTransport)
        client = Client(raw, key=researcher_identity(), enrolled={"site": node_key})
        await client.start()
        proc = start_node(home, url)
        try:
            await wait_until(lambda: "site" in client.peers(), "the node", timeout=60)
            for _ in range(3):  # warm: the node has imported and answered everything once
                await client.request("site", SearchRequest(tags=["x"]), timeout=30)
            counts["before"] = len(audit_events(home))
            stop = asyncio.Event()
            sender = asyncio.create_task(flood(raw, stop))
            started = time.monotonic()
            while time.monotonic() - started < SECONDS:
                body = Ping() if len(latencies) % 2 else SearchRequest(tags=["x"])
                asked = time.monotonic()
                reply = await client.request("site", body, timeout=30)
                latencies.append(time.monotonic() - asked)
                assert isinstance(reply.body, (Pong, SearchReply)), reply.body
                await asyncio.sleep(0.1)
            stop.set()
            await sender
            # the node still serves once the junk is over
            assert isinstance((await client.request("site", Ping(), timeout=30)).body, Pong)
            counts["records"] = len(audit_events(home)) - counts["before"]
        finally:
            await client.close()
            stop_processes([proc])  # the last summary is written as the node stops

    asyncio.run(asyncio.wait_for(scenario(), 180))
    events = audit_events(home)
    summaries = [r for r in events if r["event"] == "frames-dropped"]
    dropped = sum(r["dropped"] for r in summaries)
    print(f"\n{counts['sent']} junk frames in {SECONDS:g} s, {dropped} dropped by the node in "
          f"{len(summaries)} summaries; {len(latencies)} requests, slowest "
          f"{max(latencies):.3f} s")
    assert max(latencies) < 5.0, (latencies, node_log(home))
    assert dropped == counts["sent"], node_log(home)  # every junk frame counted, none served
    assert 1 <= len(summaries) <= 4, [r["seconds"] for r in summaries]
    assert not [r for r in events if r["event"] in ("refused-frame", "internal-error")]
    requests = [r for r in events if r["event"] == "search"]
    assert counts["records"] <= len(requests) + len(summaries) + 2  # nothing per junk frame
