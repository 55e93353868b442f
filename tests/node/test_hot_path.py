"""The simulation hot path keeps its promises: records before replies, other writers seen."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fedcore import Experiment, simulate
from fedcore.errors import ConfigurationError, DatasetError
from fedcore.node import Node
from fedcore.node._config import request_scope
from fedcore.node._turns import FlushIfLong, TurnTakingExecutor
from fedcore.node.audit import verify
from fedcore.node.executor import plan_key
from fedcore.plan.base import check_training_args
from fedcore.wire import codec
from fedcore.wire.messages import TrainReply

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class Logistic(SklearnTrainingPlan):
    estimator = SGDClassifier


def _data(n=120):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 4))
    return X, (X[:, 0] > 0).astype(np.int64)


class SpiedNode(Node):
    """A node whose transport notes what its audit log holds when each reply leaves."""

    async def serve(self, transport):
        self.at_reply: list[list[tuple[str, int | None]]] = []
        send_parts = transport.send_parts  # how the node sends every frame

        async def spied(peer: str, parts) -> None:
            if isinstance(codec.decode(b"".join(parts)).body, TrainReply):
                lines = (self.home / "audit.jsonl").read_bytes().splitlines()
                self.at_reply.append([(r["event"], r.get("round"))
                                      for r in map(json.loads, lines)])
            await send_parts(peer, parts)

        transport.send_parts = spied
        await super().serve(transport)


def test_every_record_of_a_round_is_on_file_before_its_reply_leaves(tmp_path):
    """Records are written in groups, but never after the reply that depends on them."""
    X, y = _data()
    with simulate.SimulatedFederation(root=tmp_path) as fed:
        for i, part in enumerate(np.array_split(np.arange(len(y)), 3)):
            node = fed.add_node(f"site-{i}", node_class=SpiedNode)
            node.datasets.add_arrays(f"part{i}", ["t"], X[part], y[part])
        exp = Experiment(Logistic, tags=["t"], federation=fed.url, progress=False,
                         test_ratio=0.0, model_args={"loss": "log_loss"},
                         training_args={"epochs": 1, "batch_size": 16})
        exp.run_once()
        exp.run_once()
        exp.close()
        nodes = list(fed.nodes)
        for node in nodes:
            assert len(node.at_reply) == 2
            for rnd, events in enumerate(node.at_reply, start=1):
                # Read from the file as the reply left: asked, decided, trained, in order.
                mine = [e for e, r in events if r == rnd]
                assert mine == ["train-request", "decision", "trained"], events
            assert verify(node.home / "audit.jsonl").ok


def test_a_dataset_removed_by_another_process_is_refused_at_once(tmp_path):
    """The node's parsed copy of db.json follows the file, whoever writes it."""
    X, y = _data()
    serving = Node(tmp_path / "home", node_id="site")
    entry = serving.datasets.add_arrays("d", ["t"], X, y)
    assert serving.datasets.get(entry["id"])["name"] == "d"
    other = Node(tmp_path / "home")  # the CLI or the GUI: another handle on the same home
    other.datasets.remove(entry["id"])
    with pytest.raises(DatasetError):
        serving.datasets.get(entry["id"])
    again = other.datasets.add_arrays("e", ["u"], X, y)
    assert serving.datasets.get(again["id"])["name"] == "e"


def test_an_entry_changed_by_another_process_is_read_again(tmp_path):
    """The serving node keeps a dataset's entry only while db.json is the version it read."""
    X, y = _data()
    serving = Node(tmp_path / "home", node_id="site")
    entry = serving.datasets.add_arrays("d", ["t"], X, y)
    assert serving.datasets.get(entry["id"])["description"] == ""
    other = Node(tmp_path / "home")
    with other.db.transaction():
        other.db.table("datasets").update({"description": "renamed"})
    assert serving.datasets.get(entry["id"])["description"] == "renamed"
    mine = serving.datasets.get(entry["id"])
    mine["description"] = "a caller's copy"  # changes nothing the node reads next
    assert serving.datasets.get(entry["id"])["description"] == "renamed"
    # The entries a search read are kept for the requests that follow it, by version too.
    listed = serving.datasets.search(["t"])
    listed[0]["description"] = "a caller's copy"
    assert serving.datasets.get(entry["id"])["description"] == "renamed"
    with other.db.transaction():
        other.db.table("datasets").update({"description": "again"})
    assert serving.datasets.get(entry["id"])["description"] == "again"


def test_a_policy_changed_by_another_process_applies_to_the_next_request(tmp_path):
    serving = Node(tmp_path / "home", node_id="site")
    assert serving.policy["max_epochs"] is None
    Node(tmp_path / "home").set_policy(max_epochs=2)
    assert serving.policy["max_epochs"] == 2
    changed = serving.policy
    changed["max_epochs"] = 99  # a caller's copy: the node's own view does not change
    assert serving.policy["max_epochs"] == 2


def test_jobs_queued_on_a_loop_run_together_in_order_on_one_worker_thread():
    executor = TurnTakingExecutor(hold=5.0)
    ran: list[tuple[int, str]] = []

    def job(i: int) -> int:
        ran.append((i, threading.current_thread().name))
        return i * i

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(executor, job, i)
                                      for i in range(20)))

    try:
        assert asyncio.run(main()) == [i * i for i in range(20)]
    finally:
        executor.shutdown()
    assert [i for i, _ in ran] == list(range(20))
    assert len({name for _, name in ran}) == 1 and ran[0][1] != threading.main_thread().name


