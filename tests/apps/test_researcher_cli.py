"""The researcher CLI, ``fedcore``, as a user runs it: real ``fedcore`` processes drive three
real ``fedcore-node start`` processes over ws:// (homes made with the node CLI, enrolled
both ways), and read the checkpoints they leave. Nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("websockets")

from fedcore import Experiment
from fedcore import __version__ as fedcore_version  # noqa: E402
from fedcore.wire import codec  # noqa: E402
from fedcore.wire.identity import enroll as enroll_node  # noqa: E402
from fedcore.wire.messages import Envelope  # noqa: E402
from tests._support.deployment import node_processes, write_csv  # noqa: E402
from tests._support.net import free_port  # noqa: E402
from tests._support.trust import enroll  # noqa: E402

pytestmark = pytest.mark.slow

NODES = ("site-a", "site-b", "site-c")
TAG = "cli-e2e"
ROUNDS = 4

# Deterministic (SGD with the experiment's seed), and each round lasts at least PAUSE_S on
# every node, so that a run can be killed between two checkpoints.
PLANS_PY = '''\
import time

from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan

PAUSE_S = 0.25


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier

    def fit(self, dataset, seed):
        time.sleep(PAUSE_S)
        return super().fit(dataset, seed)
'''

SIMULATION_PY = '''\
import sys

from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import StandardScaler

import fedcore
from fedcore_sklearn import SklearnTrainingPlan


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier


def make_experiment():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    with fedcore.simulate.from_arrays(X, y, n_nodes=3, tags=["bc"]) as fed:
        yield fedcore.Experiment(Plan, tags=["bc"], federation=fed.url, round_limit=2,
                                 model_args={"loss": "log_loss"}, name="simulated")
    print("simulation closed", file=sys.stderr)
'''


@dataclass
class Federation:
    url: str
    folder: Path  # exp.toml, plans.py and nodes.toml
    homes: dict[str, Path]

    @property
    def toml(self) -> Path:
        return self.folder / "exp.toml"


def _experiment_toml(url: str, **changes: str) -> str:
    lines = {
        "name": '"cli-e2e"', "plan": '"plans.py:Plan"', "tags": f'["{TAG}"]',
        "federation": json.dumps(url), "rounds": str(ROUNDS), "nodes": json.dumps(NODES),
        "seed": "7", "connect_timeout": "30", "enrolled": '"nodes.toml"',
        "aggregator": '"fedavg"', **changes}
    head = "".join(f"{k} = {v}\n" for k, v in lines.items() if v)
    return head + ('\n[model_args]\ntarget = "label"\n\n[training_args]\nepochs = 1\n'
                   'batch_size = 16\n\n[strategy]\nname = "AllNodes"\nmin_nodes = 3\n')


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    """Three node processes dialling ws://127.0.0.1:PORT, and an experiment folder."""
    from fedcore_node.cli import main

    root = tmp_path_factory.mktemp("researcher-cli")
    homes = {n: root / n for n in NODES}
    for i, (node_id, home) in enumerate(homes.items()):
        csv = write_csv(root / f"{node_id}.csv", i)
        assert main(["--home", str(home), "init", "--id", node_id]) == 0
        assert main(["--home", str(home), "policy", "set", "approval_required=false"]) == 0
        assert main(["--home", str(home), "dataset", "add", "--name", "cohort", "--tags",
                     TAG, "--path", str(csv)]) == 0
    folder = root / "experiment"
    folder.mkdir()
    for node_id, key in enroll(homes).items():  # the researcher's nodes.toml, not the session's
        enroll_node(node_id, key, folder / "nodes.toml")
    url = f"ws://127.0.0.1:{free_port()}?retry_max=0.5"
    (folder / "plans.py").write_text(PLANS_PY)
    (folder / "exp.toml").write_text(_experiment_toml(url))
    with node_processes(homes, url):
        yield Federation(url, folder, homes)


