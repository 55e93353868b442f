"""Workload B: fedcore's per-round overhead on a small torch model, against a plain loop.

A torch MLP 64-256-256-10 on scikit-learn's ``load_digits`` (80/20 stratified split),
10 IID simulated nodes, 20 rounds of 1 local epoch, batch 32, SGD lr 0.05.

The same training is run twice in this process, alternately, several times:

- with fedcore: ``fedcore.simulate.from_arrays`` + ``Experiment.run_once`` per round;
- serially without fedcore: for each round, for each of the 10 shards, load the global
  weights into the model, train one epoch with the same batching and seeds, then average
  the state dicts weighted by sample count.

Both use the same shards, initial weights, per-node shuffling seeds and averaging in float64,
so they do the same arithmetic: the script checks that their final weights are bit-identical,
which shows the comparison is like for like. The difference in round time is fedcore's
overhead (messages, encoding, threads, bookkeeping).

Run: ``python bench/workload_b.py`` (``--repeats N``, ``--threads N``; see ``--help``).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fedcore
from fedcore_torch import TorchTrainingPlan

N_NODES = 10
ROUNDS = 20
EPOCHS = 1
BATCH = 32
LR = 0.05
SEED = 0
WARMUP_ROUNDS = 2  # rounds left out of the steady-state median

# Targets (see bench/README.md) and the reference measured with Flower 1.42 on this machine.
TARGET_OVERHEAD_S = 0.006
TARGET_RATIO = 1.3
FLOWER = {"steady_s": 0.205, "compute_s": 0.023, "total_s": 17.0, "serial_s": 4.2}


class DigitsMLP(TorchTrainingPlan):
    """The plan fedcore ships to the nodes."""

    def init_model(self):
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.2, random_state=0, stratify=y)


def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(X, dtype=torch.float32)).argmax(1).numpy()
    return float((pred == y).mean())


# --- fedcore ---------------------------------------------------------------------------------


def run_fedcore(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, *,
                evaluate: bool) -> dict[str, Any]:
    """One fedcore run; times the federation's setup and every round."""
    t0 = time.perf_counter()
    with fedcore.simulate.from_arrays(Xtr, ytr, n_nodes=N_NODES, tags=["digits"],
                                      seed=SEED) as fed:
        exp = fedcore.Experiment(
            DigitsMLP, tags=["digits"], federation=fed.url, seed=SEED,
            training_args={"epochs": EPOCHS, "batch_size": BATCH, "lr": LR},
            round_limit=ROUNDS, progress=False,
            test_ratio=0.2 if evaluate else 0.0,
            evaluate_global=evaluate, evaluate_local=evaluate,
        )
        exp.search()
        setup = time.perf_counter() - t0
        rounds, cpu = [], []
        for _ in range(ROUNDS):
            t, c = time.perf_counter(), _thread_cpu()
            exp.run_once()
            rounds.append(time.perf_counter() - t)
            cpu.append({k: v - c.get(k, 0.0) for k, v in _thread_cpu().items()})
        params = exp.parameters
        acc = accuracy(exp.trained_plan().model, Xte, yte)
        exp.close()
    return {"setup": setup, "rounds": rounds, "total": setup + sum(rounds), "params": params,
            "accuracy": acc, "cpu": cpu}


# The threads a simulated round runs on: this one (waiting in run_once), fedcore's event loop
# (messages, node admission, audit, folding) and the nodes' training thread.
_THREADS = {"MainThread": "main", "fedcore-runtime": "loop", "fedcore-sim": "training"}


def _thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by each of the round's threads, and by the process."""
    out = {"process": time.process_time()}
    for thread in threading.enumerate():
        role = next((r for prefix, r in _THREADS.items() if thread.name.startswith(prefix)),
                    None)
        if role is not None and thread.ident is not None and thread.is_alive():
            try:
                clock = time.pthread_getcpuclockid(thread.ident)
                out[role] = out.get(role, 0.0) + time.clock_gettime(clock)
            except (AttributeError, OSError):  # not on this platform, or the thread ended
                pass
    return out


