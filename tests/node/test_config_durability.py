"""A change of config.toml and its audit record are one: after a crash, both or neither.

And ``audit verify`` compares config.toml with the log: a hand edit is named, with how to
record it once reviewed (``fedcore-node audit accept-config``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fedcore.node import Node
from fedcore.wire.identity import Identity

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")

KILLS = 30


def _key(tmp: Path, name: str) -> str:
    return Identity(tmp / f"{name}.key").public_bytes.hex()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedcore_node", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _verify(home: Path) -> tuple[int, dict]:
    done = _cli(home, "audit", "verify", "--json")
    return done.returncode, json.loads(done.stdout)


def _trusted(home: Path) -> dict:
    with open(home / "config.toml", "rb") as f:
        return tomllib.load(f).get("trusted_researchers", {})


def _die_before_writing_config(home: str, key: str) -> None:
    """Trust a researcher; die once db.json holds the change, before config.toml is written."""
    from fedcore.node import _storage

    real = _storage.write_atomic

    def write(path, data, **options):
        if Path(path).name == "config.toml":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, data, **options)

    node = Node(home)
    _storage.write_atomic = write  # type: ignore[assignment]
    node.trust("alice", key, by="admin")


def _die_before_the_audit_append(home: str, key: str) -> None:
    """Trust a researcher; die once config.toml is written, before the audit log is."""
    node = Node(home)
    node._audit.append_all = lambda records: os.kill(os.getpid(), signal.SIGKILL)
    node.trust("alice", key, by="admin")


@pytest.mark.parametrize("dies", [_die_before_writing_config, _die_before_the_audit_append])
def test_a_config_change_killed_half_way_is_completed_with_its_record(tmp_path, dies):
    home = tmp_path / "home"
    Node(home, node_id="site")
    key = _key(tmp_path, "alice")
    child = multiprocessing.get_context("fork").Process(target=dies, args=(str(home), key))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    code, report = _verify(home)  # the next writer (or verify) completes the change
    assert code == 0 and report["mismatches"] == [], report
    records = [r for r in Node(home).audit_log() if r["event"] == "researcher-trusted"]
    assert [r.get("recovered") for r in records] == [True]  # the record...
    assert "alice" in _trusted(home)  # ...with the change itself


def test_a_failed_config_change_leaves_neither_the_change_nor_its_record(tmp_path):
    node = Node(tmp_path / "home", node_id="site")
    with pytest.raises(RuntimeError), node.db.transaction():
        node.trust("alice", _key(tmp_path, "alice"), by="admin")
        assert "alice" in node.trusted_researchers  # seen inside the transaction
        raise RuntimeError("the administrator's command failed half-way")
    assert "alice" not in _trusted(tmp_path / "home")
    assert node.trusted_researchers == {}
    assert "researcher-trusted" not in [r["event"] for r in node.audit_log()]
    assert node.verify_audit().ok


def test_audit_verify_names_a_hand_edited_config_until_it_is_accepted(tmp_path):
    home = tmp_path / "home"
    node = Node(home, node_id="site")
    node.trust("alice", _key(tmp_path, "alice"), by="admin")
    node.set_policy(max_epochs=5, by="admin")
    assert _verify(home)[0] == 0
    config = home / "config.toml"
    config.write_text(config.read_text().replace("max_epochs = 5", "max_epochs = 500"))

    code, report = _verify(home)
    assert code == 1 and not report["ok"], report
    [mismatch] = report["mismatches"]
    assert "config.toml" in mismatch and "policy-changed" in mismatch
    assert "fedcore-node audit accept-config" in mismatch
    human = _cli(home, "audit", "verify")
    assert human.returncode == 1 and "edited by hand" in human.stdout

    accepted = _cli(home, "audit", "accept-config")
    assert accepted.returncode == 0, accepted.stderr
    assert "Recorded config.toml" in accepted.stdout
    code, report = _verify(home)
    assert code == 0 and report["mismatches"] == [], report
    assert Node(home).policy["max_epochs"] == 500  # accepted as it was edited, byte for byte
    [record] = [r for r in Node(home).audit_log() if r["event"] == "config-accepted"]
    assert record["config_sha256"]


def _config_writer(home: str, report: str, keys: list[str], start: int) -> None:
    """Change config.toml in every audited way; log each change once it returned."""
    node = Node(home)
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"ready\n")
    i = start
    while True:
        name = f"r{i % 4}"
        match i % 4:
            case 0:
                node.trust(name, keys[i % len(keys)], by="durability")
                done = f"trust {name}\n"
            case 1:
                node.add_peer(f"peer{i % 3}", keys[i % len(keys)], by="durability")
                done = f"peer peer{i % 3}\n"
            case 2:
                node.set_policy(max_epochs=i, by="durability")
                done = f"policy {i}\n"
            case _:
                if f"r{(i - 3) % 4}" in node.trusted_researchers:
                    node.untrust(f"r{(i - 3) % 4}", by="durability")
                done = "untrust\n"
        os.write(fd, done.encode())
        i += 1


def test_config_changes_survive_sigkill_at_random_moments_with_their_records(tmp_path):
    home = tmp_path / "home"
    Node(home, node_id="durable")
    keys = [_key(tmp_path, f"k{i}") for i in range(5)]
    report = tmp_path / "committed.txt"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fedcore.node", __name__])
    rng = random.Random(11)
    for k in range(KILLS):
        child = ctx.Process(target=_config_writer,
                            args=(str(home), str(report), keys, 4 * k * 1000 + 2))
        done = _changes(report)
        child.start()
        _wait_for(report, k + 1)
        _wait_for_change(report, done)  # it writes: kill it during one of its next changes
        time.sleep(rng.uniform(0.0, 0.08))  # a change is ~3 fsyncs: db.json, config, audit
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL

        node = Node(home)
        lines = report.read_text().splitlines()
        policies = [int(line.split()[1]) for line in lines if line.startswith("policy ")]
        if policies:  # the last change that returned, or one made after it
            assert node.policy["max_epochs"] >= policies[-1], f"kill {k}"
        verified = node.verify_audit()
        assert not verified.mismatches, f"kill {k}: {verified}"
        assert all("killed while writing" in p.message for p in verified.problems), verified
        # Replaying the records gives the file's key tables: nothing changed unaudited.
        trusted: dict[str, str] = {}
        for r in node.audit_log():
            if r["event"] == "researcher-trusted":
                trusted[r["researcher"]] = r["key"]
            elif r["event"] == "researcher-untrusted":
                trusted.pop(r["researcher"], None)
        assert set(trusted) == set(node.trusted_researchers), f"kill {k}"
    assert _changes(report) >= KILLS


def _changes(report: Path) -> int:
    """Changes that returned so far."""
    if not report.exists():
        return 0
    return sum(1 for line in report.read_text().splitlines() if line != "ready")


def _wait_for_change(report: Path, done: int) -> None:
    deadline = time.monotonic() + 60
    while _changes(report) <= done:
        assert time.monotonic() < deadline, "the writer made no change within 60 s"
        time.sleep(0.002)


def _wait_for(report: Path, ready: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if report.exists() and report.read_text().count("ready\n") >= ready:
            return
        time.sleep(0.002)
    raise AssertionError("the writer did not start within 30 s")
