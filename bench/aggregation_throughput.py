"""Aggregation throughput: every aggregator against plain numpy doing the same arithmetic.

N nodes each send a float32 model of P values (4 layers); one round (``start``, ``add`` per
node, ``result``) is timed for each aggregator, next to a numpy baseline run in the same
process on the same arrays:

- streaming aggregators (fedavg, fedadam, fedyogi, fedadagrad, fedavgm): a float64 running
  sum ``acc += w * u`` through one preallocated model-sized buffer, then the server step as
  plain numpy expressions on float64 state;
- median: ``np.median(np.stack(updates), axis=0)``; trimmed-mean: ``np.sort`` of the stack,
  mean of the kept rows; krum: the updates minus the global model stacked in float64, one
  Gram matrix ``X @ X.T``, distances, scores, the mean of the selected rows.

It prints the medians of several rounds: GB/s (update bytes folded per second), the ratio to
the baseline, and the peak memory numpy allocated on top of the inputs (``tracemalloc``), as
a multiple of one model. Target: streaming aggregators >= 0.8x their baseline, with a peak
that does not grow with N.

Run: ``python bench/aggregation_throughput.py`` (~40 s; ``--params 10000000 --nodes 100`` for
the issue's size; see ``--help``).
"""

from __future__ import annotations

import os

# Krum's Gram matrix (both sides) is the only BLAS call. On two cores shared with other work a
# second BLAS thread made it 3 to 40 times slower, erratically, so BLAS gets one thread unless
# the environment says otherwise (e.g. OPENBLAS_NUM_THREADS=2). Set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from fedcore import plugins  # noqa: E402
from fedcore.params import ParameterSet  # noqa: E402

STREAMING = ["fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm"]
ROBUST = ["median", "trimmed-mean", "krum"]
TARGET_RATIO = 0.8
# Server-optimizer settings shared by the aggregators and the baseline.
ETA, B1, B2, TAU, BETA = 1e-2, 0.9, 0.99, 1e-3, 0.9
TRIM_BETA, KRUM_F = 0.1, 1


