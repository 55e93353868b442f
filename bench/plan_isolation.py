"""What running plans in a worker process costs per round (docs: "What approval means").

One node on a loopback websocket URL (in this process, with its own home), the researcher in
this process, a small scikit-learn plan (``SGDClassifier`` on 4 features of a 200-row CSV,
1 epoch, evaluation off): the fixed cost of a round dominates, which is what isolation adds
to. For each ``plan_isolation`` (``none``: the node's training thread; ``process``: the
dataset's worker process, kept between rounds) it runs ``--warmup`` rounds (the first starts
the worker), then ``--rounds`` rounds, ``--runs`` times, and prints the median round time of
each run, the median of those medians, and the ratio process / none. The first round of a
worker (its start: Python, the backend's import, Landlock) is printed on its own.

Run: ``python bench/plan_isolation.py`` (``--rounds``, ``--runs``).
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def _run(mode: str, root: Path, rounds: int, warmup: int) -> tuple[float, float]:
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
        for _ in range(args.runs):  # interleaved, so that load changes hit both alike
            for mode in results:
                results[mode].append(_run(mode, root, args.rounds, args.warmup))
    medians = {}
    for mode, runs in results.items():
        medians[mode] = statistics.median(m for _, m in runs)
        print(f"{mode:8s} round medians {[f'{m * 1e3:.1f}' for _, m in runs]} ms; median "
              f"{medians[mode] * 1e3:.1f} ms; first round (worker start) "
              f"{statistics.median(f for f, _ in runs) * 1e3:.0f} ms")
    extra = medians["process"] - medians["none"]
    print(f"process / none: {medians['process'] / medians['none']:.2f}x "
          f"({extra * 1e3:+.1f} ms per round)")


if __name__ == "__main__":
    main()
