"""Node processes for end-to-end tests: a CSV per site and ``fedcore-node start`` processes.

Shared by the end-to-end tests (tests/e2e/), the node daemon's and the researcher CLI's
tests (tests/apps/).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd


def frame(seed: int, n: int) -> pd.DataFrame:
    """Four normal features and a label linear in the first two."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    return pd.DataFrame({**{f"x{i}": X[:, i] for i in range(4)}, "label": y})


def write_csv(path: Path, seed: int, n: int = 120) -> Path:
    frame(seed, n).to_csv(path, index=False)
    return path


def audit_events(home: Path) -> list[dict]:
    """The records of a node's audit log so far (none before the node first wrote one)."""
    path = home / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def node_log(home: Path) -> str:
    path = home.with_suffix(".log")
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def start_node(home: Path, url: str, **env: str) -> subprocess.Popen[bytes]:
    """``fedcore-node start`` for ``home``, its output appended to ``home``.log."""
    with open(home.with_suffix(".log"), "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedcore_node", "--home", str(home), "start",
             "--federation", url], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def stop_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running, then wait; SIGKILL any that takes over 10 s."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def node_processes(homes: dict[str, Path], url: str) -> Iterator[dict[str, subprocess.Popen]]:
    """``fedcore-node start`` for each home; terminated (then killed) on the way out."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for node_id, home in homes.items():
            procs[node_id] = start_node(home, url)
        yield procs
        for node_id, proc in procs.items():
            assert proc.poll() is None, node_log(homes[node_id])
    finally:
        stop_processes(procs.values())


def console_scripts(folder: Path) -> Path:
    """`fedcore` and `fedcore-node` in ``folder``, as an install makes them, running this
    Python (and so this source tree, through PYTHONPATH); put ``folder`` first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("fedcore", "fedcore_researcher"), ("fedcore-node", "fedcore_node")):
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        script.chmod(0o755)
    return folder
