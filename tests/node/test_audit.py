"""The audit log's hash chain: an edited, inserted or deleted record is found and named."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from fedcore.node import Node
from fedcore.node.audit import GENESIS, AuditLog, verify
from fedcore_node.cli import main


def _node_with_log(tmp_path, n=12):
    node = Node(tmp_path / "home", node_id="hospital-a")
    for i in range(n):
        node.audit("search", researcher="r1", tags=["t"], found=i)
    node._close_audit()
    return node


def _verify(capsys, node):
    code = main(["--home", str(node.home), "audit", "verify"])
    out, err = capsys.readouterr()
    return code, out + err


def test_an_untouched_log_verifies(tmp_path, capsys):
    node = _node_with_log(tmp_path)
    records = node.audit_log()
    assert [r["seq"] for r in records] == list(range(1, 13))
    assert records[0]["prev"] == GENESIS
    code, out = _verify(capsys, node)
    assert code == 0 and "intact, 12 records" in out


def _forged(lines, k):
    prev = json.loads(lines[k])["prev"]  # a forger can chain the new line to the old one
    return json.dumps({"seq": k + 1, "time": 0, "node": "hospital-a", "event": "trained",
                       "prev": prev}).encode() + b"\n"


@pytest.mark.parametrize("where", [0, 5, 11], ids=["first", "middle", "last"])
@pytest.mark.parametrize("change", ["edit", "insert", "delete"])
def test_a_changed_line_is_detected_and_named(tmp_path, capsys, change, where):
    node = _node_with_log(tmp_path)
    path = node.home / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    if change == "edit":
        lines[where] = lines[where].replace(f'"found": {where}'.encode(), b'"found": 99')
        expected = f"line {where + 1} (record {where + 1}, 'search'): edited"
    elif change == "insert":
        lines.insert(where, _forged(lines, where))
        expected = f"line {where + 1} (record {where + 1}, 'trained'): inserted"
    else:
        del lines[where]
        expected = f"record {where + 1} deleted"
    path.write_bytes(b"".join(lines))
    code, out = _verify(capsys, node)
    assert code == 1, out
    assert "1 problem(s)" in out and expected in out, out


def test_verify_json_lists_the_problem(tmp_path, capsys):
    node = _node_with_log(tmp_path)
    path = node.home / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[3]
    path.write_bytes(b"".join(lines))
    assert main(["--home", str(node.home), "audit", "verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"][0]["line"] == 4
    assert report["problems"][0]["seq"] == 5  # the record after the gap


def test_appends_from_two_processes_keep_one_chain(tmp_path, capsys):
    node = Node(tmp_path / "home", node_id="hospital-a")
    stop = threading.Event()

    def serve():  # the node, logging as it answers requests
        i = 0
        while not stop.is_set():
            node.audit("search", researcher="r1", found=i)
            i += 1
            stop.wait(0.0005)

    writer = threading.Thread(target=serve)
    writer.start()
    try:
        for value in (3, 4, 5):  # administrators changing the policy meanwhile
            done = subprocess.run(
                [sys.executable, "-m", "fedcore_node", "--home", str(node.home), "policy",
                 "set", f"max_epochs={value}"], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
    finally:
        stop.set()
        writer.join()
    records = node.audit_log()
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert [r["changes"]["max_epochs"][1] for r in records
            if r["event"] == "policy-changed"] == [3, 4, 5]
    code, out = _verify(capsys, node)
    assert code == 0, out


def test_the_chain_survives_a_lost_head_file(tmp_path, capsys):
    node = _node_with_log(tmp_path, n=3)
    (node.home / "audit.head").unlink()
    code, out = _verify(capsys, node)
    assert code == 0 and "No head file" in out
    node.audit("search", found=3)  # the next append finds the chain's end in the log itself
    assert node.audit_log()[-1]["seq"] == 4
    code, out = _verify(capsys, node)
    assert code == 0 and "intact, 4 records" in out


def test_audit_show_is_a_table_and_json_lines(tmp_path, capsys):
    node = _node_with_log(tmp_path, n=3)
    node.audit("policy-changed", by="cli:admin", changes={"max_epochs": [None, 3]})
    assert main(["--home", str(node.home), "audit", "show", "--tail", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["seq", "time", "event", "details"] and len(out) == 3
    assert out[2].split()[0] == "4" and "by=cli:admin" in out[2]
    assert main(["--home", str(node.home), "audit", "show", "--event", "search",
                 "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["found"] for r in shown] == [0, 1, 2]


def test_a_credential_anywhere_in_a_record_is_redacted_in_the_log(tmp_path):
    """In a value, a nested list or dict, a key, or what an object prints as; a record
    without one is written as given."""

    class Printed:
        def __str__(self) -> str:
            return "mqtt://site:hunter2@broker"

    log = AuditLog(tmp_path / "audit.jsonl")
    log.defer({"event": "plain", "count": 3, "tags": ("a", "b"), "ratio": 0.5})
    log.defer({"event": "secret", "url": "mqtts://site:hunter2@broker:8883/x?token=abc",
               "nested": [{"https://u:hunter2@h/": ["ws://a:hunter2@b"]}], "obj": Printed()})
    log.flush()
    text = (tmp_path / "audit.jsonl").read_text()
    assert "hunter2" not in text and "abc" not in text and text.count("***") == 5
    plain, secret = (json.loads(line) for line in text.splitlines())
    assert plain["tags"] == ["a", "b"] and plain["count"] == 3 and plain["ratio"] == 0.5
    assert secret["url"] == "mqtts://site:***@broker:8883/x?token=***"
    assert verify(tmp_path / "audit.jsonl").ok
