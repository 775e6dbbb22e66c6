"""The worker-thread hops of ``aiodbenv._threads``: what a cancellation does to each.

:func:`run_to_end` is what the pool's I/O tasks await: closing the pool waits for those tasks
and then unmaps the regions their threads work in, so a task must not end before its thread.
"""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest

from aiodbenv._threads import run_owned, run_to_end


async def test_run_to_end_returns_and_raises_what_the_call_did() -> None:
    assert await run_to_end(lambda a, b: a + b, 2, 3) == 5

    def fail() -> None:
        raise OSError(5, "EIO")

    with pytest.raises(OSError, match="EIO"):
        await run_to_end(fail)


async def test_a_cancellation_waits_for_a_call_that_has_started() -> None:
    started, release, returned = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(10)
        returned.set()

    task = asyncio.create_task(run_to_end(work))
    while not started.is_set():
        await asyncio.sleep(0.001)
    for _ in range(3):  # repeated cancellations are absorbed too
        task.cancel()
        await asyncio.sleep(0.02)
        assert not task.done(), "the task ended while its call was still running"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert returned.is_set()


async def test_a_call_cancelled_before_it_started_never_runs() -> None:
    limiter = anyio.CapacityLimiter(1)
    gate, ran = threading.Event(), list[int]()

    blocker = asyncio.create_task(run_to_end(gate.wait, 10, limiter=limiter))
    queued = asyncio.create_task(run_to_end(ran.append, 1, limiter=limiter))
    await asyncio.sleep(0.05)  # queued waits for the limiter behind blocker
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(queued, 1)  # at once: nothing of it is running
    gate.set()
    assert await asyncio.wait_for(blocker, 10) is True
    await asyncio.sleep(0.05)
    assert ran == []


async def test_run_owned_lets_the_cancellation_through_at_once() -> None:
    """The other hop, for contrast: the caller goes at once, the call finishes behind it and
    its result is undone."""
    undone: list[int] = []

    def slow() -> int:
        time.sleep(0.2)
        return 7

    task = asyncio.create_task(run_owned(slow, undo=undone.append))
    await asyncio.sleep(0.05)
    task.cancel()
    t0 = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 0.15
    for _ in range(100):
        if undone:
            break
        await asyncio.sleep(0.02)
    assert undone == [7]