def make_round(n_params: int, n_updates: int, seed: int = 0
               ) -> tuple[ParameterSet, list[ParameterSet]]:
    """A global float32 model of four layers and ``n_updates`` distinct read-only updates."""
    rng = np.random.default_rng(seed)
    sizes = [n_params // 4] * 3 + [n_params - 3 * (n_params // 4)]
    x = ParameterSet({f"layer{i}": rng.standard_normal(s, dtype=np.float32)
                      for i, s in enumerate(sizes)})
    updates = []
    for _ in range(n_updates):
        u = {}
        for k, a in x.items():
            v = rng.standard_normal(a.size, dtype=np.float32)
            v *= 0.01
            v += a
            v.flags.writeable = False  # as decoded from the wire
            u[k] = v
        updates.append(ParameterSet(u))
    return x, updates


# --- numpy baselines -----------------------------------------------------------------------

def _server_step(kind: str, x: np.ndarray, avg: np.ndarray, state: dict[str, np.ndarray]
                 ) -> np.ndarray:
    if kind == "fedavg":
        return avg.astype(np.float32)
    d = avg - x
    if kind == "fedavgm":
        state["m"] = BETA * state["m"] + d
        return (x + ETA * state["m"]).astype(np.float32)
    b1 = 0.0 if kind == "fedadagrad" else B1
    m = state["m"] = b1 * state["m"] + (1 - b1) * d
    v = state["v"]
    if kind == "fedadam":
        v = B2 * v + (1 - B2) * d * d
    elif kind == "fedyogi":
        v = v - (1 - B2) * d * d * np.sign(v - d * d)
    else:
        v = v + d * d
    state["v"] = v
    return (x + ETA * m / (np.sqrt(v) + TAU)).astype(np.float32)


def streaming_baseline(kind: str) -> Callable[..., dict[str, np.ndarray]]:
    state: dict[str, dict[str, np.ndarray]] = {}

    def run(x: ParameterSet, updates: list[ParameterSet], weights: list[float]
            ) -> dict[str, np.ndarray]:
        acc = {k: np.zeros(a.size) for k, a in x.items()}
        tmp = np.empty(max(a.size for a in x.values()))
        for u, w in zip(updates, weights, strict=True):
            for k, a in u.items():
                t = tmp[:a.size]
                np.multiply(a, w, out=t, dtype=np.float64)
                acc[k] += t
        total = sum(weights)
        out = {}
        for k, a in x.items():
            s = state.setdefault(k, {"m": np.zeros(a.size), "v": np.full(a.size, TAU ** 2)})
            out[k] = _server_step(kind, a, acc[k] / total, s)
        return out

    return run


def median_baseline(x: ParameterSet, updates: list[ParameterSet], weights: list[float]
                    ) -> dict[str, np.ndarray]:
    return {k: np.median(np.stack([u[k] for u in updates]), axis=0) for k in x}


def trimmed_baseline(x: ParameterSet, updates: list[ParameterSet], weights: list[float]
                     ) -> dict[str, np.ndarray]:
    n = len(updates)
    k_trim = math.floor(TRIM_BETA * n + 1e-9)
    return {k: np.sort(np.stack([u[k] for u in updates]), axis=0)[k_trim:n - k_trim]
            .mean(axis=0, dtype=np.float64).astype(np.float32) for k in x}


def krum_baseline(x: ParameterSet, updates: list[ParameterSet], weights: list[float]
                  ) -> dict[str, np.ndarray]:
    n = len(updates)
    centre = np.concatenate(list(x.values()))
    flat = np.empty((n, centre.size))
    for i, u in enumerate(updates):
        np.concatenate(list(u.values()), out=flat[i])
    flat -= centre
    gram = flat @ flat.T
    sq = np.diag(gram)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0)
    np.fill_diagonal(d2, np.inf)
    scores = np.sort(d2, axis=1)[:, :n - KRUM_F - 2].sum(axis=1)
    best = int(np.argmin(scores))
    return {k: np.array(updates[best][k]) for k in x}


def baseline_for(name: str) -> Callable[..., dict[str, np.ndarray]]:
    if name in STREAMING:
        return streaming_baseline(name)
    return {"median": median_baseline, "trimmed-mean": trimmed_baseline,
            "krum": krum_baseline}[name]


def make_aggregator(name: str) -> Any:
    cls = plugins.load("aggregators", name)
    kwargs: dict[str, Any] = {
        "fedadam": {"eta": ETA, "b1": B1, "b2": B2, "tau": TAU},
        "fedyogi": {"eta": ETA, "b1": B1, "b2": B2, "tau": TAU},
        "fedadagrad": {"eta": ETA, "b1": 0.0, "tau": TAU},
        "fedavgm": {"eta": ETA, "beta": BETA},
        "trimmed-mean": {"beta": TRIM_BETA},
        "krum": {"f": KRUM_F},
    }.get(name, {})
    return cls(**kwargs)


def aggregator_round(agg: Any) -> Callable[..., ParameterSet]:
    def run(x: ParameterSet, updates: list[ParameterSet], weights: list[float]) -> ParameterSet:
        agg.start(x, 1)
        for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
            agg.add(u, w, f"node-{i:03d}")
        return agg.result()

    return run


# --- measuring -----------------------------------------------------------------------------

def paired_medians(a: Callable[[], Any], b: Callable[[], Any], repeats: int
                   ) -> tuple[float, float, Any, Any]:
    """Median seconds of ``a`` and of ``b``, timed alternately (so a change in the machine's
    load hits both), and their last results."""
    outs: list[Any] = [None, None]
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1]), outs[0], outs[1]


