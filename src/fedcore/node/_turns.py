"""The training thread that simulated nodes share: jobs handed over in batches, in turns.

Simulated nodes share fedcore's event loop and one worker thread. Handing each node's job
to the worker and its result back costs two thread switches per node and round; on a busy
machine each switch waits for the scheduler (milliseconds), which made that hand-off the
largest cost of a simulated node. So jobs submitted from the loop are not handed over one
by one: they are queued until the loop has nothing else ready to run (every node that had
a request has reached its training), then handed to the worker together, in the order they
were submitted. Each node still trains on the worker thread with its own request, seeds and
dataset, so the results are those of one-by-one hand-offs, and the replies still travel as
frames.

While the worker runs a batch, the loop waits instead of competing for the GIL: left to run
beside a training thread, the loop (encoding, decoding and folding the other nodes'
messages) takes the GIL whenever a framework call releases it, and the trainer then waits
to get it back, call after call (with a small torch model a third of each round went
there). The loop waits as long as the jobs keep finishing, each within ``hold`` seconds; a
job that outlasts ``hold`` (a long training, a stuck plan) goes on while the loop serves
timeouts, progress messages and other traffic as before.

A coroutine awaits its job through :meth:`FlushIfLong.run` (or
:meth:`TurnTakingExecutor.run`): the job's result goes straight into a future of the loop,
set by the loop itself once it stops waiting for the batch, instead of a
``concurrent.futures.Future`` wrapped in one and resolved from the worker thread through
the loop's self-pipe (a lock, a condition, three callbacks and a system call per job).
A job that ends while the loop is not waiting for it (it outlasted ``hold``) is handed
back with ``call_soon_threadsafe``, as ``run_in_executor`` does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from fedcore._runtime import Deadlines

__all__ = ["TurnTakingExecutor"]

_MAX_DEFERRALS = 64  # loop iterations a batch waits for the loop to run out of work


class _Job:
    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the waiting coroutine, as an executor does
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class _LoopJob:
    """A job whose outcome goes to a future of the loop that queued it (see the module)."""

    __slots__ = ("args", "error", "fn", "future", "loop", "result")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any],
                 args: tuple[Any, ...]):
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> bool:
        """Run the job (on the worker); whether it ran (its awaiting coroutine may be gone)."""
        if self.future.cancelled():  # read across threads: a cancelled future stays so
            return False
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # handed to the waiting coroutine, as an executor does
            self.error = exc
        return True

    def settle(self) -> None:
        """Give the outcome to the future (on the loop)."""
        if self.future.done():  # cancelled meanwhile
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.result)

    def cancel(self) -> None:
        """Cancel the future, from any thread."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.future.cancel)


