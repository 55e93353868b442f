"""What running plans in a worker process costs per round (docs: "What approval means").

One node on a loopback websocket URL (in this process, with its own home), the researcher in
this process, a small scikit-learn plan (``SGDClassifier`` on 4 features of a 200-row CSV,
1 epoch, evaluation off): the fixed cost of a round dominates, which is what isolation adds
to. For each ``plan_isolation`` (``none``: the node's training thread; ``process``: the
dataset's worker process, kept between rounds) it runs ``--warmup`` rounds (the first starts
the worker), then ``--rounds`` rounds, ``--runs`` times, and prints the median round time of
each run, the median of those medians, and the ratio process / none. The first round of a
worker (its start: Python, the backend's import, Landlock) is printed on its own.

Then, for ``process``, the node is stopped and started again on the same home (issue #16:
"the first round no slower than the frameworks' import time plus two steady rounds"). The
restarted node starts its worker ahead of time, which imports there what the rounds before
imported (the backend, its framework, the plan's libraries).
The first round is measured twice: right after the restart (the worker's start races the
round), and once the node has finished starting (its worker warm). Both are printed against
the frameworks' import time (``import fedcore_sklearn, sklearn.linear_model`` in a fresh
Python that imported fedcore, median of 3) plus two steady rounds.

Run: ``python bench/plan_isolation.py`` (``--rounds``, ``--runs``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import SGDClassifier

from fedcore import Experiment, Node
from fedcore.wire.identity import Identity
from fedcore_sklearn import SklearnTrainingPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests._support.net import free_port  # noqa: E402


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier


_IMPORT = ("import time, fedcore; t = time.perf_counter(); "
           "import fedcore_sklearn, sklearn.linear_model; print(time.perf_counter() - t)")


def _import_s() -> float:
    """Seconds to import the backend and its framework in a fresh Python (median of 3)."""
    return statistics.median(float(subprocess.run(
        [sys.executable, "-c", _IMPORT], capture_output=True, text=True, check=True).stdout)
        for _ in range(3))


def _warm(node: Node, timeout: float = 300.0) -> None:
    """Wait until the node's worker has started ahead of time and imported its modules."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = list(node._workers._workers.values())
        if workers and workers[0].warm:
            return
        time.sleep(0.05)
    raise RuntimeError("no worker started ahead of time")


def _restarts(node: Node, exp: Experiment, url: str) -> tuple[float, float]:
    """First round right after a restart, and once the restarted node's worker is warm."""
    out = []
    for wait in (False, True):
        node.stop()
        node = Node(node.home).start(url)
        if wait:
            _warm(node)
        t = time.perf_counter()
        exp.run_once()
        out.append(time.perf_counter() - t)
    node.stop()
    return out[0], out[1]


def _run(mode: str, root: Path, rounds: int, warmup: int,
         restarts: list[tuple[float, float]]) -> tuple[float, float]:
    """(first round's seconds, median seconds of the measured rounds) under ``mode``."""
    url = f"ws://127.0.0.1:{free_port()}"
    node = Node(root / f"home-{mode}-{time.monotonic_ns()}", node_id="site",
                approval_required=False)
    node.set_policy(plan_isolation=mode)
    node.trust("bench", Identity(os.environ["FEDCORE_IDENTITY"]).public_key)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(200, 4)), columns=list("abcd"))
    frame["label"] = (frame["a"] > 0).astype(int)
    frame.to_csv(root / "data.csv", index=False)
    node.datasets.add("cohort", ["bench"], root / "data.csv")
    node.start(url)
    exp = Experiment(Plan, tags=["bench"], federation=url, model_args={"target": "label"},
                     training_args={"epochs": 1}, progress=False, test_ratio=0.0,
                     enrolled={"site": node.identity.public_key})
    try:
        t = time.perf_counter()
        exp.run_once()
        first = time.perf_counter() - t
        for _ in range(warmup):
            exp.run_once()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            exp.run_once()
            times.append(time.perf_counter() - t)
        if mode == "process":
            restarts.append(_restarts(node, exp, url))
        return first, statistics.median(times)
    finally:
        exp.close()
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("FEDCORE_IDENTITY", str(root / "researcher.key"))
        results: dict[str, list[tuple[float, float]]] = {"none": [], "process": []}
        restarts: list[tuple[float, float]] = []
        imports = []
        for _ in range(args.runs):  # interleaved, so that load changes hit both alike
            for mode in results:
                results[mode].append(_run(mode, root, args.rounds, args.warmup, restarts))
            imports.append(_import_s())
    medians = {}
    for mode, runs in results.items():
        medians[mode] = statistics.median(m for _, m in runs)
        print(f"{mode:8s} round medians {[f'{m * 1e3:.1f}' for _, m in runs]} ms; median "
              f"{medians[mode] * 1e3:.1f} ms; first round (worker start) "
              f"{statistics.median(f for f, _ in runs) * 1e3:.0f} ms")
    extra = medians["process"] - medians["none"]
    print(f"process / none: {medians['process'] / medians['none']:.2f}x "
          f"({extra * 1e3:+.1f} ms per round)")
    target = statistics.median(imports) + 2 * medians["process"]
    print(f"framework import {statistics.median(imports) * 1e3:.0f} ms (runs "
          f"{[f'{i * 1e3:.0f}' for i in imports]}); target: import + 2 steady rounds = "
          f"{target * 1e3:.0f} ms")
    for i, what in enumerate(("right after the restart", "once the node had started")):
        first = statistics.median(r[i] for r in restarts)
        print(f"first round {what}: {[f'{r[i] * 1e3:.0f}' for r in restarts]} ms; median "
              f"{first * 1e3:.0f} ms = {first / target:.2f}x the target "
              f"({'met' if first <= target else 'missed'})")


if __name__ == "__main__":
    main()
