from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcore.node import Node
from fedcore_node.cli import _GROUPS, _parser, main


def _csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    pd.DataFrame({"age": rng.integers(20, 90, 30), "label": rng.integers(0, 2, 30)}).to_csv(
        path, index=False)
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_add_list_remove(tmp_path, capsys):
    home = str(tmp_path / "home")
    code, out, _ = _run(capsys, "--home", home, "init", "--name", "Hospital A", "--id", "hosp-a")
    assert code == 0 and "Node hosp-a ready" in out
    code, out, _ = _run(capsys, "--home", home, "dataset", "add", "--name", "cohort",
                        "--tags", "diabetes,2024", "--path", str(_csv(tmp_path / "c.csv")))
    assert code == 0 and "30 samples" in out
    code, out, _ = _run(capsys, "--home", home, "dataset", "list")
    assert "cohort" in out and "2024,diabetes" in out and "yes" in out
    code, out, _ = _run(capsys, "--home", home, "dataset", "list", "--json")
    (entry,) = json.loads(out)
    assert entry["name"] == "cohort" and "path" not in entry  # what researchers would see
    assert Node(home).datasets.list()[0]["id"] == entry["id"]  # the same TinyDB the node uses
    code, out, _ = _run(capsys, "--home", home, "dataset", "remove", entry["id"])
    assert code == 0 and Node(home).datasets.list() == []
    events = [e["event"] for e in Node(home).audit_log()]
    assert events == ["dataset-added", "dataset-removed"]


def test_errors_are_explained_with_exit_code_1_and_nothing_is_written(tmp_path, capsys):
    home = str(tmp_path / "home")
    code, _, err = _run(capsys, "--home", home, "dataset", "list")
    assert code == 1 and "No node home" in err and "init --name" in err
    _run(capsys, "--home", home, "init")
    before = (tmp_path / "home" / "db.json").read_bytes() if (
        tmp_path / "home" / "db.json").exists() else b""
    code, _, err = _run(capsys, "--home", home, "dataset", "add", "--name", "x", "--tags", "t",
                        "--path", str(tmp_path / "missing.csv"))
    assert code == 1 and "No file at" in err
    after = (tmp_path / "home" / "db.json").read_bytes() if (
        tmp_path / "home" / "db.json").exists() else b""
    assert before == after
    code, _, err = _run(capsys, "--home", home, "dataset", "remove", "ds-nope")
    assert code == 1 and "No dataset with id 'ds-nope'" in err


def test_a_missing_file_shows_as_unavailable(tmp_path, capsys):
    home = str(tmp_path / "home")
    _run(capsys, "--home", home, "init")
    path = _csv(tmp_path / "c.csv")
    _run(capsys, "--home", home, "dataset", "add", "--name", "c", "--tags", "t", "--path",
         str(path))
    path.unlink()
    _, out, _ = _run(capsys, "--home", home, "dataset", "list")
    assert "NO (file missing)" in out


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--home", str(tmp_path), "dataset", "add", "--name", "x"])
    assert info.value.code == 2
    assert "--tags" in capsys.readouterr().err


def test_the_installed_command_runs(tmp_path):
    exe = shutil.which("fedcore-node", path=str(Path(sys.executable).parent))
    assert exe, "fedcore-node is not installed next to this Python"
    out = subprocess.run([exe, "--home", str(tmp_path / "h"), "init", "--id", "n1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Node n1 ready" in out.stdout
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert "dataset" in out.stdout and "init" in out.stdout


def _helps(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, str]:
    """Every (sub-)command's help text under ``parser``, by its command line."""
    out = {prefix: parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.update(_helps(child, f"{prefix} {name}".strip()))
    return out


def test_a_command_line_gets_the_same_parser_as_with_every_command_built():
    # `fedcore-node start ...` builds only its command's parser (a node's start-up time):
    # each command and sub-command must accept and document exactly what the whole parser
    # does, and every command must be built by the table that picks its group.
    everything = _helps(_parser())
    commands = {line.split()[0] for line in everything if line}
    assert commands == set(_GROUPS)
    for command in commands:
        for argv in ([command], ["--home", "h", command], ["--home=h", command, "--x"]):
            alone = _helps(_parser(argv))
            assert alone[""].splitlines()[0] == everything[""].splitlines()[0]  # usage
            ours = {k: v for k, v in alone.items() if k.split(" ")[0] == command}
            assert ours == {k: v for k, v in everything.items()
                            if k.split(" ")[0] == command}, argv
    for argv in ([], ["--help"], ["--home"], ["nonsense"], ["--hom", "x", "start"]):
        assert _helps(_parser(argv)) == everything
