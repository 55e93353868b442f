"""``fedcore-node start`` and ``fedcore-node status``: the node daemon and its pid file.

``start`` serves the federation in the foreground until SIGTERM or SIGINT, logging one line
per request to stderr. While it runs, ``node.pid`` in the home holds its process id under an
exclusive lock (``flock``): the lock, not the number, says whether the node runs, so a pid
file left by a crash (or a reused pid) is recognised as stale. A clean stop removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any

from fedcore.errors import ConfigurationError
from fedcore.node import Node
from fedcore.transport import redact_url
from fedcore_node._launch import PID_FILE, running_pid

try:
    import fcntl
except ImportError:  # Windows: fall back on whether the recorded pid is alive
    fcntl = None  # type: ignore[assignment]

SERVING_FILE = "node.serving"  # what the running daemon serves (JSON; its URL redacted)


def add_parsers(sub: Any) -> None:
    """Add ``start`` and ``status`` to ``fedcore-node``'s parser."""
    p = sub.add_parser(
        "start", help="serve the federation in the foreground (Ctrl-C or SIGTERM stops it)",
        description="Connect to the researcher at the federation URL (ws://, wss://, or any "
        "installed transport) and answer requests until stopped. The node dials out and "
        "reconnects by itself. Logs one line per request (researcher, kind, outcome, "
        "seconds) to stderr. SIGTERM or SIGINT stop it within 2 s; a round in progress is "
        "abandoned and recorded as such in the audit log.")
    p.add_argument("--federation", metavar="URL",
                   help="the researcher's URL (default: federation in config.toml, set by "
                   "`init --federation URL`)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also log connections and transport details")
    p = sub.add_parser("status", help="is the node running? id, federation, datasets, "
                       "pending plans")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _lock(home: Path) -> IO[str]:
    """Take the home's pid file (replacing a stale one); the open file holds the lock."""
    pid, running = running_pid(home)
    if running:
        raise ConfigurationError(f"A node is already running for {home.resolve()} (pid "
                                 f"{pid}). Stop it first: kill -TERM {pid}")
    f = open(home / PID_FILE, "a+")  # noqa: SIM115 - held open while the node runs
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            raise ConfigurationError(f"Another node process took {home / PID_FILE} just "
                                     "now.") from exc
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then removes the credentials of any URL in the line."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_url(super().format(record))


def _logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s",
                                            "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("fedcore.node").setLevel(logging.INFO)
    if verbose:
        logging.getLogger("fedcore").setLevel(logging.INFO)


def start(args: argparse.Namespace, node: Node, out: Any) -> int:
    """Serve until SIGTERM/SIGINT; exit code 0 on a clean stop."""
    url = args.federation or node.config.get("federation")
    if not url:
        raise ConfigurationError(
            "No federation URL: pass --federation ws://HOST:PORT, or store one with "
            "`fedcore-node init --federation URL` (federation = \"...\" in config.toml).")
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    # Handlers first: once the pid file exists, a SIGTERM must find them in place.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        lock = _lock(node.home)
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    _logging(args.verbose)
    log = logging.getLogger("fedcore.node")
    try:
        node.start(str(url))
        _write_serving(node.home, str(url))
        log.info("Node %s serving %s (pid %d); SIGTERM or Ctrl-C stops it", node.node_id,
                 redact_url(str(url)), os.getpid())
        while not stop.wait(0.5):
            pass
        log.info("Stopping on %s", received[0] if received else "request")
        node.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(OSError):
            (node.home / SERVING_FILE).unlink()
        with contextlib.suppress(OSError):
            (node.home / PID_FILE).unlink()
        lock.close()
    log.info("Node %s stopped cleanly", node.node_id)
    busy = [t for t in threading.enumerate() if t.name.startswith("fedcore-node-")
            and t.is_alive()]
    if busy:  # a plan still computes an abandoned round: do not wait for it to finish
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _shown(url: Any) -> str | None:
    return redact_url(str(url)) if url else None


def _write_serving(home: Path, url: str) -> None:
    """Record the URL this daemon serves (``--federation`` may differ from config.toml)."""
    import json

    tmp = home / f".{SERVING_FILE}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "federation": redact_url(url)}))
    tmp.replace(home / SERVING_FILE)


def _serving(home: Path, pid: int | None) -> str | None:
    """The URL the running daemon ``pid`` serves, as it recorded it; ``None`` if unknown."""
    import json

    try:
        record = json.loads((home / SERVING_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("pid") != pid:
        return None  # left by an earlier daemon
    return str(record.get("federation") or "") or None


def status(args: argparse.Namespace, node: Node, out: Any) -> int:
    """Print whether a node process serves this home, and what it offers."""
    import json

    pid, running = running_pid(node.home)
    datasets = node.datasets.list()
    pending = node.plans.list(status="pending")
    info = {"running": running, "pid": pid if running else None, "id": node.node_id,
            "name": node.config.get("name", ""), "home": str(node.home.resolve()),
            "federation": _shown(node.config.get("federation")),
            "serving": _serving(node.home, pid) if running else None,
            "datasets": [{"id": d["id"], "name": d["name"], "tags": d["tags"],
                          "available": d["available"]} for d in datasets],
            "pending_plans": [{"sha256": p["sha256"], "plan": p["entry"],
                               "submitter": p["submitter"]} for p in pending],
            "plans_run": node.plan_isolation_summary()}
    if args.json:
        print(json.dumps(info, indent=1), file=out)
        return 0
    if running:
        state = f"running (pid {pid})"
    elif pid is not None:
        state = f"not running (stale pid file of pid {pid}: the node did not stop cleanly)"
    else:
        state = "not running"
    names = ", ".join(f"{d['name']} [{','.join(d['tags'])}]" for d in datasets) or "none"
    plans = ", ".join(f"{p['entry']} {p['sha256'][:12]}" for p in pending) or "none"
    configured = info["federation"]
    if info["serving"]:
        federation = info["serving"] + ("" if info["serving"] == configured else
                                        f" (config.toml says {configured or 'none'})")
    else:
        federation = configured or "not set (use start --federation URL)"
    print(f"node:       {node.node_id} ({info['name']})\nstate:      {state}\n"
          f"federation: {federation}\n"
          f"datasets:   {names}\npending:    {plans}\n"
          f"plans run:  {info['plans_run']}", file=out)
    return 0
