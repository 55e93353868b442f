"""Buffers for reassembled frames, reused once nothing views them any more.

A frame received in chunks is copied into one buffer and handed on as a read-only view of
it, decoded without a copy: the arrays of the message are views of that buffer. A fresh
buffer costs more than the copy itself: the kernel zeroes every page the first time it is
written (a quarter of all CPU samples of ``bench/mqtt_throughput.py`` before this pool), and
the process gives the pages back when the buffer is freed, so the next frame pays again.

:class:`FrameBuffers` keeps the buffers it handed out and gives one again for a later frame
of about the same size once **nothing but the pool references it**: every view of a buffer
(the frame's memoryview, each decoded array, a slice of one) holds a reference to it, so an
array still in use keeps its buffer out of the pool, however long it lives. A reused buffer
is written whole before the frame is handed on (a frame that stops half way is dropped,
never delivered), so no byte of an earlier frame shows through. A kept buffer that nothing
used for ``idle_s`` seconds is freed, and so is one that does not fit the frame being
allocated, so the pool never holds more than the frames that were alive at once.

Without reference counts (an interpreter other than CPython) nothing is kept.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

__all__ = ["FrameBuffers"]

_ROOM = 1 << 16  # spare bytes at the end of a fresh buffer, beyond a 32nd of its size
_getrefcount = getattr(sys, "getrefcount", None)


class _Kept:
    __slots__ = ("buffer", "free_since")

    def __init__(self, buffer: np.ndarray):
        self.buffer = buffer
        self.free_since: float | None = None


def _refs(kept: _Kept) -> int:
    assert _getrefcount is not None
    return _getrefcount(kept.buffer)


# References to a kept buffer when only the pool holds it, measured the way it is checked
# (the count an interpreter reports for an argument differs between versions).
_ALONE = _refs(_Kept(np.empty(1, np.uint8))) if _getrefcount is not None else 0


class FrameBuffers:
    """Up to ``keep`` frame buffers, each reused once nothing else references it.

    :meth:`take` returns a writable ``uint8`` array of the size asked, whose bytes are
    undefined (an earlier frame's, or zero): the caller writes every byte before anything
    reads it. :meth:`sweep` frees the buffers that stayed unused for ``idle_s`` seconds.
    Thread-safe.
    """

    def __init__(self, keep: int = 8, idle_s: float = 30.0):
        self.keep = keep if _getrefcount is not None else 0
        self.idle_s = idle_s
        self._kept: list[_Kept] = []
        self._lock = threading.Lock()
        self.reused = 0  #: frames that got a kept buffer (for tests and benchmarks)

    def take(self, size: int) -> np.ndarray:
        """A buffer of ``size`` bytes: a kept one that fits and is free, else a new one."""
        with self._lock:
            misfits = []
            for kept in self._kept:
                if not self._free(kept):
                    continue
                capacity = len(kept.buffer)
                if size <= capacity <= size + size // 16 + _ROOM:
                    kept.free_since = None
                    self.reused += 1
                    return kept.buffer[:size]
                misfits.append(kept)
            # A new buffer: first free the kept ones that cannot serve this frame, so that
            # memory holds what is alive, not what was.
            self._kept = [k for k in self._kept if k not in misfits]
            buffer = np.empty(size + size // 32 + _ROOM, np.uint8)  # pages untouched
            if len(self._kept) < self.keep:
                self._kept.append(_Kept(buffer))
            return buffer[:size]

    def sweep(self, now: float | None = None) -> None:
        """Free the kept buffers unused for ``idle_s`` seconds (call it every few seconds)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            kept = []
            for entry in self._kept:
                if not self._free(entry):
                    entry.free_since = None
                elif entry.free_since is None:
                    entry.free_since = now
                if entry.free_since is None or now - entry.free_since < self.idle_s:
                    kept.append(entry)
            self._kept = kept

    def clear(self) -> None:
        """Forget every kept buffer (those still in use live on with their views)."""
        with self._lock:
            self._kept = []

    def __len__(self) -> int:
        return len(self._kept)

    @staticmethod
    def _free(kept: _Kept) -> bool:
        return _refs(kept) <= _ALONE
