"""Nodes stream their training loss to the researcher while a long round runs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedcore import Experiment, simulate

pytest.importorskip("torch")

from fedcore_torch import TorchTrainingPlan  # noqa: E402


class SlowMLP(TorchTrainingPlan):
    """Sleeps a little every step, as a bigger model on a bigger dataset would take time."""

    def init_model(self):
        import torch.nn as nn

        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, data, target):
        import time

        import torch.nn.functional as F

        time.sleep(0.03)
        return F.cross_entropy(self.model(data), target)


def test_a_long_round_reports_loss_and_progress_before_it_ends():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    with simulate.from_arrays(X, y, n_nodes=2, tags=["slow"]) as fed:
        exp = Experiment(SlowMLP, tags=["slow"], federation=fed.url, progress=False,
                         test_ratio=0.0, training_args={"epochs": 5, "batch_size": 10})
        assert exp.live.empty
        done: list = []
        # 50 steps of at least 30 ms per node: ~1.5 s of local training each, or more on a
        # busy machine. The researcher sees progress while the round still runs.
        worker = threading.Thread(target=lambda: done.append(exp.run_once()))
        worker.start()
        seen_during = None
        while worker.is_alive():
            live = exp.live
            if not live.empty and worker.is_alive():
                seen_during = live
                break
            time.sleep(0.02)
        worker.join()
        (rows,) = done
        live = exp.live.set_index("node")
    assert seen_during is not None, "no progress reached the researcher before the reply"
    assert (seen_during["step"] > 0).all() and (seen_during["fraction"] < 1).all()
    assert set(live.index) == set(rows["node"])
    assert (live["round"] == 1).all() and (live["step"].between(1, 50)).all()
    assert live["loss"].notna().all() and (live["loss"] > 0).all()
    assert ((live["fraction"] > 0) & (live["fraction"] <= 1)).all()
    assert (live["samples"] == live["step"] * 10).all()
