"""Simulated nodes in other processes: the relay on both sides of a shard.

A shard is a group of simulated nodes that lives in another process (a worker process of
this machine, or a Ray actor anywhere on a cluster). Its nodes are real
:class:`~fedcore.node.Node` objects serving an in-process hub of their own; the researcher
stays in the parent, on the federation's hub. Frames cross between the two hubs unchanged:
they are fedcore's codec frames (msgpack, never pickle), carried as records of
``(sender, receiver, frame)``.

- In the parent, :class:`ShardRelay` puts one node-role endpoint on the federation's hub
  for every node of the shard. What the researcher sends to one goes to the shard; what
  the shard's nodes answer is sent from it.
- In the shard, :class:`ShardHost` runs the nodes (a :class:`~fedcore.simulate.
  SimulatedFederation` of its own) and puts one researcher-role endpoint on its hub for
  every researcher that wrote, so the nodes answer it as they would on one hub.

When a shard goes away (its process died), the relay closes its endpoints: the nodes leave
the researcher's peer set, and requests waiting for them fail at once with "disconnected".

Process workers speak over their stdin/stdout pipes (:func:`write_record`,
:func:`read_record`), started as ``python -m fedcore.simulate._worker``: a fresh interpreter
(spawned, never forked from a process that holds threads), which imports neither the
caller's ``__main__`` nor anything pickled.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import queue
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import msgpack
import numpy as np

from fedcore import _runtime
from fedcore.errors import ConfigurationError, FedcoreError, TransportError
from fedcore_transport.inprocess import InProcessRelay

log = logging.getLogger("fedcore.simulate")

#: What a shard is sent (as msgpack): the federation's name, where node homes go (or
#: ``None``: a temporary folder of the shard's own), the tags, and per node
#: ``[node_id, dataset_name, first_row, end_row]`` into the shard's arrays; ``from_arrays``
#: adds the backends to import (``warm``) and whether the homes fsync (``durable``).
ShardSpec = dict[str, Any]
Record = tuple[str, str, bytes]  # (sender, receiver, frame)

_HEAD = struct.Struct("<IQ")  # header length, payload length
#: Buffer of each pipe's file object: a round's burst of small frames moves in a few system
#: calls (the default 8 KiB flushed every two requests of a small model).
PIPE_BUFFER = 1 << 20
#: How long a pipe's writer lets a burst of frames gather before it writes them.
LINGER = 0.001
#: Frames a shard hands its nodes before it lets them work through them (see ShardHost).
CHUNK = 32
#: How often a shard on a loop other than asyncio's own checks for the next chunk.
POLL = 0.0005


def shard_specs(name: str, root: str | None, tags: Sequence[str], node_ids: Sequence[str],
                datasets: Sequence[str], parts: Sequence[np.ndarray], workers: int
                ) -> list[tuple[ShardSpec, np.ndarray]]:
    """Deal nodes to ``workers`` shards: (spec, row indices) per shard.

    Nodes are dealt in turn in the order of their ids, the order in which a round sends
    its requests and folds the replies: every shard gets its first request at once, and
    the shards' replies come back in step with the fold.
    """
    order = sorted(range(len(node_ids)), key=lambda i: node_ids[i])
    out = []
    for w in range(workers):
        rows, nodes, start = [], [], 0
        for i in order[w::workers]:
            rows.append(parts[i])
            nodes.append([node_ids[i], datasets[i], start, start + len(parts[i])])
            start += len(parts[i])
        index = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        out.append(({"name": name, "root": root, "tags": list(tags), "nodes": nodes}, index))
    return out


def array_bytes(a: np.ndarray) -> bytes:
    """``a`` in NumPy's ``.npy`` format, refusing object arrays (they would need pickle)."""
    buf = io.BytesIO()
    try:
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    except ValueError:
        raise ConfigurationError(
            f"Simulation workers receive data as plain arrays. Received an array of dtype "
            f"{a.dtype}: convert it to numbers or fixed-width strings (e.g. "
            "`y.astype(str)`), or use workers=1.") from None
    return buf.getvalue()


