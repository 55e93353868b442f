"""Simulations past one core: nodes in worker processes, the researcher in this one."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from fedcore import Experiment, simulate
from fedcore.errors import ConfigurationError, RoundError

torch = pytest.importorskip("torch")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402
from fedcore_torch import TorchTrainingPlan  # noqa: E402


class Linear(TorchTrainingPlan):
    def init_model(self):
        torch.set_num_threads(1)  # the same float sums in every process that trains it
        return torch.nn.Linear(64, 10)

    def training_step(self, data, target):
        return torch.nn.functional.cross_entropy(self.model(data), target)


class Sgd(SklearnTrainingPlan):
    estimator = SGDClassifier


class DiesOnce(SklearnTrainingPlan):
    """Kills its own process the first time a node trains where DIE_FLAG names a file."""

    estimator = SGDClassifier

    def fit(self, dataset, seed):
        import os
        import signal

        flag = os.environ.get("DIE_FLAG")
        if flag:
            try:
                os.rename(flag, flag + ".taken")  # only one node, in one worker, takes it
            except OSError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().fit(dataset, seed)


def _digits(n=None):
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    return (X / 16.0)[:n], y[:n]


def _final(plan, fed, rounds=3, **kwargs):
    exp = Experiment(plan, tags=["digits"], federation=fed.url, round_limit=rounds,
                     progress=False, seed=1, **kwargs)
    exp.run()
    return exp


def test_a_node_may_hold_one_sample_and_trains_on_it():
    X, y = _digits(40)
    with simulate.from_arrays(X, y, n_nodes=40, tags=["digits"]) as fed:
        sizes = [n.datasets.list()[0]["metadata"]["n_samples"] for n in fed.nodes]
        assert sizes == [1] * 40
        exp = _final(Linear, fed, rounds=1, training_args={"batch_size": 4, "lr": 0.1})
    rows = exp.history
    assert len(rows) == 40 and (rows["n_samples"] == 1).all()
    assert "local_accuracy" not in rows or rows["local_accuracy"].isna().all()  # no test split
    with pytest.raises(ConfigurationError, match="lower n_nodes or min_samples"):
        simulate.from_arrays(X, y, n_nodes=40, tags=["digits"], min_samples=2)


@pytest.mark.parametrize("plan, args", [
    (Linear, {"training_args": {"batch_size": 8, "lr": 0.3}}),
    (Sgd, {"model_args": {"loss": "log_loss"}}),
], ids=["torch", "sklearn"])
def test_worker_processes_give_the_same_model_bit_for_bit(plan, args):
    X, y = _digits(600)
    with simulate.from_arrays(X, y, n_nodes=12, tags=["digits"], name="one") as fed:
        alone = _final(plan, fed, **args)
    with simulate.from_arrays(X, y, n_nodes=12, tags=["digits"], name="two",
                              workers=2) as fed:
        assert fed.nodes == [] and len(fed.node_ids) == 12
        sharded = _final(plan, fed, **args)
        trained = set(sharded.history["node"])
        assert trained == set(fed.node_ids)  # every node trained, in the workers
    assert sharded.parameters.equal(alone.parameters)
    cols = ["round", "node", "n_samples", "local_accuracy"]
    assert sharded.history[cols].equals(alone.history[cols])


def test_a_worker_that_dies_fails_its_nodes_at_once_and_says_why(tmp_path, monkeypatch):
    flag = tmp_path / "die"
    flag.write_text("")
    monkeypatch.setenv("DIE_FLAG", str(flag))  # the workers inherit it
    X, y = _digits(400)
    with simulate.from_arrays(X, y, n_nodes=8, tags=["digits"], workers=2) as fed:
        exp = Experiment(DiesOnce, tags=["digits"], federation=fed.url, progress=False,
                         model_args={"loss": "log_loss"}, timeout=3600.0)
        try:
            exp.run_once()  # would wait out the hour if the dead nodes were not noticed
        except RoundError as exc:  # every node of the round failed: fine too
            failures = str(exc)
        else:
            failed = exp.history[exp.history["error"].notna()] \
                if "error" in exp.history else exp.history.iloc[0:0]
            failures = " ".join(map(str, failed.get("error", [])))
        (label, why), = fed.lost.items()
        assert label.startswith("worker process") and "exited with code -9" in why
        assert "disconnected" in failures
        assert (tmp_path / "die.taken").exists()
        # the other worker's nodes keep serving
        exp.run_once()
    assert os.environ["DIE_FLAG"] == str(flag)


def _policies(pid: int | str) -> set[int]:
    """The scheduling policies of the threads of process ``pid`` (one that ends is left out)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(os.sched_getscheduler(int(tid)))
        except OSError:  # the thread ended meanwhile
            pass
    return out


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_worker_processes_run_as_batch_work_and_the_researcher_keeps_its_policy():
    import re

    X, y = _digits(40)
    mine = _policies("self")
    with simulate.from_arrays(X, y, n_nodes=4, tags=["digits"], workers=2) as fed:
        pids = [int(re.search(r"pid (\d+)", label).group(1)) for label in fed.shards]
        assert len(pids) == 2
        # every thread of each worker, those its imports started too
        assert [_policies(pid) for pid in pids] == [{os.SCHED_BATCH}] * 2
        exp = Experiment(Linear, tags=["digits"], federation=fed.url, progress=False,
                         training_args={"batch_size": 8})
        exp.run_once()  # the threads a round starts inherit it
        assert [_policies(pid) for pid in pids] == [{os.SCHED_BATCH}] * 2
        assert set(exp.history["status"]) == {"ok"} and len(exp.history) == 4
        assert _policies("self") == mine  # this process keeps the policies it had


