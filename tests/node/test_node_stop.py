"""A node stopped at any moment after it started stops at once, on record."""

from __future__ import annotations

import time

import pytest

from fedcore import Node
from tests._support.net import free_port


def test_a_node_stopped_right_after_start_stops_at_once_and_says_so(tmp_path):
    pytest.importorskip("websockets")
    url = f"ws://127.0.0.1:{free_port()}"  # nobody listens: the node keeps dialling
    node = Node(tmp_path / "home", node_id="site")
    for _ in range(5):  # a SIGTERM can come before the transport is up, or after
        started = time.monotonic()
        node.start(url)
        node.stop()
        assert time.monotonic() - started < 2
        assert [e["event"] for e in node.audit_log()][-2:] == ["started", "stopped"]
