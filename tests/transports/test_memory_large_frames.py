"""A 1 GiB ParameterSet crosses real websockets and comes back, with at most one extra copy
of it in memory on each side.

The researcher (``Client``) and the node (the core's node stack: chunk layer, signatures,
codec) run in two processes, so that each one's peak resident memory (``VmHWM``, the
high-water mark of its resident set) is its own. The researcher holds two float32 arrays
of 512 MiB (its baseline), sends them, and receives the node's reply carrying the same
arrays back: the reply's frame is its one extra copy. The node receives the frame (its one
copy: the decoded arrays are views of it) and answers with those very arrays, without
copying them.

The bound asserted on each side, above its baseline: one frame (1 GiB and its header) plus
256 MiB of slack. The slack covers what moves the frame, independent of its size: the
websocket inbox (4 messages of 16 MiB), websockets' read-ahead and the message it is
assembling, the chunks being hashed on worker threads, and the allocator's leftovers. Before
the core streamed chunks, the same exchange held three to four copies on each side (the
joined signed frame, websockets' fragments and their join, the transport's reassembly).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("websockets")

from fedcore.wire.identity import Identity  # noqa: E402
from tests._support.net import free_port  # noqa: E402

GIB = 1 << 30
SLACK = 256 << 20

_COMMON = """
import asyncio, json, resource, sys
from pathlib import Path
import numpy as np
from fedcore.wire import codec
from fedcore.wire.identity import Identity
from fedcore.wire.messages import TrainReply
from fedcore_transport.websocket import WebSocketTransport

def peak():
    # VmHWM starts afresh with this program; ru_maxrss keeps the parent's high-water mark
    # from before exec, which would hide this process's own growth.
    try:
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

url, keys = sys.argv[1], Path(sys.argv[2])
"""

_RESEARCHER = _COMMON + """
from fedcore.wire.rpc import Client
from fedcore.params import ParameterSet

async def main():
    n = 128 << 20  # 512 MiB of float32 per array
    params = ParameterSet({"ones": np.ones(n, np.float32),
                           "ramp": np.arange(n, dtype=np.float32)})
    client = Client(WebSocketTransport(url, role="researcher", identity="researcher"),
                    key=Identity(keys / "researcher.key"),
                    enrolled={"site": Identity(keys / "node.key").public_bytes})
    await client.start()
    await client.wait_for_peers(1, 60)
    base = peak()
    reply = await client.request("site", TrainReply(params=params, n_samples=1), timeout=600)
    top = peak()
    back, step = reply.body.params, 1 << 24
    same = all(np.array_equal(back[k][i:i + step], params[k][i:i + step])
               for k in params for i in range(0, n, step))
    await client.close()
    print(json.dumps({"base": base, "peak": top, "same": same}))

asyncio.run(main())
"""

_NODE = _COMMON + """
from fedcore.wire.chunks import ChunkedTransport
from fedcore.wire.signing import Guard

async def main():
    researcher = Identity(keys / "researcher.key").public_bytes
    guard = Guard(Identity(keys / "node.key"), lambda: {"researcher": researcher},
                  networked=True, max_size=codec.DEFAULT_MAX_FRAME)
    link = ChunkedTransport(WebSocketTransport(url, role="node", identity="site"), guard)
    await link.start()
    base = peak()
    got = await link.deliver()
    assert got.error is None, got.error
    env = codec.decode(got.frame)
    reply = env.reply(TrainReply(params=env.body.params, n_samples=1), sender="site")
    await link.send_parts(got.peer, codec.encode_parts(reply))
    top = peak()
    while link.peers():  # until the researcher has it all and leaves
        await asyncio.sleep(0.05)
    await link.close()
    print(json.dumps({"base": base, "peak": top}))

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_1_gib_parameter_set_crosses_with_at_most_one_extra_copy_per_side(tmp_path):
    Identity(tmp_path / "researcher.key")
    Identity(tmp_path / "node.key")
    url = f"ws://127.0.0.1:{free_port()}"
    args = [url, str(tmp_path)]
    node = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_NODE), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    researcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_RESEARCHER), *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r_out, r_err = researcher.communicate(timeout=600)
        n_out, n_err = node.communicate(timeout=60)
    finally:
        for proc in (node, researcher):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert researcher.returncode == 0, r_err[-3000:]
    assert node.returncode == 0, n_err[-3000:]
    r, n = json.loads(r_out.splitlines()[-1]), json.loads(n_out.splitlines()[-1])
    assert r["same"], "the arrays came back changed"
    frame = GIB + 4096
    for side, figures in (("researcher", r), ("node", n)):
        extra = figures["peak"] - figures["base"]
        assert extra <= frame + SLACK, (
            f"the {side} held {extra / GIB:.2f} GiB above its baseline; at most one frame "
            f"({frame / GIB:.2f} GiB) and {SLACK >> 20} MiB are allowed")
    Path(tmp_path / "figures.json").write_text(json.dumps({"researcher": r, "node": n}))
