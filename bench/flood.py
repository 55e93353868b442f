"""Junk on a node's MQTT inbox: what the researcher notices, with and without the door.

The script starts its own Mosquitto and measures, on this machine:

1. ``paho``: how many messages a second a bare paho-mqtt subscriber (a process of its own,
   doing nothing with them) reads while flooded: the ceiling of any MQTT endpoint written
   in Python;
2. a real node process (``fedcore-node start``) flooded for ``--seconds`` at ``--rate`` junk
   frames a second (tests/_support/flood.py: random bytes, unsigned frames, frames of an
   unknown key, forged signatures under the trusted key, each under a new sender name)
   while the trusted researcher pings it every 0.25 s, two ways, alternately, ``--runs``
   times each:

   - ``door``: as shipped: once strangers send more than 100 messages a second, the node
     subscribes to its verified researcher's topic alone for 10 s
     (fedcore_transport._door), so the broker discards the junk;
   - ``open``: the baseline, the same node with ``?strangers_per_s=0``: it subscribes to
     everyone throughout, and reads every junk message.

It prints, per way, the medians over the runs of: the junk rate offered (what the flooding
process wrote), the junk the node counted in its ``frames-dropped`` audit records (what it
read and dropped, and, of that, what it shed unread once it had shut strangers out: what the
broker had sent before it heard; the broker discarded the rest), the researcher's median and
slowest ping, the node's memory growth and the audit records the flood added; the slowest
ping of every run against the 2 s target; the ratio of the slowest pings (open / door); and
the load average before and after.
Run: ``python bench/flood.py`` (``--rate``, ``--seconds``, ``--runs``).
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
MEMORY_MIB = 50.0  # the most the node's memory may grow


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
                     researcher: Identity, query: str) -> dict:
    federation = fed()
    url = f"mqtt://127.0.0.1:{port}/{federation}"
    home = folder / federation
    node = Node(home, node_id="site")
    node.trust("bench", researcher.public_key)
    node_key = node.identity.public_bytes
    node._close_audit()
    log = open(folder / f"{federation}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "fedcore_node", "--home", str(home),
                             "start", "--federation", url + query], stdout=log,
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
            started = time.monotonic()
            while flooder.poll() is None or time.monotonic() - started < seconds:
                asked = time.monotonic()
                await client.request("site", Ping(), timeout=60)
                out["latencies"].append(time.monotonic() - asked)
                out["rss_peak"] = max(out.get("rss_peak", 0.0), rss_mib(proc.pid))
                await asyncio.sleep(0.25)
            flooded, _ = flooder.communicate(timeout=30)
            out.update(json.loads(flooded))
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
    except Exception as exc:  # say which run failed, with the node's log, and go on
        tail = (folder / f"{federation}.log").read_text(errors="replace")[-4000:]
        print(f"run {federation}{query} failed: {exc!r}\nnode log tail:\n{tail}",
              file=sys.stderr, flush=True)
        raise
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    events = records(home)
    out["dropped"] = sum(r["dropped"] for r in events if r["event"] == "frames-dropped")
    out["shed"] = sum(r["reasons"].get("shut out", 0) for r in events
                      if r["event"] == "frames-dropped")
    out["added"] = len(events) - out["records_before"] - 1  # the node's own "stopped"
    out["summaries"] = sum(r["event"] == "frames-dropped" for r in events)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"door": [], "open": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        researcher = Identity(folder / "researcher.key")
        broker = Broker(folder, "allow_anonymous true").start()
        try:
            ceiling = paho_rate(broker.port, args.rate, researcher.public_bytes.hex())
            for _ in range(args.runs):
                for way, query in (("door", ""), ("open", "?strangers_per_s=0")):
                    runs[way].append(node_under_flood(broker.port, args.rate, args.seconds,
                                                      folder, researcher, query))
                    print(f"{way}: slowest ping {max(runs[way][-1]['latencies']):.3f} s",
                          file=sys.stderr, flush=True)
        finally:
            broker.stop()
    med = statistics.median
    print(f"flood: {args.rate:,.0f} junk frames/s for {args.seconds:g} s, {args.runs} runs "
          f"per way; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"paho-mqtt alone reads {ceiling:,.0f} messages/s while flooded")
    print(f"{'':28}{'door (shipped)':>16}{'open (baseline)':>17}")

    def row(label: str, figure, fmt: str) -> None:
        print(f"{label:28}" + "".join(f"{format(figure(runs[w]), fmt):>16} "
                                      for w in ("door", "open")))

    row("junk offered (frames/s)", lambda r: med(x["sent"] / x["seconds"] for x in r), ",.0f")
    row("junk the node counted", lambda r: med(x["dropped"] for x in r), ",.0f")
    row("  of which shed unread", lambda r: med(x["shed"] for x in r), ",.0f")
    row("median ping (s)", lambda r: med(med(x["latencies"]) for x in r), ".3f")
    row("slowest ping, median (s)", lambda r: med(max(x["latencies"]) for x in r), ".3f")
    row("memory growth, median (MiB)", lambda r: med(x["rss_peak"] - x["rss_before"]
                                                    for x in r), ".1f")
    row("audit records added", lambda r: med(x["added"] for x in r), ".0f")
    for way in ("door", "open"):
        slowest = [max(x["latencies"]) for x in runs[way]]
        met = all(s < TARGET_S for s in slowest) and all(
            x["rss_peak"] - x["rss_before"] < MEMORY_MIB for x in runs[way])
        print(f"{way}: slowest ping per run {', '.join(f'{s:.3f}' for s in slowest)} s "
              f"(target < {TARGET_S:g} s, memory < {MEMORY_MIB:g} MiB: "
              f"{'met' if met else 'NOT met'})")
    ratio = med(max(x["latencies"]) for x in runs["open"]) / med(
        max(x["latencies"]) for x in runs["door"])
    print(f"slowest ping, open / door: {ratio:.1f}x")


if __name__ == "__main__":
    main()