def test_workers_are_checked():
    X, y = _digits(20)
    with pytest.raises(ConfigurationError, match="workers must be an integer >= 1"):
        simulate.from_arrays(X, y, n_nodes=2, tags=["t"], workers=0)
    with pytest.raises(ConfigurationError, match="engine must be one of"):
        simulate.from_arrays(X, y, n_nodes=2, tags=["t"], workers=2, engine="dask")
    with pytest.raises(ConfigurationError, match="ray_address is for engine='ray'"):
        simulate.from_arrays(X, y, n_nodes=2, tags=["t"], workers=2, ray_address="auto")
    with pytest.raises(ConfigurationError, match="plain arrays"):
        simulate.from_arrays(X, np.array([{"a": 1}] * 20), n_nodes=2, tags=["t"], workers=2)


def test_frames_from_a_pipe_reach_the_event_loop_in_order_one_wake_up_per_burst():
    import asyncio
    import threading

    from fedcore.simulate._shards import Handoff

    loop = asyncio.new_event_loop()
    taken: list[list[tuple[str, str, bytes]]] = []
    handoff = Handoff(loop, taken.append)

    def burst(first: int) -> None:  # a reader thread, while the loop is busy elsewhere
        for i in range(first, first + 500):
            handoff.put(("node-01", "researcher", str(i).encode()))

    try:
        for first in (0, 500):
            reader = threading.Thread(target=burst, args=(first,))
            reader.start()
            reader.join()
            loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert [len(batch) for batch in taken] == [500, 500]
    assert [int(frame) for batch in taken for _, _, frame in batch] == list(range(1000))


def test_nodes_are_dealt_to_shards_in_turn_in_the_order_a_round_sends():
    from fedcore.simulate._shards import shard_specs

    ids = [f"node-{i + 1:02d}" for i in range(12)]  # sorted: node-01 ... node-09, node-10 ...
    parts = [np.array([2 * i, 2 * i + 1]) for i in range(12)]
    specs = shard_specs("fed", None, ["t"], ids, [f"d{i}" for i in range(12)], parts, 2)
    dealt = [[n[0] for n in spec["nodes"]] for spec, _ in specs]
    assert dealt == [sorted(ids)[0::2], sorted(ids)[1::2]]
    for spec, index in specs:  # each node's rows are its own part of the data
        for node_id, _, lo, hi in spec["nodes"]:
            assert list(index[lo:hi]) == list(parts[ids.index(node_id)])


def test_a_shard_hands_its_nodes_a_chunk_at_a_time_and_answers_as_it_goes(monkeypatch):
    from fedcore import _runtime
    from fedcore.simulate import _shards
    from fedcore.wire import codec
    from fedcore.wire.messages import Envelope, Ping, Pong

    monkeypatch.setattr(_shards, "CHUNK", 2)
    fed = simulate.SimulatedFederation()
    for i in range(6):
        fed.add_node(f"node-{i + 1:02d}")
    answered: list[tuple[str, int]] = []  # (node, frames not yet handed to a node)
    host = None

    def emit(node: str, researcher: str, frame: bytes) -> None:
        assert researcher == "alice" and isinstance(codec.decode(frame).body, Pong)
        assert host is not None
        answered.append((node, len(host._pending)))

    host = _shards.ShardHost(fed, emit)
    try:
        frames = [codec.encode(Envelope(body=Ping(), sender="alice", recipient=node))
                  for node in host.node_ids]

        async def burst() -> None:  # on the loop, so that the six arrive as one burst
            for node, frame in zip(host.node_ids, frames, strict=True):
                host.push("alice", node, frame)

        _runtime.run(burst())
        for _ in range(200):
            if len(answered) == 6:
                break
            _runtime.run(asyncio.sleep(0.01))
    finally:
        host.close()
    assert sorted(n for n, _ in answered) == host.node_ids  # every node answered once
    # the first chunk's answers left while the last frames still waited in the shard
    assert answered[0][1] >= 2