# --- the same training without fedcore -------------------------------------------------------


def _seed(*parts: Any) -> int:
    # The per-node, per-round seed a fedcore node derives (sha256 of the parts).
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def serial_fedavg_round(model: Any, shards: list[tuple[str, Any, Any]],
                        global_state: dict[str, np.ndarray], rnd: int, *, lr: float, seed: int,
                        epochs: int = EPOCHS, batch: int = BATCH) -> dict[str, np.ndarray]:
    """One FedAvg round without fedcore: each shard trains from ``global_state`` in turn
    (seeded as a fedcore node seeds itself), then the states are averaged by sample count
    in float64. Shared by the benches that compare fedcore with a plain loop."""
    sums: dict[str, np.ndarray] = {}
    total = 0.0
    for node, X, y in shards:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in global_state.items()})
        generator = torch.Generator().manual_seed(_seed(seed, rnd, node))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=generator)
            for start in range(0, len(X), batch):
                idx = perm[start:start + batch]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                optimizer.step()
        weight = float(len(X))
        for k, v in model.state_dict().items():
            contrib = np.multiply(v.numpy(), weight, dtype=np.float64)
            if k in sums:
                sums[k] += contrib
            else:
                sums[k] = contrib
        total += weight
    return {k: (s / total).astype(global_state[k].dtype) for k, s in sums.items()}


def run_serial(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray
               ) -> dict[str, Any]:
    """The plain loop: one model, ten shards, weighted state-dict averaging."""
    t0 = time.perf_counter()
    # The IID partition fedcore.simulate deals: shuffle once, ten equal shares.
    order = np.random.default_rng(SEED).permutation(len(ytr))
    shards = []
    for i, idx in enumerate(np.array_split(order, N_NODES)):
        idx = np.sort(idx)
        shards.append((f"node-{i + 1:02d}", torch.as_tensor(Xtr[idx], dtype=torch.float32),
                       torch.as_tensor(ytr[idx], dtype=torch.int64)))
    torch.manual_seed(SEED)
    model = DigitsMLP({}, {}, {}).init_model()
    global_state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    setup = time.perf_counter() - t0
    rounds, cpu = [], []
    for rnd in range(1, ROUNDS + 1):
        t, c = time.perf_counter(), time.process_time()
        global_state = serial_fedavg_round(model, shards, global_state, rnd, lr=LR, seed=SEED)
        rounds.append(time.perf_counter() - t)
        cpu.append({"process": time.process_time() - c})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in global_state.items()})
    return {"setup": setup, "rounds": rounds, "total": setup + sum(rounds),
            "params": global_state, "accuracy": accuracy(model, Xte, yte), "cpu": cpu}


# --- report ----------------------------------------------------------------------------------


def steady(rounds: list[float]) -> float:
    return statistics.median(rounds[WARMUP_ROUNDS:])


def steady_cpu(run: dict[str, Any], key: str) -> float:
    """Median CPU seconds of ``key`` (a thread's role, or the process) per steady round."""
    return statistics.median(c.get(key, 0.0) for c in run["cpu"][WARMUP_ROUNDS:])


