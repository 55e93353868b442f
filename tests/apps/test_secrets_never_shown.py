"""A broker password written in the federation URL is shown nowhere.

A real Mosquitto that wants a password; a ``fedcore-node start`` process whose stored URL
holds the password; ``fedcore run`` and ``fedcore resume`` processes; the node's CLI and its
web GUI for both roles. The password (raw or percent-encoded) must appear in none of: the
node's log, its audit log, any GUI page, any CLI output (text and JSON), the history, the
checkpoint files. Resuming from a checkpoint, which keeps no password, works with the
password from ``$FEDCORE_MQTT_PASSWORD``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("paho.mqtt")
pytest.importorskip("flask")
requests = pytest.importorskip("requests")

from fedcore import Experiment, Node  # noqa: E402
from fedcore.wire.identity import enroll as enroll_node  # noqa: E402
from tests._support.browser import Gui  # noqa: E402
from tests._support.deployment import stop_processes, write_csv  # noqa: E402
from tests._support.mqtt import Broker, fed, require_mosquitto  # noqa: E402
from tests._support.trust import enroll  # noqa: E402

pytestmark = pytest.mark.slow

USER = "fedcore"
MARK = "hunter2zebra"  # in every form the password may take: raw and percent-encoded
SECRET = f"{MARK}:p@ss word"
QUOTED = f"{MARK}%3Ap%40ss%20word"
NODE = "site-a"
TAG = "secrets"
ADMIN, ADMIN_PW = "alice", "correct horse battery"
READER, READER_PW = "bob", "staple of the hospital"

PLANS_PY = '''\
from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier
'''


@dataclass
class Deployment:
    url: str
    home: Path
    folder: Path
    shown: dict[str, str] = field(default_factory=dict)  # where -> what it showed

    def show(self, where: str, text: str | bytes) -> str:
        """Keep what a user saw at ``where``; returns it as text."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        self.shown[where] = self.shown.get(where, "") + text
        return text


def _password_file(folder: Path) -> Path:
    require_mosquitto()
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd is missing: apt-get install mosquitto", pytrace=False)
    subprocess.run([tool, "-b", "-c", str(folder / "pw"), USER, SECRET], check=True,
                   capture_output=True)
    return folder / "pw"


