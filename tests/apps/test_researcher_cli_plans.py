"""``fedcore plan submit|status|diff`` and the experiment file's ``secagg``, ``privacy``,
``strategy`` and ``aggregator`` options, with real nodes on an in-process federation (the
CLI runs in this process, as a simulation does) and the node administrator's own CLI.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from fedcore import Experiment, Node  # noqa: E402
from fedcore.secagg import JoyeLibert, PairwiseMasking  # noqa: E402
from fedcore_node.cli import main as node_cli  # noqa: E402
from fedcore_researcher import cli  # noqa: E402
from fedcore_researcher._experiment_file import open_experiment  # noqa: E402
from tests._support.deployment import write_csv  # noqa: E402

TAG = "plan-cli"

PLANS_PY = '''\
from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier
'''


def fedcore(*argv: object) -> tuple[int, str]:
    """``fedcore ARGV`` in this process: (exit code, stdout)."""
    out = io.StringIO()
    code = cli.main([str(a) for a in argv], out=out)
    return code, out.getvalue()


def _toml(folder: Path, url: str, extra: str = "") -> Path:
    (folder / "plans.py").write_text(PLANS_PY)
    path = folder / "exp.toml"
    path.write_text(f'plan = "plans.py:Plan"\ntags = ["{TAG}"]\nfederation = "{url}"\n'
                    f'rounds = 1\nconnect_timeout = 30\n{extra}\n[model_args]\n'
                    'target = "label"\n')
    return path


@pytest.fixture
def federation(tmp_path):
    """Two nodes that require approval, on an in-process hub: (url, {node: home})."""
    url = f"inproc://plan-cli-{uuid.uuid4().hex[:8]}"
    nodes = [Node(tmp_path / n, node_id=n, approval_required=True) for n in ("n1", "n2")]
    for i, node in enumerate(nodes):
        node.datasets.add("cohort", [TAG], write_csv(tmp_path / f"{node.node_id}.csv", i))
        node.start(url)
    yield url, {n.node_id: n.home for n in nodes}
    for node in nodes:
        node.stop()


def test_submit_then_status_follows_the_administrators_decisions(tmp_path, federation,
                                                                    capsys):
    url, homes = federation
    exp_file = _toml(tmp_path, url)
    code, out = fedcore("plan", "status", exp_file)
    assert code == 1 and out.count("unknown") == 2
    assert f"Not submitted to every node yet: fedcore plan submit {exp_file}" in out

    code, out = fedcore("plan", "submit", exp_file, "--message", "SGD, one epoch")
    assert code == 0 and out.count("pending") == 2, out
    with open_experiment(str(exp_file)) as exp:
        plan_hash = exp.plan_hash
    assert f"fedcore-node plan approve {plan_hash[:12]}" in out
    assert Node(homes["n1"]).plans.get(plan_hash)["message"] == "SGD, one epoch"

    # n1 approves, n2 rejects with a note: status says so, node by node, and exits 1
    assert node_cli(["--home", str(homes["n1"]), "plan", "approve", plan_hash[:12]]) == 0
    assert node_cli(["--home", str(homes["n2"]), "plan", "reject", plan_hash[:12], "--note",
                     "no network access in plans, please"]) == 0
    capsys.readouterr()
    code, out = fedcore("plan", "status", exp_file, "--json", "--wait", "30")
    doc = json.loads(out)
    assert code == 1 and doc["plan_hash"] == plan_hash
    assert [(n["node"], n["status"], n["runs"]) for n in doc["nodes"]] == [
        ("n1", "approved", True), ("n2", "rejected", False)]
    assert doc["nodes"][1]["note"] == "no network access in plans, please"

    # once n2 approves too, status exits 0 and the run trains on both
    assert node_cli(["--home", str(homes["n2"]), "plan", "approve", plan_hash[:12]]) == 0
    code, out = fedcore("plan", "status", exp_file)
    assert code == 0 and out.count("approved") == 2, out
    assert fedcore("run", exp_file, "--quiet")[0] == 0


def test_a_node_without_approval_runs_the_plan_unsubmitted(tmp_path, federation):
    url, homes = federation
    for home in homes.values():
        assert node_cli(["--home", str(home), "policy", "set", "approval_required=false"]) == 0
    code, out = fedcore("plan", "status", _toml(tmp_path, url), "--json")
    assert code == 0 and all(n["runs"] for n in json.loads(out)["nodes"])


def test_diff_shows_what_changed_between_a_checkpoint_and_a_file(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    exp_file = _toml(old, "inproc://unused")
    with open_experiment(str(exp_file)) as exp:
        exp.save(tmp_path / "ckpt" / "round_0001.fedcore")
    new = tmp_path / "new"
    new.mkdir()
    new_file = _toml(new, "inproc://unused")
    (new / "plans.py").write_text(PLANS_PY.replace("estimator = SGDClassifier",
                                                   "estimator = SGDClassifier\n    epochs = 2"))
    code, out = fedcore("plan", "diff", tmp_path / "ckpt", new_file)
    assert code == 0
    assert "+    epochs = 2" in out and "A new SHA-256" in out
    assert f"{tmp_path / 'ckpt'} (checkpoint)" in out
    code, out = fedcore("plan", "diff", exp_file, tmp_path / "ckpt")
    assert code == 0 and "Same plan (same SHA-256)" in out


def test_secagg_privacy_strategy_and_aggregator_from_the_toml(tmp_path):
    exp_file = _toml(tmp_path, "inproc://unused", 'secagg = "masking"\n'
                     'strategy = "AllNodes"\n'
                     '[aggregator]\nname = "fedprox"\nmu = 0.1\n'
                     '[privacy]\nmechanism = "update"\nclip = 1.0\nnoise_multiplier = 1.1\n'
                     'delta = 1e-5\n')
    with open_experiment(str(exp_file)) as exp:
        assert isinstance(exp.secagg, PairwiseMasking)
        assert exp.privacy["mechanism"] == "update" and exp.privacy["clip"] == 1.0
        assert type(exp.strategy).__name__ == "AllNodes"
        assert exp.aggregator.name == "fedprox"
    table = _toml(tmp_path, "inproc://unused", '[secagg]\nname = "joye-libert"\n')
    with open_experiment(str(table)) as exp:
        assert isinstance(exp.secagg, JoyeLibert)


@pytest.mark.parametrize("extra, message", [
    ('secagg = "maskin"', "secagg: "),
    ('secagg = 5', "secagg should be a scheme name"),
    ('[secagg]\nname = "masking"\nbits = 3\n', "secagg 'masking' does not take these "
                                               "parameters"),
    ('[secagg]\nbits = 3\n', 'the [secagg] table needs name = "masking"'),
    ('[privacy]\nmechanism = "update"\nclip = 1.0\nnoise = 1.0\n',
     "[privacy]: Unknown privacy key 'noise'"),
    ('privacy = "dp"', "privacy should be a table: mechanism"),
    ('[strategy]\nfraction = 0.5\n', 'the [strategy] table needs name = "AllNodes"'),
    ('strategy = "Fractoin"', "unknown strategy 'Fractoin'. Did you mean 'Fraction'?"),
    ('secagg = "masking"\naggregator = "median"', "exp.toml: "),
])
def test_bad_options_are_usage_errors_that_say_what_to_fix(tmp_path, capsys, extra, message):
    code, _ = fedcore("run", _toml(tmp_path, "inproc://unused", extra))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_resume_refuses_a_recorded_key_file_that_is_gone(tmp_path, capsys):
    exp_file = _toml(tmp_path, "inproc://unused")
    with open_experiment(str(exp_file)) as exp:
        exp.save(tmp_path / "ckpt" / "round_0001.fedcore")
    (tmp_path / "ckpt" / "run.toml").write_text(f'identity = "{tmp_path / "gone.key"}"\n')
    assert fedcore("resume", tmp_path / "ckpt")[0] == 2
    assert (f"run.toml records the identity file {tmp_path / 'gone.key'}, which is gone. "
            "Put it back, or pass --identity KEY.") in capsys.readouterr().err


def test_run_records_the_key_and_nodes_files_as_paths_only(tmp_path, federation, monkeypatch):
    url, homes = federation
    for home in homes.values():
        assert node_cli(["--home", str(home), "policy", "set", "approval_required=false"]) == 0
    key = tmp_path / "keys" / "me.key"
    nodes = tmp_path / "keys" / "nodes.toml"
    cli.main(["identity", "--identity", str(key)], out=io.StringIO())
    nodes.write_text("")
    exp_file = _toml(tmp_path, url, f'identity = "{key}"\nenrolled = "{nodes}"\n')
    assert fedcore("run", exp_file, "--quiet", "--checkpoint-dir", tmp_path / "ckpt")[0] == 0
    text = (tmp_path / "ckpt" / "run.toml").read_text()
    assert f'identity = "{key}"' in text and f'enrolled = "{nodes}"' in text
    assert "PRIVATE" not in text and key.read_bytes().decode(errors="replace") not in text
    assert Experiment.load(tmp_path / "ckpt", progress=False).round == 1


def test_the_documented_error_lines_are_what_fedcore_prints(tmp_path, capsys):
    page = (Path(__file__).parents[2] / "docs" / "researcher-cli.md").read_text()
    for extra in ('[privacy]\nmechanism = "update"\nclip = 1.0\nnoise = 1.0\n',
                  'strategy = "Fractoin"'):
        assert fedcore("run", _toml(tmp_path, "inproc://unused", extra))[0] == 2
        line = capsys.readouterr().err.strip().replace(str(tmp_path / "exp.toml"), "exp.toml")
        assert line in page, line


def test_the_complete_example_toml_builds_an_experiment(tmp_path):
    (tmp_path / "plans.py").write_text(PLANS_PY)
    (tmp_path / "exp.toml").write_text(cli.TOML_EXAMPLE)
    with open_experiment(str(tmp_path / "exp.toml")) as exp:
        assert isinstance(exp.secagg, PairwiseMasking) and exp.privacy["clip"] == 1.0
        assert type(exp.strategy).__name__ == "Fraction" and exp.aggregator.name == "fedprox"


@pytest.mark.parametrize("record, message", [
    ("identity = [", "Cannot read"),
    ("identity = 5", "run.toml: identity should be a file path. Received: 5. Fix it or pass "
                     "--identity KEY."),
    ('enrolled = "/no/such/nodes.toml"', "records the enrolled file /no/such/nodes.toml, "
                                         "which is gone. Put it back, or pass --enrolled "
                                         "NODES_TOML."),
])
def test_a_broken_run_toml_is_a_usage_error(tmp_path, capsys, record, message):
    exp_file = _toml(tmp_path, "inproc://unused")
    with open_experiment(str(exp_file)) as exp:
        exp.save(tmp_path / "ckpt" / "round_0001.fedcore")
    (tmp_path / "ckpt" / "run.toml").write_text(record + "\n")
    assert fedcore("resume", tmp_path / "ckpt")[0] == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["missing.toml", "exp.toml"], "No experiment file at missing.toml."),
    (["plans.py.txt", "exp.toml"], "Expected an experiment file (.toml, .py) or a checkpoint "
                                   "(a .fedcore file or its folder). Received: plans.py.txt"),
])
def test_diff_of_something_that_is_no_plan_is_a_usage_error(tmp_path, capsys, monkeypatch,
                                                            args, message):
    monkeypatch.chdir(tmp_path)
    _toml(tmp_path, "inproc://unused")
    assert fedcore("plan", "diff", *args)[0] == 2
    assert message in capsys.readouterr().err


def test_the_help_lists_the_plan_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "plan submit exp.toml" in out and "plan status exp.toml --wait 600" in out
    with pytest.raises(SystemExit):
        cli.main(["plan", "status", "--help"])
    out = capsys.readouterr().out
    assert "--wait SECONDS" in out and "exit codes:" in out
