"""The audit log's hash chain: an edited, inserted or deleted record is found and named."""

from __future__ import annotations

import hashlib
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



def _sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def test_each_line_is_the_json_of_its_seq_record_and_prev(tmp_path):
    """A line is exactly ``json.dumps({"seq": n, **record, "prev": ...}, default=str)``
    (the record's credentials redacted), whichever call wrote it: for keys that are not
    strings, nested values, text that json escapes, objects written as what they print, a
    record with its own "seq" or "prev", and an empty one."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, durable=False)
    records = [
        {"time": 1765000000.123456, "node": "n1", "event": "train-request", "round": 3,
         "researcher_key": "ab" * 32},
        {},
        {1: "one", 2.5: None, False: [1, 2.0, (3,)], None: {"x": float("inf")}},
        {"event": "odd", "text": 'quote " slash \\ tab \t é ☃ \U0001F600 \x00',
         "path": tmp_path, "ok": False, "nan": float("nan")},
        {"event": "own", "prev": "mine", "seq": "mine too", "after": 1},
        {"prev": 5},
        {"seq": "x=1", "url": "https://u:hunter2@h/"},
        {"url": "mqtt://site:hunter2@broker", "n": 1},
    ]
    expected = [*records[:6], {"seq": "x=1", "url": "https://u:***@h/"},
                {"url": "mqtt://site:***@broker", "n": 1}]
    for record in records[:3]:
        log.defer(record)
    log.flush()
    returned = [log.append(records[3]), *log.append_all(records[4:])]
    lines = path.read_bytes().splitlines()
    prev = GENESIS
    for n, (line, record) in enumerate(zip(lines, expected, strict=True), 1):
        assert line == json.dumps({"seq": n, **record, "prev": prev}, default=str).encode()
        if n >= 4:  # what append and append_all return: the record as written
            assert returned[n - 4] == {"seq": n, **record, "prev": prev}
        prev = _sha(line)


def test_a_record_after_a_hand_edited_head_chains_to_what_the_head_says(tmp_path):
    """Whatever the head holds when it matches the log's size is taken as the chain's end,
    and written as json writes it (the next verify reports the break)."""
    path = tmp_path / "audit.jsonl"
    AuditLog(path).append({"event": "first"})
    size = path.stat().st_size
    for seq, sha in ((7, "not-a-hash=1"), (9.5, "ab" * 32), (True, "ab" * 32)):
        (tmp_path / "audit.head").write_text(json.dumps(
            {"seq": seq, "sha256": sha, "size": size}).ljust(199) + "\n")
        log = AuditLog(path)
        log.defer({"event": "next"})
        log.flush()
        last = path.read_bytes().splitlines()[-1]
        assert last == json.dumps({"seq": seq + 1, "event": "next", "prev": sha}).encode()
        size = path.stat().st_size
        log.close()
    assert not verify(path).ok


def test_another_writer_between_two_flushes_keeps_one_chain(tmp_path):
    """The node's log, flushing a request's records, and another writer (a CLI command:
    another open file, so another lock) appending between its flushes and at the same time."""
    path = tmp_path / "audit.jsonl"
    node, cli = AuditLog(path, durable=False), AuditLog(path, durable=False)
    node.defer({"event": "train-request"})
    node.flush()
    cli.append({"event": "policy-changed"})
    node.defer({"event": "train-request"})
    node.defer({"event": "trained"})
    node.flush()

    def requests():
        for i in range(200):
            node.defer({"event": "train-request", "i": i})
            node.defer({"event": "trained", "i": i})
            node.flush()

    serving = threading.Thread(target=requests)
    serving.start()
    for i in range(100):
        cli.append_all([{"event": "policy-changed", "i": i}])
    serving.join()
    node.close()
    cli.close()
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, 505))
    assert [r["event"] for r in records[:4]] == ["train-request", "policy-changed",
                                                  "train-request", "trained"]
    assert sum(r["event"] == "policy-changed" for r in records) == 101
    assert verify(path).ok


def test_a_rotated_log_is_noticed_at_the_next_flush(tmp_path):
    """A log moved away (logrotate) keeps what was written; the next records start a new
    file at the path, with a new chain."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, durable=False)
    log.defer({"event": "one"})
    log.flush()
    old = path.read_bytes()
    path.rename(tmp_path / "audit.jsonl.1")
    log.defer({"event": "two"})
    log.flush()
    assert (tmp_path / "audit.jsonl.1").read_bytes() == old
    assert path.read_bytes() == json.dumps(
        {"seq": 1, "event": "two", "prev": GENESIS}).encode() + b"\n"
    path.rename(tmp_path / "audit.jsonl.2")
    path.write_bytes(b"")  # rotated with a new empty file in its place
    log.append({"event": "three"})
    assert json.loads(path.read_bytes())["seq"] == 1
    assert verify(path).ok


def test_text_a_researcher_wrote_cannot_forge_a_lines_seq_or_prev(tmp_path):
    """A crafted experiment name (a correctly signed request may carry any text) stays a
    string in its record: the line's own seq and prev are the log's."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, durable=False)
    forged = f'x=1", "seq": 1, "prev": "{GENESIS}", "y": "'  # "=": scanned
    for _ in range(2):
        log.defer({"event": "train-request", "experiment": forged})
        log.defer({"event": "trained", forged: forged})
        log.flush()
    lines = path.read_bytes().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert [r["prev"] for r in records] == [GENESIS] + [_sha(line) for line in lines[:3]]
    assert records[2]["experiment"] == forged and records[3][forged] == forged
    assert verify(path).ok
