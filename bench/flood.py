"""Junk on a node's MQTT inbox: what rate it keeps up with, and what the researcher notices.

The script starts its own Mosquitto and measures, on this machine:

1. ``paho``: how many messages a second a bare paho-mqtt subscriber (a process of its own,
   doing nothing with them) reads while flooded: the ceiling of any MQTT endpoint written
   in Python;
2. ``node``: a real node process (``fedcore-node start``) flooded for ``--seconds`` at
   ``--rate`` junk frames a second (tests/_support/flood.py: random bytes, unsigned
   frames, frames of an unknown key, forged signatures under the trusted key, each under a
   new sender name) while the trusted researcher pings it every 0.25 s.

It prints the rate offered, the rate the node took (junk frames counted in its
``frames-dropped`` audit records, over the time from the flood's start to the node's stop),
the slowest and median ping,
the node's memory before and at the end, and the audit records the flood added.
Run: ``python bench/flood.py`` (``--rate``, ``--seconds``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests._support.mqtt import Broker, fed  # noqa: E402

from fedcore import Node  # noqa: E402
from fedcore.testing.transport import wait_until  # noqa: E402
from fedcore.transport import open_transport  # noqa: E402
from fedcore.wire.identity import Identity  # noqa: E402
from fedcore.wire.messages import Ping  # noqa: E402
from fedcore.wire.rpc import Client  # noqa: E402

TARGET_S = 2.0  # the slowest request the flood may cause


def _module(*args: str, text: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "tests._support.flood", *args],
                            stdout=subprocess.PIPE, text=text, cwd=ROOT, env=env)


def paho_rate(port: int, rate: float, key_hex: str) -> float:
    federation = fed()
    sink = _module("sink", str(port), f"fedcore/{federation}/to/sink/from/+", "2")
    assert sink.stdout is not None and sink.stdout.readline().strip() == "subscribed"
    flooder = _module(str(port), f"fedcore/{federation}/to/sink", str(rate), "4", key_hex)
    result = json.loads(sink.stdout.readline())
    sink.wait(10)
    flooder.communicate(timeout=60)
    return result["received"] / result["seconds"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def records(home: Path) -> list[dict]:
    return [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()
            if line.strip()]


def node_under_flood(port: int, rate: float, seconds: float, folder: Path,
                     researcher: Identity) -> dict:
    federation = fed()
    url = f"mqtt://127.0.0.1:{port}/{federation}"
    home = folder / "site"
    node = Node(home, node_id="site")
    node.trust("bench", researcher.public_key)
    node_key = node.identity.public_bytes
    node._close_audit()
    log = open(folder / "node.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "fedcore_node", "--home", str(home),
                             "start", "--federation", url], stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(ROOT / "src"), str(ROOT / "apps" / "node")])})
    out: dict = {"latencies": []}

    async def scenario() -> None:
        client = Client(open_transport(url, role="researcher", identity="researcher"),
                        key=researcher, enrolled={"site": node_key})
        await client.start()
        try:
            await wait_until(lambda: "site" in client.peers(), "the node", timeout=60)
            for _ in range(3):
                await client.request("site", Ping(), timeout=30)
            out["rss_before"] = rss_mib(proc.pid)
            out["records_before"] = len(records(home))
            flooder = _module(str(port), f"fedcore/{federation}/to/site", str(rate),
                              str(seconds), researcher.public_bytes.hex())
            started = out["started"] = time.monotonic()
            while flooder.poll() is None or time.monotonic() - started < seconds:
                asked = time.monotonic()
                await client.request("site", Ping(), timeout=60)
                out["latencies"].append(time.monotonic() - asked)
                out.setdefault("when", []).append(asked - started)
                await asyncio.sleep(0.25)
            flooded, _ = flooder.communicate(timeout=30)
            out.update(json.loads(flooded))
            out["rss_after"] = rss_mib(proc.pid)
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        out["until_stop"] = time.monotonic() - out.get("started", time.monotonic())
        proc.terminate()
        proc.wait(30)
        log.close()
    events = records(home)
    summaries = [r for r in events if r["event"] == "frames-dropped"]
    out["dropped"] = sum(r["dropped"] for r in summaries)
    out["added"] = len(events) - out["records_before"] - 1  # the node's own "stopped"
    out["summaries"] = len(summaries)
    out["log"] = (folder / "node.log").read_text()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        researcher = Identity(folder / "researcher.key")
        broker = Broker(folder, "allow_anonymous true").start()
        try:
            ceiling = paho_rate(broker.port, args.rate, researcher.public_bytes.hex())
            got = node_under_flood(broker.port, args.rate, args.seconds, folder, researcher)
        finally:
            broker.stop()
    took = got["dropped"] / max(got["seconds"], got["until_stop"])
    slowest = max(got["latencies"])
    print(f"paho-mqtt alone reads       {ceiling:10,.0f} messages/s while flooded")
    print(f"junk offered to the node    {got['sent'] / got['seconds']:10,.0f} frames/s "
          f"for {got['seconds']:.1f} s")
    print(f"junk the node took          {took:10,.0f} frames/s "
          f"({got['dropped']:,} of {got['sent']:,}; ratio to paho alone "
          f"{took / ceiling:.2f})")
    print(f"researcher's pings          median {statistics.median(got['latencies']):.3f} s, "
          f"slowest {slowest:.3f} s (target < {TARGET_S:g} s: "
          f"{'met' if slowest < TARGET_S else 'NOT met'})")
    print(f"node memory                 {got['rss_before']:.0f} -> {got['rss_after']:.0f} MiB")
    import os as _o
    if _o.environ.get("FLOOD_DEBUG"):
        print([f"{w:.2f}:{x:.3f}" for w, x in zip(got["when"], got["latencies"])])
        print(got["log"][-3000:])
    print(f"audit records the flood added: {got['added']} ({got['summaries']} summaries; "
          "the rest are the pings' own)")


if __name__ == "__main__":
    main()
