"""A cancelled pin, unpin or sync at any await point leaves no pin held, no frame stuck in I/O
and no mutex locked.

Each test cancels a pool call at one of its await points, lets the background work (reads and
write batches run as shielded tasks) settle, then checks :func:`assert_quiescent`: every buffer
header of every cache is unpinned (except pages the test still holds on purpose), none is flagged
READING, WRITING or FAILED, the bucket counts match the chains, no frame has leaked out of the
chains, and every mutex (bucket, allocator, pool, file, environment) is free. Then the pages are
read back (through the pool and from the file) to check that nothing was lost.

The await points of the pool, from the code (module by module, see "Pool map" in
docs/design.md):

- ``PoolFile._pin`` (file.py): ``PoolReads._await_read`` (bhread.py: another coroutine is
  reading the page), ``PoolFrames._get_frame`` (frames.py: ``_wait_frame_turn`` while every
  frame is pinned; ``_write_victim`` while a dirty victim is written through
  ``bhwrite.write_items``, then the back-off sleep after a failed write), ``PoolReads._fill``
  (bhread.py: the read itself, in a worker thread through ``bh.ReadBatcher`` when
  ``RWF_NOWAIT`` says the data is not in the OS page cache; a read served by ``RWF_NOWAIT``
  runs on the loop and has no await point).
- ``PoolFile.unpin`` (fput.py): none.
- ``sync.write_back`` / ``trickle.trickle``: each batch's shielded task of
  ``bhwrite.write_items`` (inside it, the open of a write descriptor under the file's lock,
  ``BufferIO.write_fd``, and the write's thread hop), ``sync.settle_claims`` (a sync waiting
  for pages another writer has claimed), the re-collect after it, then the shielded fsync of
  every file with unsynced writes (``fsync.fsync_pending``).
- ``PoolFrames._get_frame`` also awaits ``_take_over_dead_claims`` (a bucket walk that yields
  about every millisecond) when it finds no victim; it changes only claims of dead processes.
- ``Pool.open_file`` (fopen.py): ``PoolFiles._open``, the shielded task of ``_open_file`` (its
  thread hop that opens the file); ``PoolFile.close`` (file.py): the shielded
  ``PoolBase._to_end`` task of ``_finish_close`` (the pending unpins, the wait for the pool's
  I/O tasks and the thread hop that closes the descriptor).
- ``Env.close`` / ``PoolFile.close``: racing with any of the above.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.errors import AiodbenvError, Incomplete
from aiodbenv.mpool import csync
from aiodbenv.mpool.layout import BH, BH_DIRTY, BH_FAILED, BH_READING, BH_WRITING, BUCKET
from aiodbenv.mpool.page import Page
from aiodbenv.region.mutex import NullMutex, SharedMutex, lib, trylock, unlock

from .conftest import python

PS = 512
CACHE = 20 * 1024  # the minimum cache: 40 frames of 512 bytes
FRAMES = CACHE // PS
SLOW = 0.5  # seconds a delayed I/O call sleeps in its thread


async def io_started(op: str, timeout: float = 10.0) -> None:
    """Wait until a delayed fault on ``op`` has been reached: that I/O call is now sleeping
    in its thread for SLOW seconds. Polling, not a fixed sleep: a loaded machine may take a
    while to start the thread."""
    deadline = time.monotonic() + timeout
    while not any(f.op == op and f.delay and f.calls for f in list(_io._faults)):
        assert time.monotonic() < deadline, f"the {op} never started"
        await asyncio.sleep(0.001)


# -- helpers ------------------------------------------------------------------------------------


def content(pgno: int, version: int = 0) -> bytes:
    """The bytes of page ``pgno`` as written in ``version`` (0: the initial file)."""
    return f"page {pgno} v{version}".encode().ljust(PS, bytes([(pgno + version) % 251]))


def write_file(path: str, pages: int) -> None:
    with open(path, "wb") as fh:
        fh.write(b"".join(content(i) for i in range(pages)))


def path_of(f: aiodbenv.PoolFile) -> str:
    assert f.name is not None
    return f.name


def read_disk(path: str, pgno: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(pgno * PS)
        return fh.read(PS)


def _check_mutex(m: SharedMutex | NullMutex, what: str) -> None:
    if isinstance(m, NullMutex):
        return
    assert m.holder_pid() == 0, f"{what} ({m.name}) is recorded as held by {m.holder_pid()}"
    rc = trylock(m.ptr)
    if rc == errno.EOWNERDEAD:  # keep it usable for the cleanup, but fail
        lib.pthread_mutex_consistent(m.ptr)
        unlock(m.ptr)
    elif rc == 0:
        unlock(m.ptr)
    assert rc == 0, f"{what} ({m.name}) is locked (trylock: {os.strerror(rc)})"


def assert_quiescent(env: aiodbenv.Env, held: Iterable[Page] = ()) -> None:
    """Nothing pinned but ``held``, nothing under I/O, no frame leaked, every mutex free."""
    pool = env.pool
    core = pool._core
    want: dict[tuple[int, int], int] = {}
    for page in held:
        assert page.pinned, f"{page!r} was meant to be held"
        assert page._cache is not None
        key = (page._cache.index, page._bh)
        want[key] = want.get(key, 0) + 1
    seen: set[tuple[int, int]] = set()
    for cache in core.caches:
        w = cache.words
        linked = 0
        for b, bw in enumerate(cache.bucket_words):
            _check_mutex(cache.mutexes[b], f"bucket {b} of cache {cache.index}")
            off = int(w[bw + BUCKET.word.head])
            count = dirty = 0
            while off:
                x = off >> 3
                count += 1
                assert count <= 100_000, f"bucket {b} chain loops"
                flags = int(w[x + BH.word.flags])
                ref = int(w[x + BH.word.ref])
                assert not flags & (BH_READING | BH_WRITING | BH_FAILED), (
                    f"buffer {off:#x} (bucket {b}) is stuck with flags {flags:#x}"
                )
                assert w[x + BH.word.io_pid] == 0, f"buffer {off:#x} still names an I/O process"
                expected = want.get((cache.index, off), 0)
                assert ref == expected, (
                    f"buffer {off:#x} (bucket {b}) has ref {ref}, the test holds {expected}"
                )
                seen.add((cache.index, off))
                if flags & BH_DIRTY:
                    dirty += 1
                off = int(w[x + BH.word.next])
            assert w[bw + BUCKET.word.count] == count, (
                f"bucket {b}: count {w[bw + BUCKET.word.count]} != {count}"
            )
            assert w[bw + BUCKET.word.dirty] == dirty, (
                f"bucket {b}: dirty {w[bw + BUCKET.word.dirty]} != {dirty}"
            )
            linked += count
        assert cache.buffers() == linked, (
            f"cache {cache.index}: {cache.buffers()} buffers allocated, {linked} in the chains "
            "(a frame leaked)"
        )
        _check_mutex(cache.alloc_mutex, f"allocator of cache {cache.index}")
    missing = set(want) - seen
    assert not missing, f"held pages not found in any chain: {missing}"
    _check_mutex(core.mutex, "pool mutex")
    for fidx in core.file_slots():
        _check_mutex(core.file_mutex(fidx), f"file {fidx} mutex")
    ecore = env._core
    _check_mutex(ecore.mutex, "environment mutex")
    for i, m in enumerate(ecore.alloc_mutexes):
        _check_mutex(m, f"region {i} allocator")
    assert pool._waiters == 0, f"{pool._waiters} read waiters left"
    assert pool._frame_waiting == 0, f"{pool._frame_waiting} frame waiters left"
    assert not pool._frame_queue, "frame queue not empty"
    assert pool._io.reader._running == 0 and not pool._io.reader._queue, "reads still queued"


async def settle(env: aiodbenv.Env, held: Iterable[Page] = (), timeout: float = 5.0) -> None:
    """Wait until the background I/O has finished and :func:`assert_quiescent` holds."""
    held = list(held)
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_quiescent(env, held)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


T = TypeVar("T")


async def outcome(task: asyncio.Task[T]) -> T | BaseException:
    """What ``task`` ended with: its result or the exception it raised (cancellation too)."""
    try:
        return await task
    except BaseException as err:
        return err


async def check_pages(f: aiodbenv.PoolFile, expected: dict[int, bytes]) -> None:
    for pgno, data in expected.items():
        async with f.get(pgno) as page:
            assert bytes(page.data) == data, f"page {pgno} lost its content"


def is_cached(f: aiodbenv.PoolFile, pgno: int) -> bool:
    """True if page ``pgno`` of ``f`` has a buffer (looked up without pinning it)."""
    cache, b = f._core.locate(f._fidx, pgno)
    w = cache.words
    off = int(w[cache.bucket_words[b] + BUCKET.word.head])
    while off:
        x = off >> 3
        if w[x + BH.word.file] == f._fidx + 1 and w[x + BH.word.pgno] == pgno:
            return True
        off = int(w[x + BH.word.next])
    return False


async def evict(f: aiodbenv.PoolFile, pgno: int, others: range = range(60, 100)) -> None:
    """Push page ``pgno`` out of the cache by reading other pages."""
    if is_cached(f, pgno):
        async with f.get(pgno) as p:
            p.discard()
    i = 0
    while is_cached(f, pgno):
        async with f.get(others[i % len(others)]):
            pass
        i += 1
        assert i < 10 * FRAMES, f"page {pgno} never left the cache"


async def steps(k: int) -> None:
    """Let the loop run a little, more with larger ``k``: ``k`` bare iterations for small
    ``k``, then geometrically growing sleeps (so sweeps over ``k`` reach slow I/O quickly)."""
    if k < 60:
        for _ in range(k):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(0.0001 * 1.15 ** (k - 60))


def force_thread_reads(f: aiodbenv.PoolFile) -> None:
    """Make every read of ``f`` go to a worker thread, as if the OS page cache were cold."""
    assert f._fd is not None
    f._pool._io.no_nowait.add(f._fd)


@pytest.fixture(params=["file", "system"])
async def env(
    request: pytest.FixtureRequest, home: str, shm_key: int
) -> AsyncIterator[aiodbenv.Env]:
    kind = request.param
    e = await aiodbenv.Env.open(
        home,
        create=True,
        region=kind,
        cache_size=CACHE,
        page_size=PS,
        shm_key=shm_key if kind == "system" else None,
    )
    try:
        yield e
    finally:
        if not e.closed:
            await e.close()
        await aiodbenv.Env.remove(home, force=True)  # dirty pages may be left: discard them
        for name in os.listdir(home):
            if name.endswith(".db"):  # a.db, other.db
                os.remove(os.path.join(home, name))


@pytest.fixture
async def data(env: aiodbenv.Env) -> AsyncIterator[aiodbenv.PoolFile]:
    """``a.db``: 100 pages of :func:`content`, open in the pool."""
    write_file(env.resolve("a.db"), 100)
    f = await env.pool.open_file("a.db", page_size=PS)
    yield f
    if not env.closed:
        await f.close()


# -- (a) waiting for a frame --------------------------------------------------------------------


async def test_pin_cancelled_while_waiting_for_a_frame(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    pool, f = env.pool, data
    pool.fail_fast = False
    held = [await f.pin(i) for i in range(FRAMES)]
    waiter = asyncio.create_task(f.pin(FRAMES + 5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert pool._frame_waiting == 1
    waiter.cancel()
    assert isinstance(await outcome(waiter), asyncio.CancelledError)
    await settle(env, held)
    # Cancelled right at its first step, before it even reached the wait.
    waiter = asyncio.create_task(f.pin(FRAMES + 6))
    waiter.cancel()
    assert isinstance(await outcome(waiter), asyncio.CancelledError)
    await settle(env, held)
    for p in held:
        await f.unpin(p)
    await settle(env)
    await check_pages(f, {i: content(i) for i in (0, FRAMES - 1, FRAMES + 5, FRAMES + 6)})
    await settle(env)


async def test_pin_waiting_for_a_frame_then_cancelled_as_the_frame_frees(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """The frame is released and the waiter cancelled in the same loop iteration."""
    pool, f = env.pool, data
    held = [await f.pin(i) for i in range(FRAMES)]
    waiter = asyncio.create_task(f.pin(FRAMES + 5))
    await asyncio.sleep(0.02)
    await f.unpin(held.pop())
    waiter.cancel()
    res = await outcome(waiter)
    if isinstance(res, Page):  # it got the frame before the cancellation landed
        await f.unpin(res)
    else:
        assert isinstance(res, asyncio.CancelledError)
    await settle(env, held)
    for p in held:
        await f.unpin(p)
    assert pool._frame_waiting == 0
    await check_pages(f, {FRAMES + 5: content(FRAMES + 5)})
    await settle(env)


# -- (b) the page's own read ----------------------------------------------------------------------


async def test_pin_cancelled_during_its_thread_read(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """The RWF_NOWAIT attempt says "not cached" (EAGAIN), the thread read is slow."""
    f = data
    with (
        _io.inject("pread", errno.EAGAIN, times=1),
        _io.inject("pread", None, delay=SLOW, times=1) as slow,
    ):
        t = asyncio.create_task(f.pin(7))
        await io_started("pread")
        assert not t.done()
        assert f._pool._io.reader._running == 1  # the read is in its worker thread
        t.cancel()
        assert isinstance(await outcome(t), asyncio.CancelledError)
        await settle(env)
        assert slow.fired == 1
    # The read finished in the background: the page is cached, unpinned, correct.
    hits = f.stat().cache_hit
    await check_pages(f, {7: content(7)})
    assert f.stat().cache_hit == hits + 1
    await settle(env)


async def test_pin_cancelled_while_the_read_is_queued(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """More reads than I/O threads: some wait in the readers' queue when cancelled (each read
    takes 0.1 s: none can have finished after the 5 ms sleep, even on a loaded machine)."""
    f = data
    force_thread_reads(f)
    with _io.inject("pread", None, delay=0.1):
        tasks = [asyncio.create_task(f.pin(i)) for i in range(20)]
        await asyncio.sleep(0.005)
        for t in tasks[::2]:
            t.cancel()
        results = [await outcome(t) for t in tasks]
    kept = []
    for i, res in enumerate(results):
        if i % 2:
            assert isinstance(res, Page) and bytes(res.data) == content(i)
            kept.append(res)
        else:
            assert isinstance(res, asyncio.CancelledError)
    await settle(env, kept)
    for p in kept:
        await f.unpin(p)
    await settle(env)
    await check_pages(f, {i: content(i) for i in range(20)})
    await settle(env)


async def test_pin_miss_cancelled_at_every_step(env: aiodbenv.Env, data: aiodbenv.PoolFile) -> None:
    """Cancel a thread-read miss after 0, 1, 2, ... loop iterations: every await point."""
    f = data
    force_thread_reads(f)
    completed = 0
    for k in range(200):
        pgno = k % 60
        await evict(f, pgno)
        t = asyncio.create_task(f.pin(pgno))
        await steps(k)
        t.cancel()
        res = await outcome(t)
        if isinstance(res, Page):
            assert bytes(res.data) == content(pgno)
            await f.unpin(res)
            completed += 1
            if completed >= 3:
                break
        else:
            assert isinstance(res, asyncio.CancelledError), res
        await settle(env)
    assert completed, "the pin never finished"
    await settle(env)
    await check_pages(f, {i: content(i) for i in range(100)})
    await settle(env)


async def test_pin_served_by_a_read_on_the_loop_has_no_await_point(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """A miss whose page the OS page cache holds is read with RWF_NOWAIT on the loop, with no
    task and no await: even a slow such read cannot be cancelled into, the pin completes in
    one step (with a clean victim or free space for its frame)."""
    f = data
    if f._fd in f._pool._io.no_nowait:
        pytest.skip("this filesystem refuses RWF_NOWAIT")
    async with f.get(3):
        pass  # the file is in the OS page cache now (we also just wrote it)
    await evict(f, 3)
    # A run of slow-path pins yields now and then, before it holds anything; with a fresh
    # budget this one does not.
    f._pool._since_yield = 0
    f._pool._last_yield = time.monotonic()
    with _io.inject("pread", None, delay=0.05, times=1) as slow:
        coro = f._pin(3, 0)  # MODE_GET
        try:
            with pytest.raises(StopIteration) as stop:
                coro.send(None)
        finally:
            coro.close()  # if it did suspend, do not leave it counted as a pin under way
    page = stop.value.value
    assert isinstance(page, Page) and bytes(page.data) == content(3)
    assert slow.fired == 1 and f._pool._io.reader._running == 0  # read on the loop, no thread
    await settle(env, [page])
    await f.unpin(page)
    await settle(env)


# -- (c) waiting for another coroutine's read ----------------------------------------------------


@pytest.mark.parametrize("cancel", ["waiter", "reader", "both"])
async def test_pin_cancelled_while_waiting_for_another_read(
    env: aiodbenv.Env, data: aiodbenv.PoolFile, cancel: str
) -> None:
    f = data
    force_thread_reads(f)
    with _io.inject("pread", None, delay=SLOW, times=1):
        reader = asyncio.create_task(f.pin(9))
        await io_started("pread")
        waiter = asyncio.create_task(f.pin(9))
        await asyncio.sleep(SLOW / 4)
        assert not reader.done() and not waiter.done()
        if cancel in ("waiter", "both"):
            waiter.cancel()
        if cancel in ("reader", "both"):
            reader.cancel()
        res_reader = await outcome(reader)
        res_waiter = await outcome(waiter)
    held = []
    for task_name, res in (("reader", res_reader), ("waiter", res_waiter)):
        if cancel in (task_name, "both"):
            assert isinstance(res, asyncio.CancelledError), (task_name, res)
        else:
            assert isinstance(res, Page) and bytes(res.data) == content(9), (task_name, res)
            held.append(res)
    await settle(env, held)
    for p in held:
        await f.unpin(p)
    await settle(env)
    await check_pages(f, {9: content(9)})
    await settle(env)


async def test_waiters_cancelled_while_the_read_fails(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """The reader's read fails (EIO) while a waiter is being cancelled: the failed buffer is
    freed by the last one out, and the page can be read afterwards."""
    f = data
    force_thread_reads(f)
    with _io.inject("pread", errno.EIO, delay=SLOW, times=1):
        reader = asyncio.create_task(f.pin(11))
        await io_started("pread")
        waiters = [asyncio.create_task(f.pin(11)) for _ in range(3)]
        await asyncio.sleep(SLOW / 4)
        waiters[0].cancel()
        res = await outcome(reader)
        assert isinstance(res, OSError) and res.errno == errno.EIO
        waiters[1].cancel()
        results = [await outcome(w) for w in waiters]
    assert isinstance(results[0], asyncio.CancelledError)
    held = []
    for res in results[1:]:
        if isinstance(res, Page):  # it retried the read after the failure
            assert bytes(res.data) == content(11)
            held.append(res)
        else:
            assert isinstance(res, asyncio.CancelledError), res
    assert held, "the uncancelled waiter must get the page"
    await settle(env, held)
    for p in held:
        await f.unpin(p)
    await settle(env)
    await check_pages(f, {11: content(11)})
    await settle(env)


# -- (d) writing the dirty victim -----------------------------------------------------------------


async def fill_dirty(f: aiodbenv.PoolFile, pages: Iterable[int], version: int) -> dict[int, bytes]:
    expected = {}
    for i in pages:
        async with f.get(i, create=True) as p:
            p.data[:] = content(i, version)
            p.mark_dirty()
        expected[i] = content(i, version)
    return expected


async def test_pin_cancelled_while_its_victim_is_written(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    pool, f = env.pool, data
    # With the compiled write-back a dirty victim goes out with a batch of the dirty pages the
    # next misses would meet (mpool/victims.py); the Python path writes the victim alone.
    batched = csync.usable(pool._core)
    expected = {i: content(i) for i in range(100)}
    expected.update(await fill_dirty(f, range(FRAMES), 1))
    assert pool.stat().page_dirty == FRAMES
    with _io.inject("pwrite", None, delay=SLOW) as slow:
        t = asyncio.create_task(f.pin(80))
        await io_started("pwrite")
        assert not t.done()
        assert slow.calls == 1  # the victim's write is under way
        t.cancel()
        assert isinstance(await outcome(t), asyncio.CancelledError)
        await settle(env)
        assert slow.calls >= 1 if batched else slow.calls == 1
    # The victim's write (or its batch) finished: as many pages fewer are dirty, all on disk.
    dirty_now = pool.stat().page_dirty
    written = [i for i in range(FRAMES) if read_disk(path_of(f), i) == content(i, 1)]
    if batched:
        assert 1 <= len(written) == FRAMES - dirty_now
    else:
        assert dirty_now == FRAMES - 1 and len(written) == 1
    await check_pages(f, {80: content(80)})
    await pool.sync()
    await settle(env)
    for i, want in expected.items():
        assert read_disk(path_of(f), i) == want, f"page {i} on disk"
    await check_pages(f, expected)
    await settle(env)


async def test_pin_cancelled_at_every_step_of_a_dirty_eviction(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    pool, f = env.pool, data
    force_thread_reads(f)
    expected = {i: content(i) for i in range(100)}
    completed = 0
    for k in range(300):
        # Every cached page dirty, so the next miss must write one first.
        for i in range(FRAMES):
            pgno = (k + i) % 100
            async with f.get(pgno) as p:
                p.data[:] = expected[pgno] = content(pgno, k + 1)
                p.mark_dirty()
        target = (k + FRAMES + 7) % 100
        assert not is_cached(f, target)
        t = asyncio.create_task(f.pin(target))
        await steps(k)
        t.cancel()
        res = await outcome(t)
        if isinstance(res, Page):
            assert bytes(res.data) == expected[target]
            await f.unpin(res)
            completed += 1
            if completed >= 3:
                break
        else:
            assert isinstance(res, asyncio.CancelledError), res
        await settle(env)
    assert completed
    await settle(env)
    await check_pages(f, expected)
    await pool.sync()
    assert pool.stat().page_dirty == 0
    for i, want in expected.items():
        assert read_disk(path_of(f), i) == want, f"page {i} on disk"
    await settle(env)


# -- (e) unpin ----------------------------------------------------------------------------------


async def test_unpin_never_yields(env: aiodbenv.Env, data: aiodbenv.PoolFile) -> None:
    f = data
    page = await f.pin(1)
    page.data[:5] = b"HELLO"
    coro = f.unpin(page, dirty=True)
    with pytest.raises(StopIteration):
        coro.send(None)  # finished in one step: there is no await point to cancel at
    assert not page.pinned
    await settle(env)
    assert env.pool.stat().page_dirty == 1


async def test_unpin_in_an_already_cancelled_task(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    f = data
    pages = [await f.pin(i) for i in range(3)]
    pages[0].data[:5] = b"DIRTY"

    async def unpin_all() -> None:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        await f.unpin(pages[0], dirty=True)
        await f.unpin(pages[1], discard=True)
        await f.unpin(pages[2])
        await asyncio.sleep(0)  # the first real await point takes the cancellation

    t = asyncio.create_task(unpin_all())
    assert isinstance(await outcome(t), asyncio.CancelledError)
    assert not any(p.pinned for p in pages)
    await settle(env)
    assert env.pool.stat().page_dirty == 1
    await check_pages(f, {0: b"DIRTY" + content(0)[5:], 1: content(1), 2: content(2)})


async def test_async_with_cancelled_inside_and_while_entering(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    f = data
    entered = asyncio.Event()

    async def body() -> None:
        async with f.get(4) as p:
            p.data[:3] = b"abc"
            p.mark_dirty()
            entered.set()
            await asyncio.sleep(10)

    t = asyncio.create_task(body())
    await entered.wait()
    t.cancel()
    assert isinstance(await outcome(t), asyncio.CancelledError)
    await settle(env)
    assert env.pool.stat().page_dirty == 1  # the exit applied mark_dirty

    force_thread_reads(f)

    async def enter_slow() -> None:
        async with f.get(50):
            raise AssertionError("never entered")

    with _io.inject("pread", None, delay=SLOW, times=1):
        t = asyncio.create_task(enter_slow())
        await io_started("pread")
        t.cancel()
        assert isinstance(await outcome(t), asyncio.CancelledError)
        await settle(env)
    await check_pages(f, {4: b"abc" + content(4)[3:], 50: content(50)})
    await settle(env)


# -- (f) sync -----------------------------------------------------------------------------------


async def test_sync_cancelled_in_the_middle_of_a_batch_write(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    pool, f = env.pool, data
    expected = {i: content(i) for i in range(100)}
    expected.update(await fill_dirty(f, range(0, 30), 1))
    with _io.inject("pwrite", None, delay=SLOW) as slow:
        t = asyncio.create_task(pool.sync())
        await io_started("pwrite")
        assert slow.calls == 1 and not t.done()
        t.cancel()
        assert isinstance(await outcome(t), asyncio.CancelledError)
        await settle(env)
    # The batch under way finished (one batch holds all 30 pages): all clean and on disk.
    assert pool.stat().page_dirty == 0
    for i in range(30):
        assert read_disk(path_of(f), i) == expected[i]
    await pool.sync()
    await check_pages(f, expected)
    await settle(env)


async def test_sync_cancelled_while_waiting_for_another_writers_claims(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """A trickle holds claims on the pages (its write is slow); a sync waiting for those
    claims is cancelled: nothing changes, the trickle finishes and releases its claims."""
    pool, f = env.pool, data
    expected = {i: content(i) for i in range(100)}
    expected.update(await fill_dirty(f, range(0, 10), 1))
    with _io.inject("pwrite", None, delay=SLOW) as slow:
        tr = asyncio.create_task(pool.trickle(100))
        await io_started("pwrite")
        assert slow.calls == 1
        t = asyncio.create_task(pool.sync())
        await asyncio.sleep(0.05)  # the sync is now in settle_claims
        assert not t.done()
        t.cancel()
        assert isinstance(await outcome(t), asyncio.CancelledError)
        assert await tr == 10
        await settle(env)
    assert pool.stat().page_dirty == 0
    await pool.sync()
    for i in range(10):
        assert read_disk(path_of(f), i) == expected[i]
    await check_pages(f, expected)
    await settle(env)


async def test_file_sync_cancelled_during_fsync(env: aiodbenv.Env, data: aiodbenv.PoolFile) -> None:
    pool, f = env.pool, data
    expected = await fill_dirty(f, range(5), 1)
    with _io.inject("fsync", None, delay=SLOW) as slow:
        t = asyncio.create_task(f.sync())
        await io_started("fsync")
        assert slow.calls == 1 and not t.done()
        t.cancel()
        assert isinstance(await outcome(t), asyncio.CancelledError)
        await settle(env)
        await asyncio.sleep(SLOW)  # let the fsync thread finish before the fault goes
    assert pool.stat().page_dirty == 0
    for i, want in expected.items():
        assert read_disk(path_of(f), i) == want
    await settle(env)


async def test_sync_cancelled_between_batches(home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many dirty pages (several batches of 64): the batches already done stay written, the
    batch under way finishes, the others stay dirty and a later sync writes them."""
    # The compiled write-back's chunks, made the Python path's batches: the same steps.
    monkeypatch.setattr(csync, "CHUNK_BYTES", 64 * PS)
    async with aiodbenv.Env.open(home, create=True, cache_size=512 * PS, page_size=PS) as env:
        pool = env.pool
        write_file(env.resolve("a.db"), 500)
        async with pool.open_file("a.db", page_size=PS) as f:
            expected = {i: content(i) for i in range(500)}
            # Every other page, so that each page is its own pwritev: one delay per page.
            expected.update(await fill_dirty(f, range(0, 500, 2), 1))
            total = pool.stat().page_dirty
            assert total == 250  # four batches: 64, 64, 64, 58
            with _io.inject("pwrite", None, delay=0.001) as slow:
                t = asyncio.create_task(pool.sync())
                while slow.calls < 64 + 10:  # into the second batch
                    await asyncio.sleep(0.002)
                t.cancel()
                assert isinstance(await outcome(t), asyncio.CancelledError)
                await settle(env)
                calls = slow.calls
            assert calls == 128  # the second batch finished, no third one started
            assert pool.stat().page_dirty == total - calls
            on_disk = sum(read_disk(path_of(f), i) == expected[i] for i in range(0, 500, 2))
            assert on_disk == calls
            # Cancel again at every step of a sync until one completes.
            for k in range(500):
                await fill_dirty(f, range(1, 20, 2), 2)
                expected.update({i: content(i, 2) for i in range(1, 20, 2)})
                t = asyncio.create_task(pool.sync())
                await steps(k)
                t.cancel()
                res = await outcome(t)
                await settle(env)
                if not isinstance(res, asyncio.CancelledError):
                    assert not isinstance(res, BaseException), res
                    break
            else:
                raise AssertionError("sync never completed")
            assert pool.stat().page_dirty == 0
            for i, want in expected.items():
                assert read_disk(path_of(f), i) == want, f"page {i} on disk"
            await check_pages(f, expected)
            await settle(env)
    await aiodbenv.Env.remove(home, force=True)  # dirty pages may be left: discard them
    os.remove(os.path.join(home, "a.db"))


