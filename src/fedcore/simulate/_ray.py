"""Simulation shards as Ray actors: ``from_arrays(..., workers=N, engine="ray")``.

Imported only when that engine is asked for; it is the one module that imports ``ray``
(the ``ray`` extra). Each actor holds a shard's nodes (:class:`fedcore.simulate._shards.ShardHost`)
on whichever machine of the cluster Ray places it; the researcher stays in the driver.
Frames stay fedcore's codec frames: the driver pushes batches of them to an actor and
long-polls it for the frames its nodes send, so every actor call carries many frames.
"""

from __future__ import annotations

import functools
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError, FedcoreError
from fedcore.simulate._shards import ShardHost, ShardSpec

_PULL_WAIT_S = 0.5  # how long one poll waits for frames before it returns empty
_BATCH_BYTES = 64 << 20  # frames pushed in one actor call, at most (one frame always goes)
_READY_TIMEOUT_S = 600.0

_actor_class: Any = None


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigurationError(
            "engine='ray' needs Ray: pip install \"fedcore[ray]\" (on every machine of the "
            "cluster), or use engine='process' for worker processes of this machine."
        ) from None
    return ray


class _ShardActor:
    """The body of the Ray actor (wrapped by ``ray.remote`` in :func:`_actor`)."""

    def __init__(self, spec: ShardSpec, X: np.ndarray, y: np.ndarray | None,
                 build: Callable[..., Any]):
        self._out: queue.SimpleQueue[tuple[str, str, bytes]] = queue.SimpleQueue()
        self.host = ShardHost(build(spec, X, y), lambda s, r, f: self._out.put((s, r, f)))

    def ready(self) -> tuple[list[str], str]:
        """The shard's node ids, and where it runs (host, Ray node and pid)."""
        node = _ray().get_runtime_context().get_node_id()
        return self.host.node_ids, f"{socket.gethostname()}, Ray node {node[:12]}, " \
            f"pid {os.getpid()}"

    def push(self, records: list[tuple[str, str, bytes]]) -> None:
        for sender, receiver, frame in records:
            self.host.push(sender, receiver, frame)

    def pull(self, wait: float) -> list[tuple[str, str, bytes]]:
        try:
            batch = [self._out.get(timeout=wait)]
        except queue.Empty:
            return []
        while True:
            try:
                batch.append(self._out.get_nowait())
            except queue.Empty:
                return batch

    def close(self) -> None:
        self.host.close()


def _actor() -> Any:
    global _actor_class
    if _actor_class is None:
        # Two threads per actor: a push and a pull run side by side; each caller waits for
        # its call before the next, so frames keep their order.
        _actor_class = _ray().remote(num_cpus=1, max_concurrency=2)(_ShardActor)
    return _actor_class


def link_factories(workers: int, address: str | None, build: Callable[..., Any]
                   ) -> list[Callable[..., RayShard]]:
    """Join (or start) the Ray cluster; one factory per shard."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
    return [functools.partial(RayShard, i, build=build) for i in range(workers)]


class RayShard:
    """A shard in a Ray actor (a :class:`fedcore.simulate._shards.ShardLink`)."""

    def __init__(self, index: int, spec: ShardSpec, X: np.ndarray, y: np.ndarray | None,
                 *, build: Callable[..., Any]):
        self.index = index
        self.label = f"Ray actor {index + 1}"
        self._args: tuple[Any, ...] | None = (spec, X, y, build)
        self._actor: Any = None
        self._out: queue.SimpleQueue[tuple[str, str, bytes] | None] = queue.SimpleQueue()
        self._closing = False

    def start(self, on_frame: Callable[[str, str, bytes], None],
              on_lost: Callable[[str], None]) -> list[str]:
        ray = _ray()
        assert self._args is not None
        self._actor = _actor().remote(*self._args)
        self._args = None
        try:
            node_ids, where = ray.get(self._actor.ready.remote(), timeout=_READY_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            raise FedcoreError(f"Simulation {self.label} could not start its nodes: "
                               f"{exc}") from None
        self.label = f"Ray actor {self.index + 1} ({where})"
        threading.Thread(target=self._write, daemon=True,
                         name=f"fedcore-ray-{self.index}-out").start()
        threading.Thread(target=self._read, args=(on_frame, on_lost), daemon=True,
                         name=f"fedcore-ray-{self.index}-in").start()
        return list(node_ids)

    def send(self, sender: str, receiver: str, frame: bytes) -> None:
        self._out.put((sender, receiver, frame))

    def _write(self) -> None:
        ray = _ray()
        while (item := self._out.get()) is not None:
            batch, size = [item], len(item[2])
            while size < _BATCH_BYTES:
                try:
                    nxt = self._out.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._out.put(None)  # seen again by the outer loop
                    break
                batch.append(nxt)
                size += len(nxt[2])
            try:
                ray.get(self._actor.push.remote(batch))
            except ray.exceptions.RayError:  # the actor is gone: the reader says so
                return

    def _read(self, on_frame: Callable[[str, str, bytes], None],
              on_lost: Callable[[str], None]) -> None:
        ray = _ray()
        while not self._closing:
            try:
                batch = ray.get(self._actor.pull.remote(_PULL_WAIT_S))
            except ray.exceptions.RayError as exc:
                if not self._closing:
                    on_lost(f"the actor died ({type(exc).__name__})")
                return
            for sender, receiver, frame in batch:
                on_frame(sender, receiver, frame)

    def close(self) -> None:
        self._closing = True
        self._out.put(None)
        if self._actor is None:
            return
        ray = _ray()
        try:
            ray.get(self._actor.close.remote(), timeout=60)
        except ray.exceptions.RayError:
            pass  # it died already
        except Exception:  # GetTimeoutError: killed below
            pass
        ray.kill(self._actor)
