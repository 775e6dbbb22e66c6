"""No mutex wait blocks the event loop (issue 9, "every wait is bounded and never blocks the loop").

For each family of region mutexes taken on the event loop -- the pool's file-table mutex, a
file's mutex, a bucket mutex met by ``set()`` and by write-back's snapshot and completion, and
the pool mutex behind the workers' leases -- a child process locks it and is SIGSTOPped. The
operation here that needs it must keep the loop responsive (a :class:`Ticker` measures how
late a 5 ms sleep ran; a blocking wait would show as about a second), must raise
:class:`~aiodbenv.errors.LockTimeout` naming the child when the hold outlasts the pool's
``wait_timeout``, and must finish once the child is resumed and lets go. Bounds are generous
(a loaded machine); only a blocked loop or an unbounded wait breaks them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import aiodbenv
from aiodbenv.errors import Incomplete, LockTimeout
from aiodbenv.mpool import bhwrite, csync
from aiodbenv.mpool.layout import FILE_ENTRY

from .conftest import spawn

PS = 4096
#: Longest the loop may be late while an operation waits for a stopped holder (a blocking
#: wait was about 1 s per call).
LATE = 0.5

HOLDER = r"""
import asyncio, sys
import aiodbenv

async def main():
    home, kind = sys.argv[1], sys.argv[2]
    env = await aiodbenv.Env.open(home)
    pool = env.pool
    f = await pool.open_file("a.db")
    core = pool._core
    if kind == "pool":
        mx = core.mutex
    elif kind == "file":
        mx = core.file_mutex(f._fidx)
    elif kind == "env":
        mx = pool._env_core.mutex
    else:  # "bucketN": the bucket of page N
        cache, b = core.locate(f._fidx, int(kind[6:]))
        mx = cache.mutexes[b]
    print("ready", flush=True)
    sys.stdin.readline()
    mx.__enter__()  # test-only: hold it until asked to let go
    print("locked", flush=True)
    sys.stdin.readline()
    mx.__exit__(None, None, None)
    print("unlocked", flush=True)
    await f.close()
    await env.close()

asyncio.run(main())
"""


class Holder:
    """A child process that locks one mutex of the environment on request."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    async def start(cls, home: str, kind: str, procs: list[subprocess.Popen[str]]) -> Holder:
        p = spawn(HOLDER, home, kind)
        procs.append(p)
        line = await asyncio.to_thread(p.stdout.readline)  # type: ignore[union-attr]
        assert line.startswith("ready"), p.stderr.read() if p.stderr else ""
        return cls(p)

    def lock_and_stop(self) -> None:
        """Blocking (so that it can run in a hook): the child locks, then is SIGSTOPped."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().startswith("locked")
        os.kill(self.pid, signal.SIGSTOP)

    async def release(self) -> None:
        """Resume the child and have it let go."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        os.kill(self.pid, signal.SIGCONT)
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert "unlocked" in await asyncio.to_thread(self.proc.stdout.readline)
        await asyncio.to_thread(self.proc.wait, 30)