def _cli(module: str, *args: str | Path, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _node_main(*args: str) -> str:
    """``fedcore-node ARGS`` in this process (setting up); what it printed."""
    from fedcore_node.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("secrets")
    (root / "broker").mkdir()
    broker = Broker(root / "broker", "allow_anonymous false\n"
                    f"password_file {_password_file(root / 'broker')}").start()
    url = f"mqtt://{USER}:{QUOTED}@127.0.0.1:{broker.port}/{fed()}?retry_max=0.5"
    home = root / NODE
    d = Deployment(url, home, root / "experiment")
    d.folder.mkdir()
    csv = write_csv(root / "cohort.csv", 0)
    d.show("fedcore-node init", _node_main("--home", str(home), "init", "--id", NODE,
                                           "--federation", url))
    _node_main("--home", str(home), "policy", "set", "approval_required=false")
    _node_main("--home", str(home), "dataset", "add", "--name", "cohort", "--tags", TAG,
               "--path", str(csv))
    node = Node(home)
    node.users.add(ADMIN, ADMIN_PW, "admin")
    node.users.add(READER, READER_PW, "read-only")
    node._close_audit()
    for node_id, key in enroll({NODE: home}).items():
        enroll_node(node_id, key, d.folder / "nodes.toml")
    (d.folder / "plans.py").write_text(PLANS_PY)
    (d.folder / "exp.toml").write_text(
        f'name = "secrets"\nplan = "plans.py:Plan"\ntags = ["{TAG}"]\n'
        f"federation = {json.dumps(url)}\nrounds = 1\nnodes = [\"{NODE}\"]\nseed = 3\n"
        'connect_timeout = 30\nenrolled = "nodes.toml"\n\n'
        '[model_args]\ntarget = "label"\n\n[training_args]\nepochs = 1\n')
    with open(home.with_suffix(".log"), "ab") as log:  # the URL stored by `init`
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedcore_node", "--home", str(home), "start", "-v"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield d
    finally:
        stop_processes([proc])
        broker.stop()


@pytest.fixture(scope="module")
def researched(deployment) -> Deployment:
    """``fedcore run`` (the password in the URL of exp.toml), then ``fedcore resume`` (the
    password from the environment), the history, and ``fedcore nodes``."""
    d = deployment
    ckpt = d.folder / "ckpt"
    run = _cli("fedcore_researcher", "run", "exp.toml", "--checkpoint-dir", ckpt,
               cwd=d.folder)
    d.show("fedcore run", run.stdout + run.stderr)
    assert "Checkpoint:" in run.stdout
    assert f"mqtt://{USER}:***@127.0.0.1" in run.stdout  # the URL is shown, redacted

    resumed = _cli("fedcore_researcher", "resume", ckpt, "--rounds", "1", "--json",
                   "--enrolled", "nodes.toml", cwd=d.folder,
                   env={"FEDCORE_MQTT_PASSWORD": SECRET})
    d.show("fedcore resume --json", resumed.stdout + resumed.stderr)
    doc = json.loads(resumed.stdout)
    assert doc["status"] == "completed" and doc["round"] == 2
    assert doc["federation"].startswith(f"mqtt://{USER}:***@")

    for args in (["history", ckpt], ["history", ckpt, "--json"]):
        result = _cli("fedcore_researcher", *args, cwd=d.folder)
        d.show(f"fedcore {' '.join(map(str, args))}", result.stdout + result.stderr)
    nodes = _cli("fedcore_researcher", "nodes", "--federation", d.url, "--json",
                 "--enrolled", "nodes.toml", cwd=d.folder)
    d.show("fedcore nodes --json", nodes.stdout + nodes.stderr)
    assert json.loads(nodes.stdout)["nodes"][0]["connected"]

    loaded = Experiment.load(ckpt, progress=False)
    d.show("Experiment.load(...).history", loaded.history.to_csv())
    d.show("repr(Experiment.load(...))", repr(loaded))
    for path in sorted(ckpt.iterdir()):
        d.show(f"checkpoint {path.name}", path.read_bytes())
    return d


def _no_secret(shown: dict[str, str]) -> None:
    leaks = [where for where, text in shown.items()
             if MARK in text or "p%40ss" in text or "p@ss word" in text]
    assert not leaks, f"the password shows in: {leaks}"


def test_the_researcher_cli_history_and_checkpoints_never_show_the_password(researched):
    assert len(researched.shown) >= 7
    _no_secret(researched.shown)


def test_the_node_cli_audit_and_log_never_show_the_password(researched):
    d = researched
    for args in (["status"], ["status", "--json"], ["info"], ["audit", "show"],
                 ["audit", "show", "--json"]):
        d.show(f"fedcore-node {' '.join(args)}", _node_main("--home", str(d.home), *args))
    status = json.loads(d.shown["fedcore-node status --json"])
    assert status["running"] and status["federation"].startswith(f"mqtt://{USER}:***@")
    audit = d.show("audit.jsonl", (d.home / "audit.jsonl").read_bytes())
    assert '"event": "trained"' in audit  # the round ran, and was recorded
    started = [json.loads(line) for line in audit.splitlines() if '"started"' in line]
    assert started and started[-1]["transport"].startswith(f"mqtt://{USER}:***@")
    log = d.show("node log", d.home.with_suffix(".log").read_bytes())
    assert f"serving mqtt://{USER}:***@" in log  # the daemon says where, redacted
    _no_secret(d.shown)


def _login(gui: Gui, user: str, password: str) -> requests.Session:
    s = requests.Session()
    token = re.search(r'name="csrf_token" value="([^"]+)"',
                      s.get(gui.url + "/login", timeout=10).text)
    assert token
    r = s.post(gui.url + "/login", data={"csrf_token": token.group(1), "username": user,
                                         "password": password}, timeout=10)
    assert r.status_code == 200 and "Log out" in r.text
    return s


def test_no_gui_page_shows_the_password_to_either_role(researched):
    d = researched
    node = Node(d.home)
    gui = Gui(node)
    try:
        (dataset,) = node.datasets.list()
        plans = [f"/plans/{p['sha256']}" for p in node.plans.list()]
        pages = ["/", "/datasets", f"/datasets/{dataset['id']}", "/plans/", *plans,
                 "/policy", "/audit", "/users", "/account"]
        for user, password in ((ADMIN, ADMIN_PW), (READER, READER_PW)):
            s = _login(gui, user, password)
            for page in pages:
                r = s.get(gui.url + page, timeout=10)
                assert r.status_code in (200, 403), (user, page, r.status_code)
                d.show(f"GUI {page} as {user}", r.text)
            assert f"mqtt://{USER}:***@127.0.0.1" in d.shown[f"GUI / as {user}"]
    finally:
        gui.close()
        node._close_audit()
    _no_secret(d.shown)
