"""A computation run in a daemon thread, under a per-process bound, with a fallback.

Node sessions use it to compute, while the node trains, what ``protect`` needs and what does
not depend on the update (masking's combined mask, Joye-Libert's ``H(t)^{sk_i}``). The caller
waits for :meth:`Background.result`; ``None`` (logged) means the work failed and ``protect``
does it directly, with the same payload. The function runs in the thread and its result stays
in the object: the session that started it holds the only reference.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

log = logging.getLogger("fedcore.node")
T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else the count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows have no affinity call
        return os.cpu_count() or 1


def pool() -> ThreadPoolExecutor:
    """The threads that split a computation with its caller (masks, exponentiations).

    One per core, made on first use; its idle threads never block the process's exit. A
    forked child starts without it (it has none of its parent's threads).
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(cores(), thread_name_prefix="fedcore-secagg")
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


class Background(Generic[T]):
    """``work()`` in a daemon thread, holding one of ``slots`` until :attr:`release` is called.

    ``release`` gives the slot back once: when ``protect`` took the result, when the session
    discards it, or when this object is collected. ``seconds`` and ``cpu_seconds`` are the
    thread's wall and CPU time once it has finished (CPU time of that thread only).
    """

    def __init__(self, work: Callable[[], T], slots: threading.BoundedSemaphore, what: str,
                 name: str, tag: Any = None):
        self.what = what
        #: What the result is for (the caller compares it before using the result).
        self.tag = tag
        self.seconds = self.cpu_seconds = 0.0
        self._result: T | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True, name=name)
        self.release = weakref.finalize(self, slots.release)

    @classmethod
    def start(cls, work: Callable[[], T], slots: threading.BoundedSemaphore, what: str,
              name: str = "fedcore-secagg-precompute", tag: Any = None) -> Background[T] | None:
        """A running computation; ``None`` when every slot is held (the caller works later)."""
        if not slots.acquire(blocking=False):
            return None
        try:
            job = cls(work, slots, what, name, tag)
        except Exception:
            slots.release()
            raise
        try:
            job._thread.start()
        except Exception:
            job.release()
            raise
        return job

    def _run(self, work: Callable[[], T]) -> None:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            self._result = work()
        except Exception as exc:  # result() logs it; protect does the work directly
            self._error = exc
        self.seconds = time.perf_counter() - start
        self.cpu_seconds = time.thread_time() - cpu

    @property
    def done(self) -> bool:
        """Whether the work has finished (:meth:`result` then returns without waiting)."""
        return not self._thread.is_alive()

    def result(self) -> T | None:
        """The result once computed (waits for it); ``None``, logged, when the work failed."""
        self._thread.join()
        if self._error is not None:
            log.warning("Precomputing %s failed (%s: %s); computing it directly instead.",
                        self.what, type(self._error).__name__, self._error)
        return self._result


class Pending(Generic[T]):
    """A session's one background computation, handed over once under a lock.

    :meth:`install` replaces it (releasing the one it replaces), :meth:`take` hands it to
    ``protect`` (which releases it when done), :meth:`discard` drops it.
    """

    def __init__(self) -> None:
        self._job: Background[T] | None = None
        self._lock = threading.Lock()  # prepare runs on the node's loop, protect elsewhere

    @property
    def tag(self) -> Any:
        """The tag of the computation held (``None`` when none is)."""
        job = self._job
        return None if job is None else job.tag

    @property
    def job(self) -> Background[T] | None:
        """The computation held, if any (for tests and timings)."""
        return self._job

    def install(self, job: Background[T] | None) -> None:
        """Hold ``job`` instead of the current computation, which is released."""
        with self._lock:
            old, self._job = self._job, job
        if old is not None:
            old.release()

    def take(self) -> Background[T] | None:
        """The computation held, no longer held: the caller releases it."""
        with self._lock:
            job, self._job = self._job, None
        return job

    def discard(self) -> None:
        """Release the computation held, if any."""
        self.install(None)
