"""A shutdown that cancels every task: the library's own tasks run to their end.

``asyncio.run``'s teardown, and servers that cancel every task on shutdown, call ``cancel()``
on tasks their callers were shielded from: a write-back batch, the log writer, an open or a
close, the environment's closing. Stopped at an arbitrary ``await``, each left shared state
half-changed. These tests (a review's findings, each confirmed against the code before
``aiodbenv._tasks``) cancel every task at such a moment and check what users see: no crash,
no corrupt log, no lost fsync failure, no claim or descriptor left behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.mpool.layout import BH, BH_WRITING, BUCKET

from .conftest import python

PS = 512


def cancel_all_others() -> None:
    """What a shutdown does: cancel every task but the current one."""
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()


async def reached(op: str, timeout: float = 10.0) -> None:
    """Until an injected (delayed) fault on ``op`` has been reached."""
    deadline = time.monotonic() + timeout
    while not any(f.op == op and f.calls for f in list(_io._faults)):
        assert time.monotonic() < deadline, f"the {op} never started"
        await asyncio.sleep(0.001)


def writing_frames(env: aiodbenv.Env) -> int:
    """Buffers flagged WRITING (claimed by a writer) in every cache."""
    n = 0
    for cache in env.pool._core.caches:
        w = cache.words
        for bw in cache.bucket_words:
            off = int(w[bw + BUCKET.word.head])
            while off:
                x = off >> 3
                n += bool(int(w[x + BH.word.flags]) & BH_WRITING)
                off = int(w[x + BH.word.next])
    return n


_WRITER_CHILD = r"""
import asyncio, sys
import aiodbenv
from aiodbenv import _io

async def main():
    env = await aiodbenv.Env.open(sys.argv[1], log=True)
    log = env.log
    log.add_durable_listener(lambda s, e, d: None)  # rounds run on the writer task
    for i in range(5):
        await log.put(b"A-%d" % i)
    fault = _io.inject("pwrite", None, delay=1.0, times=1)
    fault.__enter__()
    flush = asyncio.ensure_future(log.flush())
    while not any(f.op == "pwrite" and f.calls for f in list(_io._faults)):
        await asyncio.sleep(0.001)
    print("writing", flush=True)  # main returns: the teardown cancels every task

asyncio.run(main())
"""


async def test_the_log_writer_keeps_its_role_until_its_write_ends(home: str) -> None:
    """A process ends (its ``asyncio.run`` returns) while its log writer's round is in its
    thread. The teardown cancelled the writer task, which let the writer role go at once;
    another process took it, wrote and flushed its records over the same range, and then
    the late write put the old buffer's bytes over them: its cursor found a corrupt log."""
    async with aiodbenv.Env.open(home, create=True, log=True):
        pass
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WRITER_CHILD), home],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "writing"
        async with aiodbenv.Env.open(home, log=True) as env:
            log = env.log
            deadline = time.monotonic() + 30
            while log._c.role_holder() != (0, 0):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.001)
            await log.put(b"B-1", flush=True)
            await log.put(b"B-2-" + b"x" * 40, flush=True)
            child.communicate(timeout=30)
            records = [data async for _, data in log.cursor()]
        assert records == [b"A-%d" % i for i in range(5)] + [b"B-1", b"B-2-" + b"x" * 40]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    await aiodbenv.Env.remove(home)


_CLOSE_CHILD = r"""
import asyncio, os, sys, time
import aiodbenv
from aiodbenv import _io
from aiodbenv.log.rounddata import CRound

home, what = sys.argv[1:3]
MB = 1 << 20

async def main():
    if what == "compiled-round":  # a close cancelled outright during a compiled log round
        env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=16 * MB,
                                      log_file_size=128 * MB)
        log = env.log
        record = os.urandom(60000)
        for _ in range(250):
            await log.put(record)
        flush = asyncio.ensure_future(log.flush())
        for _ in range(100000):
            await asyncio.sleep(0)
            r = log._inflight
            if isinstance(r, CRound) and not r.io_done():
                break
        else:
            print("no compiled round caught")
        closing = asyncio.ensure_future(env.close(nosync=True))
        while not log._closing:
            await asyncio.sleep(0)
        cancel_all_others()
        for t in (closing, flush):
            try:
                await t
            except BaseException:
                pass
    else:  # a close given up by its caller while a sync writes or a pin reads; main returns
        env = await aiodbenv.Env.open(home, create=True, cache_size=20480, page_size=512)
        with open(os.path.join(home, "a.db"), "wb") as fh:
            fh.write(b"\0" * 512 * 100)
        f = await env.pool.open_file("a.db", page_size=512)
        f._pool._io.no_nowait.add(f._fd)
        op = "pwrite" if what == "sync" else "pread"
        if what == "sync":
            for i in range(10):
                async with f.get(i) as p:
                    p.data[:6] = b"NEW %02d" % i
                    p.mark_dirty()
        fault = _io.inject(op, None, delay=0.5, times=1)
        fault.__enter__()
        t = asyncio.ensure_future(env.pool.sync() if what == "sync" else f.pin(50))
        t.add_done_callback(lambda t: t.cancelled() or t.exception())  # its end is not checked
        while not any(x.op == op and x.calls for x in list(_io._faults)):
            await asyncio.sleep(0.001)
        try:
            await asyncio.wait_for(env.close(nosync=True), 0.05)
        except asyncio.TimeoutError:
            pass
        return env  # at once: the teardown cancels every task, the closing among them
    await asyncio.sleep(1)  # a long-lived process goes on
    return env

def run():
    env = asyncio.run(main())
    time.sleep(1)  # a thread left running in an unmapped region would crash the process
    print("survived", flush=True)
    print("closed" if env.closed else "left open", flush=True)

def cancel_all_others():
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()

try:
    run()
except BaseException as err:
    print(repr(err), flush=True)
"""


