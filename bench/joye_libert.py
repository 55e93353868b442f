"""Joye-Libert: what a packed round costs per parameter, and the 1M-parameter round at 10 nodes.

Ten nodes (``--nodes``) run whole Joye-Libert rounds in memory (every message through the
wire codec, no transport), 2048-bit modulus, on ``--values`` float32 parameters, with two
packings measured side by side in this run:

- **packed** (the default, ``value_bits=40``): 40-bit values in 48-bit slots, 42 per
  ciphertext;
- **64-bit values** (``value_bits=64``, the packing before): 72-bit slots, 28 per ciphertext.

A ciphertext costs one 4096-bit exponentiation on a node (its mask ``H(t)^sk_i``) and one on
the researcher (``H(t)^sk_0``) in the protocol before, whatever it carries, so one value per
ciphertext (the issue's "one ciphertext carries one value") cost two exponentiations per
value: the script derives it from the same measurement. The researcher now exponentiates
nothing (the round keys add up to 0): its share is multiplications. It also times a node's
``protect`` once its masks were computed by ``prepare`` (while it trains): what is left after
training.

The 1M-parameter, 10-node round is then **extrapolated per ciphertext** from these rounds
(the output says so), three ways: simulated on this machine (nodes one after another: 10 x
protect + researcher), on a federation (nodes in parallel: one protect + researcher), and on
a federation whose training hides the precomputation (what is left of protect + researcher).
``--full`` runs that 1M round for real once, in simulation (about 11 x 23,810
exponentiations: ~1 h on a quiet 2-core machine). Targets: at most 60 s, and 2x better per
parameter than Fed-BioMed (~30 min per round for a 60 MB model, 15M float32: 2 min per
million parameters, on its hardware).

Figures are medians of ``--repeats`` rounds (3 by default).
Run: ``python bench/joye_libert.py`` (~3 min on 2 quiet cores; ``--help`` for options).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from fedcore.params import ParameterSet
from fedcore.secagg import JoyeLibert
from fedcore.secagg import _bigint as B
from fedcore.secagg.local import open_sessions, run_round

TARGET_S = 60.0
FEDBIOMED_S_PER_M = 30 * 60 / 15.0  # ~30 min per round for 15M parameters


def updates_for(n_nodes: int, size: int) -> tuple[dict[str, ParameterSet], dict[str, float]]:
    rng = np.random.default_rng(0)
    updates, weights = {}, {}
    for i in range(n_nodes):
        updates[f"node-{i:02d}"] = ParameterSet(
            {"w": rng.standard_normal(size).astype(np.float32)})
        weights[f"node-{i:02d}"] = float(100 + i)
    return updates, weights


def one_round(scheme: JoyeLibert, updates: dict[str, ParameterSet],
              weights: dict[str, float]) -> dict[str, Any]:
    """Per-node protect (mean), researcher time, ciphertexts and values per ciphertext."""
    start = time.perf_counter()
    done = run_round(scheme, updates, weights, weights_hint=weights)
    total = time.perf_counter() - start
    report = done.result.report
    protect = statistics.mean(done.protect_s.values())
    researcher = sum(report["timings"].values())
    return {"protect": protect, "researcher": researcher, "total": total,
            "ct": report["ciphertexts"], "per_ct": report["values_per_ciphertext"]}


def after_training(scheme: JoyeLibert, updates: dict[str, ParameterSet],
                   weights: dict[str, float]) -> float:
    """Seconds of one node's protect left after ``prepare`` finished its masks."""
    nodes = list(updates)
    r, sessions = open_sessions(scheme, nodes, weights_hint=weights, wire=False)
    node, session = nodes[0], sessions[nodes[0]]
    options = r.train_options(node)
    session.prepare(options, updates[node])
    job = session._pre.job  # noqa: SLF001 - the bench waits for the training's stand-in
    if job is not None:
        job.result()
    start = time.perf_counter()
    session.protect(updates[node], weights[node], options)
    return time.perf_counter() - start


