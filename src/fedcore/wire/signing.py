"""End-to-end signed messages: the one rule, in one place.

On a networked transport (``transport.capabilities.networked``) every message carries a
signature trailer and every received message is verified before anything else reads it; on
the in-process transport neither happens (nothing can forge a frame inside one process, and
simulation stays fast). A message is a whole frame, or one chunk of a larger frame
(:mod:`fedcore.wire.chunks`): each chunk is signed on its own, its position in the frame
included, so a receiver never buffers a byte that a trusted key did not sign.

Trailer, appended after the message (so ``codec`` itself is unchanged)::

    b"FCS2" | Ed25519 public key (32) | counter u64 | time ms u64 | signature (64)

The signature covers ``BLAKE3(message) || trailer[:52]`` (256-bit digest): large messages
are hashed once, part by part, never copied. BLAKE3 hashes twice as fast as SHA-256 (with
the CPU's SHA extensions) on these machines, and every byte on the wire is hashed by its
sender and by its receiver, so the digest was the transport's largest cost. A trailer
starting ``b"FCS1"`` (earlier releases) is verified over ``SHA-256(message)``: the magic is
signed, so a digest cannot be swapped for the other. The counter is ``max(previous + 1,
time_ns())``, so it grows across a sender's restarts. A receiver refuses a message whose
time is more than :data:`WINDOW_S` away from its own clock, and one whose counter it already
accepted: it keeps the counters of the last :data:`REORDER_S` seconds per key (messages of
concurrent sends may arrive slightly out of counter order) and refuses anything older. With
a ``replay_file`` (a node's home, next to a researcher's key), the highest counter accepted
per key is appended there as each message is accepted (one ``write``, no ``fsync``) and read
back on start, so a message captured before a restart cannot be replayed after it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcore._files import write_atomic
from fedcore.errors import GovernanceError, ProtocolError
from fedcore.wire import codec
from fedcore.wire.identity import Identity, fingerprint
from fedcore.wire.messages import Envelope

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["REORDER_S", "TRAILER", "WINDOW_S", "Guard", "ReplayedFrame", "Signed"]

log = logging.getLogger("fedcore.signing")

WINDOW_S = 300.0  #: how far a message's signing time may be from the receiver's clock
REORDER_S = 5.0  #: how far out of counter order a message may arrive
_MAGIC = b"FCS2"  # BLAKE3 digest
_SHA256_MAGIC = b"FCS1"  # earlier releases: SHA-256 digest
_MAGICS = (_MAGIC, _SHA256_MAGIC)
_SIGNED = struct.Struct("<4s32sQQ")
TRAILER = _SIGNED.size + 64  #: bytes a signature adds to a message
_COMPACT_LINES = 20_000  # the replay file is rewritten (one line per key) beyond this


class ReplayedFrame(ProtocolError):
    """A message whose counter was already accepted (a replay, or a duplicate delivery)."""


class Signed(NamedTuple):
    """A verified message: who signed it (trusted name and raw key) and its body."""

    name: str
    key: bytes
    body: memoryview


class _Seen:
    """Counters accepted from one key: ``floor`` (strict lower bound) and recent ones."""

    __slots__ = ("floor", "highest", "prune_at", "recent")

    def __init__(self, floor: int = 0):
        self.floor = floor
        self.highest = floor
        self.recent: set[int] = set()
        self.prune_at = 64

    def fresh(self, counter: int) -> bool:
        """Whether ``counter`` was never accepted and is recent enough to be accepted."""
        reorder = int(REORDER_S * 1e9)
        return not (counter <= self.floor or counter in self.recent
                    or counter <= self.highest - reorder)

    def accept(self, counter: int) -> bool:
        reorder = int(REORDER_S * 1e9)
        if not self.fresh(counter):
            return False
        self.recent.add(counter)
        if counter > self.highest:
            self.highest = counter
            if len(self.recent) > self.prune_at:
                # Counters older than the window are refused by the test above anyway.
                # Pruning only once the set doubled keeps a busy sender's messages at O(1)
                # each instead of a pass over the whole window per message.
                self.recent = {c for c in self.recent if c > counter - reorder}
                self.prune_at = max(64, 2 * len(self.recent))
        return True


class Guard:
    """Signs what a component sends and verifies what it receives (networked only).

    ``trusted`` returns ``{name: raw public key}``: the researchers a node trusts, or the
    nodes a researcher enrolled. ``untrusted_hint`` finishes the message of a refusal.
    ``replay_file`` keeps the replay state across restarts (see the module's text).
    """

    def __init__(self, identity: Identity | None, trusted: Callable[[], Mapping[str, bytes]],
                 *, networked: bool, max_size: int, untrusted_hint: str = "",
                 replay_file: str | Path | None = None):
        if networked and identity is None:
            raise ValueError("a networked Guard needs an identity")
        self.identity = identity
        self.networked = networked
        self.max_size = max_size
        self._trusted = trusted
        self._hint = untrusted_hint
        self._counter = 0
        self._seen: dict[bytes, _Seen] = {}
        self._lock = threading.Lock()
        self._keys: dict[bytes, Ed25519PublicKey] = {}
        self._replay_fd: int | None = None
        self._replay_lines = 0
        self._replay_file = Path(replay_file) if replay_file and networked else None
        if self._replay_file is not None:
            self._load_replay_state(self._replay_file)

    # --- sending ------------------------------------------------------------------------------

    def seal(self, env: Envelope) -> bytes:
        """The frame of ``env`` as one message, signed when the transport is networked."""
        parts = codec.encode_parts(env, max_size=self.max_size)
        if self.networked:
            parts.append(self.trailer(parts))
        return b"".join(parts)

    def trailer(self, parts: Sequence[Buffer]) -> bytes:
        """The signature trailer of the message made of ``parts`` (thread-safe)."""
        assert self.identity is not None
        digest = blake3.blake3()
        for part in parts:
            digest.update(part)
        with self._lock:
            self._counter = max(self._counter + 1, time.time_ns())
            counter = self._counter
        signed = _SIGNED.pack(_MAGIC, self.identity.public_bytes, counter,
                              int(time.time() * 1000))
        return signed + self.identity.sign(digest.digest() + signed)

    # --- receiving ----------------------------------------------------------------------------

    def open(self, frame: Buffer) -> tuple[Envelope, str]:
        """Verify (when networked) and decode a one-message ``frame``; return it and its signer.

        ``ProtocolError`` for an oversized, unsigned, altered or replayed frame;
        ``GovernanceError`` for a frame signed by a key this side does not trust.
        """
        if not self.networked:
            return codec.decode(frame, max_size=self.max_size), ""
        signed = self.verify(frame)
        return codec.decode(signed.body, max_size=self.max_size), signed.name

    def signer(self, message: Buffer) -> tuple[str, bytes]:
        """The trusted name and key that ``message`` claims (unverified; cheap).

        ``ProtocolError`` when it carries no trailer, ``GovernanceError`` when its key is not
        trusted: what a receiver checks before it hashes or buffers anything.
        """
        view = memoryview(message).cast("B")
        if len(view) < TRAILER or bytes(view[-TRAILER:-TRAILER + 4]) not in _MAGICS:
            raise ProtocolError("Unsigned frame: every frame on a networked transport must "
                                "be signed by its sender (fedcore >= this release on both "
                                "ends).")
        key = bytes(view[-TRAILER + 4:-TRAILER + 36])
        trusted = self._trusted()
        if not trusted:
            raise GovernanceError(f"Refused: nobody is trusted yet. {self._hint}")
        name = next((n for n, k in trusted.items() if k == key), None)
        if name is None:
            raise GovernanceError(
                f"Refused a frame signed by an unknown key {fingerprint(key)}. {self._hint}")
        return name, key

    def verify(self, message: Buffer, signer: tuple[str, bytes] | None = None) -> Signed:
        """Check the signature trailer of ``message``; return its signer and body.

        ``signer`` is what :meth:`signer` returned for it, when the caller checked already.
        The cheap checks (size, key, time, counter) come before the hashing and the
        signature check, so a stale or replayed message costs no cryptography. The replay
        state is updated only when every check passed (thread-safe: large messages are
        verified on worker threads).
        """
        view = memoryview(message).cast("B")
        if len(view) > self.max_size + TRAILER:
            raise ProtocolError(f"Frame of {len(view) - TRAILER} bytes exceeds the limit of "
                                f"{self.max_size} bytes. Refused unread.")
        name, key = signer or self.signer(view)
        body, trailer = view[:-TRAILER], view[-TRAILER:]
        magic, _, counter, millis = _SIGNED.unpack(trailer[:_SIGNED.size])
        skew = abs(time.time() - millis / 1000)
        if skew > WINDOW_S:
            raise ProtocolError(f"Frame from {name!r} was signed {skew:.0f} s away from this "
                                f"clock (allowed: {WINDOW_S:.0f} s): a replay, or clocks "
                                "out of sync (run NTP). Refused.")
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and not seen.fresh(counter):
                raise self._replayed(name, counter)
        digest = (blake3.blake3(body) if magic == _MAGIC else hashlib.sha256(body)).digest()
        try:
            self._public(key).verify(bytes(trailer[_SIGNED.size:]),
                                     digest + bytes(trailer[:_SIGNED.size]))
        except InvalidSignature:
            raise ProtocolError(f"Bad signature on a frame from {name!r}: it was altered "
                                "in transit or forged. Refused.") from None
        with self._lock:
            seen = self._seen.setdefault(key, _Seen())
            if not seen.accept(counter):  # accepted meanwhile, on another thread
                raise self._replayed(name, counter)
            self._remember(key, counter)
        return Signed(name, key, body)

    @staticmethod
    def _replayed(name: str, counter: int) -> ReplayedFrame:
        return ReplayedFrame(f"Replayed frame from {name!r}: its counter {counter} was "
                             "already seen (a replay, or a duplicate delivery). Refused.")

    def _public(self, key: bytes) -> Ed25519PublicKey:
        public = self._keys.get(key)
        if public is None:
            public = self._keys[key] = Ed25519PublicKey.from_public_bytes(key)
        return public

    # --- replay state across restarts -------------------------------------------------------

    def _load_replay_state(self, path: Path) -> None:
        highest: dict[bytes, int] = {}
        lines = 0
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            lines += 1
            key_hex, _, counter = line.partition(" ")
            try:
                key, value = bytes.fromhex(key_hex), int(counter)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if len(key) == 32 and value > highest.get(key, 0):
                highest[key] = value
        self._seen = {key: _Seen(floor) for key, floor in highest.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        if lines > _COMPACT_LINES:
            self._compact(path, highest)
        else:
            self._replay_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._replay_lines = lines

    def _compact(self, path: Path, highest: Mapping[bytes, int]) -> None:
        if self._replay_fd is not None:
            os.close(self._replay_fd)
        write_atomic(path, "".join(f"{k.hex()} {v}\n" for k, v in highest.items()))
        self._replay_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._replay_lines = len(highest)

    def _remember(self, key: bytes, counter: int) -> None:
        """Append an accepted counter to the replay file (called under the lock)."""
        if self._replay_fd is None or self._replay_file is None:
            return
        try:
            os.write(self._replay_fd, f"{key.hex()} {counter}\n".encode())
            self._replay_lines += 1
            if self._replay_lines > _COMPACT_LINES:
                self._compact(self._replay_file,
                              {k: s.highest for k, s in self._seen.items()})
        except OSError as exc:  # a full disk must not stop the node: say what is lost
            log.error("Cannot write the replay state to %s (%s): frames captured now could "
                      "be replayed after a restart.", self._replay_file, exc)

    def close(self) -> None:
        """Release the replay file."""
        with self._lock:
            if self._replay_fd is not None:
                os.close(self._replay_fd)
                self._replay_fd = None
