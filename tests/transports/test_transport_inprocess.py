"""The in-process transport passes the transport conformance suite."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from fedcore.testing.transport import Endpoints, TransportConformance
from fedcore.transport import Role, Transport
from fedcore_transport.inprocess import InProcessTransport


class TestInProcessTransport(TransportConformance):
    """In-process messages of 256 KiB: the suite's large frames cross as chunks."""

    @pytest.fixture
    def endpoints(self) -> Endpoints:
        return Endpoints.same(f"inproc://conformance-{uuid.uuid4().hex[:8]}")

    def open_raw(self, url: str, role: Role, identity: str) -> Transport:
        return InProcessTransport(url, role=role, identity=identity, max_frame_size=256 << 10)


def test_import_fedcore_leaves_the_testing_toolkit_alone():
    code = ("import sys, fedcore; "
            "print(sorted(m for m in sys.modules if m.startswith(('fedcore.testing', 'pytest'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