def same_weights(a: Any, b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternating fedcore/serial runs (default 5)")
    parser.add_argument("--eval-repeats", type=int, default=3,
                        help="fedcore runs with evaluation on (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides (default 1; 0 leaves "
                             "torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    Xtr, Xte, ytr, yte = load_data()
    print(f"Workload B: MLP 64-256-256-10 on digits ({len(ytr)} train / {len(yte)} test), "
          f"{N_NODES} IID nodes, {ROUNDS} rounds x {EPOCHS} epoch, batch {BATCH}, SGD lr {LR}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), "
          f"python {sys.version.split()[0]}")

    run_serial(Xtr, ytr, Xte, yte)  # warm-up: imports, allocator, first-call costs
    run_fedcore(Xtr, ytr, Xte, yte, evaluate=False)
    fed_runs, ser_runs = [], []
    for i in range(args.repeats):
        # Alternate which goes first so drifting machine load hits both alike.
        pair = [lambda: ser_runs.append(run_serial(Xtr, ytr, Xte, yte)),
                lambda: fed_runs.append(run_fedcore(Xtr, ytr, Xte, yte, evaluate=False))]
        for run in pair if i % 2 else reversed(pair):
            run()
    eval_runs = [run_fedcore(Xtr, ytr, Xte, yte, evaluate=True)
                 for _ in range(args.eval_repeats)]

    med = statistics.median
    f_steady = med(steady(r["rounds"]) for r in fed_runs)
    s_steady = med(steady(r["rounds"]) for r in ser_runs)
    f_first = med(r["rounds"][0] for r in fed_runs)
    f_rounds = med(sum(r["rounds"]) for r in fed_runs)
    s_rounds = med(sum(r["rounds"]) for r in ser_runs)
    f_setup = med(r["setup"] for r in fed_runs)
    f_total = med(r["total"] for r in fed_runs)
    s_total = med(r["total"] for r in ser_runs)
    overhead = f_steady - s_steady
    ratio = f_total / s_total
    identical = all(same_weights(f["params"], s["params"])
                    for f, s in zip(fed_runs, ser_runs, strict=True))

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"\nmedians of {args.repeats} alternating runs, evaluation off (test_ratio=0)")
    print(f"  {'':34}{'fedcore':>10}{'serial':>10}")
    print(f"  {'steady round (median, rounds 3+)':34}{f_steady:>9.4f}s{s_steady:>9.4f}s")
    print(f"  {'first round':34}{f_first:>9.4f}s")
    print(f"  {'20 rounds':34}{f_rounds:>9.3f}s{s_rounds:>9.3f}s")
    print(f"  {'setup (federation + search)':34}{f_setup:>9.3f}s")
    print(f"  {'whole run (setup + rounds)':34}{f_total:>9.3f}s{s_total:>9.3f}s")
    print(f"  steady-round overhead: {overhead * 1e3:.1f} ms "
          f"(target <= {TARGET_OVERHEAD_S * 1e3:.0f} ms: {verdict(overhead <= TARGET_OVERHEAD_S)})")
    print(f"  whole run / serial: {ratio:.2f}x "
          f"(target <= {TARGET_RATIO}x: {verdict(ratio <= TARGET_RATIO)}); "
          f"rounds only: {f_rounds / s_rounds:.2f}x")
    print(f"  final weights bit-identical to the serial loop: {identical}")
    f_cpu = med(steady_cpu(r, "process") for r in fed_runs)
    s_cpu = med(steady_cpu(r, "process") for r in ser_runs)
    threads = ", ".join(f"{role} {med(steady_cpu(r, role) for r in fed_runs) * 1e3:.1f}"
                        for role in ("loop", "training", "main"))
    print(f"  CPU per steady round: fedcore {f_cpu * 1e3:.1f} ms ({threads}), serial "
          f"{s_cpu * 1e3:.1f} ms: overhead {(f_cpu - s_cpu) * 1e3:.1f} ms of CPU (moves less "
          "with the load than the wall-clock figures)")
    print(f"  test accuracy: fedcore {med(r['accuracy'] for r in fed_runs):.4f}, "
          f"serial {med(r['accuracy'] for r in ser_runs):.4f}")
    if eval_runs:
        e_steady = med(steady(r["rounds"]) for r in eval_runs)
        e_total = med(r["total"] for r in eval_runs)
        print(f"\nfedcore with evaluation on (test_ratio=0.2, global + local), median of "
              f"{len(eval_runs)} runs")
        print(f"  steady round {e_steady:.4f}s, whole run {e_total:.3f}s "
              "(nodes train on 80% of their shard, so not comparable to the serial loop)")
    print(f"\nreference, Flower 1.42 on this machine: {FLOWER['steady_s']} s per steady round "
          f"against {FLOWER['compute_s']} s of compute; {FLOWER['total_s']:g} s total against "
          f"{FLOWER['serial_s']} s serial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