class TurnTakingExecutor(concurrent.futures.ThreadPoolExecutor):
    """One worker thread, fed in batches by the event loop, which waits while it works.

    ``submit`` from a coroutine on a running loop queues the job; ``submit`` from any other
    thread hands it over at once. See the module's docstring.
    """

    def __init__(self, hold: float = 1.0):
        super().__init__(1, thread_name_prefix="fedcore-sim")
        self._hold = hold
        self._queued: list[_Job | _LoopJob] = []
        self._armed: asyncio.AbstractEventLoop | None = None
        self._busy = 0  # batches handed over and not finished
        self._done = threading.Condition()
        self._finished = 0  # jobs finished, ever (the loop waits while it grows)
        self._closed = False
        self._waiting = False  # the loop waits for the batch running now (under _done)
        self._landed: list[_LoopJob] = []  # its jobs that ended meanwhile, not yet settled

    def run(self, fn: Callable[..., Any], /, *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` in the next batch, as a future of the running loop (on the loop)."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._armed is not None and self._armed is not loop:  # another loop's batch
            return asyncio.wrap_future(self.submit(fn, *args), loop=loop)
        job = _LoopJob(loop, fn, args)
        self._queue(loop, job)
        return job.future

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        """Queue ``fn(*args, **kwargs)`` for the next batch (see the class docstring)."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        job = _Job(fn, args, kwargs)
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if loop is None or (self._armed is not None and self._armed is not loop):
            self._hand_over([job], wait=False)
            return job.future
        self._queue(loop, job)
        return job.future

    def _queue(self, loop: asyncio.AbstractEventLoop, job: _Job | _LoopJob) -> None:
        self._queued.append(job)
        if self._armed is None:
            self._armed = loop
            loop.call_soon(self._settle, loop, 0)

    def _settle(self, loop: asyncio.AbstractEventLoop, deferrals: int) -> None:
        """Hand the queue over once the loop has nothing else ready (or waited long enough)."""
        ready = getattr(loop, "_ready", None)  # asyncio's own loops: the callbacks to run
        if ready and deferrals < _MAX_DEFERRALS:
            loop.call_soon(self._settle, loop, deferrals + 1)  # after what is ready now
            return
        if ready is None and deferrals < 3:  # another loop: a few turns of it
            loop.call_soon(self._settle, loop, deferrals + 1)
            return
        jobs, self._queued, self._armed = self._queued, [], None
        if jobs:
            self._hand_over(jobs, wait=True)

    def _hand_over(self, jobs: list[_Job | _LoopJob], *, wait: bool) -> None:
        with self._done:
            idle = self._busy == 0
            self._busy += 1
            finished = self._finished
            self._waiting = wait and idle
        try:
            super().submit(self._run, jobs)
        except RuntimeError:  # shut down meanwhile
            with self._done:
                self._busy -= 1
                self._waiting = False
            for job in jobs:
                job.future.cancel()  # on the loop (wait) or a job of no loop
            raise
        if not (wait and idle):
            return
        # The loop pauses while the jobs keep finishing, each within `hold` seconds. It is
        # woken when the batch ends, or every `hold` seconds to see whether a job finished
        # meanwhile (woken at every job, it would take the GIL from the trainer each time).
        try:
            with self._done:
                while self._busy:
                    self._done.wait(self._hold)
                    if self._finished == finished:
                        break  # one job ran for `hold` seconds: serve the loop meanwhile
                    finished = self._finished
        finally:
            with self._done:  # later jobs of the batch are handed back thread-safely
                self._waiting = False
                landed, self._landed = self._landed, []
            for job in landed:
                job.settle()

    def _run(self, jobs: list[_Job | _LoopJob]) -> None:
        try:
            for job in jobs:
                if isinstance(job, _Job):
                    job.run()
                elif job.run():
                    with self._done:
                        if self._waiting:  # the loop settles it when it stops waiting
                            self._landed.append(job)
                        else:
                            with contextlib.suppress(RuntimeError):  # its loop closed: no
                                job.loop.call_soon_threadsafe(job.settle)  # one waits
                self._finished += 1  # read under the condition by the waiting loop
        finally:
            with self._done:
                self._busy -= 1
                self._done.notify_all()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking jobs; queued jobs that were never handed over are cancelled."""
        self._closed = True
        jobs, self._queued = self._queued, []
        for job in jobs:
            if isinstance(job, _LoopJob):
                job.cancel()
            else:
                job.future.cancel()
        super().shutdown(wait=wait, cancel_futures=cancel_futures)


class FlushIfLong(concurrent.futures.Executor):
    """``inner``, writing the node's deferred audit records if a job it took runs long.

    The node defers a request's audit records and writes them in one group before the
    request's reply leaves. Most work handed to the training thread ends within a
    fraction of a second, and its records then go to the file with the reply's. Work that
    is still running ``after`` seconds later (a long training, a stuck plan) has its
    records written then, so an administrator sees the request while it runs and a crash
    leaves it on record. Jobs submitted from outside an event loop are preceded by a
    write at once.
    """

    def __init__(self, inner: concurrent.futures.Executor, flush: Callable[[], None],
                 after: float = 1.0):
        self.inner = inner
        self._flush = flush
        self._after = after
        self._watch: Deadlines | None = None  # the loop's watch, once a job was handed over
        # Handed over from the loop (by submit or run).
        self._jobs: list[concurrent.futures.Future[Any] | asyncio.Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        """Hand ``fn(*args, **kwargs)`` to the inner executor; flush if it outlasts ``after``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush()
            return self.inner.submit(fn, *args, **kwargs)
        future = self.inner.submit(fn, *args, **kwargs)
        self._jobs.append(future)
        self._arm(loop)
        return future

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Awaitable[Any]:
        """``fn(*args)`` on the inner executor, awaited on the running loop.

        What ``loop.run_in_executor(self, fn, *args)`` does, without the thread-safe
        hand-back of each result when the inner executor takes turns with the loop.
        """
        loop = asyncio.get_running_loop()
        inner = self.inner
        future = (inner.run(fn, *args) if isinstance(inner, TurnTakingExecutor)
                  else asyncio.wrap_future(inner.submit(fn, *args), loop=loop))
        self._jobs.append(future)
        self._arm(loop)
        return future

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have :meth:`_fire` called ``after`` seconds from now, unless it is due already."""
        watch = self._watch
        if watch is None or watch.loop is not loop:
            watch = self._watch = _watch(loop, self._after)
        watch.add(self, self._fire)

    def settle(self) -> None:
        """No job of the node runs any more: the pending write is not needed (on the loop)."""
        self._jobs.clear()
        if self._watch is not None:
            self._watch.discard(self)

    def _fire(self) -> None:
        # A loop that waited for a batch of jobs runs the timers that fell due meanwhile
        # before the coroutines the jobs' results wake: finished jobs need no early write.
        self._jobs = [job for job in self._jobs if not job.done()]
        if self._jobs:
            self._flush()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the inner executor down."""
        self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Deadlines]] = \
    weakref.WeakKeyDictionary()


def _watch(loop: asyncio.AbstractEventLoop, after: float) -> Deadlines:
    """When each :class:`FlushIfLong` of ``loop`` (with one ``after``) is due: one timer.

    A simulation's nodes share a loop; a timer of its own for each node's request (set,
    then cancelled as the request ends) was a timer-heap entry per node and round.
    """
    watches = _watches.setdefault(loop, {})
    watch = watches.get(after)
    if watch is None:
        watch = watches[after] = Deadlines(loop, after)
    return watch