def fedcore(*args: str | Path, cwd: Path, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """``fedcore ARGS`` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "fedcore_researcher", *map(str, args)],
                          cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def full_run(federation) -> tuple[subprocess.CompletedProcess[str], Path]:
    """An uninterrupted ``fedcore run`` of ROUNDS rounds: (the process, its checkpoints)."""
    folder = federation.folder / "full"
    return _ok(fedcore("run", "exp.toml", "--checkpoint-dir", folder,
                       cwd=federation.folder)), folder


def test_run_prints_progress_a_table_of_metrics_and_fills_the_checkpoint_folder(full_run):
    result, folder = full_run
    assert f"{ROUNDS}/{ROUNDS}" in result.stderr  # the progress bar
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("round  nodes"))
    assert lines[header].split()[2:] == ["accuracy", "precision", "recall", "f1"]
    rows = [line.split() for line in lines[header + 1:header + 1 + ROUNDS]]
    assert [row[:2] for row in rows] == [[str(r), "3"] for r in range(1, ROUNDS + 1)]
    assert float(rows[-1][2]) > 0.7  # the data are linearly separable
    files = sorted(p.name for p in folder.glob("*.fedcore"))
    assert files == [f"round_{r:04d}.fedcore" for r in range(1, ROUNDS + 1)]
    assert f"Checkpoint: {(folder / files[-1]).resolve()}" in result.stdout


def _metrics(exp: Experiment, rounds: int | None = None) -> list[dict]:
    return json.loads(exp.metrics().head(rounds).to_json(orient="records"))


def test_resume_after_a_kill_ends_bit_identical_to_an_uninterrupted_run(federation, full_run):
    folder = federation.folder / "killed"
    with open(federation.folder / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedcore_researcher", "run", "exp.toml", "--rounds",
             str(ROUNDS), "--checkpoint-dir", str(folder), "--quiet"],
            cwd=federation.folder, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (folder / "round_0002.fedcore").exists():
            assert proc.poll() is None, (federation.folder / "killed.log").read_text()
            assert time.monotonic() < deadline, "no round-2 checkpoint"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # no goodbye: the process just ends
    finally:
        proc.kill()
        proc.wait()
    left = sorted(p.name for p in folder.glob("*.fedcore"))
    assert f"round_{ROUNDS:04d}.fedcore" not in left, "the run ended before the kill"

    # --json: one document on stdout, with the per-round metrics
    result = _ok(fedcore("resume", folder, "--enrolled", "nodes.toml", "--json",
                         cwd=federation.folder))
    doc = json.loads(result.stdout)
    assert doc["round"] == ROUNDS and doc["status"] == "completed"
    assert [m["round"] for m in doc["metrics"]] == list(range(1, ROUNDS + 1))
    assert doc["plan_hash"] == Experiment.load(full_run[1], progress=False).plan_hash
    assert doc["checkpoint"] == str((folder / f"round_{ROUNDS:04d}.fedcore").resolve())

    resumed = Experiment.load(folder, progress=False)
    reference = Experiment.load(full_run[1], progress=False)
    assert resumed.round == reference.round == ROUNDS
    assert resumed.parameters is not None and reference.parameters is not None
    assert resumed.parameters.equal(reference.parameters), "the final models differ"
    assert doc["metrics"] == _metrics(reference)


def test_resume_remembers_the_runs_key_and_enrolled_nodes(federation, full_run, tmp_path):
    """No --identity, no --enrolled, no $FEDCORE_IDENTITY/$FEDCORE_NODES, another folder:
    the run's run.toml names the files (paths only), so the nodes still answer."""
    record = (full_run[1] / "run.toml").read_text()
    assert f'enrolled = "{federation.folder / "nodes.toml"}"' in record
    assert f'identity = "{Path(os.environ["FEDCORE_IDENTITY"]).resolve()}"' in record
    env = {k: v for k, v in os.environ.items() if k not in ("FEDCORE_IDENTITY", "FEDCORE_NODES")}
    result = subprocess.run(
        [sys.executable, "-m", "fedcore_researcher", "resume", str(full_run[1]), "--rounds",
         "1", "--checkpoint-dir", str(tmp_path / "more"), "--json", "--quiet"],
        cwd=tmp_path, env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL)
    doc = json.loads(_ok(result).stdout)
    assert doc["status"] == "completed" and doc["round"] == ROUNDS + 1
    assert not (tmp_path / ".fedcore").exists(), "a new default key was made instead"


def test_nodes_lists_the_connected_nodes_and_their_datasets(federation):
    result = _ok(fedcore("nodes", "--federation", federation.url, "--tags", TAG, "--json",
                         "--enrolled", "nodes.toml", cwd=federation.folder))
    doc = json.loads(result.stdout)
    assert [n["node"] for n in doc["nodes"]] == list(NODES)
    assert all(n["connected"] and n["answers"] for n in doc["nodes"])
    assert sorted((d["node"], d["name"]) for d in doc["datasets"]) == [
        (n, "cohort") for n in NODES]
    assert all(d["tags"] == [TAG] and d["n_samples"] == 120 for d in doc["datasets"])


def test_history_csv_has_one_row_per_node_and_round(federation, full_run):
    folder = full_run[1]
    frame = pd.read_csv(io.StringIO(_ok(fedcore("history", folder, "--csv",
                                                cwd=federation.folder)).stdout))
    assert len(frame) == 3 * ROUNDS
    assert sorted(zip(frame["round"], frame["node"], strict=True)) == [
        (r, n) for r in range(1, ROUNDS + 1) for n in NODES]
    assert (frame["status"] == "ok").all() and "global_accuracy" in frame

    metrics = json.loads(_ok(fedcore("history", folder / "round_0002.fedcore", "--metrics",
                                     "--json", cwd=federation.folder)).stdout)
    assert metrics == _metrics(Experiment.load(folder, progress=False), 2)


def _usage_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stderr


def test_bad_experiment_files_are_usage_errors_that_say_what_to_fix(federation):
    folder = federation.folder
    (folder / "typo.toml").write_text(_experiment_toml(federation.url,
                                                       aggregator='"fedavgg"'))
    err = _usage_error(fedcore("run", "typo.toml", cwd=folder))
    assert "typo.toml" in err and "'fedavgg'" in err and "Did you mean 'fedavg'?" in err

    (folder / "untagged.toml").write_text(_experiment_toml(federation.url, tags=""))
    err = _usage_error(fedcore("run", "untagged.toml", cwd=folder))
    assert "missing key 'tags'" in err and 'tags = ["' in err  # and a minimal example

    err = _usage_error(fedcore("run", "nowhere.toml", cwd=folder))
    assert "No experiment file at nowhere.toml" in err


def test_unreadable_or_incompatible_checkpoints_are_usage_errors(federation, full_run):
    folder = federation.folder
    env = codec.decode((full_run[1] / "round_0001.fedcore").read_bytes())
    state = {**env.body.state, "format": 99}
    old = type(env.body)(state=state, params=env.body.params, history=env.body.history,
                         aggregator_state=env.body.aggregator_state)
    (folder / "future.fedcore").write_bytes(codec.encode(Envelope(body=old)))
    err = _usage_error(fedcore("resume", "future.fedcore", cwd=folder))
    assert "format 99" in err and "format 1" in err

    err = _usage_error(fedcore("resume", "plans.py", cwd=folder))
    assert "not a readable fedcore checkpoint" in err


def test_a_python_file_runs_a_simulated_federation_in_process(tmp_path):
    (tmp_path / "simulation.py").write_text(SIMULATION_PY)
    result = _ok(fedcore("run", "simulation.py", "--json", cwd=tmp_path))
    doc = json.loads(result.stdout)  # the progress bar and the file's own prints: on stderr
    assert doc["status"] == "completed" and doc["federation"].startswith("inproc://")
    assert [(m["round"], m["nodes"]) for m in doc["metrics"]] == [(1, 3), (2, 3)]
    assert doc["metrics"][-1]["accuracy"] > 0.8 and doc["checkpoint"] is None
    assert "simulation closed" in result.stderr  # the generator's clean-up ran


def test_ctrl_c_stops_a_run_with_exit_code_130(federation, tmp_path):
    # Nobody dials this port: the run waits for its nodes until interrupted.
    url = f"ws://127.0.0.1:{free_port()}"
    log = tmp_path / "err.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedcore_researcher", "run", "exp.toml", "--federation",
             url], cwd=federation.folder, stdout=subprocess.PIPE, stderr=err,
            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while f"0/{ROUNDS}" not in log.read_text():  # the progress bar: the run started
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    assert "interrupted after round 0" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_version_from_the_console_script():
    script = Path(sys.executable).with_name("fedcore")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == f"fedcore {fedcore_version}\n"


def test_the_docs_and_the_help_show_the_same_complete_and_valid_toml(tmp_path, capsys):
    from fedcore_researcher import cli
    from fedcore_researcher._experiment_file import read_toml

    page = (Path(__file__).parents[2] / "docs" / "researcher-cli.md").read_text()
    blocks = page.split("```toml\n")[1:]
    complete = [b.split("```")[0] for b in blocks if "[strategy]" in b]
    assert complete == [cli.TOML_EXAMPLE]
    (tmp_path / "exp.toml").write_text(cli.TOML_EXAMPLE)
    desc = read_toml(tmp_path / "exp.toml")  # every key known, every type right
    assert desc["checkpoint_dir"] == str(tmp_path / "checkpoints")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and cli.TOML_EXAMPLE in help_text.replace("\n  ", "\n")