async def test_sync_with_a_pinned_dirty_page_cancelled(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    pool, f = env.pool, data
    expected = await fill_dirty(f, range(10), 1)
    pinned = await f.pin(3)
    f.set(pinned, dirty=True)
    with _io.inject("pwrite", None, delay=SLOW, times=1):
        t = asyncio.create_task(pool.sync())
        await io_started("pwrite")
        t.cancel()
        assert isinstance(await outcome(t), asyncio.CancelledError)
        await settle(env, [pinned])
    assert pool.stat().page_dirty == 1  # only the pinned page
    with pytest.raises(Incomplete):
        await pool.sync()
    await f.unpin(pinned)
    await pool.sync()
    for i, want in expected.items():
        assert read_disk(path_of(f), i) == want
    await settle(env)


# -- (g) trickle --------------------------------------------------------------------------------


async def test_trickle_cancelled(env: aiodbenv.Env, data: aiodbenv.PoolFile) -> None:
    pool, f = env.pool, data
    expected = {i: content(i) for i in range(100)}
    expected.update(await fill_dirty(f, range(FRAMES), 1))
    with _io.inject("pwrite", None, delay=SLOW) as slow:
        t = asyncio.create_task(pool.trickle(50))
        await io_started("pwrite")
        assert slow.calls == 1 and not t.done()
        t.cancel()
        assert isinstance(await outcome(t), asyncio.CancelledError)
        await settle(env)
    st = pool.stat()
    assert st.page_dirty == FRAMES // 2  # the batch under way (half the cache) finished
    written = [i for i in range(FRAMES) if read_disk(path_of(f), i) == expected[i]]
    assert len(written) == FRAMES // 2
    for k in range(100):
        t = asyncio.create_task(pool.trickle(100))
        await steps(k)
        t.cancel()
        res = await outcome(t)
        await settle(env)
        if not isinstance(res, asyncio.CancelledError):
            break
    assert pool.stat().page_dirty == 0
    for i, want in expected.items():
        assert read_disk(path_of(f), i) == want
    await check_pages(f, expected)
    await settle(env)


# -- (h) closing while I/O is in flight ----------------------------------------------------------


@pytest.mark.parametrize("reuse", [False, True])
async def test_file_close_racing_with_a_read(
    env: aiodbenv.Env, data: aiodbenv.PoolFile, reuse: bool
) -> None:
    """The file is closed while a pin of it waits for its thread read: the pin either gets
    the right page or a typed error, never the closed descriptor's EBADF; and when another
    file is opened meanwhile (``reuse``: it gets the freed descriptor number) the read must not
    fill the page from that other file."""
    f = data
    force_thread_reads(f)
    with open(env.resolve("other.db"), "wb") as fh:
        fh.write(b"OTHER FILE".ljust(PS, b"!") * 20)
    other = None
    with _io.inject("pread", None, delay=SLOW, times=1):
        t = asyncio.create_task(f.pin(12))
        await io_started("pread")
        await f.close()
        if reuse:
            other = await env.pool.open_file("other.db", page_size=PS)
        res = await outcome(t)
    try:
        if isinstance(res, Page):
            try:
                got = bytes(res.data)
            finally:
                await f.unpin(res)
            assert got == content(12), "page 12 of a.db was read from another file"
        else:
            assert isinstance(res, AiodbenvError), f"pin got {res!r}"
        await settle(env)
        async with env.pool.open_file("a.db", page_size=PS) as g:
            await check_pages(g, {12: content(12)})
    finally:
        if other is not None:
            await other.close()
    await settle(env)


async def test_a_close_whose_wait_is_cancelled_leaves_no_read_behind(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """A close waits for the reads under way by gathering them; cancelled, the gather cancels
    each read's future. The read's end must still take its future out of the pool's I/O set:
    a cancelled future left there made every later close loop on it for good (a review's
    finding in the read path that counts itself by hand)."""
    f = data
    force_thread_reads(f)
    pool = env.pool
    with _io.inject("pread", None, delay=SLOW, times=1):
        t = asyncio.create_task(f.pin(12))
        await io_started("pread")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool._quiesce(), 0.05)  # the close's wait, cancelled
        page = await asyncio.wait_for(t, 10)
    assert bytes(page.data) == content(12)
    await f.unpin(page)
    await asyncio.wait_for(pool._quiesce(), 5)  # looped for good before
    assert not pool._io.tasks
    await settle(env)


async def test_a_close_whose_wait_is_cancelled_leaves_the_writes_under_way_alone(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """A close waits for the pool's I/O tasks; if that wait is cancelled, only the wait ends:
    a sync whose write batch was under way still finishes and reports success, with its pages
    on disk and clean. (The wait gathered the tasks, and a cancelled gather cancels each of
    them: the sync then raised CancelledError into a caller who had not been cancelled.)"""
    pool, f = env.pool, data
    expected = await fill_dirty(f, range(10), 1)
    with _io.inject("pwrite", None, delay=SLOW, times=1):
        t = asyncio.create_task(pool.sync())
        await io_started("pwrite")
        assert pool._io.tasks, "the sync's write batch runs as a pool I/O task"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool._quiesce(), 0.05)  # the close's wait, cancelled
        res = await asyncio.wait_for(t, 10)
    assert res.written == 10 and not res.incomplete and not res.errors, res
    for i, want in expected.items():
        assert read_disk(env.resolve("a.db"), i) == want, f"page {i} on disk"
    await settle(env)


async def test_an_io_task_cancelled_outright_ends_after_its_thread(
    env: aiodbenv.Env, data: aiodbenv.PoolFile
) -> None:
    """Every I/O task of the pool cancelled directly (what ``asyncio.run``'s teardown, or a
    framework's shutdown that cancels every task, does) while a write sleeps in its thread,
    then the environment closed: the tasks end only when the thread has returned, so the
    close waits for it. (A task ended at once while its thread went on writing into the
    region; the close then unmapped the region under it and the process crashed with a
    segmentation fault.)"""
    pool, f = env.pool, data
    await fill_dirty(f, range(10), 1)
    with _io.inject("pwrite", None, delay=SLOW, times=1):
        t = asyncio.create_task(pool.sync())
        await io_started("pwrite")
        tasks = list(pool._io.tasks)
        assert tasks
        for task in tasks:
            task.cancel()
        await asyncio.sleep(SLOW / 5)
        assert not any(task.done() for task in tasks), "a task ended before its thread"
        await outcome(t)
        await env.close()
    assert all(task.done() for task in tasks)


@pytest.mark.parametrize("reuse", [False, True])
async def test_file_close_racing_with_a_write(
    env: aiodbenv.Env, data: aiodbenv.PoolFile, reuse: bool
) -> None:
    """The file is closed while a sync writes its pages: the sync succeeds or fails with a
    typed error, the pages are on disk or still dirty (never lost), and a file opened
    meanwhile (``reuse``) never receives them."""
    pool, f = env.pool, data
    expected = {i: content(i) for i in range(100)}
    expected.update(await fill_dirty(f, range(10), 1))
    with open(env.resolve("other.db"), "wb") as fh:
        fh.write(b"OTHER FILE".ljust(PS, b"!") * 20)
    other = None
    with _io.inject("pwrite", None, delay=SLOW, times=1):
        t = asyncio.create_task(pool.sync())
        await io_started("pwrite")
        await f.close()
        if reuse:
            other = await pool.open_file("other.db", page_size=PS)
        res = await outcome(t)
    assert not isinstance(res, BaseException) or isinstance(res, AiodbenvError), (
        f"sync raised {res!r}"
    )
    await settle(env)
    with open(env.resolve("other.db"), "rb") as fh:
        assert fh.read() == b"OTHER FILE".ljust(PS, b"!") * 20, "a.db's pages went to other.db"
    await pool.sync()
    for i, want in expected.items():
        assert read_disk(env.resolve("a.db"), i) == want, f"page {i} on disk"
    if other is not None:
        await other.close()
    await settle(env)


_CLOSE_RACE = r"""
import asyncio, errno, json, os, sys
import aiodbenv
from aiodbenv import _io

home, kind, key, what, loop = sys.argv[1:6]
key = int(key)
PS = 512
problems = []

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda l, ctx: problems.append(repr(ctx.get("exception")
                                                                  or ctx["message"])))
    env = await aiodbenv.Env.open(home, create=True, region=kind, cache_size=20480,
                                  page_size=PS, shm_key=key if kind == "system" else None)
    f = await env.pool.open_file("a.db", page_size=PS)
    f._pool._io.no_nowait.add(f._fd)
    if what in ("read", "frame-wait"):
        if what == "frame-wait":  # every frame pinned: the pin waits for one
            held = [await f.pin(i) for i in range(40)]
        with _io.inject("pread", None, delay=0.2, times=1):
            t = asyncio.ensure_future(f.pin(12 if what == "read" else 50))
            await asyncio.sleep(0.05)
            try:
                await env.close()
                closed = "ok"
            except BaseException as err:
                closed = repr(err)
            try:
                res = await t
                want = b"page 12 " if what == "read" else b"page 50 "
                got = "page" if bytes(res.data[:8]) == want else "wrong page"
            except aiodbenv.errors.AiodbenvError as err:
                got = "error"
            except BaseException as err:
                got = repr(err)
    else:  # a sync whose batch is being written
        for i in range(20):
            async with f.get(i) as p:
                p.data[:6] = b"NEW %02d" % i
                p.mark_dirty()
        with _io.inject("pwrite", None, delay=0.2, times=1):
            t = asyncio.ensure_future(env.pool.sync())
            await asyncio.sleep(0.05)
            if what == "cancelled-sync":
                t.cancel()
            elif what == "cancel-all":  # a shutdown that cancels every other task first
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()
                await asyncio.sleep(0)
            try:
                await env.close()
                closed = "ok"
            except BaseException as err:
                closed = repr(err)
            try:
                await t
                got = "synced"
            except asyncio.CancelledError:
                got = "cancelled"
            except aiodbenv.errors.AiodbenvError:
                got = "error"
            except BaseException as err:
                got = repr(err)
    await asyncio.sleep(0.25)  # anything left running in the background ends now
    print(json.dumps({"closed": closed, "got": got, "problems": problems}))

if loop == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["file", "system"])
@pytest.mark.parametrize("what", ["read", "frame-wait", "sync", "cancelled-sync", "cancel-all"])
async def test_env_close_racing_with_io(home: str, shm_key: int, kind: str, what: str) -> None:
    """Env.close while a pin's read or a sync's write is in its worker thread, or while a pin
    waits for a frame (the close's own unpinning frees frames for it), or after every other
    task was cancelled while a sync's write was in its thread (``cancel-all``: a shutdown
    that cancels all tasks; the write-back task ended at once then, and the close unmapped
    the region under its thread: SIGSEGV): the close succeeds, the
    pin or sync ends with its result or a typed error, nothing crashes (this runs in a child
    process: unmapping a region under a running read can kill the process), and the
    environment left behind is quiescent: no buffer pinned, READING or WRITING, no mutex
    held."""
    write_file(os.path.join(home, "a.db"), 100)
    try:
        loop = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
        proc = python(_CLOSE_RACE, home, kind, str(shm_key), what, loop, timeout=60)
        assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-3000:]}"
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["closed"] == "ok", report
        assert report["problems"] == [], report
        if what in ("read", "frame-wait"):
            assert report["got"] in ("page", "error"), report
        elif what == "sync":
            assert report["got"] in ("synced", "error"), report
        else:
            assert report["got"] == "cancelled", report
        if what == "cancel-all":  # the write went on: the pages are on disk
            for i in range(20):
                assert read_disk(os.path.join(home, "a.db"), i)[:6] == b"NEW %02d" % i, i
        # The regions outlive the handle: join them and look.
        async with aiodbenv.Env.open(home) as env:
            assert_quiescent(env)
            async with env.pool.open_file("a.db", page_size=PS) as f:
                for i in range(20):
                    async with f.get(i) as p:
                        head = bytes(p.data[:7])
                        if what in ("read", "frame-wait"):
                            assert head == content(i)[:7], (i, head)
                        else:  # dirty pages are never lost: cached, or written
                            assert head[:6] == b"NEW %02d" % i, (i, head)
                await env.pool.sync()
                assert_quiescent(env)
    finally:
        await aiodbenv.Env.remove(home, force=True)
        os.remove(os.path.join(home, "a.db"))


# -- (h) opening and closing a file -------------------------------------------------------------


def open_fds() -> set[int]:
    """This process's open descriptors (a cancelled open or close must not leak one), less
    the io_uring descriptors of pool page readers: a pool's reader is made at its first disk
    read and kept until the pool closes, as reader threads are."""
    fds = {int(n) for n in os.listdir("/proc/self/fd")}
    for fd in list(fds):
        try:
            if "io_uring" in os.readlink(f"/proc/self/fd/{fd}"):
                fds.discard(fd)
        except OSError:
            fds.discard(fd)
    return fds


def open_entries(env: aiodbenv.Env) -> dict[int, int]:
    """File slot -> open handles (all processes), for every slot in use."""
    core = env.pool._core
    return {i: core.file_field(i, "refcnt") for i in core.file_slots()}


async def test_open_file_cancelled_at_every_step(env: aiodbenv.Env) -> None:
    """Cancel ``pool.open_file`` after 0, 1, 2, ... loop iterations. Cancelled, it leaves no
    descriptor open, no handle counted in the file table and nothing in the pool's files;
    finished, the file reads and closes as usual."""
    write_file(env.resolve("a.db"), 10)
    pool = env.pool
    fds = open_fds()
    opened = 0

    async def open_a() -> aiodbenv.PoolFile:
        return await pool.open_file("a.db", page_size=PS)

    for k in range(200):
        t = asyncio.create_task(open_a())
        await steps(k)
        t.cancel()
        res = await outcome(t)
        if isinstance(res, aiodbenv.PoolFile):
            await check_pages(res, {3: content(3)})
            await res.close()
            opened += 1
            if opened >= 3:
                break
        else:
            assert isinstance(res, asyncio.CancelledError), res
        await settle(env)
        await pool._quiesce()  # a cancelled open finishes, then closes, in the background
        assert not pool._io.files, "a cancelled open left a file in the pool"
        assert not any(open_entries(env).values()), f"handles left: {open_entries(env)}"
        assert open_fds() <= fds, f"descriptors leaked: {sorted(open_fds() - fds)}"
    assert opened, "the open never finished"
    async with pool.open_file("a.db", page_size=PS) as f:
        await check_pages(f, {i: content(i) for i in range(10)})
    await settle(env)


async def test_file_close_cancelled_at_every_step(env: aiodbenv.Env) -> None:
    """Cancel ``PoolFile.close`` after 0, 1, 2, ... loop iterations, while one of its pages
    is still pinned and dirty: the close still ends (the handle is gone from the file table,
    its descriptor closed, its pin released), a second close is harmless, and the dirty page
    reaches the disk at the next sync."""
    write_file(env.resolve("a.db"), 10)
    pool = env.pool
    fds = open_fds()
    for k in range(0, 120, 7):
        f = await pool.open_file("a.db", page_size=PS)
        page = await f.pin(2)
        page.data[:4] = f"K{k:03d}".encode()
        page.mark_dirty()
        t = asyncio.create_task(f.close())
        await steps(k)
        t.cancel()
        res = await outcome(t)
        assert res is None or isinstance(res, asyncio.CancelledError), res
        assert f.closed or k == 0, "a close that began must go on"  # k == 0: never began
        await f.close()  # finishes one that never began; harmless otherwise
        await pool._quiesce()
        await settle(env)
        assert not pool._io.files
        assert not any(open_entries(env).values()), f"handles left: {open_entries(env)}"
        assert open_fds() <= fds, f"descriptors leaked: {sorted(open_fds() - fds)}"
        await pool.sync()
        assert read_disk(env.resolve("a.db"), 2)[:4] == f"K{k:03d}".encode()
    await settle(env)
