"""A simulation worker process: ``python -m fedcore.simulate._worker``.

Started by :class:`fedcore.simulate._shards.ProcessShard`. It reads the shard's description and data
from stdin, starts the shard's nodes, answers ``ready`` with their ids, then relays frames
(records of :mod:`fedcore.simulate._shards`) between stdin/stdout and its nodes until ``stop`` or
the end of stdin. Anything the nodes or plans print goes to stderr: stdout carries records
only.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import IO, Any

import msgpack

from fedcore import simulate
from fedcore.simulate._shards import (
    PIPE_BUFFER,
    ShardHost,
    bytes_array,
    next_burst,
    read_record,
    write_record,
    write_records,
)


def _writer(out: IO[bytes], items: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
    try:
        while write_records(out, items, next_burst(items)):
            pass
    except (OSError, ValueError):  # the parent is gone
        os._exit(1)


def batch_scheduling() -> None:
    """Schedule this process's threads, and those they start, as batch work (Linux).

    A worker is CPU-bound throughput work. Under the default policy each wake-up of one of
    its threads (the pipe reader with the next frames, the training thread handed a batch)
    preempts whatever runs on that core: often another thread of the same worker, which then
    waits for the GIL it just lost, or the researcher's loop. ``SCHED_BATCH`` keeps the
    worker's share of the CPU and its nice value and drops only that wake-up preemption.
    Any process may choose it for itself, and nothing needs it back: the worker ends with
    its simulation. Where it is not offered or refused, a thread keeps the default policy.
    """
    setscheduler = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setscheduler is None or policy is None:  # not Linux
        return
    try:  # the threads running already (imports may start some); later ones inherit it
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            setscheduler(tid, policy, os.sched_param(0))
        except OSError:  # refused (a seccomp profile), or the thread ended
            pass


def main() -> int:
    """Serve one shard; the exit code is 0 after a ``stop``."""
    batch_scheduling()  # before the shard's threads start: they inherit it
    out = os.fdopen(os.dup(1), "wb", buffering=PIPE_BUFFER)
    os.dup2(2, 1)  # prints, from Python or C, go to stderr; records keep the pipe
    sys.stdout = sys.stderr
    stdin = open(sys.stdin.fileno(), "rb", buffering=PIPE_BUFFER, closefd=False)
    records: dict[str, bytes] = {}
    spec: dict[str, Any] = {}
    while len(records) < 2:
        kind, _, payload = read_record(stdin)
        if kind == "spec":
            spec = msgpack.unpackb(payload)
        else:
            records[kind] = payload
    X = bytes_array(records["X"])
    y = bytes_array(records["y"]) if records["y"] else None
    try:
        fed = simulate.build_shard(spec, X, y)
    except Exception as exc:  # said to the parent, which raises it
        write_record(out, "error", [f"{type(exc).__name__}: {exc}"])
        out.flush()
        return 1
    items: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    writer = threading.Thread(target=_writer, args=(out, items), daemon=True)
    writer.start()
    host = ShardHost(fed, lambda s, r, frame: items.put(("frame", (s, r), frame)))
    items.put(("ready", host.node_ids))
    try:
        while True:
            try:
                kind, fields, payload = read_record(stdin)
            except EOFError:
                break
            if kind == "stop":
                break
            host.push(fields[0], fields[1], payload)
    finally:
        host.close()
        items.put(None)
        writer.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
