"""A put, flush or checkpoint_record cancelled at any of its await points leaves no waiter,
no writer role and no mutex behind, and the log goes on.

The await points, from the code (aiodbenv/log/log.py):

- ``Log._append``: ``_locked`` (the log mutex is held elsewhere: bounded back-off),
  ``_wait_progress`` for buffer space (NEED.SPACE) or for the next file (NEED.SWITCH);
  ``_append_direct`` (a record larger than the buffer, written by the writer task).
- ``Log._flush_word`` / ``_write_through``: ``_locked`` (counting the commit), then
  ``_wait_progress`` while the writer task writes and fsyncs in a worker thread.
- ``checkpoint_record``: the append and the flush above, then ``_locked`` (set_checkpoint).

The writer task itself is never cancelled by a caller; each test cancels, lets it settle, and
checks :func:`assert_quiescent`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import aiodbenv
from aiodbenv import LSN, _io
from aiodbenv.log.orphan import running
from aiodbenv.log.record import HEADER
from aiodbenv.region.mutex import lib

SLOW = 0.4


async def io_started(op: str, timeout: float = 10.0) -> None:
    """Wait until a delayed fault on ``op`` is reached (that call now sleeps in its thread)."""
    deadline = time.monotonic() + timeout
    while not any(f.op == op and f.delay and f.calls for f in list(_io._faults)):
        assert time.monotonic() < deadline, f"the {op} never started"
        await asyncio.sleep(0.001)


async def late_work_done(env: aiodbenv.Env, log: aiodbenv.Log, timeout: float = 30.0) -> None:
    """Wait until a closed handle's late work has ended: its thread's (what the close kept
    for it is let go) and its writer task's; then the handle's last step (close_core)."""
    deadline = time.monotonic() + timeout
    while running() or log._task is not None or not env._core.closed:
        assert time.monotonic() < deadline, "the late work never ended"
        await asyncio.sleep(0.01)


async def late_failure_panics(
    home: str, op: str, record: bytes, options: dict[str, int], *, flush: bool = True
) -> None:
    """Put ``record`` while ``op`` fails slowly, close (giving up on it): the put gets an
    error of the library and the environment is panicked afterwards."""
    env = await aiodbenv.Env.open(home, create=True, log=True, **options)
    log = env.log
    await log.put(b"first", flush=True)
    log.wait_timeout = 0.2
    fault = _io.inject(op, errno.EIO, delay=1.0, times=1)
    fault.__enter__()
    try:
        put = asyncio.ensure_future(log.put(record, flush=flush))
        await io_started(op)
        await env.close(nosync=True)
        with pytest.raises(aiodbenv.AiodbenvError):
            await put
        await late_work_done(env, log)
    finally:
        fault.__exit__(None, None, None)
    with pytest.raises(aiodbenv.RunRecovery, match="failed"):
        await aiodbenv.Env.open(home)
    await aiodbenv.Env.remove(home, force=True)


async def assert_quiescent(log: aiodbenv.Log, timeout: float = 10.0) -> None:
    """The writer task finished, nobody holds the writer role or the log mutex, nothing is
    queued; then the log still takes and returns records."""
    deadline = time.monotonic() + timeout
    while log._task is not None:
        assert time.monotonic() < deadline, "the writer task never finished"
        await asyncio.sleep(0.005)
    c = log._c
    assert c.role_holder() == (0, 0)
    assert not log._want.direct
    if c.mutex.ptr is not None:
        assert lib.pthread_mutex_trylock(c.mutex.ptr) == 0, "the log mutex is held"
        lib.pthread_mutex_unlock(c.mutex.ptr)
    before = [x async for x in log.cursor()]
    lsn = await log.put(b"afterwards", flush=True)
    assert log.flushed_lsn > lsn
    assert [x async for x in log.cursor()] == before + [(lsn, b"afterwards")]


@pytest.fixture
async def small(home: str) -> AsyncIterator[aiodbenv.Env]:
    env = await aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=1024, log_file_size=4096
    )
    yield env
    await env.close()
    await aiodbenv.Env.remove(home)


async def cancel_when(
    coro: Awaitable[object], ready: Callable[[], Awaitable[None]]
) -> asyncio.Task[object]:
    task = asyncio.ensure_future(coro)
    await ready()
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return task


async def test_flush_cancelled_during_the_fsync(small: aiodbenv.Env) -> None:
    log = small.log
    lsn = await log.put(b"one")
    with _io.inject("fdatasync", None, delay=SLOW):
        await cancel_when(log.flush(lsn), lambda: io_started("fdatasync"))
        assert log._c.role_holder()[0] != 0  # the fsync goes on in its thread
    await assert_quiescent(log)
    assert log.flushed_lsn > lsn  # the round finished in the background


async def test_put_flush_cancelled_during_the_write(small: aiodbenv.Env) -> None:
    log = small.log
    with _io.inject("pwrite", None, delay=SLOW):
        await cancel_when(log.put(b"two", flush=True), lambda: io_started("pwrite"))
    await assert_quiescent(log)
    assert [d async for _, d in log.cursor()][:1] == [b"two"]


async def test_put_cancelled_waiting_for_buffer_space(small: aiodbenv.Env) -> None:
    log = small.log
    with _io.inject("pwrite", None, delay=SLOW):
        flusher = asyncio.ensure_future(log.put(b"a" * 100, flush=True))
        await io_started("pwrite")
        # The writer is busy; fill the buffer until a put must wait for space.
        while True:
            end = log.end_lsn
            t = asyncio.ensure_future(log.put(b"b" * 300))
            await asyncio.sleep(0.01)
            if not t.done():
                break
            await t
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert log.end_lsn == end  # the cancelled put appended nothing
        await flusher
    await assert_quiescent(log)


async def test_put_cancelled_waiting_for_the_next_file(small: aiodbenv.Env) -> None:
    log = small.log
    while log.end_lsn.offset + HEADER.size + 900 <= 4096:
        await log.put(b"c" * 600)
    with _io.inject("fdatasync", None, delay=SLOW):
        flusher = asyncio.ensure_future(log.flush())
        await io_started("fdatasync")
        end = log.end_lsn
        await cancel_when(log.put(b"d" * 900), lambda: asyncio.sleep(0.05))
        assert log.end_lsn == end
        await flusher
    await assert_quiescent(log)


async def test_large_put_cancelled_before_and_after_its_write_began(small: aiodbenv.Env) -> None:
    log = small.log
    with _io.inject("fdatasync", None, delay=SLOW):
        flusher = asyncio.ensure_future(log.put(b"e", flush=True))
        await io_started("fdatasync")
        end = log.end_lsn
        # Queued behind the fsync, not begun: cancelled, it is never written.
        await cancel_when(log.put(b"f" * 2000), lambda: asyncio.sleep(0.05))
        await flusher
    assert log.end_lsn == end
    await assert_quiescent(log)
    with _io.inject("pwrite", None, delay=SLOW):
        # Begun (the writer is in its pwrite): it is appended all the same.
        await cancel_when(log.put(b"g" * 2000), lambda: io_started("pwrite"))
    await assert_quiescent(log)
    assert b"g" * 2000 in [d async for _, d in log.cursor()]


async def test_put_cancelled_while_the_log_mutex_is_held(small: aiodbenv.Env) -> None:
    log = small.log
    ptr = log._c.mutex.ptr
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:  # another "process": a thread that owns the robust mutex
        lib.pthread_mutex_lock(ptr)
        locked.set()
        release.wait(10)
        lib.pthread_mutex_unlock(ptr)

    th = threading.Thread(target=hold)
    th.start()
    try:
        locked.wait(5)
        end = log.end_lsn
        await cancel_when(log.put(b"h"), lambda: asyncio.sleep(0.05))
    finally:
        release.set()
        th.join()
    assert log.end_lsn == end
    await assert_quiescent(log)


async def test_checkpoint_record_cancelled_at_its_flush(small: aiodbenv.Env) -> None:
    log = small.log
    ckp = await log.put(b"i")
    with _io.inject("fdatasync", None, delay=SLOW):
        await cancel_when(log.checkpoint_record(ckp), lambda: io_started("fdatasync"))
    await assert_quiescent(log)
    # The record is in the log; it is not taken as the last checkpoint until one completes.
    items = [d async for _, d in log.cursor()]
    assert any(isinstance(d, aiodbenv.CheckpointRecord) for d in items)
    done = await log.checkpoint_record(ckp)
    assert log.last_checkpoint == (done, ckp)


async def test_close_waits_for_a_flush_under_way(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    lsn = await env.log.put(b"j")
    with _io.inject("fdatasync", None, delay=SLOW):
        flush = asyncio.ensure_future(env.log.flush(lsn))
        await io_started("fdatasync")
        await env.close()
    await flush
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert [x async for x in env.log.cursor()] == [(lsn, b"j")]
        assert env.log.flushed_lsn > LSN(1, 0)
    await aiodbenv.Env.remove(home)


@pytest.mark.one_loop
@pytest.mark.parametrize("op", ["pwrite", "fdatasync"])
async def test_close_keeps_the_descriptors_of_a_write_slower_than_its_wait(
    home: str, tmp_path: pathlib.Path, op: str
) -> None:
    """A flush whose write (or fsync) in the log's I/O thread lasts longer than the close
    waits: the close must not close the log file's descriptor under it. Closed, its number
    went to the next file opened, and the late write's bytes into that file (or the fsync to
    it, the log reported durable); the flush got a ValueError of a released view, and the
    late write left the log mutex locked for good (every other process's flush timed out)."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    log = env.log
    await log.put(b"first", flush=True)  # the log file is open in this process
    log.wait_timeout = 0.2
    fault = _io.inject(op, None, delay=1.0, times=1)
    fault.__enter__()
    try:
        flush = asyncio.ensure_future(log.put(b"late" * 25, flush=True))
        await io_started(op)
        await env.close(nosync=True)  # waits 0.2 s, then gives up on the write
        others = [os.open(tmp_path / f"other{i}", os.O_RDWR | os.O_CREAT) for i in range(8)]
        try:
            try:
                lsn: LSN | None = await flush  # its round published itself, in the thread
            except aiodbenv.InvalidArgument as err:  # or its end was the writer task's
                assert "closed while" in str(err)
                lsn = None
            await late_work_done(env, log)
        finally:
            for fd in others:
                os.close(fd)
    finally:
        fault.__exit__(None, None, None)
    assert [p.stat().st_size for p in sorted(tmp_path.glob("other*"))] == [0] * 8
    # The late write let the log mutex and the writer role go: another handle flushes.
    async with aiodbenv.Env.open(home) as env:
        env.log.wait_timeout = 5
        after = await env.log.put(b"after", flush=True)
        records = [x async for x in env.log.cursor()]
    assert records[-1] == (after, b"after")
    if lsn is not None:  # reported durable: it is in the log
        assert (lsn, b"late" * 25) in records
    await aiodbenv.Env.remove(home)


@pytest.mark.one_loop
async def test_close_during_a_file_switch_keeps_no_descriptor(home: str) -> None:
    """The next log file, created by the writer task's thread after the close gave up on it,
    is not kept open by the closed handle (it went into the emptied table of descriptors,
    for good, on the code before)."""
    env = await aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=1024, log_file_size=4096
    )
    log = env.log
    await log.put(b"first", flush=True)
    log.wait_timeout = 0.2

    async def fill() -> None:
        for _ in range(20):
            await env.log.put(b"r" * 500, flush=True)

    fault = _io.inject("open", None, delay=1.0, times=1)
    fault.__enter__()
    try:
        task = asyncio.ensure_future(fill())
        await io_started("open")
        await env.close(nosync=True)
        try:
            await task
        except aiodbenv.InvalidArgument as err:  # not pytest.raises: it keeps the frames
            assert "closed" in str(err)
        else:
            raise AssertionError("the puts went on past the close")
        await late_work_done(env, log)
    finally:
        fault.__exit__(None, None, None)
    held = []  # log files (the region stays mapped for the late work while the handle lives)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(os.path.join(os.path.realpath(home), "log.")):
            held.append(target)
    assert held == []
    await aiodbenv.Env.remove(home)


