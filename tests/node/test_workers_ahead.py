"""``fedcore-node start`` starts its plan workers before the node imports its runtime.

A node that ran plans in a worker before (``plan-workers.json``) starts those workers first
(``fedcore_node._launch``, ``fedcore.node._spawn.start_ahead``); the node takes each one
whose read rules are those it computes from its own registry, and ends the others.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from fedcore.node import Node, _spawn  # noqa: E402
from fedcore.plan import PlanBundle  # noqa: E402
from fedcore.wire.identity import Identity  # noqa: E402
from fedcore.wire.messages import TrainReply  # noqa: E402
from fedcore_node import _launch  # noqa: E402
from tests._support.attack import Attacker  # noqa: E402
from tests._support.deployment import start_node, stop_processes  # noqa: E402
from tests._support.net import free_port  # noqa: E402
from tests.node.test_plan_isolation import PLAIN, _frameworks, _request  # noqa: E402

X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int64)


def _home(tmp_path: Path) -> tuple[Path, str, PlanBundle, bytes]:
    """A node home whose dataset ran an sklearn plan in a worker before (as remembered)."""
    node = Node(tmp_path / "site", node_id="site")
    node.trust("alice", Identity(tmp_path / "alice.key").public_key)
    dataset = node.datasets.add_arrays("cohort", ["cohort"], X, Y)["id"]
    bundle = PlanBundle(files={"plan.py": PLAIN}, entry="PlainPlan", backend="sklearn")
    node.plans.submit(bundle)
    node.plans.approve(bundle.sha256)
    (node.home / _spawn.MEMORY).write_text(json.dumps(
        {dataset: {"backends": ["sklearn"], "modules": ["sklearn.linear_model"]}}))
    node._close_audit()
    return node.home, dataset, bundle, node.identity.public_bytes


def _ahead(home: Path) -> list[_spawn.Launched]:
    return list(_spawn._AHEAD.get(os.path.realpath(home), {}).values())


def _wait(condition, what: str, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_node_takes_the_worker_started_before_it_and_its_round_runs_there(tmp_path):
    home, dataset, bundle, key = _home(tmp_path)
    assert _spawn.start_ahead(home) == 1
    assert _spawn.start_ahead(home) == 0  # once per home
    [launched] = _ahead(home)
    url = f"ws://127.0.0.1:{free_port()}"
    node = Node(home).start(url)
    try:
        _wait(lambda: (w := list(node._workers._workers.values())) and w[0].warm,
              "the node did not take its worker")
        [worker] = node._workers._workers.values()
        assert worker.process.pid == launched.process.pid  # not a second one
        assert "sklearn" in _frameworks(worker.process.pid)  # imported before any request
        with Attacker(url, {"site": key}, key=tmp_path / "alice.key") as attacker:
            reply = attacker.ask("site", _request(bundle.to_wire(), dataset)).body
        assert isinstance(reply, TrainReply) and reply.n_samples == len(X)
        assert list(node._workers._workers.values()) == [worker]
    finally:
        node.stop()
    assert launched.process.poll() is not None  # the node's stop ended it
    assert _ahead(home) == []


def test_a_worker_started_ahead_for_files_the_node_no_longer_serves_is_ended(tmp_path):
    home, dataset, _, _ = _home(tmp_path)
    assert _spawn.start_ahead(home) == 1
    [launched] = _ahead(home)
    node = Node(home)
    node.datasets.remove(dataset, by="admin")  # after the workers started, before serving
    node.start(f"ws://127.0.0.1:{free_port()}")
    try:
        _wait(lambda: launched.process.poll() is not None, "the unused worker still runs")
        assert node._workers._workers == {}
    finally:
        node.stop()


def test_nothing_is_started_ahead_without_a_remembered_dataset_or_with_isolation_off(
        tmp_path):
    home, _, _, _ = _home(tmp_path)
    node = Node(home)
    node.set_policy(plan_isolation="none")
    assert _spawn.start_ahead(home) == 0
    _spawn.drop(home)
    node.set_policy(plan_isolation="process")
    node._close_audit()
    (home / _spawn.MEMORY).unlink()
    assert _spawn.start_ahead(home) == 0
    _spawn.drop(home)


def test_the_command_line_decides_which_home_starts_workers_ahead(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCORE_NODE_HOME", str(tmp_path / "env-home"))
    assert _launch.command(["--home", "h", "start", "--federation", "x"]) == "start"
    assert _launch.home(["--home", "h", "--home=g", "start", "--home", "x"]) == Path("g")
    assert _launch.home(["start"]) == tmp_path / "env-home"
    home, _, _, _ = _home(tmp_path)
    for argv in (["--home", str(home), "status"], ["--home", str(home), "start", "--help"]):
        _launch.start_workers(argv)
        assert _ahead(home) == []
    _launch.start_workers(["--home", str(home), "start"])
    [launched] = _ahead(home)
    _launch.end_workers(["--home", str(home), "start"])  # no node took it
    assert launched.process.poll() is not None and _ahead(home) == []


def test_fedcore_node_start_serves_the_first_round_in_the_worker_it_started_first(tmp_path):
    home, dataset, bundle, key = _home(tmp_path)
    url = f"ws://127.0.0.1:{free_port()}"
    proc = start_node(home, url)  # python -m fedcore_node: fedcore_node._launch.main

    def workers() -> list[int]:
        return [int(p) for task in os.listdir(f"/proc/{proc.pid}/task")
                for p in open(f"/proc/{proc.pid}/task/{task}/children").read().split()]

    try:
        _wait(lambda: any("sklearn" in _frameworks(pid) for pid in workers()),
              "no worker imported sklearn ahead")
        with Attacker(url, {"site": key}, key=tmp_path / "alice.key") as attacker:
            reply = attacker.ask("site", _request(bundle.to_wire(), dataset)).body
            assert isinstance(reply, TrainReply) and reply.n_samples == len(X), reply
            assert len(workers()) == 1
    finally:
        stop_processes([proc])
