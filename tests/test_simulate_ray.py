"""Simulations past one machine: node shards as Ray actors on a local two-node cluster.

Needs the ``ray`` extra (the test command installs it); skipped where Ray is missing. The
cluster is real: a head and a second node, each a ``ray start --block`` process of its own
(stopped by their process ids at the end), joined over the host's address (Ray binds to the
interface address even when asked for loopback, so the test reads what the head took).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

import fedcore  # noqa: E402
from fedcore import Experiment, simulate  # noqa: E402
from fedcore_torch import TorchTrainingPlan  # noqa: E402

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 300.0


class Linear(TorchTrainingPlan):
    def init_model(self):
        torch.set_num_threads(1)  # the same float sums in every process that trains it
        return torch.nn.Linear(64, 10)

    def training_step(self, data, target):
        return torch.nn.functional.cross_entropy(self.model(data), target)


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out


def _wait_for(lines: queue.Queue[str], pattern: str, proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if m := re.search(pattern, line):
            return m.group(1)
    raise AssertionError(f"ray start did not print {pattern!r}:\n{''.join(seen[-30:])}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()  # `ray start --block` stops the daemons it started
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node (one CPU each, so two actors land one on each)."""
    env = dict(os.environ)
    src = str(Path(fedcore.__file__).resolve().parents[1])  # the actors import this fedcore
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths are limited
    common = ["--block", "--num-cpus=1", "--object-store-memory=100000000",
              "--disable-usage-stats"]
    procs = []
    try:
        head = subprocess.Popen([RAY, "start", "--head", "--port=0", f"--temp-dir={temp}",
                                 "--include-dashboard=false", *common], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(head)
        address = _wait_for(_lines(head), r"ray start --address='([^']+)'", head)
        second = subprocess.Popen([RAY, "start", f"--address={address}", *common], env=env,
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(second)
        _wait_for(_lines(second), r"(Ray runtime started)", second)
        ray.init(address=address, include_dashboard=False, configure_logging=False)
        deadline = time.monotonic() + START_TIMEOUT_S
        while sum(n["Alive"] for n in ray.nodes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert sum(n["Alive"] for n in ray.nodes()) == 2
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            _stop(proc)


def test_a_thousand_nodes_on_two_ray_nodes_train_the_in_process_model(cluster):
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    X = X / 16.0
    args = {"training_args": {"batch_size": 8, "lr": 0.3}, "round_limit": 2, "seed": 3,
            "progress": False, "connect_timeout": 120.0}
    with simulate.from_arrays(X, y, n_nodes=1000, tags=["digits"], name="digits") as fed:
        alone = Experiment(Linear, tags=["digits"], federation=fed.url, **args)
        alone.run()
    with simulate.from_arrays(X, y, n_nodes=1000, tags=["digits"], name="digits", workers=2,
                              engine="ray", ray_address=cluster) as fed:
        assert len(fed.node_ids) == 1000 and fed.nodes == []
        on_ray = Experiment(Linear, tags=["digits"], federation=fed.url, **args)
        on_ray.run()
        shards = fed.shards
    assert len(set(on_ray.history["node"])) == 1000  # every node trained, in both rounds
    assert on_ray.parameters.equal(alone.parameters)
    assert on_ray.history["n_samples"].sum() == alone.history["n_samples"].sum()
    ray_nodes = {re.search(r"Ray node (\w+)", label).group(1) for label in shards}
    assert len(ray_nodes) == 2  # one actor on each node of the cluster
