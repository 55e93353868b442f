"""Mosquitto brokers for the MQTT tests: each on a free loopback port, never the system's."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests._support.net import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def require_mosquitto() -> None:
    """Fail (never skip) where Mosquitto is missing: scripts/test.sh installs it."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("Mosquitto is missing: apt-get install mosquitto (scripts/test.sh does).",
                    pytrace=False)


def fed() -> str:
    """A federation name per test: no retained leftovers from another test."""
    return f"fed-{uuid.uuid4().hex[:8]}"


class Broker:
    """A Mosquitto process on a free loopback port, with its own config in ``folder``."""

    def __init__(self, folder: Path, extra: str = "", port: int | None = None):
        self.folder, self.port = folder, port or free_port()
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"user {getpass.getuser()}\n"
            "persistence false\n"
            # as docs/deployment.md advises: Mosquitto's default queue (1000 messages per
            # client) drops QoS 1 messages to a receiver that lags, e.g. on a loaded CI box
            "max_queued_messages 0\n"
            f"log_dest file {folder / 'mosquitto.log'}\n"
            f"{extra}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        require_mosquitto()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"Mosquitto did not start on {self.port}: {err}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
