"""End-to-end signed frames: the one rule, in one place.

On a networked transport (``transport.capabilities.networked``) every frame carries a
signature trailer and every received frame is verified before it is decoded; on the
in-process transport neither happens (nothing can forge a frame inside one process, and
simulation stays fast).

Trailer, appended after the codec's frame (so ``codec`` itself is unchanged)::

    b"FCS1" | Ed25519 public key (32) | counter u64 | time ms u64 | signature (64)

The signature covers ``SHA-256(frame) || trailer[:52]``: large frames are hashed once, part
by part, never copied. The counter is ``max(previous + 1, time_ns())`` so it grows across a
sender's restarts; a receiver keeps the highest counter per key in memory and refuses any
frame at or below it, or whose time is more than :data:`WINDOW_S` away from its own clock.
Counters are not persisted: after a receiver restarts, only a frame captured less than
``WINDOW_S`` before could be replayed, once.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import codec
from .errors import GovernanceError, ProtocolError
from .identity import Identity, fingerprint
from .messages import Envelope

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["WINDOW_S", "Guard"]

WINDOW_S = 300.0  #: how far a frame's signing time may be from the receiver's clock
_MAGIC = b"FCS1"
_SIGNED = struct.Struct("<4s32sQQ")
TRAILER = _SIGNED.size + 64


class Guard:
    """Signs what a component sends and verifies what it receives (networked only).

    ``trusted`` returns ``{name: raw public key}``: the researchers a node trusts, or the
    nodes a researcher enrolled. ``untrusted_hint`` finishes the message of a refusal.
    """

    def __init__(self, identity: Identity | None, trusted: Callable[[], Mapping[str, bytes]],
                 *, networked: bool, max_size: int, untrusted_hint: str = ""):
        if networked and identity is None:
            raise ValueError("a networked Guard needs an identity")
        self.identity = identity
        self.networked = networked
        self.max_size = max_size
        self._trusted = trusted
        self._hint = untrusted_hint
        self._counter = 0
        self._highest: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._keys: dict[bytes, Ed25519PublicKey] = {}

    def seal(self, env: Envelope) -> bytes:
        """The frame of ``env``, signed when the transport is networked."""
        parts = codec.encode_parts(env, max_size=self.max_size - TRAILER * self.networked)
        if self.networked:
            parts.append(self._trailer(parts))
        return b"".join(parts)

    def _trailer(self, parts: list[Buffer]) -> bytes:
        assert self.identity is not None
        with self._lock:
            self._counter = max(self._counter + 1, time.time_ns())
            counter = self._counter
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        signed = _SIGNED.pack(_MAGIC, self.identity.public_bytes, counter,
                              int(time.time() * 1000))
        return signed + self.identity.sign(digest.digest() + signed)

    def open(self, frame: bytes) -> tuple[Envelope, str]:
        """Verify (when networked) and decode ``frame``; return it and its signer's name.

        ``ProtocolError`` for an oversized, unsigned, altered or replayed frame;
        ``GovernanceError`` for a frame signed by a key this side does not trust.
        """
        if not self.networked:
            return codec.decode(frame, max_size=self.max_size), ""
        name, body = self.verify(frame)
        return codec.decode(body, max_size=self.max_size), name

    def verify(self, frame: bytes) -> tuple[str, memoryview]:
        """Check the signature trailer of ``frame``; return the signer's name and the body."""
        view = memoryview(frame).cast("B")
        if len(view) > self.max_size:
            raise ProtocolError(f"Frame of {len(view)} bytes exceeds the limit of "
                                f"{self.max_size} bytes. Refused unread.")
        if len(view) < TRAILER or bytes(view[-TRAILER:-TRAILER + 4]) != _MAGIC:
            raise ProtocolError("Unsigned frame: every frame on a networked transport must "
                                "be signed by its sender (fedcore >= this release on both "
                                "ends).")
        body, trailer = view[:-TRAILER], view[-TRAILER:]
        _, key, counter, millis = _SIGNED.unpack(trailer[:_SIGNED.size])
        trusted = self._trusted()
        if not trusted:
            raise GovernanceError(f"Refused: nobody is trusted yet. {self._hint}")
        name = next((n for n, k in trusted.items() if k == key), None)
        if name is None:
            raise GovernanceError(
                f"Refused a frame signed by an unknown key {fingerprint(key)}. {self._hint}")
        digest = hashlib.sha256(body).digest()
        try:
            self._public(key).verify(bytes(trailer[_SIGNED.size:]),
                                     digest + bytes(trailer[:_SIGNED.size]))
        except InvalidSignature:
            raise ProtocolError(f"Bad signature on a frame from {name!r}: it was altered "
                                "in transit or forged. Refused.") from None
        skew = abs(time.time() - millis / 1000)
        if skew > WINDOW_S:
            raise ProtocolError(f"Frame from {name!r} was signed {skew:.0f} s away from this "
                                f"clock (allowed: {WINDOW_S:.0f} s): a replay, or clocks "
                                "out of sync (run NTP). Refused.")
        with self._lock:
            if counter <= self._highest.get(key, 0):
                raise ProtocolError(f"Replayed frame from {name!r}: its counter {counter} "
                                    "was already seen. Refused.")
            self._highest[key] = counter
        return name, body

    def _public(self, key: bytes) -> Ed25519PublicKey:
        public = self._keys.get(key)
        if public is None:
            public = self._keys[key] = Ed25519PublicKey.from_public_bytes(key)
        return public
