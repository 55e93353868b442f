"""The background event loop that runs fedcore's networking for synchronous callers.

Experiments and simulated nodes run their coroutines on one daemon thread's loop, so the
synchronous API works the same in a script and inside Jupyter, whose own loop is already
running (``asyncio.run`` would refuse there).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from fedcore.errors import ConfigurationError

T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The runtime loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or not _loop.is_running():
            ready = threading.Event()
            new_loop = asyncio.new_event_loop()

            def main() -> None:
                asyncio.set_event_loop(new_loop)
                new_loop.call_soon(ready.set)
                new_loop.run_forever()

            _thread = threading.Thread(target=main, name="fedcore-runtime", daemon=True)
            _thread.start()
            ready.wait()
            _loop = new_loop
        return _loop


@atexit.register
def _shutdown() -> None:
    """Stop the loop at interpreter exit, letting pending tasks unwind quietly."""
    global _loop
    with _lock:
        current, thread, _loop = _loop, _thread, None
    if current is None or thread is None or not current.is_running():
        return

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(cancel_all(), current).result(timeout=5)
    except (concurrent.futures.TimeoutError, RuntimeError):
        pass
    current.call_soon_threadsafe(current.stop)
    thread.join(timeout=5)


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the runtime loop from any thread."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the runtime loop and wait for its result (from any other thread)."""
    if threading.current_thread() is _thread:
        coro.close()
        raise ConfigurationError(
            "A synchronous fedcore call was made from fedcore's own event loop: use the "
            "async twin (e.g. `await experiment.arun()`) there."
        )
    future = submit(coro)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise


async def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` run on the runtime loop, from any event loop (e.g. Jupyter's)."""
    if threading.current_thread() is _thread:
        return await coro
    return await asyncio.wrap_future(submit(coro))


def blocking(method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
             ) -> Callable[Concatenate[S, P], T]:
    """The synchronous form of an async method: it runs on the runtime loop, and waits.

    One async implementation per call gives both public forms::

        async def _search(self, tags): ...      # the docstring is the public one
        search = _runtime.blocking(_search)
        asearch = _runtime.awaitable(_search)
    """
    @functools.wraps(method)
    def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return run(method(self, *args, **kwargs))

    call.__name__ = call.__qualname__ = method.__name__.lstrip("_")
    return call


def awaitable(method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
              ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """The async twin of :func:`blocking`: awaitable from any event loop (e.g. Jupyter's)."""
    name = method.__name__.lstrip("_")

    @functools.wraps(method)
    async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await run_async(method(self, *args, **kwargs))

    call.__name__ = call.__qualname__ = "a" + name
    call.__doc__ = f"Async twin of :meth:`{name}`."
    return call


class Deadlines:
    """Callbacks each due ``delay`` seconds after it was added, on ``loop``: one timer for all.

    Every entry waits the same delay, so they fall due in the order they were added: they
    wait in a dict in that order, and one timer is set for the first. Many requests in
    flight at once (a simulation's nodes, a scatter to a thousand of them) then cost no
    timer-heap entry each, set and cancelled. Used on the loop's thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float):
        self.loop, self.delay = loop, delay
        self._due: dict[Any, tuple[float, Callable[[], None]]] = {}  # in the order added
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: Any, callback: Callable[[], None]) -> None:
        """Call ``callback()`` ``delay`` seconds from now, unless ``key`` is waiting already."""
        if key in self._due:
            return
        self._due[key] = (when := self.loop.time() + self.delay, callback)
        if self._timer is None:
            self._timer = self.loop.call_at(when, self._fire)

    def discard(self, key: Any) -> None:
        """``key``'s callback is no longer needed."""
        if self._due.pop(key, None) is not None and not self._due:
            self.clear()

    def clear(self) -> None:
        """Forget every entry."""
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        due, now = self._due, self.loop.time()
        try:
            while due:
                key, (when, callback) = next(iter(due.items()))
                if when > now:
                    break
                del due[key]
                callback()  # one that raises leaves the others' timer set (finally)
        finally:
            if due and self._timer is None:
                self._timer = self.loop.call_at(next(iter(due.values()))[0], self._fire)
