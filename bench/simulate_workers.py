"""Simulation past one core: ``from_arrays(..., workers=N)`` against ``workers=1``.

Workload C of issue #16 (as in ``bench/many_nodes.py``): a torch linear model 64 -> 10 on
scikit-learn's ``load_digits`` (80/20 split, the 80 dealt IID to the nodes), batch 32, SGD
lr 0.5, one local epoch per round. At 1000 nodes each node holds one or two samples, so a
round is mostly fedcore's per-node work (messages, checks, audit records), which is what
worker processes spread over the cores.

In one process, alternately (so drifting machine load hits both alike): the federation
with every node here (``workers=1``), and the same federation in N worker processes. The
script prints the median steady round (rounds 3+: round 1 carries a framework's first-call
costs in fresh processes), the ratio, and whether the final weights are bit-identical.
Target (issue #16): ``workers=2`` at least 1.6x faster than ``workers=1`` at 1000 nodes on
the 2-core machine.

Run: ``OMP_NUM_THREADS=1 python bench/simulate_workers.py`` (``--nodes``, ``--workers``,
``--rounds``, ``--repeats``; see ``--help``). ``OMP_NUM_THREADS`` is inherited by the
workers: the same thread count on both sides gives the same float sums.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fedcore
from fedcore_torch import TorchTrainingPlan

SEED = 0
TARGET = 1.6


class DigitsLinear(TorchTrainingPlan):
    """The plan the nodes run."""

    def init_model(self):
        return nn.Linear(64, 10)

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)


def run(X: Any, y: Any, n_nodes: int, workers: int, rounds: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with fedcore.simulate.from_arrays(X, y, n_nodes=n_nodes, tags=["digits"], seed=SEED,
                                      workers=workers) as fed:
        exp = fedcore.Experiment(
            DigitsLinear, tags=["digits"], federation=fed.url, seed=SEED,
            training_args={"epochs": 1, "batch_size": 32, "lr": 0.5}, round_limit=rounds,
            progress=False, test_ratio=0.0, evaluate_global=False, evaluate_local=False,
            connect_timeout=120.0)
        exp.search()
        setup = time.perf_counter() - t0
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            exp.run_once()
            times.append(time.perf_counter() - t)
        params = exp.parameters
        exp.close()
    return {"setup": setup, "steady": statistics.median(times[2:]), "params": params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run (>= 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    args = parser.parse_args(argv)
    X_all, y_all = load_digits(return_X_y=True)
    X, _, y, _ = train_test_split(X_all / 16.0, y_all, test_size=0.2, random_state=0,
                                  stratify=y_all)
    print(f"{args.nodes} nodes, workers=1 vs workers={args.workers}; torch "
          f"{torch.get_num_threads()} thread(s), {os.cpu_count()} cores, python "
          f"{sys.version.split()[0]}")
    runs: dict[int, list[dict[str, Any]]] = {1: [], args.workers: []}
    for i in range(args.repeats):
        order = [1, args.workers] if i % 2 == 0 else [args.workers, 1]
        for w in order:
            runs[w].append(run(X, y, args.nodes, w, args.rounds))
            print(f"  workers={w}: setup {runs[w][-1]['setup']:.1f} s, steady round "
                  f"{runs[w][-1]['steady']:.3f} s (load average {os.getloadavg()[0]:.1f})",
                  flush=True)
    one = statistics.median(r["steady"] for r in runs[1])
    many = statistics.median(r["steady"] for r in runs[args.workers])
    same = all(a["params"].equal(b["params"])
               for a, b in zip(runs[1], runs[args.workers], strict=True))
    ratio = one / many
    print(f"steady round, medians of {args.repeats}: workers=1 {one:.3f} s, "
          f"workers={args.workers} {many:.3f} s: {ratio:.2f}x faster (target >= {TARGET}x: "
          f"{'met' if ratio >= TARGET else 'NOT met'}); final weights bit-identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
