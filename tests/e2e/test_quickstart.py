"""docs/deployment.md, "From nothing to a first round", run as written: every command of its
block through bash, as `fedcore` and `fedcore-node` on the PATH, the researcher and three
node administrators each in a HOME of their own. Only the placeholders change (keys, the
plan's hash, host and port, each node's id). Three real ``fedcore-node start`` processes
serve over ws:// and the researcher's ``fedcore run`` trains on all of them.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("websockets")

from fedcore import Node  # noqa: E402
from tests._support.deployment import (  # noqa: E402
    console_scripts,
    stop_processes,
    write_csv,
)
from tests._support.net import free_port  # noqa: E402

pytestmark = pytest.mark.slow

DOC = Path(__file__).parents[2] / "docs" / "deployment.md"
NODES = ("site-a", "site-b", "site-c")


def doc_block(marker: str) -> str:
    """The fenced block right after ``<!-- quickstart:MARKER -->`` in docs/deployment.md."""
    found = re.search(rf"<!-- quickstart:{re.escape(marker)} -->\n(?:<!-- not-run -->\n)?"
                      r"```\w*\n(.*?)```", DOC.read_text(), re.S)
    assert found, f"docs/deployment.md lost its quickstart {marker} block"
    return found.group(1)


def doc_commands() -> list[str]:
    """The commands of the quickstart block, continuation lines joined, comments dropped."""
    text = doc_block("commands").replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_documented_path_is_three_node_commands_and_one_enroll_per_node():
    commands = doc_commands()
    first_enroll = next(i for i, c in enumerate(commands) if c.startswith("fedcore enroll"))
    to_serve = [c for c in commands[:first_enroll] if c.startswith("fedcore-node")]
    assert [c.split()[3] for c in to_serve] == ["init", "start"]  # + the install: 3
    assert sum(c.startswith("fedcore enroll") for c in commands) == 1  # once per node


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    """`fedcore` and `fedcore-node` as a user has them, for this Python and source tree."""
    return console_scripts(tmp_path / "bin")


def test_from_nothing_to_a_first_round_with_the_documented_commands(tmp_path, bin_dir):
    port = free_port()
    researcher = tmp_path / "researcher"
    researcher.mkdir()
    (researcher / "plans.py").write_text(doc_block("plans.py"))
    (researcher / "exp.toml").write_text(doc_block("exp.toml").replace(":8765", f":{port}"))
    admins = {n: tmp_path / n for n in NODES}
    for i, folder in enumerate(admins.values()):
        folder.mkdir()
        write_csv(folder / "cohort.csv", i)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("FEDCORE_IDENTITY", "FEDCORE_NODES", "FEDCORE_NODE_HOME")}
    base_env.update(PATH=f"{bin_dir}{os.pathsep}{base_env['PATH']}", PYTHONUNBUFFERED="1")
    values: dict[str, str] = {}
    daemons: list[subprocess.Popen[bytes]] = []

    def sh(command: str, home: Path) -> str:
        done = subprocess.run(["bash", "-c", command], cwd=home, env={**base_env, "HOME": str(
            home)}, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"$ {command}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def fill(command: str, node: str | None = None) -> str:
        command = command.replace("ws://researcher.example.org:8765", f"ws://127.0.0.1:{port}")
        for key, value in values.items():
            command = command.replace(key, value)
        return command.replace("site-a", node) if node else command

    try:
        for command in doc_commands():
            if command.startswith("fedcore-node"):
                lines = {node: fill(command, node) for node in NODES}
                if command.endswith(" start"):
                    for node, line in lines.items():
                        with open(admins[node] / "node.log", "ab") as log:
                            daemons.append(subprocess.Popen(
                                ["bash", "-c", f"exec {line}"], cwd=admins[node], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**base_env, "HOME": str(admins[node])}))
                    continue
                with ThreadPoolExecutor(len(NODES)) as pool:  # the admins work side by side
                    outs = dict(zip(NODES, pool.map(
                        lambda n: sh(lines[n], admins[n]), NODES), strict=True))
                if " init " in command:  # its last line: what the researcher runs
                    for node, out in outs.items():
                        values[f"NODE_KEY:{node}"] = out.strip().splitlines()[-1]
            elif command.startswith("fedcore enroll"):
                for node in NODES:
                    enroll_line = values[f"NODE_KEY:{node}"]
                    assert enroll_line == fill(command, node).replace(
                        "NODE_KEY", enroll_line.split()[-1])
                    sh(enroll_line, researcher)
            else:
                out = sh(fill(command), researcher)
                if command == "fedcore identity":
                    values["RESEARCHER_KEY"] = re.search(r"public key:\s+(\S+)", out)[1]
                if command.startswith("fedcore plan submit"):
                    assert out.count("pending") == 3, out
                    values["PLAN_HASH"] = re.search(r"plan approve (\w+)", out)[1]
                if command.startswith("fedcore run"):
                    result = out
    finally:
        stop_processes(daemons)
    assert "round 3 of 3" in result, result
    for node, folder in admins.items():
        home = Node(folder / "fedcore-node")
        assert home.node_id == node
        trained = [r for r in home.audit_log() if r["event"] == "trained"]
        assert len(trained) == 3, (node, (folder / "node.log").read_text()[-2000:])