def test_a_job_that_outlasts_hold_leaves_the_loop_serving():
    executor = TurnTakingExecutor(hold=0.05)
    release = threading.Event()

    async def main() -> str:
        loop = asyncio.get_running_loop()
        stuck = loop.run_in_executor(executor, release.wait, 30)
        ticks = 0
        while ticks < 5:  # the loop runs while the job is stuck
            await asyncio.sleep(0.01)
            ticks += 1
        release.set()
        assert await stuck is True
        return "served"

    try:
        assert asyncio.run(main()) == "served"
    finally:
        executor.shutdown()


def test_a_failing_job_fails_its_own_future_only():
    executor = TurnTakingExecutor()

    def job(i: int) -> int:
        if i == 1:
            raise ValueError("plan failed")
        return i

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(executor, job, i)
                                      for i in range(3)), return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        executor.shutdown()
    assert out[0] == 0 and out[2] == 2 and isinstance(out[1], ValueError)



def _writes(job_s: float, inner: concurrent.futures.Executor | None = None
            ) -> tuple[int, int]:
    """Audit writes FlushIfLong (0.2 s) asked for while a job of ``job_s`` ran, and after it."""
    writes: list[str] = []
    executor = FlushIfLong(inner or concurrent.futures.ThreadPoolExecutor(1),
                           lambda: writes.append("flush"), after=0.2)

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, time.sleep, job_s)
        during = len(writes)
        executor.settle()  # the node's request is answered: nothing left to write early
        await asyncio.sleep(0.3)
        return during, len(writes)

    try:
        return asyncio.run(main())
    finally:
        executor.shutdown()


def test_a_short_job_leaves_its_records_to_the_replys_single_write():
    assert _writes(0.0) == (0, 0)


def test_a_long_job_has_its_records_written_while_it_runs():
    assert _writes(0.5) == (1, 1)


def test_a_job_done_while_the_loop_waited_for_its_batch_needs_no_early_write():
    """The simulation's loop waits for the training thread; the timer falls due meanwhile."""
    assert _writes(0.5, TurnTakingExecutor(hold=5.0)) == (0, 0)


def test_training_arguments_found_valid_once_are_still_checked_when_they_change():
    """Only the exact arguments (types included) a plan accepted are not parsed again
    (the node checks a request's arguments with ``check_training_args``, which keeps what
    the plan class parsed)."""
    check_training_args(Logistic, {"epochs": 1})
    check_training_args(Logistic, {"epochs": 1})  # remembered
    for wrong in ({"epochs": True}, {"epochs": True}, {"epoch": 1}, {"epochs": [1]}):
        with pytest.raises(ConfigurationError):  # True == 1, but a bool is refused
            check_training_args(Logistic, wrong)


def test_a_request_reads_one_version_of_the_policy_and_the_next_request_the_new_one(tmp_path):
    """config.toml is looked at once per request (``request_scope``, set by the node for
    each request it answers): a change made meanwhile applies from the next request."""
    serving = Node(tmp_path / "home", node_id="site")

    def request(change: int | None) -> tuple[object, object]:
        request_scope.set(object())
        first = serving.policy["max_epochs"]
        if change is not None:  # an administrator, in another process, while it runs
            Node(tmp_path / "home").set_policy(max_epochs=change)
        return first, serving.policy["max_epochs"]

    assert contextvars.copy_context().run(request, 2) == (None, None)
    assert contextvars.copy_context().run(request, None) == (2, 2)
    assert serving.policy["max_epochs"] == 2  # outside a request: read as it is


def test_of_several_nodes_on_one_loop_only_the_one_whose_job_runs_long_writes_early():
    """The nodes of a simulation share one loop (and one timer for these writes)."""
    writes: list[str] = []
    pool = concurrent.futures.ThreadPoolExecutor(2)
    quick = FlushIfLong(pool, lambda: writes.append("quick"), after=0.2)
    slow = FlushIfLong(pool, lambda: writes.append("slow"), after=0.2)

    async def request(executor: FlushIfLong, seconds: float) -> None:
        await executor.run(time.sleep, seconds)
        executor.settle()  # its reply is sent: nothing left to write early

    async def main() -> None:
        await asyncio.gather(request(quick, 0.0), request(slow, 0.5))
        await asyncio.sleep(0.3)

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()
    assert writes == ["slow"]


def test_a_plans_key_is_the_sha256_of_the_sorted_json_of_its_arguments():
    # The warm plan of a round is found by this key: the encoder built once writes what
    # json.dumps(sort_keys=True, default=repr) writes, so equal arguments (of equal types)
    # find the same plan and others do not.
    cases = [
        ({}, {"epochs": 1, "batch_size": 32, "lr": 0.5}, {"kind": "array", "n": 3}),
        ({"b": [1, 2.5, None], "a": {"z": True, "y": "é\n\"q\""}}, {"lr": 1}, {}),
        ({"x": float("nan"), "y": float("-inf"), "z": -0.0}, {"lr": 1.0}, {"k": [[]]}),
        ({"odd": ValueError("x"), "n": np.float64(2.5)}, {"lr": True}, {}),
        ({1: "int key", "2": 2}, {}, {"deep": {"b": {"d": 1, "c": 2}}}),
    ]
    keys = set()
    for model_args, training_args, data_info in cases:
        request = SimpleNamespace(model_args=model_args, training_args=training_args,
                                  data_info=data_info)  # the fields a key reads
        try:
            text = json.dumps([model_args, training_args, data_info], sort_keys=True,
                              default=repr)
        except TypeError:  # mixed key types cannot be sorted: neither can the key's
            with pytest.raises(TypeError):
                plan_key("exp", "a" * 64, request)  # type: ignore[arg-type]
            continue
        expected = hashlib.sha256(f"exp\0{'a' * 64}\0{text}".encode()).hexdigest()
        assert plan_key("exp", "a" * 64, request) == expected  # type: ignore[arg-type]
        keys.add(expected)
    assert len(keys) == 4  # 1, 1.0 and True give different keys
