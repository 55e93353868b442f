"""Node state survives being killed: every write that returned is there after SIGKILL.

Also for a home that does not fsync (``durable=False``, a simulation's temporary one): a
killed process leaves its writes to the operating system, and every file is replaced whole.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time

import pytest

from fedcore.node import Node
from fedcore.plan import PlanBundle

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")

KILLS = 100


def _writer(home: str, report: str, start: int, durable: bool) -> None:
    """Write plans and policy changes to a node home; log each write once it returned."""
    node = Node(home, durable=durable)
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"ready\n")
    i = start
    while True:
        if i % 3:
            bundle = PlanBundle(files={"plan.py": f"# plan {i}\n"}, entry="P", backend="sklearn")
            node.plans.submit(bundle, submitter="durability")
            done = f"plan {bundle.sha256}\n"
        else:
            node.set_policy(max_epochs=i + 1)
            done = f"policy {i + 1}\n"
        os.write(fd, done.encode())  # one write of a short line: whole or not at all
        i += 1


@pytest.mark.parametrize("durable", [True, False], ids=["fsync", "no-fsync"])
def test_the_node_database_survives_sigkill_at_random_moments(tmp_path, durable):
    home = tmp_path / "home"
    Node(home, node_id="durable")
    report = tmp_path / "committed.txt"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fedcore.node", "fedcore.plan", __name__])
    rng = random.Random(7)
    for k in range(KILLS):
        child = ctx.Process(target=_writer,
                            args=(str(home), str(report), 3 * k * 1000 + 1, durable))
        child.start()
        _wait_for(report, k + 1)  # the child opened the node: kill it while it writes
        time.sleep(rng.uniform(0.0, 0.1))  # a write is ~2 fsyncs: db.json, audit
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL

        node = Node(home)  # reopens: config.toml and db.json parse
        lines = report.read_text().splitlines() if report.exists() else []
        plans = {line.split()[1] for line in lines if line.startswith("plan ")}
        stored = {e["sha256"] for e in node.plans.list()}
        assert plans <= stored, f"kill {k}: writes that returned are missing"
        policies = [int(line.split()[1]) for line in lines if line.startswith("policy ")]
        if policies:
            # The last change that returned, or one made after it before the kill.
            assert node.policy["max_epochs"] >= policies[-1], f"kill {k}"
        # Every stored plan has its plan-submitted record, after any kill (issue 15).
        verified = node.verify_audit()
        assert not verified.mismatches, f"kill {k}: {verified}"
        assert all("killed while writing" in p.message for p in verified.problems), verified
    assert len(plans) > KILLS // 2, "the children hardly wrote anything: kill later"


def _wait_for(report, ready: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if report.exists() and report.read_text().count("ready\n") >= ready:
            return
        time.sleep(0.002)
    raise AssertionError("the writer did not start within 30 s")
