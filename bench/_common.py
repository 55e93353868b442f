"""Helpers the benchmark scripts share (they run as ``python bench/NAME.py``)."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.params import ParameterSet
from fedcore.testing.transport import wait_until
from fedcore.transport import Transport
from fedcore.wire import codec
from fedcore.wire.chunks import ChunkedTransport
from fedcore.wire.identity import Identity
from fedcore.wire.messages import TrainReply
from fedcore.wire.rpc import Client
from fedcore.wire.signing import Guard


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def layered_params(total_mb: int) -> ParameterSet:
    """Twenty float32 layers of equal size, ``total_mb`` MB in all."""
    rng = np.random.default_rng(0)
    per_layer = total_mb * 1_000_000 // 4 // 20
    return ParameterSet({f"layer{i}.weight": rng.standard_normal(per_layer, dtype=np.float32)
                         for i in range(20)})


async def echo_node(link: ChunkedTransport) -> None:
    """Answer every request with a TrainReply carrying the parameters it received.

    Frames go through the core's chunk layer and are verified and signed as on a deployed
    node (``link.guard``); the reply carries the received arrays, decoded without a copy.
    """
    while True:
        got = await link.deliver()
        assert got.error is None, got.error
        env = codec.decode(got.frame)
        reply = env.reply(TrainReply(params=env.body.params, n_samples=1),  # type: ignore[attr-defined]
                          sender=link.identity)
        await link.send_parts(got.peer, codec.encode_parts(reply))
        del got, env, reply  # answered: a node keeps nothing of a request it answered


async def round_trips(make: Callable[..., Transport], url: str, params: ParameterSet,
                      n_nodes: int, repeats: int, timeout: float = 60.0) -> list[float]:
    """Seconds per round of sending ``params`` to ``n_nodes`` echo nodes and back.

    ``make(url, role=..., identity=...)`` builds a transport; every frame is signed and
    verified as in a deployment, and every reply is checked.
    """
    keys = Path(tempfile.mkdtemp(prefix="fedcore-bench-keys-"))
    researcher = Identity(keys / "researcher.key")
    node_keys = {f"node-{i}": Identity(keys / f"node-{i}.key") for i in range(n_nodes)}
    trusts_researcher = {"researcher": researcher.public_bytes}
    client = Client(make(url, role="researcher", identity="researcher"), key=researcher,
                    enrolled={n: k.public_bytes for n, k in node_keys.items()})
    await client.start()
    nodes = [ChunkedTransport(make(url, role="node", identity=n), Guard(
        key, lambda: trusts_researcher, networked=True, max_size=codec.DEFAULT_MAX_FRAME))
        for n, key in node_keys.items()]
    for node in nodes:
        await node.start()
    echoes = [asyncio.create_task(echo_node(node)) for node in nodes]
    try:
        await wait_until(lambda: len(client.peers()) == n_nodes, "the nodes to connect")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            replies = await asyncio.gather(*(
                client.request(n.identity, TrainReply(params=params, n_samples=1),
                               timeout=timeout) for n in nodes))
            times.append(time.perf_counter() - start)
            assert all(r.body.params.equal(params) for r in replies)  # type: ignore[attr-defined]
            del replies  # checked: nothing of this round is kept while the next one runs
        return times
    finally:
        for task in echoes:
            task.cancel()
        for node in nodes:
            await node.close()
        await client.close()
        shutil.rmtree(keys, ignore_errors=True)
