"""A flood of unauthenticated frames on the broker does not take a node from its researcher.

A node process serves on the test's own Mosquitto; another process publishes junk on the
node's inbox (tests/_support/flood.py: random bytes, unsigned frames, frames of an unknown
key, forged signatures under the trusted key, each under a new sender name) at
10,000 frames a second offered for 10 s (the flooding process checks it kept that rate),
while the trusted researcher keeps asking. Every request completes within 2 s, the node's
memory grows less than 50 MiB, and its audit log gains only a few summary records.

No MQTT client written in Python reads 10,000 messages a second on the test machine (a bare
paho-mqtt subscriber reads 2,000 to 9,000 here): what keeps the researcher's requests from
waiting behind the junk is that the node stops subscribing to strangers' topics while they
flood it (fedcore_transport._door), so the broker discards the junk instead of queueing it.
The test prints the figures (``-s``); bench/flood.py measures them over several runs.
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

RATE = 10_000.0
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


def test_a_flood_of_junk_frames_neither_delays_the_researcher_nor_grows_the_node(tmp_path):
    broker = Broker(tmp_path, "allow_anonymous true").start()
    federation = fed()
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
            flooder = flood(broker.port, f"fedcore/{federation}/to/site", RATE, SECONDS)
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
    offered = sent["sent"] / sent["seconds"]
    print(f"\nflood: {offered:,.0f} junk frames/s offered for {sent['seconds']:.1f} s, "
          f"{dropped:,} dropped by the node in {len(summaries)} summaries (the broker "
          f"discarded the rest); {len(latencies)} requests, median "
          f"{sorted(latencies)[len(latencies) // 2]:.3f} s, slowest {max(latencies):.3f} s; "
          f"node memory {memory['before']:.0f} -> peak {memory['peak']:.0f} MiB; load "
          f"average {os.getloadavg()[0]:.1f}")
    assert sent["sent"] == RATE * SECONDS and offered > 0.9 * RATE, sent  # the flood was real
    assert max(latencies) < 2.0, (latencies, node_log(home))
    assert memory["peak"] - memory["before"] < 50, memory
    assert "hears only the senders it verified" in home.with_suffix(".log").read_text()
    assert 0 < dropped < sent["sent"]  # what reached the node, it dropped and counted
    assert 1 <= len(summaries) <= 4, [r["seconds"] for r in summaries]
    assert not [r for r in events if r["event"] in ("refused-frame", "internal-error")]
    requests = [r for r in events if r["event"] == "search"]
    assert sent["records"] <= len(requests) + len(summaries) + 2  # nothing per junk frame