def bytes_array(data: bytes) -> np.ndarray:
    """The inverse of :func:`array_bytes`."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class Handoff:
    """Records put from other threads, taken on ``loop`` in batches.

    ``take(records)`` runs on the loop with every record put since it last ran: a burst of
    frames from a pipe costs one wake-up of the loop, not one per frame (the wake-up, a
    write to the loop's self-pipe and a callback, cost more than relaying a small frame).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, take: Callable[[list[Record]], None]):
        self._loop = loop
        self._take = take
        self._records: list[Record] = []
        self._lock = threading.Lock()

    def put(self, record: Record) -> None:
        """From any thread: queue ``record``; wake the loop only if nothing was waiting."""
        with self._lock:
            self._records.append(record)
            if len(self._records) > 1:  # a batch is already on its way to the loop
                return
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            records, self._records = self._records, []
        self._take(records)


# --------------------------------------------------------------------------- the shard side


class ShardHost:
    """The nodes of ``fed`` (a shard's own federation), serving the parent's researchers.

    ``emit(sender, receiver, frame)`` is called (from fedcore's event loop) for every frame
    a node sends; :meth:`push` hands over every frame the parent's researchers sent.

    The frames are handed to the nodes a chunk at a time (:data:`CHUNK`): the next chunk
    as soon as the event loop has nothing else to run (:class:`WhenIdle`: the nodes are
    through the last one). A round's requests arrive in a burst; handed over all at once,
    every node would decode and admit its request before the first one trains, and every
    reply would leave together at the end, while the parent waits for them. In chunks,
    the replies stream back while the rest train.
    """

    def __init__(self, fed: Any, emit: Callable[[str, str, bytes], None]):
        self._emit = emit
        self.fed = fed  # the shard's own SimulatedFederation, its nodes started
        self.node_ids = [n.node_id for n in self.fed.nodes]
        self._researchers: dict[str, InProcessRelay] = {}
        self._opening: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Frames from the parent not yet handed to a node, in the parent's order.
        self._pending: deque[Record] = deque()
        self._loop = _runtime.loop()
        self._handoff = Handoff(self._loop, self._pending.extend)
        self._idle = _runtime.run(self._start())

    async def _start(self) -> WhenIdle:
        return WhenIdle(asyncio.get_running_loop(), self._pump)

    def push(self, sender: str, receiver: str, frame: bytes) -> None:
        """From any thread: a researcher's frame for one of this shard's nodes."""
        self._handoff.put((sender, receiver, frame))

    def _pump(self) -> bool:
        """On the loop, once it has nothing else to run: hand the nodes the next chunk.

        One pump keeps the parent's order of frames (a chunked message stays whole).
        Returns whether it gave the loop something to run.
        """
        handed = 0
        while self._pending and handed < CHUNK:
            sender, receiver, frame = self._pending[0]
            endpoint = self._researchers.get(sender)
            if endpoint is None:  # the first frame of this researcher: its endpoint first
                if sender not in self._opening:
                    self._opening.add(sender)
                    self._spawn(self._open(sender))
                    return True
                return False
            self._pending.popleft()
            handed += 1
            try:
                endpoint.relay(receiver, frame)
            except TransportError as exc:  # a node of this shard stopped
                log.warning("Simulation shard dropped a frame for %s: %s", receiver, exc)
        return handed > 0

    async def _open(self, researcher: str) -> None:
        endpoint = InProcessRelay(self.fed.url, role="researcher", identity=researcher,
                                  forward=functools.partial(self._answer, researcher))
        await endpoint.start()
        self._researchers[researcher] = endpoint
        self._opening.discard(researcher)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answer(self, researcher: str, node: str, frame: bytes) -> None:
        self._emit(node, researcher, frame)

    def close(self) -> None:
        """Stop the nodes and the researcher endpoints."""
        async def stop() -> None:
            self._idle.close()
            for task in list(self._tasks):
                task.cancel()
            for endpoint in self._researchers.values():
                await endpoint.close()

        try:
            _runtime.run(stop())
        finally:
            self.fed.close()


class WhenIdle:
    """Call ``pump()`` on ``loop`` whenever the loop has nothing ready to run.

    ``pump`` returns whether it gave the loop work. On asyncio's own loops it is called
    just before the loop would wait for I/O or a timer (in its selector's ``select``): no
    timer, no polling, no delay. On another loop it is called every :data:`POLL` seconds
    instead. Never from the loop's ready queue: the training thread's batches start when
    that queue runs dry (``node/_turns.py``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pump: Callable[[], bool]):
        self._loop = loop
        self._pump = pump
        self._timer: asyncio.TimerHandle | None = None
        selector = getattr(loop, "_selector", None)
        if isinstance(selector, selectors.BaseSelector):
            self._selector: _IdleSelector | None = _IdleSelector(selector, pump)
            setattr(loop, "_selector", self._selector)  # noqa: B010 (asyncio's private)
        else:
            self._selector = None
            self._timer = loop.call_later(POLL, self._poll)

    def _poll(self) -> None:
        self._pump()
        self._timer = self._loop.call_later(POLL, self._poll)

    def close(self) -> None:
        """Stop calling ``pump`` (on the loop)."""
        selector = self._selector
        if selector is not None:
            selector.pump = None
            inner = selector.inner
            if getattr(self._loop, "_selector", None) is selector:  # not wrapped since
                setattr(self._loop, "_selector", inner)  # noqa: B010 (private)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _IdleSelector(selectors.BaseSelector):
    """A loop's selector that calls ``pump`` before it would wait (see :class:`WhenIdle`)."""

    def __init__(self, inner: selectors.BaseSelector, pump: Callable[[], bool]):
        self.inner = inner
        self.pump: Callable[[], bool] | None = pump

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # The loop asks to wait (timeout None or > 0) only when nothing is ready to run.
        if (timeout is None or timeout > 0) and self.pump is not None:
            try:
                if self.pump():
                    timeout = 0
            except Exception:  # a bug: said, and the loop (every node of the shard) goes on
                log.exception("Simulation shard failed to hand frames to its nodes")
        return self.inner.select(timeout)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self.inner.get_map()

    def close(self) -> None:
        self.inner.close()


# --------------------------------------------------------------------------- the parent side


class ShardLink(Protocol):
    """How the parent reaches one shard (a worker process, a Ray actor)."""

    #: What to call the shard in messages ("worker process 2 (pid 1234)").
    label: str

    def start(self, on_frame: Callable[[str, str, bytes], None],
              on_lost: Callable[[str], None]) -> list[str]:
        """Build the shard's nodes; return their ids once they serve.

        Afterwards, call ``on_frame(sender, receiver, frame)`` (from any thread) for every
        frame a node sends, and ``on_lost(reason)`` once if the shard goes away unasked.
        """

    def send(self, sender: str, receiver: str, frame: bytes) -> None:
        """From any thread, without blocking for long: a frame for one of the shard's nodes."""

    def close(self) -> None:
        """Stop the shard (its nodes close their homes) and wait for it."""


class ShardRelay:
    """The parent's endpoints, on the federation's hub, for the nodes of every shard."""

    def __init__(self, url: str, links: Sequence[ShardLink]):
        self.url = url
        self.links = list(links)
        self.node_ids: list[str] = []
        #: Why each shard that went away unasked did (its label -> the reason).
        self.lost: dict[str, str] = {}
        self._endpoints: dict[str, InProcessRelay] = {}
        self._shard_of: dict[str, int] = {}
        self._loop = _runtime.loop()
        self._handoff = Handoff(self._loop, self._deliver)
        self._closing = False

    def start(self) -> None:
        """Start every shard (in parallel: each builds its nodes), then their endpoints."""
        errors: list[BaseException | None] = [None] * len(self.links)
        ids: list[list[str]] = [[] for _ in self.links]

        def start_one(i: int) -> None:
            try:
                ids[i] = self.links[i].start(self._incoming, functools.partial(self._lost, i))
            except BaseException as exc:  # reported below, after every shard is up or not
                errors[i] = exc

        threads = [threading.Thread(target=start_one, args=(i,), daemon=True)
                   for i in range(len(self.links))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [e for e in errors if e is not None]
        if failed:
            self.close()
            raise failed[0]
        for i, shard_ids in enumerate(ids):
            for node_id in shard_ids:
                self._shard_of[node_id] = i
        self.node_ids = sorted(self._shard_of)
        _runtime.run(self._connect(self.node_ids))

    async def _connect(self, node_ids: list[str]) -> None:
        for node_id in node_ids:
            # What the researcher sends a node goes on to its shard within the send: the
            # shard gets a round's first requests while the researcher sends the rest.
            link = self.links[self._shard_of[node_id]]
            endpoint = InProcessRelay(self.url, role="node", identity=node_id,
                                      forward=functools.partial(_to_shard, link, node_id))
            await endpoint.start()
            self._endpoints[node_id] = endpoint

    def _incoming(self, sender: str, receiver: str, frame: bytes) -> None:
        self._handoff.put((sender, receiver, frame))

    def _deliver(self, records: list[Record]) -> None:
        # On the loop, a burst at a time, in each shard's order of frames.
        for node, researcher, frame in records:
            endpoint = self._endpoints.get(node)
            if endpoint is None:
                continue
            try:
                endpoint.relay(researcher, frame)
            except TransportError as exc:  # the researcher left
                log.debug("Dropped a frame of %s: %s", node, exc)

    def _lost(self, shard: int, why: str) -> None:
        if self._closing:
            return
        link = self.links[shard]
        self.lost[link.label] = why
        nodes = [n for n, s in self._shard_of.items() if s == shard]
        log.error("Simulation %s stopped: %s. Its %d nodes (%s) are gone; requests waiting "
                  "for them fail.", link.label, why, len(nodes), _span(nodes))

        async def drop() -> None:
            for node_id in nodes:
                endpoint = self._endpoints.pop(node_id, None)
                if endpoint is not None:
                    await endpoint.close()

        try:
            asyncio.run_coroutine_threadsafe(drop(), self._loop)
        except RuntimeError:  # the loop is gone: the interpreter is exiting
            pass

    def close(self) -> None:
        """Close the endpoints, then stop every shard."""
        self._closing = True

        async def stop() -> None:
            for endpoint in self._endpoints.values():
                await endpoint.close()
            self._endpoints.clear()

        try:
            _runtime.run(stop())
        finally:
            for link in self.links:
                link.close()


def _to_shard(link: ShardLink, node: str, researcher: str, frame: bytes) -> None:
    link.send(researcher, node, frame)


def _span(nodes: Sequence[str]) -> str:
    return "none" if not nodes else nodes[0] if len(nodes) == 1 else f"{nodes[0]}..{nodes[-1]}"


# --------------------------------------------------------------------------- worker processes


def write_record(out: IO[bytes], kind: str, fields: Sequence[Any] = (),
                 payload: bytes | memoryview = b"") -> None:
    """One record on a pipe: its kind and fields (msgpack), then a payload of bytes.

    It is buffered: :func:`write_records` (or ``out.flush()``) sends it.
    """
    head = msgpack.packb([kind, *fields])
    out.write(_HEAD.pack(len(head), len(payload)))
    out.write(head)
    if len(payload):
        out.write(payload)


def next_burst(items: queue.SimpleQueue[Any]) -> Any:
    """The next record of ``items`` once there is one, after :data:`LINGER` seconds.

    Meanwhile the rest of a burst joins it: one write and one wake-up of the reader for
    many frames, and the thread that queues them is not interrupted for each one (a
    writer woken per frame takes the GIL at every system call the queuing thread makes).
    """
    first = items.get()
    if first is not None:
        time.sleep(LINGER)
    return first


def write_records(out: IO[bytes], items: queue.SimpleQueue[Any], first: Any) -> bool:
    """Write ``first`` and every record waiting in ``items``, then flush.

    One system call for a burst of small frames. Returns ``False`` when it took the
    ``None`` that ends the stream (the records before it are flushed first).
    """
    item = first
    while item is not None:
        write_record(out, *item)
        try:
            item = items.get_nowait()
        except queue.Empty:
            out.flush()
            return True
    out.flush()
    return False


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError
    return data


def read_record(stream: IO[bytes]) -> tuple[str, list[Any], bytes]:
    """The next record of :func:`write_record`: ``(kind, fields, payload)``; EOFError at end."""
    n_head, n_payload = _HEAD.unpack(_read_exactly(stream, _HEAD.size))
    kind, *fields = msgpack.unpackb(_read_exactly(stream, n_head))
    return kind, fields, _read_exactly(stream, n_payload) if n_payload else b""


class ProcessShard:
    """A shard in a worker process of this machine (``python -m fedcore.simulate._worker``)."""

    def __init__(self, index: int, spec: ShardSpec, X: np.ndarray, y: np.ndarray | None,
                 *, threads: int | None = None):
        self.index = index
        self.label = f"worker process {index + 1}"
        # Encoded now: data a worker cannot receive is refused before any process starts.
        self._setup: list[tuple[str, bytes]] | None = [
            ("spec", msgpack.packb(spec)), ("X", array_bytes(X)),
            ("y", b"" if y is None else array_bytes(y))]
        self._threads = threads
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: queue.SimpleQueue[tuple[str, Sequence[Any], bytes] | None] = \
            queue.SimpleQueue()
        self._serving = False
        self._closing = False

    def start(self, on_frame: Callable[[str, str, bytes], None],
              on_lost: Callable[[str], None]) -> list[str]:
        env = dict(os.environ)
        # The worker imports this very fedcore (a checkout on PYTHONPATH included).
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
        if self._threads is not None:  # the frameworks' thread pools
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[var] = str(self._threads)
        self._proc = subprocess.Popen([sys.executable, "-m", "fedcore.simulate._worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                      bufsize=PIPE_BUFFER)
        self.label = f"worker process {self.index + 1} (pid {self._proc.pid})"
        assert self._proc.stdin is not None and self._proc.stdout is not None
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert self._setup is not None
        try:
            for kind, payload in self._setup:
                write_record(stdin, kind, [], payload)
            stdin.flush()
        except OSError:
            pass  # it died at once: read_record says how
        self._setup = None
        try:
            kind, fields, _ = read_record(stdout)
        except EOFError:
            raise FedcoreError(f"Simulation {self.label} exited with code "
                               f"{self._proc.wait()} before its nodes started; its error "
                               "is above in the output.") from None
        if kind == "error":
            self._proc.wait()
            raise ConfigurationError(f"Simulation {self.label} could not start its nodes: "
                                     f"{fields[0]}")
        node_ids = [str(n) for n in fields]
        self._serving = True
        threading.Thread(target=self._write, args=(stdin,), daemon=True,
                         name=f"fedcore-shard-{self.index}-out").start()
        threading.Thread(target=self._read, args=(stdout, on_frame, on_lost), daemon=True,
                         name=f"fedcore-shard-{self.index}-in").start()
        return node_ids

    def send(self, sender: str, receiver: str, frame: bytes) -> None:
        self._out.put(("frame", (sender, receiver), frame))

    def _write(self, stdin: IO[bytes]) -> None:
        try:
            while write_records(stdin, self._out, next_burst(self._out)):
                pass
            write_record(stdin, "stop")
            stdin.close()
        except (OSError, ValueError):  # the worker is gone: the reader reports it
            pass

    def _read(self, stdout: IO[bytes], on_frame: Callable[[str, str, bytes], None],
              on_lost: Callable[[str], None]) -> None:
        while True:
            try:
                kind, fields, payload = read_record(stdout)
            except (EOFError, OSError, ValueError):
                break
            if kind == "frame":
                on_frame(str(fields[0]), str(fields[1]), payload)
        if not self._closing:
            assert self._proc is not None
            on_lost(f"it exited with code {self._proc.wait()}")

    def close(self) -> None:
        self._closing = True
        self._out.put(None)
        if self._proc is None:
            return
        if not self._serving:  # it failed to start, or is still starting: no writer
            self._proc.kill()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.warning("Simulation %s did not stop within 60 s: killed.", self.label)
            self._proc.kill()
            self._proc.wait()
