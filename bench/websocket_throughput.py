"""Websocket throughput: a 100 MB ParameterSet sent to 3 nodes and collected back.

Two paths move the same bytes over loopback, on one event loop in one process:

- ``fedcore``: the researcher's ``Client.request`` (encode, correlate) over
  ``WebSocketTransport`` to 3 node endpoints, each decoding the request and answering with
  a ``TrainReply`` carrying the same parameters, decoded again by the researcher. Every
  frame goes through the core's chunk layer as in a deployment: chunks of 16 MiB (websocket
  messages written as 1 MiB fragments), each signed by its sender and verified by its
  receiver, reassembled into one buffer and decoded without a copy;
- ``raw``: ``websockets`` alone (``compression=None``, ``max_size`` raised), the server sending
  one prebuilt frame of the same size to 3 clients that echo it back, as one websocket frame
  (what ``ws.send(frame)`` does) and as 1 MiB fragments of one message. No signature, no
  encoding, no reassembly.

Effective MB/s counts every byte of parameters moved: 2 directions x nodes x size / seconds.
The paths alternate (``--pairs`` runs of ``--repeats`` rounds each, in turn raw first and
fedcore first), so that the machine's load and each run's aftermath weigh on both alike;
the process CPU seconds per round are printed too, a figure the load moves less than wall
time.
Run: ``python bench/websocket_throughput.py`` (``--mb``, ``--nodes``, ``--repeats``,
``--pairs``, ``--one-frame``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from _common import layered_params, round_trips  # noqa: E402 - bench/ is on sys.path
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from fedcore.testing.transport import wait_until
from fedcore.wire import codec
from fedcore.wire.messages import Envelope, TrainReply
from fedcore_transport.websocket import WebSocketTransport

TARGET_MBS = 400.0
RATIO_TARGET = 0.9  # fedcore's MB/s over raw websockets' with the same fragments
OPTIONS = {"compression": None, "max_size": codec.DEFAULT_MAX_FRAME}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def raw_path(frame: bytes, n_nodes: int, repeats: int, fragment: int = 0
                   ) -> list[float]:
    port = free_port()
    conns: list[ServerConnection] = []

    def pieces(data: bytes) -> Any:
        if not fragment:
            return data
        view = memoryview(data)
        return (view[i:i + fragment] for i in range(0, len(view), fragment))

    async def handler(ws: ServerConnection) -> None:
        conns.append(ws)
        await ws.wait_closed()

    async def echo(i: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}", proxy=None, **OPTIONS) as ws:  # type: ignore[arg-type]
            async for message in ws:
                await ws.send(pieces(message))  # type: ignore[arg-type]

    async with serve(handler, "127.0.0.1", port, **OPTIONS):  # type: ignore[arg-type]
        clients = [asyncio.create_task(echo(i)) for i in range(n_nodes)]
        await wait_until(lambda: len(conns) == n_nodes, "the clients to connect")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            await asyncio.gather(*(ws.send(pieces(frame)) for ws in conns))
            back = await asyncio.gather(*(ws.recv() for ws in conns))
            times.append(time.perf_counter() - start)
            assert all(len(b) == len(frame) for b in back)
        for task in clients:
            task.cancel()
        return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="size of the parameters (MB)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per run")
    parser.add_argument("--pairs", type=int, default=4,
                        help="alternating runs of each path (raw first, then fedcore first, ...)")
    parser.add_argument("--one-frame", action="store_true",
                        help="also time raw websockets sending one huge websocket frame")
    args = parser.parse_args(argv)
    params = layered_params(args.mb)
    frame = codec.encode(Envelope(TrainReply(params=params, n_samples=1), sender="r"))
    moved_mb = 2 * args.nodes * params.nbytes / 1e6
    print(f"{params.nbytes / 1e6:.0f} MB of parameters to {args.nodes} nodes and back "
          f"({moved_mb:.0f} MB moved); {args.pairs} alternating pairs of {args.repeats} "
          "rounds, medians")
    paths: dict[str, Callable[[], Coroutine[Any, Any, list[float]]]] = {
        "raw, fragments": lambda: raw_path(frame, args.nodes, args.repeats, fragment=1 << 20),
        "fedcore ws://": lambda: round_trips(
            WebSocketTransport, f"ws://127.0.0.1:{free_port()}", params, args.nodes,
            args.repeats),
    }
    if args.one_frame:
        paths["raw, one frame"] = lambda: raw_path(frame, args.nodes, args.repeats)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    load_before = os.getloadavg()[0]
    order = list(paths.items())
    for _ in range(args.pairs):  # alternate, so that the machine's load hits both alike
        # ... in both orders (raw, fedcore, fedcore, raw, ...): a run right after the other
        # path paid up to 0.5 s more system time per round (see bench/README.md)
        for name, run in order:
            before = _cpu()
            times = asyncio.run(run())
            seconds[name] += times
            cpu[name].append((_cpu() - before) / len(times))
        order.reverse()
    results = {}
    for name in paths:
        median = statistics.median(seconds[name])
        results[name] = moved_mb / median
        print(f"  {name:15s} {median:7.3f} s  {results[name]:7.0f} MB/s   "
              f"(process CPU ~{statistics.median(cpu[name]):.2f} s per round)")
    ok = results["fedcore ws://"] >= TARGET_MBS
    ratio = results["fedcore ws://"] / results["raw, fragments"]
    print(f"fedcore / raw with the same fragments: {ratio:.2f} (issue 16: >= {RATIO_TARGET}); "
          f"target >= {TARGET_MBS:.0f} MB/s: {'met' if ok else 'NOT met'}; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    return 0 if ok else 1


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
