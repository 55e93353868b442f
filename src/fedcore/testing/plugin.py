"""fedcore's pytest plugin: fixtures for a plug-in's conformance tests, and a report header.

Installed fedcore registers it as the ``pytest11`` entry point ``fedcore``, so pytest loads
it in every test session of an environment with fedcore (``-p no:fedcore`` turns it off);
without the installed entry point, ``pytest -p fedcore.testing.plugin`` loads it. It
provides:

- ``fedcore_register``: ``fedcore_register(group, name, obj)`` registers a plug-in in the
  running process (:func:`fedcore.plugins.register`) for one test, and forgets it afterwards;
- ``fedcore_free_port``: a TCP port on 127.0.0.1 that nothing listens on;
- ``fedcore_inproc_url``: a fresh ``inproc://`` federation URL for the test;
- ``fedcore_identity``: a researcher key in the test's temporary folder (never the user's
  ``~/.fedcore``), its path also in ``FEDCORE_IDENTITY`` for the test.

The header of a session lists the plug-ins fedcore finds in each group. The suites themselves
are plain classes to subclass (:mod:`fedcore.testing.aggregator`,
:mod:`fedcore.testing.secagg`, :mod:`fedcore.testing.backend`,
:mod:`fedcore.testing.transport`); nothing here imports an ML framework.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedcore import plugins

__all__ = ["fedcore_free_port", "fedcore_identity", "fedcore_inproc_url", "fedcore_register",
           "pytest_report_header"]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line per extension point: the plug-in names fedcore finds (none is imported)."""
    return ["fedcore plug-ins: " + "; ".join(
        f"{group}: {', '.join(plugins.available(group))}" for group in plugins.GROUPS)]


@pytest.fixture
def fedcore_register() -> Iterator[Callable[[str, str, Any], None]]:
    """``register(group, name, obj)`` for this test only; earlier registrations come back."""
    with contextlib.ExitStack() as stack:

        def register(group: str, name: str, obj: Any) -> None:
            stack.enter_context(plugins.registered(group, name, obj))

        yield register


@pytest.fixture
def fedcore_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fedcore_inproc_url() -> str:
    """A federation URL of the in-process transport that no other test uses."""
    return f"inproc://test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fedcore_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The path of a researcher key in ``tmp_path``, set as ``FEDCORE_IDENTITY``."""
    path = tmp_path / "fedcore-identity" / "researcher.key"
    monkeypatch.setenv("FEDCORE_IDENTITY", str(path))
    monkeypatch.setenv("FEDCORE_NODES", str(path.parent / "nodes.toml"))
    return path