@pytest.mark.one_loop
@pytest.mark.parametrize("what", ["compiled-round", "sync", "read"])
async def test_a_closing_cancelled_outright_finishes(home: str, what: str) -> None:
    """The environment's closing cancelled outright: while a compiled log round ran in its
    thread, it unmapped the regions under it (SIGSEGV); while a sync's write or a pin's read
    ran (the close given up by its caller, then the teardown), it failed half-way with a
    BufferError and left the region attached and the descriptors open. Now the closing runs
    to its end and the process lives on."""
    proc = python(_CLOSE_CHILD, home, what, timeout=120)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-3000:]}"
    assert proc.stdout.split()[-2:] == ["survived", "closed"], proc.stdout
    assert "BufferError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    await aiodbenv.Env.remove(home, force=True)
    for name in os.listdir(home):
        os.remove(os.path.join(home, name))


async def test_a_closing_cancelled_during_a_log_round_lets_the_role_go(home: str) -> None:
    """Every task cancelled while a closing waits for a flush's fdatasync in the writer's thread:
    the log's descriptors end closed and the writer role free, so another handle's flush
    succeeds (the role stayed recorded for this live process, and that flush timed out)."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    lsn = await env.log.put(b"j")
    log = env.log
    with _io.inject("fdatasync", None, delay=0.5, times=1):
        flush = asyncio.ensure_future(log.flush(lsn))
        await reached("fdatasync")
        closing = asyncio.ensure_future(env.close(nosync=True))
        await asyncio.sleep(0.05)
        cancel_all_others()  # the caller's close and flush, and the closing
        for t in (closing, flush):
            try:
                await t
            except (asyncio.CancelledError, aiodbenv.errors.AiodbenvError):
                pass
        deadline = time.monotonic() + 10
        while not env.closed:  # the closing goes on in the background
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert log._fds == {}
    async with aiodbenv.Env.open(home, log=True) as other:
        other.log.wait_timeout = 5.0
        assert other.log._c.role_holder() == (0, 0)
        later = await other.log.put(b"k", flush=True)
        assert other.log.flushed_lsn > later
    await aiodbenv.Env.remove(home)


async def test_write_back_claims_are_released_when_its_task_is_cancelled(home: str) -> None:
    """The write-ahead path's chunk task cancelled outright after its claims were taken:
    they were never released, the buffers stayed WRITING, and the next sync waited for
    them for good."""
    env = await aiodbenv.Env.open(home, create=True, log=True, cache_size=20480, page_size=PS)
    try:
        f = await env.pool.open_file("a.db", create=True, lsn_offset=0, page_size=PS)
        lsn = await env.log.put(b"x")
        for i in range(8):
            async with f.get(i, create=True) as p:
                p.data[0:8] = lsn.pack()
                p.mark_dirty()
        in_claim, real = threading.Event(), _io.step

        def slow(name: str) -> None:
            if name == "claimed":  # the claims are taken; the thread is still in the call
                in_claim.set()
                time.sleep(0.3)
            real(name)

        _io.step = slow
        try:
            sync = asyncio.ensure_future(env.pool.sync())
            while not in_claim.is_set():
                await asyncio.sleep(0.001)
        finally:
            _io.step = real
        for task in list(env.pool._io.tasks):
            task.cancel()
        result = await sync
        assert result.written == 8, result
        assert writing_frames(env) == 0
        again = await asyncio.wait_for(env.pool.sync(), 10)
        assert again.incomplete == 0
        await f.close()
    finally:
        await env.close()
    await aiodbenv.Env.remove(home)


async def test_a_failed_fsync_panics_even_if_its_task_is_cancelled(home: str) -> None:
    """The write-back task cancelled outright while its fsync fails: the failure was
    dropped with the task, so the environment did not panic and the next sync's fsync
    (which Linux lets succeed after dropping the unwritten pages) reported the pages safe."""
    env = await aiodbenv.Env.open(home, create=True, cache_size=20480, page_size=PS)
    with open(os.path.join(home, "a.db"), "wb") as fh:
        fh.write(b"\0" * PS * 20)
    f = await env.pool.open_file("a.db", page_size=PS)
    for i in range(5):
        async with f.get(i) as p:
            p.data[:4] = b"NEW!"
            p.mark_dirty()
    with _io.inject("fsync", errno.EIO, delay=0.3, times=1):
        sync = asyncio.ensure_future(env.pool.sync())
        await reached("fsync")
        for task in list(env.pool._io.tasks):
            task.cancel()
        with pytest.raises(aiodbenv.RunRecovery):
            await sync
    assert env._core.panicked
    with pytest.raises(aiodbenv.RunRecovery):
        await env.pool.sync()
    try:
        await env.close()
    except aiodbenv.RunRecovery:
        pass
    await aiodbenv.Env.remove(home, force=True)
    os.remove(os.path.join(home, "a.db"))


def _open_fds() -> set[str]:
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{n}"))
        except OSError:
            pass
    return out


async def test_an_open_cancelled_outright_leaves_no_descriptor(home: str) -> None:
    """Every task cancelled while ``open_file`` opens the file in its thread: the open's
    result was dropped with its task, and the descriptor stayed open after Env.close."""
    env = await aiodbenv.Env.open(home, create=True, cache_size=20480, page_size=PS)
    path = os.path.join(home, "a.db")
    with open(path, "wb") as fh:
        fh.write(b"\0" * PS * 20)
    with _io.inject("open", None, delay=0.3, times=1):
        opening = asyncio.ensure_future(env.pool.open_file("a.db", page_size=PS))
        await reached("open")
        cancel_all_others()
        with pytest.raises(asyncio.CancelledError):
            await opening
    await asyncio.sleep(0.5)
    await env.close()
    assert path not in _open_fds()
    await aiodbenv.Env.remove(home)
    os.remove(path)


def test_a_closing_reached_by_the_teardown_at_any_turn_ends_closed(tmp_path: object) -> None:
    """``env.close()`` started, then ``main`` returns after 0-78 turns of the loop: the
    teardown cancels every task, the closing among them, at each of its steps in turn. The
    handle ends closed with nothing of it left open. (Its last step ran in a sub-task a
    shutdown could cancel: if that came before the worker thread took the call, the regions
    were never detached and the home's descriptor leaked, and a caller awaiting the close
    got CancelledError.)"""
    base = str(tmp_path)

    async def main(home: str, turns: int) -> aiodbenv.Env:
        env = await aiodbenv.Env.open(home, create=True, log=True, region="private")
        closing = asyncio.ensure_future(env.close())
        for _ in range(turns):
            await asyncio.sleep(0)
        assert closing is not None  # left to the teardown
        return env

    bad = []
    for turns in range(0, 80, 2):
        home = os.path.join(base, f"h{turns}")
        os.mkdir(home)
        env = asyncio.run(main(home, turns))
        if not env.closed or home in _open_fds():
            bad.append(turns)
        asyncio.run(aiodbenv.Env.remove(home, force=True))
    assert bad == [], f"left open after these numbers of turns: {bad}"


_FLUSHERS_CHILD = r"""
import asyncio, os, sys
import aiodbenv