async def test_an_idle_close_keeps_nothing_mapped(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing a log with nothing under way keeps no view, mapping or descriptor of the log
    region for late work (a first version of the keep above took an idle thread for a busy
    one: every close left the region mapped while the handle lived, and warned twice)."""
    kept = []
    for _ in range(3):
        env = await aiodbenv.Env.open(home, create=True, log=True)
        await env.log.put(b"x", flush=True)
        await env.close()
        kept.append(env)  # the caller keeps its closed handles
    with open("/proc/self/maps") as fh:
        maps = [line for line in fh if os.path.realpath(home) in line]
    assert maps == []
    assert "still running" not in caplog.text and "outlived" not in caplog.text
    await aiodbenv.Env.remove(home)


@pytest.mark.one_loop
async def test_a_late_write_that_fails_panics_and_tells_its_flush(home: str) -> None:
    """A write (or fsync) that fails after the close gave up on it panics the environment
    (through the view kept for it) and lets the role go; its flush gets an error of the
    library, not the ValueError of the environment's released view."""
    await late_failure_panics(home, "fdatasync", b"late", {})


HOLD_LOG_MUTEX = """
import asyncio, sys, time, aiodbenv
async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    with env.log._c.mutex:
        print("held", flush=True)
        time.sleep(3)  # past the late write's end and its thread's wait for the mutex
    print("free", flush=True)
    time.sleep(60)  # killed by the test: nothing of this process may finish the round
asyncio.run(main())
"""


@pytest.mark.one_loop
@pytest.mark.parametrize("served_by", ["thread", "writer task"])
async def test_a_late_round_publishes_once_the_mutex_is_free(home: str, served_by: str) -> None:
    """A write that ends after the close, while another process holds the log mutex longer
    than the waits for it, is published on the loop once the mutex is free, and the writer
    role goes. Without the kept views it could not be; and a writer task's round (a durable
    listener makes the flush one) whose bounded waits gave up left the role held by this
    live process for good: every other process's flush timed out."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    log = env.log
    await log.put(b"first", flush=True)
    if served_by == "writer task":
        log.add_durable_listener(lambda start, end, data: None)
    log.wait_timeout = 0.2
    fault = _io.inject("pwrite", None, delay=2.5, times=1)  # ends while the mutex is held
    fault.__enter__()
    try:
        flush = asyncio.ensure_future(log.put(b"late", flush=True))
        await io_started("pwrite")
        flush.cancel()  # nobody waits for it: the loop alone must finish it
        await env.close(nosync=True)
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD_LOG_MUTEX, home, stdout=asyncio.subprocess.PIPE
        )
        assert holder.stdout is not None
        try:
            assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"held\n"
            assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"free\n"
            deadline = time.monotonic() + 30
            while log._c.role_holder() != (0, 0):
                assert time.monotonic() < deadline, "the closed handle kept the writer role"
                await asyncio.sleep(0.01)
        finally:
            holder.kill()
            await holder.wait()
    finally:
        fault.__exit__(None, None, None)
    async with aiodbenv.Env.open(home) as other:
        other.log.wait_timeout = 5
        lsn = await other.log.put(b"after", flush=True)
        records = [d async for _, d in other.log.cursor()]
    assert lsn and records[-2:] == [b"late", b"after"]
    await late_work_done(env, log)  # the closed handle is uncounted once its work ended
    await aiodbenv.Env.remove(home)


@pytest.mark.one_loop
async def test_a_late_direct_write_that_fails_panics_the_environment(home: str) -> None:
    """A record larger than the log buffer is written by the writer task straight to its
    file; that write failing after the close panicked through the environment's released
    view: the put got a ValueError and the environment was not panicked at all."""
    small_buffer = {"log_buffer_size": 4096, "log_file_size": 1 << 20}
    await late_failure_panics(home, "pwrite", b"big" * 3000, small_buffer, flush=False)


@pytest.mark.one_loop
async def test_the_handle_stays_counted_while_its_late_write_runs(home: str) -> None:
    """After a close that gave up on a slow write, the environment could be removed (the
    handle was uncounted at once) and created again: the new log wrote its first record where
    the late write then landed, over a record it had reported durable."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    log = env.log
    await log.put(b"first", flush=True)
    log.wait_timeout = 0.2
    fault = _io.inject("pwrite", None, delay=1.0, times=1)
    fault.__enter__()
    try:
        late = asyncio.ensure_future(log.put(b"LATE" * 4, flush=True))
        await io_started("pwrite")
        await env.close(nosync=True)
        assert env.closed
        with pytest.raises(aiodbenv.InvalidArgument):
            env.log  # noqa: B018  (closed for its caller at once)
        with pytest.raises(aiodbenv.Busy):
            await aiodbenv.Env.remove(home)  # its late write runs: still counted
        lsn = await late
        await late_work_done(env, log)
    finally:
        fault.__exit__(None, None, None)
    async with aiodbenv.Env.open(home) as env:
        after = await env.log.put(b"after", flush=True)
        records = [x async for x in env.log.cursor()]
    assert records[-2:] == [(lsn, b"LATE" * 4), (after, b"after")]
    await aiodbenv.Env.remove(home)


FSYNC_SLOWLY = """
import asyncio, sys, aiodbenv
from aiodbenv import _io
async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    with _io.inject("fdatasync", None, delay=1.5, times=1) as fault:
        flush = asyncio.ensure_future(env.log.put(b"theirs", flush=True))
        while not fault.calls:
            await asyncio.sleep(0.001)
        print("fsyncing", flush=True)
        await flush
    await env.close()
asyncio.run(main())
"""


@pytest.mark.one_loop
async def test_a_flush_waiting_for_another_process_gets_an_error_at_the_close(home: str) -> None:
    """A flush waiting for another process's round (woken through the handle's socket) when
    another task closes the environment: it got a CancelledError nobody asked for (its task
    looked cancelled), where every other waiter gets InvalidArgument."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    await env.log.put(b"1", flush=True)
    await env.log.put(b"2", flush=True)
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FSYNC_SLOWLY, home, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert other.stdout is not None
        assert await asyncio.wait_for(other.stdout.readline(), 60) == b"fsyncing\n"
        put = asyncio.ensure_future(env.log.put(b"mine", flush=True))
        await asyncio.sleep(0)
        await env.close(nosync=True)
        try:  # a CancelledError fails the test
            lsn: LSN | None = await put  # (served before the close saw it: the Python rounds)
        except aiodbenv.InvalidArgument as err:
            assert "closed" in str(err)
            lsn = None
        assert await asyncio.wait_for(other.wait(), 60) == 0
    finally:
        if other.returncode is None:
            other.kill()
            await other.wait()
    if lsn is not None:
        async with aiodbenv.Env.open(home) as env:
            assert (lsn, b"mine") in [x async for x in env.log.cursor()]
    await aiodbenv.Env.remove(home)
