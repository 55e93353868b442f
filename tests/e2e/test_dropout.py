"""Rounds that survive nodes dropping out: deadlines, quorum, selection, and a node process
killed mid-round that comes back for the next round."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from fedcore import Experiment, Node
from fedcore.errors import ConfigurationError, RoundError
from fedcore.researcher.strategies import AllNodes, Fraction

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402
from tests._support.deployment import audit_events  # noqa: E402
from tests._support.deployment import frame as _frame  # noqa: E402
from tests._support.net import free_port  # noqa: E402
from tests._support.sklearn_plans import SleepWhenToldPlan  # noqa: E402


class SlowSmallSitePlan(SklearnTrainingPlan):
    """Sleeps on the node with the smallest dataset (fewer than 100 training samples)."""

    estimator = SGDClassifier
    sleep_s = 5.0

    def fit(self, dataset, seed):
        if len(dataset) < 100:
            import time

            time.sleep(self.sleep_s)
        return super().fit(dataset, seed)


def _inproc(tmp_path: Path, sizes: dict[str, int]) -> tuple[str, list[Node]]:
    """Nodes on a fresh hub, each with its own worker (a slow node blocks only itself)."""
    url = f"inproc://dropout-{uuid.uuid4().hex[:8]}"
    nodes = []
    for i, (node_id, n) in enumerate(sizes.items()):
        node = Node(tmp_path / node_id, node_id=node_id, approval_required=False)
        frame = _frame(i, n)
        node.datasets.add_arrays("cohort", ["drop"], frame.drop(columns="label").to_numpy(),
                                 frame["label"].to_numpy())
        nodes.append(node.start(url))
    return url, nodes


def _exp(plan, url: str, **kwargs) -> Experiment:
    return Experiment(plan, tags=["drop"], federation=url, progress=False,
                      training_args={"epochs": 1, "batch_size": 16}, seed=3, **kwargs)


def test_a_node_past_the_deadline_is_named_and_the_round_closes_on_quorum(tmp_path, caplog):
    url, nodes = _inproc(tmp_path, {"a": 200, "b": 200, "slow": 60})
    try:
        exp = _exp(SlowSmallSitePlan, url, strategy=AllNodes(min_nodes=2, deadline=1.0))
        started = time.perf_counter()
        with caplog.at_level("WARNING", "fedcore"):
            rows = exp.run_once()
        elapsed = time.perf_counter() - started
        assert elapsed < 4, f"the round waited {elapsed:.1f} s: the late node sleeps 5 s"
        assert list(rows["node"]) == ["a", "b", "slow"]
        assert list(rows["status"]) == ["ok", "ok", "missing"]
        assert "'slow' missed the round's deadline of 1 s" in rows.iloc[2]["error"]
        assert "node slow is missing" in caplog.text
        assert exp.round == 1 and exp.parameters is not None
        # The same round without a quorum: the error names who answered and who did not.
        exp.strategy = AllNodes(min_nodes=3, deadline=1.0)
        with pytest.raises(RoundError, match=r"lacks its quorum: 2 node\(s\) answered "
                                             r"\(a, b\).*needs 3.*slow: ") as info:
            exp.run_once()
        assert set(info.value.failures) == {"slow"}
        assert exp.round == 1
    finally:
        for node in nodes:
            node.stop()


def test_a_stopped_node_is_missing_and_a_restarted_one_takes_part_again(tmp_path):
    url, nodes = _inproc(tmp_path, {"a": 150, "b": 150, "c": 150})
    try:
        exp = _exp(SlowSmallSitePlan, url, strategy=AllNodes(min_nodes=2))
        assert exp.run_once()["status"].tolist() == ["ok"] * 3
        nodes[1].stop()
        rows = exp.run_once()  # the researcher notices the node left and searches again
        assert rows["status"].tolist() == ["ok", "missing", "ok"]
        assert "'b' is not connected" in rows.iloc[1]["error"]
        status = exp.node_status().set_index("node")
        assert status.loc["b", "connected"] == False  # noqa: E712 - numpy bool
        assert status.loc["a", "answers"] and status.loc["a", "dataset"] == "cohort"
        assert pd.notna(status.loc["b", "last_seen"])
        nodes[1] = Node(tmp_path / "b").start(url)  # same home, same id
        rows = exp.run_once()
        assert rows["status"].tolist() == ["ok"] * 3 and exp.round == 3
    finally:
        for node in nodes:
            node.stop()


def test_fraction_selects_reproducibly_and_the_checkpoint_keeps_the_strategy(tmp_path):
    strategy = Fraction(0.5, seed=11)
    picks = [strategy.select(["a", "b", "c", "d"], rnd) for rnd in range(1, 6)]
    assert picks == [Fraction(0.5, seed=11).select(["a", "b", "c", "d"], rnd)
                     for rnd in range(1, 6)]
    assert all(len(p) == 2 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # a new draw each round
    assert Fraction(0.1).select(["a", "b", "c"], 1) != []  # at least one node
    with pytest.raises(ConfigurationError, match="fraction must be in"):
        Fraction(0)
    url, nodes = _inproc(tmp_path, {"a": 150, "b": 150, "c": 150, "d": 150})
    try:
        exp = _exp(SlowSmallSitePlan, url, strategy=strategy)
        exp.run(3)
        trained = exp.history.groupby("round")["node"].apply(list).tolist()
        assert trained == picks[:3]
        path = exp.save(tmp_path / "exp.fedcore")
        assert repr(Experiment.load(path).strategy) == repr(strategy)
    finally:
        for node in nodes:
            node.stop()


# --- node processes over websockets ------------------------------------------------------


def test_a_node_process_killed_mid_round_is_named_and_rejoins_after_a_restart(tmp_path):
    pytest.importorskip("websockets")
    from fedcore_node.cli import main

    url = f"ws://127.0.0.1:{free_port()}"
    homes = {n: tmp_path / n for n in ("site-a", "site-b", "site-c")}
    for i, (node_id, home) in enumerate(homes.items()):
        csv = tmp_path / f"{node_id}.csv"
        _frame(i, 200).to_csv(csv, index=False)
        assert main(["--home", str(home), "init", "--id", node_id]) == 0
        assert main(["--home", str(home), "policy", "set", "approval_required=false"]) == 0
        assert main(["--home", str(home), "dataset", "add", "--name", "cohort", "--tags",
                     "drop", "--path", str(csv)]) == 0
    from tests._support.deployment import start_node, stop_processes
    from tests._support.trust import enroll

    enrolled = enroll(homes)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    exp = Experiment(SleepWhenToldPlan, tags=["drop"], federation=url, progress=False,
                     nodes=list(homes), model_args={"target": "label"}, enrolled=enrolled,
                     training_args={"epochs": 1, "batch_size": 16}, connect_timeout=20,
                     strategy=AllNodes(min_nodes=2))
    try:
        for node_id, home in homes.items():
            extra = {"PLAN_TEST_SLEEP": "30"} if node_id == "site-b" else {}
            procs[node_id] = start_node(home, url, **extra)
        exp.search()

        def kill_b_when_it_trains() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if any(e["event"] == "train-request" for e in audit_events(homes["site-b"])):
                    procs["site-b"].send_signal(signal.SIGKILL)
                    return
                time.sleep(0.05)

        import threading

        killer = threading.Thread(target=kill_b_when_it_trains)
        killer.start()
        started = time.perf_counter()
        rows = exp.run_once()
        killer.join()
        # noticed the drop, not the 30 s sleep (the margin is for a loaded machine)
        assert time.perf_counter() - started < 25
        assert rows["status"].tolist() == ["ok", "missing", "ok"]
        assert "'site-b' disconnected" in rows.iloc[1]["error"]
        assert procs["site-b"].wait(timeout=5) == -signal.SIGKILL

        procs["site-b"] = start_node(homes["site-b"], url)
        deadline = time.monotonic() + 15
        while not exp.node_status().set_index("node").loc["site-b", "answers"]:
            assert time.monotonic() < deadline, (tmp_path / "site-b.log").read_text()
            time.sleep(0.2)
        rows = exp.run_once()
        assert rows["status"].tolist() == ["ok", "ok", "ok"] and exp.round == 2
    finally:
        exp.close()
        stop_processes(procs.values())
