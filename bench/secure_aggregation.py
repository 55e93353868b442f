"""Secure aggregation: what protecting and unprotecting a round costs against plain sums.

Ten nodes (``--nodes``) with models of 1M and 10M float32 parameters (``--sizes``, in ten
layers). For each scheme the script runs the protocol in memory, phase after phase, and
times the computation only (no transport, no codec):

- **per-node protect**: every node's ``protect``, run one after another here, divided by the
  number of nodes (on a real federation the nodes work in parallel: this is what each adds);
- **researcher**: ``add_protected`` of every payload plus unmasking and ``unprotect_sum``;
- **setup**: the key exchange and share phases of the whole round (sizes do not matter);
- **round compute**: all nodes' protect + researcher, against the plain scheme's.

``plain`` is the identity scheme (the researcher's float64 weighted sum, as FedAvg does).
Masking is also timed with 2 of the 10 nodes lost during training, so the researcher must
rebuild their mask keys and remove 2 x 8 pairwise masks (drop-out recovery), and in the
32-bit ring (``ring_bits=32``: half the keystream, additions and payload, a coarser step).
Joye-Libert costs one 4096-bit modular exponentiation per ciphertext (28 values) on each
node and on the researcher: it is measured at ``--jl-values`` values and extrapolated
linearly per ciphertext to the large sizes (a 1M-value round would take hours here); the
output says so. Its exponentiations run on every core (gmpy2 releases the GIL): the script prints
the per-exponentiation time on one thread and on the pool, and a node's protect after
masks precomputed during training (``prepare``): what is left once training ends.
Figures are medians of ``--repeats`` rounds in this process.

Run: ``python bench/secure_aggregation.py`` (~20 s; ``--help`` for options).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

import numpy as np

from fedcore.params import ParameterSet
from fedcore.secagg import (
    JoyeLibert,
    PairwiseMasking,
    PlainAggregation,
    SecureAggregation,
    open_node_session,
)
from fedcore.secagg import _bigint as B
from fedcore.secagg._crypto import apply_masks
from fedcore.secagg.local import open_sessions

TARGET_RATIO = 1.5


def make_updates(n_nodes: int, size: int) -> tuple[dict[str, ParameterSet], dict[str, float]]:
    rng = np.random.default_rng(0)
    per_layer = size // 10
    base = {f"layer{i}": rng.standard_normal(per_layer, dtype=np.float32) for i in range(10)}
    updates, weights = {}, {}
    for i in range(n_nodes):
        node = f"node-{i:02d}"
        # cheap distinct updates: the shared base scaled per node
        updates[node] = ParameterSet({k: v * np.float32(1 + i / 100) for k, v in base.items()})
        weights[node] = float(100 + i)
    return updates, weights


def one_round(scheme: SecureAggregation, updates: dict[str, ParameterSet],
              weights: dict[str, float], lost: tuple[str, ...] = ()) -> dict[str, Any]:
    """Seconds of each side for one round, and the bytes of one payload's arrays."""
    nodes = list(updates)
    start = time.perf_counter()
    r, sessions = open_sessions(scheme, nodes, weights_hint=weights, wire=False)
    setup_s = time.perf_counter() - start
    protect_s = researcher_s = 0.0
    payload_bytes = 0
    for node in r.participants:
        options = r.train_options(node)
        if node in lost:
            continue
        session = sessions.get(node) or open_node_session(node, options)
        t = time.perf_counter()
        payload = session.protect(updates[node], weights[node], options)
        t2 = time.perf_counter()
        r.add_protected(node, payload)
        researcher_s += time.perf_counter() - t2
        protect_s += t2 - t
        payload_bytes = sum(v.nbytes for v in payload.values() if isinstance(v, np.ndarray))
        payload_bytes += sum(p.nbytes for p in payload.values() if isinstance(p, ParameterSet))
        del payload
    requests = r.unmask_requests()
    replies = {n: sessions[n].answer("unmask", m) for n, m in requests.items()}
    t = time.perf_counter()
    for node, reply in replies.items():
        r.add_unmask(node, reply)
    result = r.unprotect_sum()
    researcher_s += time.perf_counter() - t
    expected = sum(weights[n] * np.asarray(updates[n]["layer0"], np.float64)
                   for n in nodes if n not in lost)
    bound = result.report.get("error_bound", {}).get("params", 0.0)  # the scheme's step
    assert np.allclose(result.sums["layer0"], expected, rtol=1e-9, atol=1e-6 + bound)
    n_protected = len(nodes) - len(lost)
    return {"setup": setup_s, "protect": protect_s / n_protected, "researcher": researcher_s,
            "round": protect_s + researcher_s, "bytes": payload_bytes, "report": result.report}


