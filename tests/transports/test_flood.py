"""A flood of unauthenticated frames on the broker does not take a node from its researcher.

A node process serves on the test's own Mosquitto; another process publishes junk on the
node's inbox (tests/_support/flood.py: random bytes, unsigned frames, frames of an unknown
key, forged signatures under the trusted key, each under a new sender name) at
``FLOOD_RATE`` frames a second (10,000 by default) for 10 s, while the trusted researcher
keeps asking. Every request completes within 2 s, the node's memory grows less than
50 MiB, and its audit log gains only a few summary records.

No MQTT endpoint written in Python reads more messages a second than paho-mqtt parses: on
a loaded machine that is below 10,000. The test first measures it (a bare paho subscriber
in a process of its own) and floods at the lower of ``FLOOD_RATE`` and half of it, so what
it shows is that junk costs the node little beyond what the MQTT library spends reading it;
it prints both rates (``-s``). bench/flood.py measures them without the assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("paho.mqtt")

from fedcore import Node  # noqa: E402
from fedcore.testing.transport import wait_until  # noqa: E402
from fedcore.transport import open_transport  # noqa: E402
from fedcore.wire.identity import public_key, researcher_identity  # noqa: E402
from fedcore.wire.messages import Ping, Pong, SearchReply, SearchRequest  # noqa: E402
from fedcore.wire.rpc import Client  # noqa: E402
from tests._support.deployment import audit_events, node_log, start_node, stop_processes  # noqa: E402
from tests._support.mqtt import Broker, fed, require_mosquitto  # noqa: E402

require_mosquitto()

RATE = float(os.environ.get("FLOOD_RATE", 10_000))
SECONDS = 10.0


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def flood(port: int, prefix: str, rate: float, seconds: float) -> subprocess.Popen[bytes]:
    key = researcher_identity().public_bytes.hex()
    root = Path(__file__).parents[2]
    return subprocess.Popen(
        [sys.executable, "-m", "tests._support.flood", str(port), prefix, str(rate),
         str(seconds), key], stdout=subprocess.PIPE, cwd=root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])})


def paho_capacity(port: int, federation: str) -> float:
    """Messages a second a bare paho-mqtt subscriber takes here, flooded at ``RATE``."""
    root = Path(__file__).parents[2]
    sink = subprocess.Popen(
        [sys.executable, "-m", "tests._support.flood", "sink", str(port),
         f"fedcore/{federation}/to/sink/from/+", "2"], stdout=subprocess.PIPE, text=True,
        cwd=root, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])})
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "subscribed"
    flooder = flood(port, f"fedcore/{federation}/to/sink", RATE, 4.0)
    result = json.loads(sink.stdout.readline())
    sink.wait(10)
    flooder.communicate(timeout=60)
    return result["received"] / result["seconds"]


def test_a_flood_of_junk_frames_neither_delays_the_researcher_nor_grows_the_node(tmp_path):
    broker = Broker(tmp_path, "allow_anonymous true").start()
    federation = fed()
    capacity = paho_capacity(broker.port, federation)
    rate = min(RATE, capacity / 2)
    url = f"mqtt://127.0.0.1:{broker.port}/{federation}"
    home = tmp_path / "site"
    node = Node(home, node_id="site")
    node.trust("tests", public_key())
    node_key = node.identity.public_bytes
    node._close_audit()
    proc = start_node(home, url)
    latencies: list[float] = []
    memory: dict[str, float] = {}
    sent: dict[str, float] = {}

    async def scenario() -> None:
        client = Client(open_transport(url, role="researcher", identity="researcher"),
                        key=researcher_identity(), enrolled={"site": node_key})
        await client.start()
        try:
            await wait_until(lambda: "site" in client.peers(), "the node", timeout=60)
            for _ in range(3):  # warm: the node has imported and answered everything once
                await client.request("site", SearchRequest(tags=["x"]), timeout=30)
            memory["before"] = rss_mib(proc.pid)
            records_before = len(audit_events(home))
            flooder = flood(broker.port, f"fedcore/{federation}/to/site", rate, SECONDS)
            started = time.monotonic()
            while flooder.poll() is None or time.monotonic() - started < SECONDS:
                body = Ping() if len(latencies) % 2 else SearchRequest(tags=["x"])
                asked = time.monotonic()
                reply = await client.request("site", body, timeout=30)
                latencies.append(time.monotonic() - asked)
                assert isinstance(reply.body, (Pong, SearchReply)), reply.body
                memory["peak"] = max(memory.get("peak", 0.0), rss_mib(proc.pid))
                await asyncio.sleep(0.25)
            out, _ = flooder.communicate(timeout=30)
            sent.update(json.loads(out))
            memory["after"] = rss_mib(proc.pid)
            sent["records"] = len(audit_events(home)) - records_before
        finally:
            await client.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        stop_processes([proc])
        broker.stop()
    events = audit_events(home)
    summaries = [r for r in events if r["event"] == "frames-dropped"]
    dropped = sum(r["dropped"] for r in summaries)
    print(f"\npaho-mqtt reads {capacity:,.0f} messages/s here; flooding at {rate:,.0f}/s")
    print(f"flood: {sent['sent'] / sent['seconds']:,.0f} junk frames/s sent for "
          f"{sent['seconds']:.1f} s, {dropped:,} dropped by the node in {len(summaries)} "
          f"summaries; {len(latencies)} requests, slowest {max(latencies):.3f} s; node "
          f"memory {memory['before']:.0f} -> peak {memory['peak']:.0f} MiB")
    assert max(latencies) < 2.0, (latencies, node_log(home))
    assert memory["peak"] - memory["before"] < 50, memory
    assert dropped == sent["sent"]  # the node took every junk frame, and dropped it
    assert 1 <= len(summaries) <= 4, [r["seconds"] for r in summaries]
    assert not [r for r in events if r["event"] in ("refused-frame", "internal-error")]
    requests = [r for r in events if r["event"] == "search"]
    assert sent["records"] <= len(requests) + len(summaries) + 2  # nothing per junk frame