async def one(home, seed):
    env = await aiodbenv.Env.open(home, create=True, log=True)
    log = env.log

    async def flusher(k):
        n = 0
        while True:
            await log.put(b"%d-%d" % (k, n), flush=True)
            n += 1

    tasks = [asyncio.ensure_future(flusher(k)) for k in range(4)]
    await asyncio.sleep(0.01 + seed % 7 * 0.003)
    closing = asyncio.ensure_future(env.close())
    await closing  # the flushers go on meanwhile: each ends with an error
    for t in tasks:
        try:
            await asyncio.wait_for(t, 30)
        except aiodbenv.errors.AiodbenvError:
            pass
    await asyncio.sleep(0.05)  # a writer left running would now touch the unmapped region
    task = log._task
    assert task is None or task.done(), task
    await aiodbenv.Env.remove(home)

async def main(home):
    for seed in range(40):
        await one(home, seed)
    print("ok", flush=True)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.one_loop
def test_no_log_writer_starts_after_the_closing_waited_for_it(home: str) -> None:
    """Flushes still waiting while the log closes started a new writer task after the close
    had waited for the last one; it served on in the region the close then unmapped
    (SIGSEGV in release_role). Now, once the close has waited, a waiter gets
    InvalidArgument instead, and no writer runs after the close."""
    proc = python(_FLUSHERS_CHILD, home, timeout=300)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-3000:]}"
    assert proc.stdout.strip() == "ok", (proc.stdout, proc.stderr[-3000:])
