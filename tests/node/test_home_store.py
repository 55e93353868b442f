"""A database change and its audit record are one: after a crash, both or neither (issue 15).

And ``audit verify`` checks the database against the log: it passes after any crash, and
names what was changed behind the node's back.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.node import Node
from fedcore.plan import PlanBundle
from tests._support.deployment import write_csv

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")


def _bundle(i: int) -> PlanBundle:
    return PlanBundle({"plan.py": f"# plan {i}\n"}, "P", "sklearn")


def _killed_before_the_audit_append(home: str) -> None:
    """Submit a plan, and die the moment db.json is written, before the log is."""
    node = Node(home)
    node._audit.append_all = lambda records: os.kill(os.getpid(), signal.SIGKILL)
    node.plans.submit(_bundle(1), submitter="alice")


def _audit_verify(home: Path) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "fedcore_node", "--home", str(home), "audit",
                           "verify", "--json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return done.returncode, json.loads(done.stdout)


def test_a_change_whose_process_died_before_its_audit_record_is_recorded_on_next_open(
        tmp_path):
    home = tmp_path / "home"
    Node(home, node_id="site")
    child = multiprocessing.get_context("fork").Process(
        target=_killed_before_the_audit_append, args=(str(home),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    sha = _bundle(1).sha256
    stored = json.loads((home / "db.json").read_text())
    assert any(p["sha256"] == sha for p in stored["plans"].values())  # the change is there
    log = home / "audit.jsonl"
    assert not log.exists() or sha not in log.read_text()  # ...and its record is not, yet

    code, report = _audit_verify(home)  # any process that opens the node completes it
    assert code == 0 and report["ok"] and report["mismatches"] == [], report
    records = [r for r in Node(home).audit_log() if r["event"] == "plan-submitted"]
    assert [(r["plan"], r["submitter"], r["recovered"]) for r in records] == [
        (sha, "alice", True)]


def test_a_failed_change_leaves_neither_the_change_nor_its_record(tmp_path):
    node = Node(tmp_path / "home", node_id="site")
    with pytest.raises(RuntimeError), node.db.transaction():
        node.plans.submit(_bundle(2), submitter="alice")
        raise RuntimeError("the administrator's command failed half-way")
    assert node.plans.list() == []
    assert "plan-submitted" not in [r["event"] for r in node.audit_log()]
    assert node.verify_audit().ok


def test_audit_verify_names_changes_made_behind_the_nodes_back(tmp_path):
    home = tmp_path / "home"
    node = Node(home, node_id="site")
    rejected = node.plans.submit(_bundle(3), submitter="alice")["sha256"]
    node.plans.reject(rejected, by="admin", note="reads files it should not")
    kept = node.datasets.add("kept", ["a"], write_csv(tmp_path / "a.csv", seed=1))["id"]
    node.datasets.add("other", ["b"], write_csv(tmp_path / "b.csv", seed=2))
    assert node.verify_audit().ok

    # Someone with write access to the home edits db.json: the rejected plan approved, a
    # plan no researcher submitted approved, a dataset gone without a record.
    db = json.loads((home / "db.json").read_text())
    for entry in db["plans"].values():
        entry["status"] = "approved"
    db["plans"]["99"] = {**entry, "sha256": "f" * 64, "status": "approved"}
    db["datasets"] = {k: v for k, v in db["datasets"].items() if v["id"] != kept}
    (home / "db.json").write_text(json.dumps(db))

    code, report = _audit_verify(home)
    assert code == 1 and not report["ok"] and report["problems"] == []  # the log is intact
    text = "\n".join(report["mismatches"])
    assert len(report["mismatches"]) == 3, text
    assert f"plan {rejected[:16]} (P) is approved in db.json, but record" in text
    assert "says rejected" in text
    assert f"plan {'f' * 16} (P) is in db.json, but no plan-submitted record" in text
    assert f"dataset {kept} was added (record" in text and "db.json lacks it" in text