class Ticker:
    """Measures event-loop lateness: the longest a 5 ms sleep overran."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.create_task(self._run())

    @classmethod
    async def started(cls) -> Ticker:
        t = cls()
        await asyncio.sleep(0.02)  # ticking before the operation starts
        return t

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.monotonic() - t - 0.005)

    async def stop(self) -> float:
        # One more tick first: a synchronous stall just before this call shows only when the
        # sleep it delayed ends.
        await asyncio.sleep(0.02)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.worst


@pytest.fixture
async def env(home: str) -> AsyncIterator[aiodbenv.Env]:
    e = await aiodbenv.Env.open(home, create=True, region="file", cache_size=64 * PS)
    e.pool.wait_timeout = 1.0
    yield e
    if not e.closed:
        await e.close()
    await aiodbenv.Env.remove(home, force=True)


async def dirty_pages(f: aiodbenv.PoolFile, n: int, value: int = 1) -> None:
    for i in range(n):
        async with f.get(i, create=True) as page:
            page.data[0] = value
            page.mark_dirty()


async def times_out_then_finishes(
    pool: aiodbenv.Pool, holder: Holder, op: Callable[[], Awaitable[Any]]
) -> Any:
    """``op`` (the holder's mutex locked and stopped) raises LockTimeout naming the holder
    after ``wait_timeout``; started again, it waits without blocking the loop and finishes
    once the holder lets go. Returns what the second call returned."""
    holder.lock_and_stop()
    ticker = await Ticker.started()
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        await op()
    elapsed = time.monotonic() - t0
    assert info.value.pid == holder.pid and f"process {holder.pid}" in str(info.value)
    assert 0.8 < elapsed < 15, elapsed
    pool.wait_timeout = 30.0
    task = asyncio.ensure_future(op())
    await asyncio.sleep(0.3)
    assert not task.done()
    await holder.release()
    out = await asyncio.wait_for(task, 30)
    worst = await ticker.stop()
    assert worst < LATE, f"event loop stalled {worst:.3f} s"
    return out


# -- the pool's file-table mutex -----------------------------------------------------------------


async def test_open_file_with_a_stopped_file_table_holder(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    pool = env.pool
    a = await pool.open_file("a.db", create=True)
    holder = await Holder.start(home, "pool", procs)
    f = await times_out_then_finishes(pool, holder, lambda: pool.open_file("b.db", create=True))
    async with f.get(0, create=True):
        pass
    await f.close()
    await a.close()
    # The open that timed out gave its handle count back: b.db is open nowhere now.
    entry = pool._core.entry(f._fidx)
    assert pool._core.meta_words[entry + FILE_ENTRY.word.refcnt] == 0


async def test_close_with_a_stopped_file_table_holder(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    pool = env.pool
    a = await pool.open_file("a.db", create=True)
    holder = await Holder.start(home, "pool", procs)
    holder.lock_and_stop()
    ticker = await Ticker.started()
    pool.wait_timeout = 30.0
    task = asyncio.create_task(a.close())
    await asyncio.sleep(0.5)
    assert not task.done()
    await holder.release()
    await asyncio.wait_for(task, 30)
    assert await ticker.stop() < LATE


async def test_close_times_out_naming_the_holder(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    pool = env.pool
    a = await pool.open_file("a.db", create=True)
    holder = await Holder.start(home, "pool", procs)
    holder.lock_and_stop()
    ticker = await Ticker.started()
    with pytest.raises(LockTimeout) as info:
        await a.close()
    assert info.value.pid == holder.pid
    assert await ticker.stop() < LATE
    await holder.release()


# -- a file's mutex: write-back's generation records --------------------------------------------


@pytest.mark.parametrize("how", ["sync", "trickle", "checkpoint"])
async def test_write_back_with_a_stopped_file_mutex_holder(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]], how: str
) -> None:
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    await dirty_pages(f, 8)
    holder = await Holder.start(home, "file", procs)

    async def op() -> Any:
        if how == "sync":
            return await pool.sync()
        if how == "trickle":
            return await pool.trickle(100)
        return await env.checkpoint()

    holder.lock_and_stop()
    ticker = await Ticker.started()
    with pytest.raises((LockTimeout, Incomplete)) as info:
        await op()
    err = info.value
    cause = err if isinstance(err, LockTimeout) else err.__cause__ or err
    assert str(holder.pid) in str(err) + str(cause) + repr(getattr(err, "result", ""))
    # Written but not recorded as written: the pages stay dirty (no sync would fsync them).
    assert pool.stat().page_dirty == 8
    pool.wait_timeout = 30.0
    task = asyncio.ensure_future(op())
    await asyncio.sleep(0.3)
    assert not task.done()
    await holder.release()
    await asyncio.wait_for(task, 30)
    assert await ticker.stop() < LATE
    await pool.sync()
    assert pool.stat().page_dirty == 0
    await f.close()


async def test_fsync_record_with_a_stopped_file_mutex_holder(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """Pages written (by trickle) but not fsynced: the sync's fsync records its generation
    under the file mutex."""
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    await dirty_pages(f, 4)
    await pool.trickle(100)
    assert pool.stat().page_dirty == 0
    holder = await Holder.start(home, "file", procs)
    result = await times_out_then_finishes(pool, holder, pool.sync)
    assert result.files_synced == 1
    await f.close()


async def test_new_page_with_a_stopped_file_mutex_holder(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """``new()`` grows the file's page count under its mutex."""
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    holder = await Holder.start(home, "file", procs)
    page = await times_out_then_finishes(pool, holder, f.new)
    assert page.pgno == 0
    await f.unpin(page)
    await f.close()


async def test_env_close_with_a_stopped_pool_mutex_holder(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """Closing the pool handle closes its files and unlinks its statistics block under the
    pool mutex."""
    await env.pool.open_file("a.db", create=True)
    holder = await Holder.start(home, "pool", procs)
    holder.lock_and_stop()
    ticker = await Ticker.started()
    env.pool.wait_timeout = 30.0
    closing = asyncio.create_task(env.close())
    await asyncio.sleep(0.5)
    assert not closing.done()
    await holder.release()
    await asyncio.wait_for(closing, 30)
    assert await ticker.stop() < LATE


# -- bucket mutexes: set(), write-back's snapshot and completion ---------------------------------


async def test_set_with_a_stopped_bucket_holder_never_blocks(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    page = await f.pin(0, create=True)
    f.set(page, clean=True)
    holder = await Holder.start(home, "bucket0", procs)
    holder.lock_and_stop()
    ticker = await Ticker.started()
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        f.set(page, dirty=True)
    assert time.monotonic() - t0 < LATE
    assert info.value.pid == holder.pid
    assert pool.stat().page_dirty == 0  # nothing changed
    await holder.release()
    f.set(page, dirty=True)  # once let go, it works
    assert pool.stat().page_dirty == 1
    assert await ticker.stop() < LATE
    await f.unpin(page)
    await f.close()


#: The write-back paths: the Python one, and the compiled one (mpool/csync.py) when installed.
WRITEBACK_PATHS = [
    "python",
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(not csync.ENABLED, reason="no compiled write-back here"),
    ),
]


def use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "python":
        monkeypatch.setattr(csync, "ENABLED", False)


def before(module: Any, name: str, action: Callable[[], None], monkeypatch: Any) -> None:
    """Run ``action`` once, just before the first call of ``module.name``."""
    real = getattr(module, name)
    armed = [True]

    def wrapped(*args: Any) -> Any:
        if armed:
            armed.clear()
            action()
        return real(*args)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("path", WRITEBACK_PATHS)
async def test_snapshot_meets_a_stopped_bucket_holder(
    env: aiodbenv.Env,
    home: str,
    procs: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """The bucket is locked between the dirty scan and the copy for writing (the compiled
    path's claim waits for it in its worker thread, then leaves the page to the Python
    rounds)."""
    use_path(path, monkeypatch)
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    await dirty_pages(f, 1, value=7)
    holder = await Holder.start(home, "bucket0", procs)
    if path == "python":
        before(bhwrite, "_snapshot", holder.lock_and_stop, monkeypatch)
    else:
        before(csync, "_claim", holder.lock_and_stop, monkeypatch)
    ticker = await Ticker.started()
    t0 = time.monotonic()
    with pytest.raises((LockTimeout, Incomplete)):
        await pool.sync()
    assert time.monotonic() - t0 < 15
    worst = await ticker.stop()
    assert worst < LATE, f"event loop stalled {worst:.3f} s"
    assert pool.stat().page_dirty == 1
    await holder.release()
    await pool.sync()
    assert pool.stat().page_dirty == 0
    with open(os.path.join(home, "a.db"), "rb") as fh:
        assert fh.read(1) == b"\x07"
    await f.close()


@pytest.mark.parametrize("path", WRITEBACK_PATHS)
async def test_write_done_meets_a_stopped_bucket_holder(
    env: aiodbenv.Env,
    home: str,
    procs: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """The bucket is locked while the page is being written: releasing the claim waits (in
    a task of the pool) without blocking the loop, and finishes once the holder lets go."""
    use_path(path, monkeypatch)
    pool = env.pool
    pool.wait_timeout = 30.0
    f = await pool.open_file("a.db", create=True)
    await dirty_pages(f, 1)
    holder = await Holder.start(home, "bucket0", procs)
    real = bhwrite._write_runs
    if path == "python":

        def write_runs(runs: Any) -> Any:  # in the worker thread
            out = real(runs)
            holder.lock_and_stop()
            return out

        monkeypatch.setattr(bhwrite, "_write_runs", write_runs)
    else:  # in the worker thread, between the compiled write and the release
        before(csync, "_release", holder.lock_and_stop, monkeypatch)
    ticker = await Ticker.started()
    sync = asyncio.create_task(pool.sync())
    await asyncio.sleep(1.5)
    worst = ticker.worst
    assert worst < LATE, f"event loop stalled {worst:.3f} s"
    monkeypatch.setattr(bhwrite, "_write_runs", real)
    await holder.release()
    await asyncio.wait_for(sync, 30)
    while pool._io.tasks:  # the deferred release of the claim
        await asyncio.gather(*list(pool._io.tasks), return_exceptions=True)
    assert await ticker.stop() < LATE
    await pool.sync()
    assert pool.stat().page_dirty == 0
    await f.close()


# -- the workers' lease and health records (pool mutex) ------------------------------------------


async def test_worker_lease_with_a_stopped_holder(
    env: aiodbenv.Env,
    home: str,
    procs: list[subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = env.pool
    a = await pool.open_file("a.db", create=True)
    worker = env.start_trickle(20, interval=3600)
    await asyncio.sleep(0.1)
    holder = await Holder.start(home, "pool", procs)
    holder.lock_and_stop()
    ticker = await Ticker.started()
    with caplog.at_level(logging.WARNING, logger="aiodbenv"):
        assert not await worker._take_lease(10)  # renewal gives up at wait_timeout
    assert f"process {holder.pid}" in caplog.text
    health = env.health()  # read without the mutex rather than block
    assert health.shared is not None
    pool.wait_timeout = 30.0
    renew = asyncio.create_task(worker._take_lease(10))
    await asyncio.sleep(0.3)
    assert not renew.done()
    await holder.release()
    assert await asyncio.wait_for(renew, 30)
    assert await ticker.stop() < LATE
    await env.stop_workers()
    await a.close()


async def test_reaping_with_a_stopped_env_mutex_holder_never_blocks(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    holder = await Holder.start(home, "env", procs)
    holder.lock_and_stop()
    ticker = await Ticker.started()
    t0 = time.monotonic()
    pool.reap()  # the registry is busy: nothing to do now, the next look tries again
    assert time.monotonic() - t0 < LATE
    await holder.release()
    assert await ticker.stop() < LATE
    await f.close()
