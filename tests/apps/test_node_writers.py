"""Many writers on one node home at once: CLI processes, the daemon, the web GUI (issue 15).

Sixteen processes run ``fedcore-node`` commands (``dataset add``, ``plan approve`` /
``reject``, ``policy set``) against one home while ``fedcore-node start`` serves it, a
researcher submits plans through that daemon, and an administrator approves plans in the
GUI over HTTP. Every operation that reported success must be there afterwards, and
``fedcore-node audit verify`` must find the audit log and the database in agreement.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("websockets")
requests = pytest.importorskip("requests")
pytest.importorskip("flask")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork and flock")

from fedcore.node import Node  # noqa: E402
from fedcore.plan import PlanBundle  # noqa: E402
from fedcore.wire.identity import public_key  # noqa: E402
from fedcore.wire.messages import PlanStatus, PlanSubmit  # noqa: E402
from fedcore_node.cli import main  # noqa: E402
from fedcore_node.gui import make_gui_server  # noqa: E402
from tests._support.attack import Attacker  # noqa: E402
from tests._support.deployment import start_node, stop_processes, write_csv  # noqa: E402
from tests._support.net import free_port  # noqa: E402

WRITERS = 16
OPS = 11  # per writer: 4 plan decisions, 4 dataset registrations, 3 policy changes
SUBMISSIONS = 40  # by the researcher, through the daemon
GUI_APPROVALS = 12
ADMIN, ADMIN_PW = "carol", "a long enough password"

def _writer(home: str, w: int, csv: str, plans: list[str], go: str) -> None:
    """One administrator's shell: ``fedcore-node`` commands, one fresh Node each.

    Runs the real CLI entry point in its own process (forked from a server that imported
    fedcore once: sixteen imports would take most of a minute on two busy cores). Prints
    one JSON line per command: what it changed when it reported success.
    """
    folder = Path(go).parent
    (folder / f"ready-{w}").touch()
    while not Path(go).exists():  # every writer starts at once, when the test says go
        time.sleep(0.01)
    with open(folder / f"writer-{w}.jsonl", "w") as report:
        for i in range(OPS):
            done = _command(home, w, i, csv, plans)
            print(json.dumps(done), file=report, flush=True)


def _command(home: str, w: int, i: int, csv: str, plans: list[str]) -> list[Any]:
    if i % 3 == 0:
        sha, verdict = plans[i // 3], ("approve" if (w + i) % 2 else "reject")
        code, text = _cli(home, "plan", verdict, sha, "--note", f"by writer {w}")
        if code == 0 and sha in text:
            return ["plan", sha, {"approve": "approved", "reject": "rejected"}[verdict]]
    elif i % 3 == 1:
        name = f"w{w}-{i}"
        code, text = _cli(home, "dataset", "add", "--name", name, "--tags", f"t{w}x{i}",
                          "--path", csv)
        found = re.search(r"as (ds-[0-9a-f]+)", text)
        if code == 0 and found:
            return ["dataset", found.group(1), name]
    else:
        who = f"r{w}-{i}"
        code, text = _cli(home, "policy", "set", f"dataset_access.{who}=*")
        if code == 0 and who in text:
            return ["access", who]
    return ["failed", code, text[-300:]]


def _cli(home: str, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["--home", home, *argv])
    return code, out.getvalue()


def _bundle(tag: str, i: int) -> PlanBundle:
    return PlanBundle({"plan.py": f"# {tag} plan {i}\nVALUE = {i}\n"}, "P", "sklearn")


def test_concurrent_cli_daemon_gui_and_researcher_writes_all_survive(tmp_path: Path):
    home = tmp_path / "site"
    csv = write_csv(tmp_path / "data.csv", seed=1, n=20)
    node = Node(home, node_id="site")
    node.trust("tests", public_key())
    node.users.add(ADMIN, ADMIN_PW, "admin")
    decided = [node.plans.submit(_bundle("cli", i), submitter="setup")["sha256"]
               for i in range(WRITERS * 4)]
    node_key = node.identity.public_bytes
    url = f"ws://127.0.0.1:{free_port()}"
    daemon = start_node(home, url)
    gui = make_gui_server(Node(home), "127.0.0.1", 0)  # the GUI: its own Node, own handles
    threading.Thread(target=gui.serve_forever, daemon=True).start()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fedcore_node.cli", __name__])
    writers: list[Any] = []
    go = tmp_path / "go"
    try:
        with Attacker(url, {"site": node_key}, timeout=60) as researcher:
            session = _login(f"http://127.0.0.1:{gui.port}")
            writers = [ctx.Process(target=_writer, args=(
                str(home), w, str(csv), decided[4 * w:4 * w + 4], str(go)))
                for w in range(WRITERS)]
            for proc in writers:
                proc.start()
            _wait_until_ready(writers, tmp_path)
            go.touch()
            submitted, approved = _submit_and_approve(researcher, session,
                                                      f"http://127.0.0.1:{gui.port}")
            for proc in writers:
                proc.join(120)
    finally:
        for proc in writers:
            if proc.is_alive():
                proc.kill()
        stop_processes([daemon])
        gui.shutdown()
        gui.server_close()

    assert [p.exitcode for p in writers] == [0] * WRITERS
    results = [json.loads(line) for w in range(WRITERS)
               for line in (tmp_path / f"writer-{w}.jsonl").read_text().splitlines()]
    assert len(results) == WRITERS * OPS
    failed = [r for r in results if r[0] == "failed"]
    assert not failed, failed  # nothing refused: no writer lost a race it should have waited
    assert len(results) + len(submitted) + len(approved) >= 200

    node = Node(home)
    datasets = {e["id"]: e["name"] for e in node.datasets.list()}
    plans = {e["sha256"]: e["status"] for e in node.plans.list()}
    access = node.policy["dataset_access"] or {}
    for r in results:  # every command that said it succeeded is in the database
        if r[0] == "dataset":
            assert datasets.get(r[1]) == r[2], f"registered dataset {r[1:]} is missing"
        elif r[0] == "plan":
            assert plans[r[1]] == r[2], f"plan {r[1][:12]} was {r[2]}, now {plans[r[1]]}"
        else:
            assert access.get(r[1]) == ["*"], f"dataset_access.{r[1]} was lost"
    for sha in submitted:  # every acknowledged submission is kept
        assert plans.get(sha) == ("approved" if sha in approved else "pending"), sha
    assert len(datasets) == WRITERS * 4

    check = subprocess.run([sys.executable, "-m", "fedcore_node", "--home", str(home), "audit",
                            "verify", "--json"], capture_output=True, text=True, timeout=60)
    report = json.loads(check.stdout)
    assert check.returncode == 0 and report["ok"], report
    assert report["mismatches"] == [] and report["problems"] == []
    events = [r["event"] for r in node.audit_log()]
    assert events.count("dataset-added") == WRITERS * 4
    assert events.count("plan-submitted") == WRITERS * 4 + SUBMISSIONS
    assert events.count("policy-changed") == WRITERS * 3


def _submit_and_approve(researcher: Attacker, session: requests.Session, gui: str
                        ) -> tuple[list[str], set[str]]:
    """Submit plans through the daemon while the CLI writers run; approve some in the GUI."""
    submitted, approved = [], set()
    for i in range(SUBMISSIONS):
        bundle = _bundle("researcher", i)
        reply = researcher.ask("site", PlanSubmit(plan=bundle.to_wire(), message=f"#{i}"))
        assert isinstance(reply.body, PlanStatus) and reply.body.status == "pending", reply
        submitted.append(bundle.sha256)
        if i % 3 == 0 and len(approved) < GUI_APPROVALS:
            page = session.get(f"{gui}/plans/{bundle.sha256}", timeout=30)
            r = session.post(f"{gui}/plans/{bundle.sha256}/approve",
                             data={"csrf_token": _csrf(page.text), "note": "gui"}, timeout=30)
            assert r.status_code == 200 and "Approved plan" in r.text, r.text[-500:]
            approved.add(bundle.sha256)
    return submitted, approved


def _wait_until_ready(writers: list[Any], folder: Path) -> None:
    """Wait until every writer process runs, so that they race from the same moment."""
    deadline = time.monotonic() + 90
    while len(list(folder.glob("ready-*"))) < len(writers):
        assert time.monotonic() < deadline, "the writers did not start within 90 s"
        assert all(p.is_alive() for p in writers), "a writer exited before it began"
        time.sleep(0.05)


def _login(gui: str) -> requests.Session:
    s = requests.Session()
    token = _csrf(s.get(gui + "/login", timeout=30).text)
    r = s.post(gui + "/login", data={"csrf_token": token, "username": ADMIN,
                                     "password": ADMIN_PW}, timeout=30)
    assert r.status_code == 200 and "Log out" in r.text
    return s


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the form"
    return match.group(1)
