"""docs/deployment.md, "From nothing to a first round", run as written: every command of its
block through bash, as `fedcore` and `fedcore-node` on the PATH, the researcher and three
node administrators each in a HOME of their own. Only the placeholders change (keys, the
plan's hash, host and port, each node's id). Three real ``fedcore-node start`` processes
serve over ws:// and the researcher's ``fedcore run`` trains on all of them.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
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


class Quickstart:
    """The researcher and the node administrators, each in a HOME of their own, running the
    documented commands through bash with `fedcore` and `fedcore-node` on the PATH."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.researcher = tmp_path / "researcher"
        self.researcher.mkdir()
        (self.researcher / "plans.py").write_text(doc_block("plans.py"))
        (self.researcher / "exp.toml").write_text(
            doc_block("exp.toml").replace(":8765", f":{self.port}"))
        self.admins = {n: tmp_path / n for n in NODES}
        for i, folder in enumerate(self.admins.values()):
            folder.mkdir()
            write_csv(folder / "cohort.csv", i)
        env = {k: v for k, v in os.environ.items()
               if k not in ("FEDCORE_IDENTITY", "FEDCORE_NODES", "FEDCORE_NODE_HOME")}
        bin_dir = console_scripts(tmp_path / "bin")
        self.env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
                    "PYTHONUNBUFFERED": "1"}
        self.values: dict[str, str] = {}  # placeholder -> what replaces it
        self.enroll_lines: dict[str, str] = {}
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.result = ""

    def sh(self, command: str, home: Path) -> str:
        done = subprocess.run(["bash", "-c", command], cwd=home, env={**self.env, "HOME": str(
            home)}, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"$ {command}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def fill(self, command: str, node: str | None = None) -> str:
        command = command.replace("ws://researcher.example.org:8765",
                                  f"ws://127.0.0.1:{self.port}")
        for key, value in self.values.items():
            command = command.replace(key, value)
        return command.replace("site-a", node) if node else command

    def node_admins(self, command: str) -> None:
        """One command, run by every node's administrator (side by side)."""
        lines = {node: self.fill(command, node) for node in NODES}
        if command.endswith(" start"):
            for node, line in lines.items():
                with open(self.admins[node] / "node.log", "ab") as log:
                    self.daemons.append(subprocess.Popen(
                        ["bash", "-c", f"exec {line}"], cwd=self.admins[node], stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        env={**self.env, "HOME": str(self.admins[node])}))
            return
        with ThreadPoolExecutor(len(NODES)) as pool:
            outs = dict(zip(NODES, pool.map(lambda n: self.sh(lines[n], self.admins[n]),
                                            NODES), strict=True))
        if " init " in command:  # its last line: what the researcher runs
            self.enroll_lines = {n: out.strip().splitlines()[-1] for n, out in outs.items()}

    def enroll(self, command: str) -> None:
        for node, line in self.enroll_lines.items():
            assert line == self.fill(command, node).replace("NODE_KEY", line.split()[-1])
            self.sh(line, self.researcher)

    def research(self, command: str) -> None:
        out = self.sh(self.fill(command), self.researcher)
        if command == "fedcore identity":
            self.values["RESEARCHER_KEY"] = re.search(r"public key:\s+(\S+)", out)[1]
        elif command.startswith("fedcore plan submit"):
            assert out.count("pending") == 3, out
            self.values["PLAN_HASH"] = re.search(r"plan approve (\w+)", out)[1]
        elif command.startswith("fedcore run"):
            self.result = out


def test_from_nothing_to_a_first_round_with_the_documented_commands(tmp_path):
    q = Quickstart(tmp_path)
    try:
        for command in doc_commands():
            if command.startswith("fedcore-node"):
                q.node_admins(command)
            elif command.startswith("fedcore enroll"):
                q.enroll(command)
            else:
                q.research(command)
    finally:
        stop_processes(q.daemons)
    assert "round 2 of 2" in q.result, q.result
    for node, folder in q.admins.items():
        home = Node(folder / "fedcore-node")
        assert home.node_id == node
        trained = [r for r in home.audit_log() if r["event"] == "trained"]
        assert len(trained) == 2, (node, (folder / "node.log").read_text()[-2000:])
