"""Loopback networking for tests that listen on real sockets."""

from __future__ import annotations

import socket

# Every port handed out in this process. A test's node that is still dialling its
# researcher after the test (a reconnect loop winding down) must not find a later test's
# listener on the same port, so no port is handed out twice in one test session.
_given: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and no earlier test was given."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port
    raise RuntimeError("no unused loopback port left for this test session")
