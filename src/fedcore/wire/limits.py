"""What a receiver spends on frames it did not ask for: bounded, whoever sends them.

- :class:`TokenBucket`: a rate (per second) with a burst.
- :class:`Bounded`: per-name state that forgets its least recently used names beyond a cap,
  so a stream of made-up sender names cannot grow memory without bound.
- :class:`Drops`: refused frames counted rather than answered one by one. Anyone who can
  publish on a broker can send junk; a receiver that audited, logged and answered (signing
  the answer) each junk frame would spend more on it than the sender did. A few refusals are
  reported one by one (a researcher the node does not trust yet deserves to be told why);
  the rest are counted, and a summary (how many, why, claimed by whom, an example of each
  reason) is reported at most once per ``interval`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Bounded", "Drops", "TokenBucket"]

K = TypeVar("K")
V = TypeVar("V")


class TokenBucket:
    """``rate`` events per second on average, at most ``burst`` at once."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        """Spend one token if there is one; whether there was."""
        if not self.ready():
            return False
        self.tokens -= 1.0
        return True

    def ready(self) -> bool:
        """Whether a token is there now (none is spent)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1.0


class Bounded(OrderedDict[K, V], Generic[K, V]):
    """A dict of at most ``cap`` entries: using a key makes it recent, the oldest go first."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def get_or_add(self, key: K, make: Callable[[], V]) -> V:
        """The value of ``key``, created by ``make()`` when absent (the oldest may go)."""
        value = self.get(key)
        if value is None:
            value = self[key] = make()
            while len(self) > self.cap:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


_PEERS = 16  # claimed sender names a summary counts one by one (the rest: "others")
_EXAMPLE = 300  # characters of an example refusal kept per reason


class Drops:
    """Refused frames, counted; a few reported one by one, the rest in summaries.

    Thread-safe: a transport may count drops on its own receiving thread. ``report`` is
    called on the thread that made the summary due.

    :meth:`drop` says whether a refusal may be reported on its own (at most ``burst`` at
    once, ``per_s`` a second after that). ``report`` receives each summary: a dict with
    ``dropped`` (frames), ``seconds`` (the span it covers), ``reasons`` (count per reason),
    ``examples`` (one message per reason) and ``peers`` (count per claimed sender name).
    A summary goes out when a drop comes ``interval`` seconds or more after the previous
    one went out (or after the first drop of a quiet spell), on :meth:`tick` and on
    :meth:`flush`.
    """

    def __init__(self, report: Callable[[dict[str, Any]], None], *, per_s: float = 0.1,
                 burst: float = 5, interval: float = 30.0):
        self.report = report
        self.interval = interval
        #: Frames dropped since this object was made.
        self.total = 0
        self._individual = TokenBucket(per_s, burst)
        self._reported_at = -interval  # monotonic time of the latest summary
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self._count = 0
        self._since = 0.0
        self._reasons: Counter[str] = Counter()
        self._examples: dict[str, str] = {}
        self._peers: Counter[str] = Counter()

    def reportable(self) -> bool:
        """Whether the next drop could be reported alone (nothing is counted)."""
        with self._lock:
            return self._individual.ready()

    def drop(self, peer: str, reason: str, message: str) -> bool:
        """Count one refused frame; whether it may also be reported (and answered) alone."""
        with self._lock:
            return self._drop(peer, reason, message)

    def _drop(self, peer: str, reason: str, message: str) -> bool:
        self.total += 1
        if not self._count:
            self._since = time.time()
        self._count += 1
        self._reasons[reason] += 1
        self._examples.setdefault(reason, message[:_EXAMPLE])
        if peer in self._peers or len(self._peers) < _PEERS:
            self._peers[peer] += 1
        else:
            self._peers["(others)"] += 1
        self.tick()
        return self._individual.take()

    def tick(self) -> None:
        """Send the summary if one is due."""
        with self._lock:
            if self._count and time.monotonic() - self._reported_at >= self.interval:
                self.flush()

    def flush(self) -> None:
        """Send the summary of the drops not summarised yet, if any."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._count:
            return
        summary = {"dropped": self._count, "seconds": round(time.time() - self._since, 3),
                   "reasons": dict(self._reasons), "examples": dict(self._examples),
                   "peers": dict(self._peers.most_common())}
        self._reported_at = time.monotonic()
        self._reset()
        self.report(summary)
