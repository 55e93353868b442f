"""``fedcore-node init`` with flags: one command creates the home and the node's key, trusts
the researcher, registers a dataset and stores the federation URL, and prints the line the
researcher runs to enroll the node. Bad flags are refused before anything is written."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fedcore.node import Node
from fedcore.wire.identity import enrolled_nodes, public_key
from fedcore_node.cli import main
from tests._support.deployment import write_csv


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_init_makes_a_node_ready_to_serve_and_prints_the_enroll_line(tmp_path, capsys):
    from fedcore_researcher.cli import main as fedcore

    csv = write_csv(tmp_path / "cohort.csv", 0)
    home = tmp_path / "home"
    code, out, _ = _run(capsys, "--home", home, "init", "--id", "site-a", "--name", "Hosp A",
                        "--trust", f"alice={public_key()}", "--data", csv, "--tags",
                        "diabetes,2024", "--federation", "ws://127.0.0.1:8765")
    assert code == 0, out
    node = Node(home)
    assert node.node_id == "site-a" and node.config["federation"] == "ws://127.0.0.1:8765"
    assert list(node.trusted_researchers) == ["alice"]
    [entry] = node.datasets.list()
    assert (entry["name"], sorted(entry["tags"])) == ("cohort", ["2024", "diabetes"])
    assert entry["metadata"]["n_samples"] == 120
    assert "Registered 'cohort'" in out and "Trusted researcher 'alice'" in out
    # The last line is the researcher's one command: run it as printed.
    last = out.strip().splitlines()[-1]
    assert last == f"fedcore enroll site-a {node.identity.public_key}"
    nodes_toml = tmp_path / "nodes.toml"
    assert fedcore([*last.split()[1:], "--enrolled", str(nodes_toml)], out=io.StringIO()) == 0
    assert enrolled_nodes(nodes_toml) == {"site-a": node.identity.public_bytes}
    events = [r["event"] for r in node.audit_log()]
    assert {"researcher-trusted", "dataset-added", "federation-set"} <= set(events)


def test_a_description_file_and_policy_flags(tmp_path, capsys):
    write_csv(tmp_path / "cohort.csv", 1)
    (tmp_path / "cohort.toml").write_text(
        'name = "cohort-2024"\ntags = ["diabetes"]\npath = "cohort.csv"\n')
    code, out, _ = _run(capsys, "--home", tmp_path / "h", "init", "--dataset",
                        tmp_path / "cohort.toml", "--policy", "approval_required=false")
    assert code == 0
    assert "approval off" in out and "Registered 'cohort-2024'" in out
    assert "No trusted researcher yet" in out and "No federation URL yet" in out
    assert Node(tmp_path / "h").policy["approval_required"] is False


def test_init_again_adds_to_an_existing_home(tmp_path, capsys):
    assert _run(capsys, "--home", tmp_path / "h", "init", "--id", "site-b")[0] == 0
    key = Node(tmp_path / "h").identity.public_key
    code, out, _ = _run(capsys, "--home", tmp_path / "h", "init", "--trust",
                        f"bob={public_key()}")
    assert code == 0 and out.strip().endswith(f"fedcore enroll site-b {key}")
    assert list(Node(tmp_path / "h").trusted_researchers) == ["bob"]


@pytest.mark.parametrize("flags, message", [
    (["--trust", "alice=zzz"], "--trust alice: Expected an Ed25519 public key"),
    (["--data", "missing.csv", "--tags", "x"], "No file at"),
    (["--federation", "researcher.org:8765"], "--federation: expected a URL such as "
                                              "ws://host:port"),
    (["--policy", "max_epochs=many"], "max_epochs"),
])
def test_a_bad_flag_is_explained_and_leaves_no_home(tmp_path, capsys, monkeypatch, flags,
                                                     message):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "cohort.csv", 0)
    code, out, err = _run(capsys, "--home", tmp_path / "h", "init", "--id", "site-a",
                          "--trust", f"alice={public_key()}", "--data", "cohort.csv",
                          "--tags", "x", *flags)
    assert code == 1 and message in err, err
    assert not (tmp_path / "h").exists(), "a failed init left a half-made home"


@pytest.mark.parametrize("flags, message", [
    (["--tags", "x"], "--tags: only with --data PATH"),
    (["--data", "c.csv"], "--data needs --tags"),
    (["--trust", "alice"], "--trust expects NAME=KEY"),
    (["--dataset", "d.toml", "--data", "c.csv"], "--dataset FILE replaces --data"),
])
def test_usage_errors_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["--home", str(tmp_path / "h"), "init", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_the_help_shows_the_one_command_setup(capsys):
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    out = capsys.readouterr().out
    for flag in ("--trust NAME=KEY", "--data PATH", "--tags", "--federation URL", "--dataset",
                 "--policy", "fedcore-node start", "enroll"):
        assert flag in out, flag


def test_path_is_absolute_in_the_registry(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(Path("c.csv"), 2)
    assert _run(capsys, "--home", "h", "init", "--data", "c.csv", "--tags", "t")[0] == 0
    [entry] = Node(tmp_path / "h").datasets.list()
    assert Path(entry["path"]) == (tmp_path / "c.csv").resolve()


def test_a_home_given_with_a_tilde_that_no_shell_expanded(tmp_path, capsys, monkeypatch):
    """systemd and compose pass `--home ~/fedcore-node` as it is: ~ is the user's home."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _run(capsys, "--home", "~/fedcore-node", "init", "--id", "site-t")[0] == 0
    code, out, _ = _run(capsys, "--home", "~/fedcore-node", "info")
    assert code == 0 and "site-t" in out and str(tmp_path / "fedcore-node") in out
