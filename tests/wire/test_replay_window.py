"""Replay protection holds for a busy sender: every message of the last seconds is known."""

from __future__ import annotations

import pytest

from fedcore.wire import codec
from fedcore.wire.identity import Identity
from fedcore.wire.messages import Envelope, Ping
from fedcore.wire.signing import Guard, ReplayedFrame


def test_a_busy_senders_messages_are_each_refused_when_replayed(tmp_path):
    researcher = Identity(tmp_path / "researcher.key")
    sender = Guard(researcher, dict, networked=True, max_size=codec.DEFAULT_MAX_FRAME)
    node = Guard(Identity(tmp_path / "node.key"), lambda: {"r": researcher.public_bytes},
                 networked=True, max_size=codec.DEFAULT_MAX_FRAME)
    frames = [sender.seal(Envelope(Ping(), sender="r", recipient="site")) for _ in range(3000)]
    # Concurrent sends may arrive slightly out of counter order: swap neighbours.
    order = [i ^ 1 for i in range(len(frames))]
    for i in order:
        assert node.open(frames[i])[1] == "r"
    for frame in frames[::97] + frames[-3:]:  # old, middle and newest alike
        with pytest.raises(ReplayedFrame):
            node.open(frame)
    assert node.open(sender.seal(Envelope(Ping(), sender="r", recipient="site")))[1] == "r"
