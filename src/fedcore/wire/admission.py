"""What a receiver lets in before it spends anything on a message: the gate of the chunk layer.

Anyone who can publish on a broker can send junk; a receiver that audited, logged and
answered each junk frame would spend more on it than the sender did. :class:`Admission`
keeps the cost of what was not asked for bounded, whoever sends it:

- :meth:`screen` runs on the transport's own receiving thread (``Transport.screen``): a
  message no trusted key signed is dropped there, counted, before it costs the event loop
  anything;
- :meth:`check_claim`: signatures claimed under a trusted key from sender names that key
  never used get a budget of checks a second, so forged signatures cost no cryptography
  beyond it (with the broker ACL of docs/deployment.md nobody else can use those names);
- :meth:`check_rate`: frames a second taken from one verified key (a node's
  ``max_requests_per_s``);
- :meth:`refused`: refusals are counted in :class:`~fedcore.wire.limits.Drops` summaries, and
  only a few are handed on one by one to be answered.

Its state is capped per key and per name (:class:`~fedcore.wire.limits.Bounded`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fedcore.errors import FedcoreError, ProtocolError
from fedcore.wire.limits import Bounded, Drops, TokenBucket
from fedcore.wire.signing import Guard, ReplayedFrame

__all__ = ["Admission"]

log = logging.getLogger("fedcore.chunks")

NAMES = 1024  #: keys and sender names whose state is kept (the least recent go first)
STRANGERS = 20.0  #: signature checks a second under a key, from names it never used
_REASONS = (("unsigned", "Unsigned frame"), ("unknown key", "unknown key"),
            ("nobody trusted", "nobody is trusted"), ("bad signature", "Bad signature"),
            ("clock", "was signed"), ("oversized", "exceeds the limit"),
            ("unverified", "dropped unverified"), ("rate limited", "Too many frames"))


class Admission:
    """The limits of one receiving endpoint that verifies with ``guard``.

    ``on_dropped`` receives each summary of dropped frames (default: a log line);
    ``request_rate`` returns the most frames a second taken from one key (``None``: no
    limit), read as each frame starts.
    """

    def __init__(self, guard: Guard,
                 on_dropped: Callable[[dict[str, Any]], None] | None = None,
                 request_rate: Callable[[], float | None] | None = None):
        self.guard = guard
        #: Refused frames, counted and summarised.
        self.drops = Drops(on_dropped or _log_summary)
        self._rate = request_rate
        self._buckets: Bounded[bytes, TokenBucket] = Bounded(NAMES)
        self._vouched: Bounded[bytes, Bounded[str, bool]] = Bounded(NAMES)
        self._strangers: Bounded[bytes, TokenBucket] = Bounded(NAMES)

    def screen(self, peer: str, message: bytes | bytearray) -> bool:
        """On the transport's receiving thread: whether to queue ``message`` at all.

        What no trusted key signed is dropped, counted; the few refusals that may still be
        answered go on, to be refused on the loop.
        """
        try:
            self.guard.signer(message)
        except FedcoreError as exc:
            if self.drops.reportable():
                return True
            self.count(peer, exc)
            return False
        return True

    def check_claim(self, peer: str, claimed: tuple[str, bytes]) -> None:
        """``ProtocolError`` when a claim of a key under a name it never used is one too many.

        Such messages get a budget of signature checks a second, per key.
        """
        vouched = self._vouched.get(claimed[1])
        if vouched is not None and peer in vouched:
            return
        bucket = self._strangers.get_or_add(
            claimed[1], lambda: TokenBucket(STRANGERS, 2 * STRANGERS))
        if not bucket.take():
            raise ProtocolError(
                f"Too many frames claiming the key of {claimed[0]!r} under sender names it "
                "never used: dropped unverified. (With the broker ACL of docs/deployment.md "
                "nobody else can use its name.)")

    def vouch(self, peer: str, key: bytes) -> None:
        """A message from ``peer`` verified under ``key``."""
        self._vouched.get_or_add(key, lambda: Bounded(64)).get_or_add(peer, bool)

    def check_rate(self, claimed: tuple[str, bytes]) -> None:
        """``ProtocolError`` when a new frame from a verified key goes beyond its rate."""
        rate = self._rate() if self._rate is not None else None
        if not rate:
            return
        bucket = self._buckets.get_or_add(claimed[1], lambda: TokenBucket(rate, 2 * rate))
        bucket.rate, bucket.burst = rate, 2 * rate  # follows a change of the policy
        if not bucket.take():
            raise ProtocolError(
                f"Too many frames from {claimed[0]!r}: at most {rate:g} a second are taken "
                "from one key (the node's policy max_requests_per_s). Slow down, or ask the "
                "node's administrator to raise it.")

    def count(self, peer: str, exc: FedcoreError) -> None:
        """Count a refused message that is never answered (a chunk after a frame's start)."""
        self.drops.drop(peer, _reason(exc), str(exc))

    def refused(self, peer: str, exc: FedcoreError) -> bool:
        """Count a refused frame; whether it may also be handed on, to be answered."""
        return self.drops.drop(peer, _reason(exc), str(exc))


def _reason(exc: FedcoreError) -> str:
    """A short name for why a message was refused (the key of a summary's counts)."""
    if isinstance(exc, ReplayedFrame):
        return "replayed"
    text = str(exc)
    return next((reason for reason, marker in _REASONS if marker in text),
                type(exc).__name__)


def _log_summary(summary: dict[str, Any]) -> None:
    log.warning("Dropped %d frame(s) in %.0f s that failed verification or came too fast "
                "(%s), claimed by %s.", summary["dropped"], summary["seconds"],
                summary["reasons"], summary["peers"])
