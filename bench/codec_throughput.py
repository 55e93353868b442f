"""Codec throughput: encoding and decoding a 100 MB ParameterSet.

Encoding is compared, in the same process, with numpy's ``tobytes()`` of the same arrays
(one copy of every byte into fresh memory: the ceiling for producing a frame as one
``bytes`` object). A copy into an already allocated buffer is shown too: the gap between the
two is the cost of faulting in fresh pages, which any encoder returning new bytes pays.
Decoding must not copy the arrays: the script checks that every decoded array shares memory
with the frame (``np.shares_memory``) and prints the decode time.

Run: ``python bench/codec_throughput.py`` (``--mb``, ``--repeats``; see ``--help``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _common import timed  # bench/ is on sys.path

from fedcore.params import ParameterSet
from fedcore.wire import codec
from fedcore.wire.messages import Envelope, TrainReply

TARGET_ENCODE_GBS = 2.0


def make_params(total_mb: int) -> ParameterSet:
    """A model-like set: a few large float32 matrices and many small vectors."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    big = total_mb * 1_000_000 // 4 // 20  # float32 values per large layer (20 of them)
    for i in range(20):
        arrays[f"layer{i}.weight"] = rng.standard_normal(big, dtype=np.float32).reshape(-1, 250)
        arrays[f"layer{i}.bias"] = rng.standard_normal(250, dtype=np.float32)
        arrays[f"layer{i}.num_batches_tracked"] = np.array(i, dtype=np.int64)
    return ParameterSet(arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="size of the set in MB (100)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (7)")
    args = parser.parse_args(argv)

    params = make_params(args.mb)
    nbytes = params.nbytes
    env = Envelope(TrainReply(params=params, n_samples=1000, timings={"total_s": 1.0}),
                   sender="node-01", recipient="researcher", experiment="bench", round=1)
    print(f"ParameterSet: {len(params)} arrays, {nbytes / 1e6:.1f} MB; "
          f"numpy {np.__version__}, python {sys.version.split()[0]}")

    def ceiling() -> list[bytes]:
        return [a.tobytes() for a in params.values()]

    reused = np.empty(nbytes, np.uint8)

    def memcpy() -> None:
        pos = 0
        for a in params.values():
            reused[pos:pos + a.nbytes] = a.reshape(-1).view(np.uint8)
            pos += a.nbytes

    t_ceiling, _ = timed(ceiling, args.repeats)
    t_memcpy, _ = timed(memcpy, args.repeats)
    t_encode, frame = timed(lambda: codec.encode(env), args.repeats)
    t_parts, _ = timed(lambda: codec.encode_parts(env), args.repeats)
    t_decode, decoded = timed(lambda: codec.decode(frame), args.repeats)

    got = decoded.body.params
    zero_copy = all(np.shares_memory(a, np.frombuffer(frame, np.uint8)) for a in got.values())
    exact = got.equal(params)
    read_only = not any(a.flags.writeable for a in got.values())

    def gbs(seconds: float) -> float:
        return nbytes / seconds / 1e9

    print(f"\nmedians of {args.repeats} runs (frame {len(frame) / 1e6:.1f} MB)")
    print(f"  numpy tobytes() (ceiling)   {t_ceiling * 1e3:8.1f} ms  {gbs(t_ceiling):6.2f} GB/s")
    print(f"  memcpy into a reused buffer {t_memcpy * 1e3:8.1f} ms  {gbs(t_memcpy):6.2f} GB/s  "
          "(no fresh pages: what allocation costs the two lines below)")
    print(f"  codec.encode -> bytes       {t_encode * 1e3:8.1f} ms  {gbs(t_encode):6.2f} GB/s  "
          f"({t_ceiling / t_encode:.0%} of the ceiling; target >= {TARGET_ENCODE_GBS} GB/s: "
          f"{'met' if gbs(t_encode) >= TARGET_ENCODE_GBS else 'NOT met'})")
    print(f"  codec.encode_parts (no join){t_parts * 1e3:8.2f} ms  (buffers for vectored I/O)")
    print(f"  codec.decode                {t_decode * 1e3:8.3f} ms  "
          f"(zero-copy: {zero_copy}; read-only views: {read_only}; values equal: {exact})")
    return 0 if zero_copy and exact else 1


if __name__ == "__main__":
    sys.exit(main())