def median_rounds(scheme: SecureAggregation, updates: dict[str, ParameterSet],
                  weights: dict[str, float], repeats: int, lost: tuple[str, ...] = ()
                  ) -> dict[str, Any]:
    runs = [one_round(scheme, updates, weights, lost) for _ in range(repeats)]
    out = {k: statistics.median(r[k] for r in runs)
           for k in ("setup", "protect", "researcher", "round")}
    out["bytes"], out["report"] = runs[-1]["bytes"], runs[-1]["report"]
    return out


def jl_core_scaling(key_size: int, count: int = 32) -> tuple[float, float]:
    """Seconds per H(t)^sk mod N^2 exponentiation: one thread, then the pool (medians of 3)."""
    n2 = B.big(B.biprime(key_size)) ** 2
    rng = np.random.default_rng(0)
    bases = [B.big(int.from_bytes(rng.bytes(key_size // 4), "little")) % n2
             for _ in range(count)]
    sk = int.from_bytes(rng.bytes(key_size // 4), "little")
    one, pool = [], []
    for _ in range(3):
        t = time.perf_counter()
        [B.powmod_many([b], sk, n2) for b in bases]
        one.append((time.perf_counter() - t) / count)
        t = time.perf_counter()
        B.powmod_many(bases, sk, n2)
        pool.append((time.perf_counter() - t) / count)
    return statistics.median(one), statistics.median(pool)


def jl_after_training(scheme: JoyeLibert, updates: dict[str, ParameterSet],
                      weights: dict[str, float]) -> dict[str, float]:
    """One node's protect after ``prepare`` (its masks computed meanwhile): its timings."""
    nodes = list(updates)
    r, sessions = open_sessions(scheme, nodes, weights_hint=weights, wire=False)
    node = nodes[0]
    options = r.train_options(node)
    session = sessions[node]
    session.prepare(options, updates[node])  # training would run here
    session.protect(updates[node], weights[node], options)
    timings: dict[str, float] = getattr(session, "timings", {})
    return dict(timings)


def prg_speed() -> float:
    """GB/s of masking keystream added into a 64 MB vector (AES-128-CTR as uint64)."""
    vec = np.zeros(8 << 20, np.uint64)
    seeds = [(bytes([i]) * 16, 1) for i in range(4)]
    apply_masks(vec, seeds[:1])  # warm-up: fault the pages in
    times = []
    for _ in range(3):
        t = time.perf_counter()
        apply_masks(vec, seeds)
        times.append(time.perf_counter() - t)
    return 4 * vec.nbytes / statistics.median(times) / 1e9


def fmt(seconds: float) -> str:
    """Seconds in the unit that reads best."""
    if seconds < 10:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 600:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min"


def row(name: str, m: dict[str, Any], plain: dict[str, Any], size: int, note: str = "") -> str:
    per_m = m["protect"] / (size / 1e6)
    return (f"{name:<28} {fmt(m['protect']):>12} {fmt(per_m):>12} {fmt(m['researcher']):>12} "
            f"{fmt(m['round']):>10} {m['round'] / plain['round']:>9.1f}x "
            f"{m['bytes'] / 1e6:>7.1f} MB {fmt(m['setup']):>10}{note}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jl-values", type=int, default=557, help="values per node of the "
                    "measured Joye-Libert round (557 + 3 bookkeeping = 20 ciphertexts)")
    ap.add_argument("--jl-key-size", type=int, default=2048)
    args = ap.parse_args(argv)
    n = args.nodes
    lost = (f"node-{n - 1:02d}", f"node-{n - 2:02d}")
    print(f"masking PRG (AES-128-CTR keystream added as uint64): {prg_speed():.2f} GB/s")

    jl_scheme = JoyeLibert(key_size=args.jl_key_size, clip=8.0)
    jl_updates, jl_weights = make_updates(n, args.jl_values)
    jl = median_rounds(jl_scheme, jl_updates, jl_weights, 1)
    jl_ct = jl["report"]["ciphertexts"]
    per_ct_node, per_ct_res = jl["protect"] / jl_ct, jl["researcher"] / jl_ct
    print(f"Joye-Libert {args.jl_key_size}-bit, measured at {args.jl_values} values "
          f"({jl_ct} ciphertexts of {jl['report']['values_per_ciphertext']} values) on {n} "
          f"nodes: {per_ct_node * 1e3:.1f} ms per ciphertext per node, "
          f"{per_ct_res * 1e3:.1f} ms per ciphertext for the researcher "
          f"(integers: {jl['report']['bigint']}, {B.workers()} thread(s)); setup "
          f"{jl['setup']:.2f} s")
    one, pool = jl_core_scaling(args.jl_key_size)
    print(f"  one exponentiation mod N^2: {one * 1e3:.1f} ms on one thread, "
          f"{pool * 1e3:.1f} ms each on {B.workers()} thread(s) ({one / pool:.2f}x)")
    after = jl_after_training(jl_scheme, jl_updates, jl_weights)
    if "precompute_s" in after:
        left = (after["protect_s"] - after["wait_s"]) / jl_ct
        print(f"  with prepare (masks computed while the node trains, {after['precompute_s']:.2f}"
              f" s here): protect after training {left * 1e3:.2f} ms per ciphertext")

    header = (f"{'scheme':<28} {'protect/node':>12} {'per M params':>12} {'researcher':>12} "
              f"{'round':>10} {'vs plain':>10} {'payload':>10} {'setup':>10}")
    for size in args.sizes:
        updates, weights = make_updates(n, size)
        print(f"\n{n} nodes, {size:,} float32 parameters ({4 * size / 1e6:.0f} MB per node); "
              f"medians of {args.repeats} rounds; round = all nodes' protect (serial) + "
              "researcher")
        print(header)
        plain = median_rounds(PlainAggregation(), updates, weights, args.repeats)
        print(row("plain (float64 weighted sum)", plain, plain, size))
        masking = median_rounds(PairwiseMasking(clip=8.0), updates, weights, args.repeats)
        print(row("masking", masking, plain, size))
        dropped = median_rounds(PairwiseMasking(clip=8.0), updates, weights, args.repeats,
                                lost)
        print(row(f"masking, 2 of {n} dropped", dropped, plain, size))
        ring32 = median_rounds(PairwiseMasking(clip=8.0, ring_bits=32), updates, weights,
                               args.repeats)
        print(row("masking, 32-bit ring", ring32, plain, size,
                  f"  (step {ring32['report']['step']['params']:.1e})"))
        n_ct = math.ceil((size + 3) / jl["report"]["values_per_ciphertext"])
        est = {"protect": per_ct_node * n_ct, "researcher": per_ct_res * n_ct,
               "setup": jl["setup"], "bytes": n_ct * 2 * args.jl_key_size // 8}
        est["round"] = n * est["protect"] + est["researcher"]
        print(row("joye-libert (extrapolated)", est, plain, size, f"  ({n_ct:,} ciphertexts)"))
        extra_node = masking["protect"] - plain["protect"]
        extra_res = masking["researcher"] - plain["researcher"]
        recovery = dropped["researcher"] - masking["researcher"]
        print(f"masking adds {fmt(extra_node)} per node ({fmt(extra_node / (size / 1e6))} per "
              f"million parameters) and {fmt(extra_res)} on the researcher; recovering 2 "
              f"drop-outs costs the researcher {fmt(recovery)} more than a round without.")
        extra32 = ring32["protect"] + ring32["researcher"] - plain["researcher"]
        print(f"With nodes working in parallel, masking stays within the {TARGET_RATIO}x "
              f"target for any round whose plain time (training + transfer + aggregation) "
              f"is at least {(extra_node + extra_res) / (TARGET_RATIO - 1):.2f} s "
              f"({extra32 / (TARGET_RATIO - 1):.2f} s in the 32-bit ring).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
