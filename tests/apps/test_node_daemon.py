"""``fedcore-node start`` / ``status``: a real node process, stopped by a signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedcore_node.cli import main

pytest.importorskip("websockets")
pytest.importorskip("sklearn")

from fedcore import Experiment  # noqa: E402
from fedcore.errors import RoundError  # noqa: E402
from tests._support.deployment import audit_events, frame, start_node  # noqa: E402
from tests._support.net import free_port  # noqa: E402
from tests._support.sklearn_plans import SleepWhenToldPlan  # noqa: E402
from tests._support.trust import enroll  # noqa: E402


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_start_status_and_a_clean_stop_on_sigterm(tmp_path: Path, capsys):
    home = str(tmp_path / "home")
    url = f"ws://127.0.0.1:{free_port()}"  # nobody listens: the node keeps dialling
    assert _cli(capsys, "--home", home, "init", "--id", "site-z", "--federation", url)[0] == 0
    code, out = _cli(capsys, "--home", home, "status")
    assert code == 0 and "not running" in out and url in out
    # The daemon serves another URL than the configured one: status shows the one served.
    served = f"ws://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "fedcore_node", "--home", home, "start",
                             "--federation", served],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (Path(home) / "node.pid").exists(), 15, "the pid file")
        _wait_for(lambda: served in _cli(capsys, "--home", home, "status")[1], 15,
                  "status to show the URL served")
        code, out = _cli(capsys, "--home", home, "status")
        assert f"running (pid {proc.pid})" in out and "site-z" in out
        assert f"federation: {served} (config.toml says {url})" in out
        assert json.loads(_cli(capsys, "--home", home, "status", "--json")[1])["serving"] == \
            served
        code, out = _cli(capsys, "--home", home, "start")  # a second one is refused
        assert code == 1 and "already running" in out
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        # The node's own clock: its last audit record is written within 2 s of the signal
        # (the interpreter's exit after that depends on how busy the machine is).
        assert audit_events(Path(home))[-1]["time"] - signalled < 2
        assert b"Stopping on SIGTERM" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        _stop(proc)
    assert not (Path(home) / "node.pid").exists()
    assert not (Path(home) / "node.serving").exists()
    out = _cli(capsys, "--home", home, "status")[1]
    assert "state:      not running" in out and f"federation: {url}\n" in out
    code, out = _cli(capsys, "--home", home, "audit", "verify")
    assert code == 0 and "intact" in out
    assert [e["event"] for e in audit_events(Path(home))][-2:] == ["started", "stopped"]


def test_a_stale_pid_file_is_detected_and_replaced(tmp_path: Path, capsys):
    home = tmp_path / "home"
    _cli(capsys, "--home", str(home), "init", "--id", "site-s")
    (home / "node.pid").write_text("999999\n")  # left by a crash
    code, out = _cli(capsys, "--home", str(home), "status")
    assert "not running (stale pid file of pid 999999" in out


def test_sigterm_mid_round_abandons_it_on_record_and_exits_within_2_s(tmp_path: Path, capsys):
    home = tmp_path / "home"
    url = f"ws://127.0.0.1:{free_port()}"
    csv = tmp_path / "c.csv"
    frame(0, 100).to_csv(csv, index=False)
    for argv in (["init", "--id", "site-t", "--federation", url],
                 ["policy", "set", "approval_required=false"],
                 ["dataset", "add", "--name", "cohort", "--tags", "term", "--path", str(csv)]):
        assert _cli(capsys, "--home", str(home), *argv)[0] == 0
    enrolled = enroll({"site-t": home})
    proc = start_node(home, url, PLAN_TEST_SLEEP="30")
    exp = Experiment(SleepWhenToldPlan, tags=["term"], federation=url, nodes=["site-t"],
                     model_args={"target": "label"}, progress=False, connect_timeout=20,
                     enrolled=enrolled)
    errors: list[BaseException] = []

    def round_() -> None:
        try:
            exp.run_once()
        except RoundError as exc:
            errors.append(exc)

    worker = threading.Thread(target=round_)
    try:
        worker.start()
        _wait_for(lambda: any(e["event"] == "train-request" for e in audit_events(home)), 20,
                  "the node to start training")
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, home.with_suffix(".log").read_text()
        assert audit_events(home)[-1]["time"] - signalled < 2  # see the test above
        worker.join(timeout=10)
        assert errors and "site-t" in str(errors[0])  # the researcher is told
    finally:
        exp.close()
        _stop(proc)
    events = [e["event"] for e in audit_events(home)]
    assert events[-2:] == ["train-abandoned", "stopped"]
    assert _cli(capsys, "--home", str(home), "audit", "verify")[0] == 0
    log = home.with_suffix(".log").read_text()
    assert "search: ok" in log  # one line per request: researcher, kind, outcome, seconds
