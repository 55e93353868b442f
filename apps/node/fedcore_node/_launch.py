"""The ``fedcore-node`` command's entry point: ``start`` starts its plan workers first.

A node that ran plans in worker processes before (``plan-workers.json`` in its home) starts
those workers as the very first thing ``fedcore-node start`` does, before this process
imports the node runtime and the transport: each worker imports its frameworks while the
node imports its own modules (on a machine with a core to spare, at the same time). The
node takes them once it serves (:func:`fedcore.node._spawn.take`); any it does not take
ends. This module imports the standard library only; the rest comes in :func:`main`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: fall back on whether the recorded pid is alive
    fcntl = None  # type: ignore[assignment]

DEFAULT_HOME = "fedcore-node"
PID_FILE = "node.pid"


def command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names after ``--home``, if any (argparse decides the rest)."""
    i = 0
    while i < len(argv) and (argv[i] == "--home" or argv[i].startswith("--home=")):
        i += 1 if "=" in argv[i] else 2
    return argv[i] if i < len(argv) else None


def home(argv: Sequence[str]) -> Path:
    """The node home ``argv`` names (the last ``--home``), else the default one."""
    where = os.environ.get("FEDCORE_NODE_HOME", DEFAULT_HOME)
    for i, arg in enumerate(argv):
        if arg == "--home" and i + 1 < len(argv):
            where = argv[i + 1]
        elif arg.startswith("--home="):
            where = arg.partition("=")[2]
        elif arg == command(argv):
            break
    return Path(where).expanduser()


def running_pid(home: Path) -> tuple[int | None, bool]:
    """``(pid, running)`` from the home's pid file; ``(None, False)`` without one."""
    path = home / PID_FILE
    try:
        text = path.read_text().strip()
    except OSError:
        return None, False
    pid = int(text) if text.isdigit() else None
    if fcntl is not None:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return pid, True  # someone holds the lock: the node runs
            fcntl.flock(f, fcntl.LOCK_UN)
        return pid, False
    if pid is None:
        return None, False
    try:
        os.kill(pid, 0)
    except OSError:
        return pid, False
    return pid, True


def start_workers(argv: Sequence[str]) -> None:
    """For ``fedcore-node ... start``, start the plan workers its node will want.

    Nothing for another command, for help, or while a node already serves the home (its
    workers use the home's scratch folders).
    """
    if command(argv) != "start" or "-h" in argv or "--help" in argv:
        return
    where = home(argv)
    if not (where / "config.toml").is_file() or running_pid(where)[1]:
        return
    from fedcore.node._spawn import start_ahead

    start_ahead(where)


def end_workers(argv: Sequence[str]) -> None:
    """End the workers :func:`start_workers` started that no node took."""
    if command(argv) == "start":
        from fedcore.node._spawn import drop

        drop(home(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedcore-node``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    start_workers(argv)
    try:
        from fedcore_node.cli import main as cli_main

        return cli_main(argv)
    finally:
        end_workers(argv)