def fmt(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 600:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--values", type=int, default=1005, help="parameters of the measured "
                    "rounds (1005 + 3 bookkeeping = 24 ciphertexts packed)")
    ap.add_argument("--size", type=int, default=1_000_000, help="the extrapolated round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also run the --size round for real")
    args = ap.parse_args(argv)
    n = args.nodes
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n} nodes, 2048-bit modulus, integers: {B.backend()}, {B.workers()} thread(s) for "
          f"the exponentiations, {os.cpu_count()} CPU(s), load average {load:.1f}")
    updates, weights = updates_for(n, args.values)
    JoyeLibert(clip=8.0).researcher_session(1, list(updates))  # warm the pool and imports
    rows: dict[str, dict[str, Any]] = {}
    schemes = {"packed (40-bit values)": JoyeLibert(clip=8.0),
               "64-bit values (before)": JoyeLibert(clip=8.0, value_bits=64)}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in schemes}
    for _ in range(args.repeats):  # the packings take turns
        for name, scheme in schemes.items():
            runs[name].append(one_round(scheme, updates, weights))
    for name, rs in runs.items():
        rows[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    left = statistics.median(after_training(schemes["packed (40-bit values)"], updates, weights)
                             for _ in range(args.repeats))
    print(f"\nmeasured: {args.values:,} parameters per node, medians of {args.repeats} rounds")
    print(f"{'packing':<26} {'values/ct':>9} {'cts':>5} {'protect/node':>13} "
          f"{'researcher':>11} {'node ms/ct':>10} {'res. ms/ct':>10} {'node s per M':>13}")
    for name, m in rows.items():
        node_ct, res_ct = m["protect"] / m["ct"], m["researcher"] / m["ct"]
        print(f"{name:<26} {m['per_ct']:>9} {m['ct']:>5} {fmt(m['protect']):>13} "
              f"{fmt(m['researcher']):>11} {node_ct * 1e3:>10.1f} {res_ct * 1e3:>10.1f} "
              f"{node_ct * 1e6 / m['per_ct']:>13.0f}")
    packed = rows["packed (40-bit values)"]
    node_ct = packed["protect"] / packed["ct"]
    res_ct = packed["researcher"] / packed["ct"]
    unpacked = 2 * node_ct  # one exponentiation per value on the node and on the researcher
    print(f"{'one value per ciphertext':<26} {1:>9} {'':>5} {'':>13} {'':>11} "
          f"{node_ct * 1e3:>10.1f} {node_ct * 1e3:>10.1f} {node_ct * 1e6:>13.0f}  (derived: "
          "the researcher exponentiating too, as before)")
    per_param = {k: (m["protect"] + m["researcher"]) / args.values for k, m in rows.items()}
    now, wide = per_param["packed (40-bit values)"], per_param["64-bit values (before)"]
    print(f"per parameter (node + researcher): packed {now * 1e3:.2f} ms, 64-bit values "
          f"{wide * 1e3:.2f} ms ({wide / now:.2f}x), one value per ciphertext "
          f"{unpacked * 1e3:.1f} ms ({unpacked / now:.0f}x)")
    print(f"a node's protect after its masks were precomputed: {fmt(left)} "
          f"({left / packed['ct'] * 1e3:.2f} ms per ciphertext)")

    n_ct = -(-(args.size + 3) // packed["per_ct"])
    node, res = node_ct * n_ct, res_ct * n_ct
    after = left / packed["ct"] * n_ct
    m = args.size / 1e6
    print(f"\n{args.size:,} parameters, {n} nodes: {n_ct:,} ciphertexts per node "
          "(EXTRAPOLATED per ciphertext from the rounds above)")
    for what, seconds in (("simulated here (nodes one after another)", n * node + res),
                          ("federation (nodes in parallel)", node + res),
                          ("federation, masks precomputed during training", after + res)):
        verdict = "meets" if seconds <= TARGET_S else "misses"
        print(f"  {what:<48} {fmt(seconds):>9}  {verdict} the {TARGET_S:.0f} s target; "
              f"{FEDBIOMED_S_PER_M * m / seconds:.2f}x Fed-BioMed's speed per parameter "
              f"(target 2x)")
    print(f"  (the last holds when each node trains at least as long as its precomputation, "
          f"{fmt(node)} here on {B.workers()} thread(s); nodes with more cores shorten it)")
    if args.full:
        big, big_w = updates_for(n, args.size)
        start = time.perf_counter()
        r = one_round(JoyeLibert(clip=8.0), big, big_w)
        print(f"  MEASURED once: simulated round {fmt(time.perf_counter() - start)} "
              f"(protect {fmt(r['protect'])} per node, researcher {fmt(r['researcher'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
