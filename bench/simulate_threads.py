"""CPU per node-round of every thread of a simulation, in the parent and in its workers.

Workload C of issue #16 (the federation of ``bench/simulate_workers.py``), ``workers=N``
(1: every node in this process). Around each round it reads each thread's CPU time from
Linux's ``/proc/<pid>/task/<tid>/schedstat`` (this process's threads by name, the workers'
by pid), and prints the medians of rounds 3 and later per node-round: what each process and
thread costs, hence which one a change must relieve. Reading ``/proc`` happens outside the
timed rounds. Linux only.

Run: ``OMP_NUM_THREADS=1 python bench/simulate_threads.py --nodes 1000 --workers 2``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

from simulate_workers import SEED, DigitsLinear
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fedcore


def _cpu(pid: str) -> dict[str, float]:
    """CPU seconds of each thread of ``pid`` (``"self"``: this process), by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[tid] = int(f.read().split()[0]) / 1e9
        except OSError:  # the thread ended
            pass
    return out


def _children() -> list[str]:
    me, kids = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].split()[1] == me:
            kids.append(pid)
    return kids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="rounds (>= 3)")
    args = parser.parse_args(argv)
    X_all, y_all = load_digits(return_X_y=True)
    X, _, y, _ = train_test_split(X_all / 16.0, y_all, test_size=0.2, random_state=0,
                                  stratify=y_all)
    n = args.nodes
    per: dict[tuple[str, str], list[float]] = {}  # (process, thread) -> us per node-round
    walls = []
    with fedcore.simulate.from_arrays(X, y, n_nodes=n, tags=["digits"], seed=SEED,
                                      workers=args.workers) as fed:
        exp = fedcore.Experiment(
            DigitsLinear, tags=["digits"], federation=fed.url, seed=SEED,
            training_args={"epochs": 1, "batch_size": 32, "lr": 0.5},
            round_limit=args.rounds, progress=False, test_ratio=0.0, evaluate_global=False,
            evaluate_local=False, connect_timeout=120.0)
        exp.search()
        pids = ["self", *_children()]
        for r in range(args.rounds):
            before = {p: _cpu(p) for p in pids}
            t = time.perf_counter()
            exp.run_once()
            walls.append(time.perf_counter() - t)
            after = {p: _cpu(p) for p in pids}
            if r < 2:
                continue
            names = {str(t.native_id): t.name for t in threading.enumerate()}
            for p in pids:
                for tid, cpu in after[p].items():
                    name = names.get(tid, tid) if p == "self" else tid
                    spent = (cpu - before[p].get(tid, 0.0)) / n * 1e6
                    per.setdefault(("parent" if p == "self" else f"worker {p}", name),
                                   []).append(spent)
        exp.close()
    print(f"{n} nodes, workers={args.workers}, steady round {statistics.median(walls[2:]):.3f} s "
          f"(load average {os.getloadavg()[0]:.1f}); CPU per node-round, medians of rounds 3+:")
    totals: dict[str, float] = {}
    for (proc, name), values in sorted(per.items()):
        us = statistics.median(values)
        totals[proc] = totals.get(proc, 0.0) + us
        if us >= 0.5:
            print(f"  {proc:>14} {name:<24} {us:8.1f} us")
    for proc, us in totals.items():
        print(f"  {proc:>14} {'(all threads)':<24} {us:8.1f} us")
    print(f"  {'all processes':>14} {'':<24} {sum(totals.values()):8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
