"""Frame buffers reused across frames: never while anything views the frame they held."""

from __future__ import annotations

import asyncio
import gc

import numpy as np

from fedcore.params import ParameterSet
from fedcore.wire import codec
from fedcore.wire.buffers import FrameBuffers
from fedcore.wire.messages import Envelope, TrainReply
from tests.wire.test_chunks import Pair

MB = 1 << 20


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def test_a_buffer_comes_back_once_nothing_views_it():
    pool = FrameBuffers()
    first = pool.take(MB)
    first[:] = 7
    where = _address(first)
    view = np.frombuffer(first.data.toreadonly(), np.float32)[10:20]  # as the codec decodes
    second = pool.take(MB)
    assert _address(second) != where and pool.reused == 0  # a decoded array still views it
    assert (view.view(np.uint8) == 7).all()
    del first, view
    third = pool.take(MB)
    assert _address(third) == where and pool.reused == 1
    assert len(third) == MB


def test_a_slice_or_a_memoryview_alone_keeps_the_buffer_out_of_the_pool():
    pool = FrameBuffers()
    frame = pool.take(MB)
    where = _address(frame)
    held = memoryview(frame)[100:200]
    del frame
    assert _address(pool.take(MB)) != where
    held.release()
    del held
    gc.collect()
    assert _address(pool.take(MB)) == where


def test_only_a_buffer_of_about_the_frames_size_is_reused_and_misfits_are_freed():
    pool = FrameBuffers()
    small = pool.take(MB)
    del small
    big = pool.take(8 * MB)  # the free 1 MiB buffer cannot serve: it is freed, not kept
    assert pool.reused == 0 and len(pool) == 1
    del big
    assert len(pool.take(8 * MB - 100)) == 8 * MB - 100 and pool.reused == 1


def test_unused_buffers_are_freed_after_idle_s_and_the_pool_keeps_at_most_keep():
    pool = FrameBuffers(keep=2, idle_s=10.0)
    held = [pool.take(MB) for _ in range(3)]  # the third is handed out but not kept
    assert len(pool) == 2
    del held
    pool.sweep(now=100.0)
    pool.sweep(now=105.0)
    assert len(pool) == 2
    pool.sweep(now=111.0)
    assert len(pool) == 0


def test_a_frame_still_held_is_never_overwritten_by_the_next_one(tmp_path):
    """Frames decoded without a copy stay intact while held; a buffer is reused after."""
    pair = Pair(tmp_path)
    sizes = 40_000
    sent = [ParameterSet({"w": np.full(sizes, float(i), np.float32)}) for i in range(3)]

    async def scenario() -> tuple[list[ParameterSet], int]:
        researcher, node = pair.researcher(), pair.node()
        await node.start()
        await researcher.start()
        try:
            kept = []
            for i, params in enumerate(sent):
                env = Envelope(TrainReply(params=params, n_samples=1), sender="researcher")
                await researcher.send_parts("node", codec.encode_parts(env))
                got = await node.deliver()
                received = codec.decode(got.frame).body.params  # type: ignore[attr-defined]
                del got
                if i == 0:
                    kept.append(received)  # the application holds the first frame's arrays
                else:
                    kept.append(ParameterSet({"w": received["w"].copy()}))
                del received
            return kept, node.buffers.reused
        finally:
            await researcher.close()
            await node.close()

    kept, reused = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [p["w"][0] for p in kept] == [0.0, 1.0, 2.0]
    assert all(p.equal(s) for p, s in zip(kept, sent, strict=True))
    assert reused == 1  # the third frame took the second's buffer, never the first's
