"""The digest under a frame's signature: BLAKE3, SHA-256 from earlier releases, never swapped."""

from __future__ import annotations

import hashlib
import struct
import time

import numpy as np
import pytest

from fedcore.errors import ProtocolError
from fedcore.wire import codec
from fedcore.wire.identity import Identity
from fedcore.wire.messages import Envelope, Ping
from fedcore.wire.signing import TRAILER, Guard


def _pair(tmp_path) -> tuple[Identity, Guard, Guard]:
    researcher = Identity(tmp_path / "researcher.key")
    sender = Guard(researcher, dict, networked=True, max_size=codec.DEFAULT_MAX_FRAME)
    node = Guard(Identity(tmp_path / "node.key"), lambda: {"r": researcher.public_bytes},
                 networked=True, max_size=codec.DEFAULT_MAX_FRAME)
    return researcher, sender, node


def test_a_large_message_altered_anywhere_is_refused(tmp_path):
    _, sender, node = _pair(tmp_path)
    body = np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes()
    message = body + sender.trailer([body])
    assert bytes(node.verify(message).body) == body
    for where in (0, len(body) // 2, len(body) - 1):  # first, middle and last byte
        altered = bytearray(body + sender.trailer([body]))
        altered[where] ^= 0x80
        with pytest.raises(ProtocolError, match="Bad signature"):
            node.verify(bytes(altered))


def test_a_frame_signed_over_sha256_by_an_earlier_release_is_still_verified(tmp_path):
    researcher, _, node = _pair(tmp_path)
    frame = codec.encode(Envelope(Ping(), sender="r", recipient="site"))
    head = struct.pack("<4s32sQQ", b"FCS1", researcher.public_bytes, time.time_ns(),
                       int(time.time() * 1000))
    signed = frame + head + researcher.sign(hashlib.sha256(frame).digest() + head)
    env, signer = node.open(signed)
    assert signer == "r" and isinstance(env.body, Ping)


def test_the_digest_cannot_be_swapped_by_changing_the_trailers_magic(tmp_path):
    """The magic that names the digest is signed: switching it breaks the signature."""
    _, sender, node = _pair(tmp_path)
    frame = bytearray(sender.seal(Envelope(Ping(), sender="r", recipient="site")))
    assert bytes(frame[-TRAILER:-TRAILER + 4]) == b"FCS2"
    frame[-TRAILER:-TRAILER + 4] = b"FCS1"
    with pytest.raises(ProtocolError, match="Bad signature"):
        node.open(bytes(frame))
