"""The deployment recipe of deploy/, run without a container engine: Mosquitto starts with
the shipped mosquitto.conf and fedcore.acl (only the listener's port and the folder the
container mounts are changed, and the broker runs as the test's user), with certificates
from the shipped make-certs.sh and one account per component; the node and researcher
containers' entrypoint scripts run as processes, set the nodes up from their environment,
and a round trains over mqtts:// through that broker.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("paho.mqtt")

from fedcore import Node  # noqa: E402
from fedcore_node.cli import main as node_cli  # noqa: E402
from tests._support.deployment import (  # noqa: E402
    console_scripts,
    node_log,
    stop_processes,
    write_csv,
)
from tests._support.mqtt import Broker, require_mosquitto  # noqa: E402
from tests._support.net import free_port  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
NODES = ("site-a", "site-b")
PLANS_PY = '''\
from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier
'''


def shipped_config(folder: Path, port: int) -> str:
    """deploy/mosquitto/mosquitto.conf with /mosquitto/config/ at ``folder``, on ``port``."""
    shipped = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    lines = [line.replace("/mosquitto/config/", f"{folder}/") for line in shipped]
    lines = [f"listener {port} 127.0.0.1" if line == "listener 8883" else line
             for line in lines]
    changed = [(a, b) for a, b in zip(shipped, lines, strict=True) if a != b]
    assert {a.split()[0] for a, _ in changed} == {"listener", "cafile", "certfile", "keyfile",
                                                  "password_file", "acl_file"}, changed
    return "\n".join([*lines, f"user {getpass.getuser()}", ""])


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def broker(tmp_path):
    """Mosquitto with the shipped files: (broker, ca.pem, {account: password file})."""
    require_mosquitto()
    folder = tmp_path / "mosquitto"
    folder.mkdir()
    made = subprocess.run([str(DEPLOY / "mosquitto" / "make-certs.sh"), "127.0.0.1",
                           str(folder / "certs")], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    (folder / "fedcore.acl").write_text((DEPLOY / "mosquitto" / "fedcore.acl").read_text())
    passwd = folder / "passwd"
    passwd.touch(mode=0o600)
    secrets = {}
    for account in ("researcher", *NODES):
        password = f"{account}-secret"
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), account, password], check=True,
                       capture_output=True)
        secrets[account] = _secret(tmp_path / f"{account}.pw", password)
    port = free_port()
    b = Broker(folder, port=port)
    b.config.write_text(shipped_config(folder, port))
    b.start()
    yield b, folder / "certs" / "ca.pem", secrets
    b.stop()


def test_the_shipped_acl_is_the_documented_one():
    page = (ROOT / "docs" / "deployment.md").read_text()
    assert (DEPLOY / "mosquitto" / "fedcore.acl").read_text() in page


def test_compose_and_dockerfiles_point_at_the_shipped_files():
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = [v.split(":")[0] for v in compose["services"]["broker"]["volumes"]]
    for mount in mounts:  # the generated ones are made by the documented steps
        if not mount.endswith(("passwd", "certs")):
            assert (DEPLOY / mount).is_file(), mount
    node_script = (DEPLOY / "node" / "entrypoint.sh").read_text()
    for name in ("node-a", "node-b"):
        service = compose["services"][name]
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        for key in service["environment"]:
            assert key in node_script, f"{key} is not read by the node's entrypoint"
    for role, script in (("node", "entrypoint.sh"), ("researcher", "entrypoint.sh")):
        dockerfile = (DEPLOY / role / "Dockerfile").read_text()
        assert f"deploy/{role}/{script}" in dockerfile and "-c /tmp/fedcore/constraints.txt" \
            in dockerfile


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEDCORE_IDENTITY", "FEDCORE_NODES", "FEDCORE_NODE_HOME"))}
    bin_dir = console_scripts(tmp_path / "bin")
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "HOME": str(tmp_path),
            "PYTHONUNBUFFERED": "1", **extra}


def test_the_node_entrypoint_says_what_a_first_start_needs(tmp_path):
    done = subprocess.run([str(DEPLOY / "node" / "entrypoint.sh")], capture_output=True,
                          text=True, timeout=60,
                          env=_env(tmp_path, FEDCORE_NODE_HOME=str(tmp_path / "home")))
    assert done.returncode == 2
    assert (f"no node home at {tmp_path / 'home'} yet, and FEDCORE_NODE_ID FEDCORE_FEDERATION "
            "not set: set them (see deploy/compose.yaml) to create it.") in done.stderr
    assert not (tmp_path / "home").exists()


def test_a_round_through_the_shipped_broker_with_the_entrypoints(tmp_path, broker):
    b, ca, secrets = broker
    study = tmp_path / "study"
    study.mkdir()
    researcher_env = _env(tmp_path, FEDCORE_STUDY=str(study),
                          FEDCORE_MQTT_PASSWORD_FILE=str(secrets["researcher"]))

    def fedcore(*args: str) -> str:
        done = subprocess.run([str(DEPLOY / "researcher" / "entrypoint.sh"), *args],
                              capture_output=True, text=True, timeout=300, env=researcher_env,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"fedcore {args}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    key = re.search(r"public key:\s+(\S+)", fedcore("identity"))[1]
    assert (study / "keys" / "researcher.key").is_file()
    homes, daemons = {}, []
    try:
        for i, node in enumerate(NODES):
            homes[node] = tmp_path / node / "home"
            homes[node].parent.mkdir()
            data = write_csv(tmp_path / node / "cohort.csv", i)
            env = _env(tmp_path / node, FEDCORE_NODE_HOME=str(homes[node]),
                       FEDCORE_NODE_ID=node, FEDCORE_TRUST=f"study={key}",
                       FEDCORE_FEDERATION=f"mqtts://{node}@127.0.0.1:{b.port}/study?"
                                          f"cafile={ca}",
                       FEDCORE_MQTT_PASSWORD_FILE=str(secrets[node]),
                       FEDCORE_DATA=str(data), FEDCORE_TAGS="diabetes")
            with open(homes[node].with_suffix(".log"), "ab") as log:
                daemons.append(subprocess.Popen([str(DEPLOY / "node" / "entrypoint.sh")],
                                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL))
        for node in NODES:  # each node's init printed the researcher's enroll line
            enroll = _wait_for_line(homes[node], daemons, "fedcore enroll ")
            fedcore(*enroll.split()[1:])
        (study / "plans.py").write_text(PLANS_PY)
        (study / "exp.toml").write_text(
            'plan = "plans.py:Plan"\ntags = ["diabetes"]\nrounds = 2\nconnect_timeout = 60\n'
            f'nodes = {json.dumps(list(NODES))}\n'
            f'federation = "mqtts://researcher@127.0.0.1:{b.port}/study?cafile={ca}"\n'
            '\n[model_args]\ntarget = "label"\n')
        submitted = fedcore("plan", "submit", "exp.toml")
        plan_hash = re.search(r"plan approve (\w+)", submitted)[1]
        for node in NODES:  # the administrators, on the running nodes' homes
            assert node_cli(["--home", str(homes[node]), "plan", "approve", plan_hash]) == 0
        doc = json.loads(fedcore("run", "exp.toml", "--json", "--quiet"))
        for daemon, node in zip(daemons, NODES, strict=True):
            assert daemon.poll() is None, node_log(homes[node])
    finally:
        stop_processes(daemons)
    assert doc["status"] == "completed" and doc["round"] == 2, doc
    assert [m["nodes"] for m in doc["metrics"]] == [2, 2]
    for node in NODES:
        home = Node(homes[node])
        assert home.config["federation"].startswith("mqtts://")
        assert sum(r["event"] == "trained" for r in home.audit_log()) == 2


def _wait_for_line(home: Path, daemons: list[subprocess.Popen[bytes]], prefix: str) -> str:
    import time

    deadline = time.monotonic() + 120
    while True:
        for line in node_log(home).splitlines():
            if line.startswith(prefix):
                return line
        assert all(d.poll() is None for d in daemons), node_log(home)
        assert time.monotonic() < deadline, node_log(home)
        time.sleep(0.1)


@pytest.mark.parametrize("url, name", [
    ("mqtts://researcher@broker:8883/study?cafile=/ca.pem", "researcher"),
    ("mqtt://broker/study?username=alice&password_file=/pw", "alice"),
    ("mqtt://lab%2Da:secret@broker/study", "lab-a"),
])
def test_the_researchers_name_on_the_broker_is_its_account(url, name):
    """The shipped ACL grants the researcher's topics to its account: the researcher's
    name on the transport must be that account for the nodes' replies to reach it."""
    from fedcore.researcher.federation import Federation

    assert Federation(url).name == name
    assert Federation("mqtt://broker/study").name.startswith("researcher-")