def peak_extra(fn: Callable[[], Any]) -> int:
    """Peak bytes numpy allocated during one call, on top of what existed before it."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000,
                        help="float32 values per model (1000000)")
    parser.add_argument("--nodes", type=int, default=100, help="updates per round (100)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds per figure, streaming aggregators (5)")
    parser.add_argument("--robust-repeats", type=int, default=3,
                        help="timed rounds per figure, robust aggregators (3)")
    parser.add_argument("--pool-mb", type=float, default=1000.0,
                        help="distinct updates the streaming runs cycle through, in MB (1000)")
    parser.add_argument("--only", nargs="*", choices=STREAMING + ROBUST,
                        help="aggregators to run (all)")
    args = parser.parse_args(argv)
    names = args.only or STREAMING + ROBUST
    model_bytes = args.params * 4
    n = args.nodes
    robust = [a for a in names if a in ROBUST]
    # Streaming aggregators fold one update at a time: a pool of distinct updates, cycled
    # (and larger than the CPU caches), stands for N arriving ones. Robust ones hold all N.
    pool = n if robust else max(2, min(n, int(args.pool_mb * 1e6 // model_bytes)))
    held = pool * model_bytes
    if robust and held > 2e9:
        print(f"warning: the robust aggregators hold all {n} updates: {held / 1e9:.1f} GB of "
              "inputs, plus their numpy baselines' stacked copies (krum's in float64).",
              file=sys.stderr)
    x, updates = make_round(args.params, pool)
    rng = np.random.default_rng(1)
    weights = [float(w) for w in rng.integers(50, 500, n)]
    round_updates = [updates[i % pool] for i in range(n)]
    nbytes = n * model_bytes

    print(f"{n} nodes x {args.params:,} float32 params ({model_bytes / 1e6:.0f} MB a model, "
          f"{nbytes / 1e9:.2f} GB a round; {pool} distinct updates); numpy {np.__version__}, "
          f"python {sys.version.split()[0]}; medians of {args.repeats} rounds "
          f"({args.robust_repeats} for robust ones), timed alternately with numpy's; "
          f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}")
    header = (f"{'aggregator':<13} {'fedcore':>9} {'numpy':>9} {'ratio':>6}   "
              f"{'peak extra (models)':>20}")
    print(header)
    print(f"{'':<13} {'GB/s':>9} {'GB/s':>9} {'':>6}   {'fedcore':>9} {'numpy':>10}")
    failed = []
    for name in names:
        agg_fn, base_fn = aggregator_round(make_aggregator(name)), baseline_for(name)
        # The first round of each side, on fresh state, measures memory and warms up.
        mem_agg = peak_extra(lambda f=agg_fn: f(x, round_updates, weights))
        mem_base = peak_extra(lambda f=base_fn: f(x, round_updates, weights))
        t_agg, t_base, got, want = paired_medians(
            lambda f=agg_fn: f(x, round_updates, weights),
            lambda f=base_fn: f(x, round_updates, weights),
            args.repeats if name in STREAMING else args.robust_repeats)
        for k in x:  # both sides computed the same model
            if not np.allclose(got[k], want[k], rtol=1e-5, atol=1e-6):
                failed.append(f"{name}: result differs from numpy in {k}")
                break
        ratio = t_base / t_agg
        print(f"{name:<13} {nbytes / t_agg / 1e9:9.2f} {nbytes / t_base / 1e9:9.2f} "
              f"{ratio:5.2f}x   {mem_agg / model_bytes:8.1f}x {mem_base / model_bytes:9.1f}x")
        if name in STREAMING and ratio < TARGET_RATIO:
            failed.append(f"{name}: {ratio:.2f}x the numpy baseline (target >= "
                          f"{TARGET_RATIO}x)")
    print(f"\ntarget: streaming aggregators >= {TARGET_RATIO}x numpy, peak memory O(model)")
    for line in failed:
        print(f"MISSED: {line}")
    if not failed:
        print("met")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
