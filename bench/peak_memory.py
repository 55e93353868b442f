"""Peak memory of sending a model of M bytes, on both ends, in separate processes.

A researcher process sends a ParameterSet of ``--mb`` MiB (20 float32 layers) to one node
process over ``ws://`` (and ``mqtt://`` through a Mosquitto the script starts, when one is
installed); the node decodes it and sends it back as its ``TrainReply``, so both processes
send and receive the whole model once. Every frame goes through the core as in a
deployment: encoded as views of the arrays, cut into chunks, each chunk signed and verified,
reassembled into one buffer per frame, decoded without a copy.

Each process reads its peak resident memory (``ru_maxrss``) after it imported and connected
(its baseline, before the model exists) and at the end, and the script prints, per process:
the peak, the peak over M, and what the transfer added (peak - baseline) over M. Target:
**peak <= 3x M per process on both ends**.

Run: ``python bench/peak_memory.py`` (``--mb``, ``--transports ws,mqtt``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

TARGET = 3.0
MIB = 1 << 20


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _params(mb: int):  # type: ignore[no-untyped-def]
    import numpy as np

    from fedcore.params import ParameterSet

    per_layer = mb * MIB // 4 // 20
    rng = np.random.default_rng(0)
    return ParameterSet({f"layer{i}.weight": rng.standard_normal(per_layer, dtype=np.float32)
                         for i in range(20)})


def _transport(url: str, role: str, identity: str):  # type: ignore[no-untyped-def]
    from fedcore.transport import open_transport

    return open_transport(url, role=role, identity=identity)  # type: ignore[arg-type]


async def _researcher(url: str, keys: Path, mb: int) -> dict[str, int]:
    from fedcore.wire.identity import Identity
    from fedcore.wire.messages import TrainReply
    from fedcore.wire.rpc import Client

    node_key = (keys / "node.pub").read_bytes()
    client = Client(_transport(url, "researcher", "researcher"),
                    key=Identity(keys / "researcher.key"), enrolled={"node": node_key})
    await client.start()
    try:
        (keys / "researcher.ready").touch()
        await client.wait_for_peers(1, 60.0)
        assert client.peers() == {"node"}, "the node did not connect"
        baseline = _peak_bytes()
        params = _params(mb)
        reply = await client.request("node", TrainReply(params=params, n_samples=1),
                                     timeout=300.0)
        assert reply.body.params.equal(params), "the model came back altered"  # type: ignore[attr-defined]
        del reply
        return {"baseline": baseline, "peak": _peak_bytes(), "model": params.nbytes}
    finally:
        await client.close()


async def _node(url: str, keys: Path) -> dict[str, int]:
    from fedcore.wire import codec
    from fedcore.wire.chunks import ChunkedTransport
    from fedcore.wire.identity import Identity
    from fedcore.wire.messages import TrainReply
    from fedcore.wire.signing import Guard

    researcher_key = (keys / "researcher.pub").read_bytes()
    link = ChunkedTransport(_transport(url, "node", "node"), Guard(
        Identity(keys / "node.key"), lambda: {"researcher": researcher_key}, networked=True,
        max_size=codec.DEFAULT_MAX_FRAME))
    await link.start()
    baseline = _peak_bytes()
    try:
        got = await link.deliver()
        assert got.error is None, got.error
        env = codec.decode(got.frame)
        params = env.body.params  # type: ignore[attr-defined]
        reply = env.reply(TrainReply(params=params, n_samples=1), sender="node")
        await link.send_parts(got.peer, codec.encode_parts(reply))
        # The researcher closes once it has the reply: wait for that, then report.
        while link.peers():
            await asyncio.sleep(0.05)
        return {"baseline": baseline, "peak": _peak_bytes(), "model": params.nbytes}
    finally:
        await link.close()


def _child(role: str, url: str, keys: Path, mb: int) -> int:
    out = (asyncio.run(_researcher(url, keys, mb)) if role == "researcher"
           else asyncio.run(_node(url, keys)))
    print(json.dumps(out), flush=True)
    return 0


def _keys(folder: Path) -> None:
    from fedcore.wire.identity import Identity

    for name in ("researcher", "node"):
        key = Identity(folder / f"{name}.key")
        (folder / f"{name}.pub").write_bytes(key.public_bytes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(url: str, folder: Path, mb: int) -> dict[str, dict[str, int]]:
    """Run the researcher and the node as two processes; their memory figures."""
    run = [sys.executable, __file__, "--child"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ready = folder / "researcher.ready"
    ready.unlink(missing_ok=True)
    researcher = subprocess.Popen([*run, "researcher", url, str(folder), str(mb)],
                                  stdout=subprocess.PIPE, env=env)
    import time

    deadline = time.monotonic() + 60
    while not ready.exists() and researcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the researcher listens (ws://) before the node dials
    node = subprocess.Popen([*run, "node", url, str(folder), str(mb)],
                            stdout=subprocess.PIPE, env=env)
    results = {}
    for name, proc in (("researcher", researcher), ("node", node)):
        stdout, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"the {name} process failed (exit {proc.returncode})")
        results[name] = json.loads(stdout.decode().strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1], argv[2], Path(argv[3]), int(argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="model size (MiB)")
    parser.add_argument("--transports", default="ws,mqtt")
    args = parser.parse_args(argv)
    rows: list[tuple[str, str, dict[str, int]]] = []
    with tempfile.TemporaryDirectory(prefix="fedcore-bench-memory-") as tmp:
        folder = Path(tmp)
        _keys(folder)
        for transport in args.transports.split(","):
            if transport == "ws":
                results = measure(f"ws://127.0.0.1:{_free_port()}", folder, args.mb)
            elif transport == "mqtt":
                if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
                    print("mqtt: skipped (Mosquitto is not installed)")
                    continue
                sys.path.insert(0, str(Path(__file__).parent))
                from mqtt_throughput import start_broker

                broker, port = start_broker(folder)
                try:
                    results = measure(f"mqtt://127.0.0.1:{port}/mem-{uuid.uuid4().hex[:8]}",
                                      folder, args.mb)
                finally:
                    broker.terminate()
                    broker.wait(5)
            else:
                parser.error(f"unknown transport {transport!r}")
            rows += [(transport, name, r) for name, r in results.items()]
    print(f"A model of {args.mb} MiB (M) sent to one node process and back; peak RSS per "
          "process (ru_maxrss)")
    print(f"{'':6} {'process':>10} {'baseline':>10} {'peak':>10} {'peak / M':>9} "
          f"{'added / M':>10}")
    ok = True
    for transport, name, r in rows:
        m = r["model"]
        ratio = r["peak"] / m
        print(f"{transport:6} {name:>10} {r['baseline'] / MIB:8.0f}Mi {r['peak'] / MIB:8.0f}Mi "
              f"{ratio:8.2f}x {(r['peak'] - r['baseline']) / m:9.2f}x")
        ok &= ratio <= TARGET
    print(f"target: peak <= {TARGET:.0f}x M per process on both ends: "
          f"{'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
