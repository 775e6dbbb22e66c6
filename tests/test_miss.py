"""The miss in one compiled call (``aiodb_miss``, aiodbenv/_csrc/40_miss.c; aiodbenv/mpool/miss.py).

- it is in use when the accelerator is, and serves misses of pages in the OS page cache whole;
- it follows the Python path's replacement policy exactly: the same workload through either
  path gives the same hits, misses, evictions and cached pages;
- a page not in the OS page cache goes to the disk reader (threads or io_uring) and comes back
  right;
- a process SIGKILLed at each step inside the call (``AIODBENV_TEST_MISS_KILL``, a hook in the C
  code that makes it kill itself at that step) leaves only what the reaper cleans up.

The pure-Python path runs the same workloads (the policy test, and this file again under
``AIODBENV_MUTEX=abi`` from tests/test_mutex.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.mpool import accel, bhread, fget, fopen, hot, miss, uring, victims
from aiodbenv.mpool import file as file_module
from aiodbenv.mpool.bh import ReadBatcher
from aiodbenv.mpool.layout import BH, BH_DIRTY, BH_READING, BUCKET
from aiodbenv.mpool.readers import ReaderThreads, use_threads

from .conftest import spawn
from .test_reaper import assert_no_mutex_held, pin_totals

PS = 1024
FRAMES = 32
PAGES = 96

compiled = pytest.mark.skipif(not miss.COMPILED_MISS, reason="the accelerator is not in use")


def page_bytes(p: int) -> bytes:
    return (p.to_bytes(4, "little") * (PS // 4))[:PS]


@pytest.fixture
async def env(home: str) -> AsyncIterator[aiodbenv.Env]:
    """A file environment of FRAMES frames and a file of PAGES pages, written and synced (in
    the OS page cache)."""
    e = await aiodbenv.Env.open(home, create=True, cache_size=FRAMES * PS, page_size=PS)
    try:
        async with e.pool.open_file("m.db", create=True, page_size=PS) as f:
            for p in range(PAGES):
                async with f.get(p, create=True) as page:
                    page.data[:] = page_bytes(p)
                    page.mark_dirty()
        await e.pool.sync()
        yield e
    finally:
        try:
            if not e.closed:
                await e.close(nosync=True)  # RunRecovery after a test's panic
        finally:
            await aiodbenv.Env.remove(home, force=True)


class Counting:
    """Counts what the compiled misses did: those of the Python slow path (miss.try_miss /
    finish_miss as fget calls them) and those of the compiled page context (hot.c calls
    aiodb_miss itself; what it hands back reaches finish_miss as ``missed``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.whole_py = 0  # misses done whole in C, called from the Python slow path
        self.fallback = 0  # nothing held: the Python path
        self.handed: list[int] = []  # out[0] of the calls that handed a step back
        self.hotfiles: list[Any] = []  # the compiled contexts of the files opened
        real_try, real_finish = fget.try_miss, fget.finish_miss
        real_attach = fopen.attach

        def try_miss(f: Any, pgno: int) -> Any:
            r = real_try(f, pgno)
            if r is not None:
                self.whole_py += 1
            else:
                self.count(int(f._miss_out[0]))
            return r

        async def finish_miss(f: Any, pgno: int, mode: int, missed: Any = None) -> Any:
            if missed is not None:
                self.count(missed[1])
            return await real_finish(f, pgno, mode, missed)

        real_disk_frame = file_module.disk_frame

        def disk_frame(missed: Any) -> int:
            # PoolFile._pin reads a plain disk miss itself, without finish_miss.
            frame = real_disk_frame(missed)
            if frame:
                self.count(missed[1])
            return frame

        def attach(f: Any) -> None:
            real_attach(f)
            if f._hotc is not None:
                self.hotfiles.append(f._hotc)

        monkeypatch.setattr(fget, "try_miss", try_miss)
        monkeypatch.setattr(fget, "finish_miss", finish_miss)
        monkeypatch.setattr(fopen, "attach", attach)
        monkeypatch.setattr(file_module, "disk_frame", disk_frame)

    def count(self, status: int) -> None:
        if status == accel.MISS_FALLBACK:
            self.fallback += 1
        else:
            self.handed.append(status)

    @property
    def in_ctx(self) -> int:
        """Misses the compiled page context served whole, with no Python at all."""
        return sum(hf.misses for hf in self.hotfiles)

    @property
    def whole(self) -> int:
        """Misses done whole in one compiled call, from either side."""
        return self.whole_py + self.in_ctx


@compiled
async def test_misses_from_the_os_cache_run_in_one_compiled_call(
    env: aiodbenv.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    pool = env.pool
    rnd = random.Random(7)
    async with pool.open_file("m.db", page_size=PS) as f:
        s0 = pool.stat()
        for _ in range(600):
            p = rnd.randrange(PAGES)
            async with f.get(p) as page:
                assert bytes(page.data) == page_bytes(p)
        s1 = pool.stat()
    misses = s1.cache_miss - s0.cache_miss
    assert misses > 300
    # The cache is full of clean pages: every miss but a rare busy mutex is done in C.
    assert counting.whole >= misses - 5, (counting.whole, misses, counting.handed)
    assert s1.page_in - s0.page_in == misses
    assert s1.ro_evict - s0.ro_evict == misses
    assert pin_totals(env) == {}


@pytest.mark.skipif(
    not (hot.COMPILED and miss.COMPILED_MISS), reason="the compiled page context is not in use"
)
async def test_the_compiled_context_serves_a_miss_without_the_python_slow_path(
    env: aiodbenv.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    pool = env.pool
    rnd = random.Random(5)
    async with pool.open_file("m.db", page_size=PS) as f:
        slow = 0
        real_pin = f._pin

        async def counted(*args: Any) -> Any:
            nonlocal slow
            slow += 1
            return await real_pin(*args)

        f._pin = counted  # type: ignore[method-assign]  # what the context calls on a miss
        s0 = pool.stat()
        for i in range(800):
            p = rnd.randrange(PAGES)
            if i % 2:
                async with f.get(p) as page:
                    assert bytes(page.data) == page_bytes(p)
            else:
                page = await f.get(p)
                assert bytes(page.data) == page_bytes(p)
                await f.unpin(page)
        s1 = pool.stat()
        assert pin_totals(env) == {}
    misses = s1.cache_miss - s0.cache_miss
    assert misses > 400
    # Every miss is served whole by the context, or (one in MISS_RUN_MIN at least, when a run
    # lasts a millisecond) goes to the Python slow path to let the loop run.
    assert counting.in_ctx + slow == misses, (counting.in_ctx, slow, misses)
    assert slow <= misses // 16 + 2, (slow, misses)
    assert counting.whole_py + counting.in_ctx == misses
    # The statistics are those of the Python path: a miss, a page-in, a clean eviction each.
    assert s1.page_in - s0.page_in == misses
    assert s1.ro_evict - s0.ro_evict == misses
    assert s1.cache_hit - s0.cache_hit == 800 - misses


@pytest.mark.skipif(
    not (hot.COMPILED and miss.COMPILED_MISS), reason="the compiled page context is not in use"
)
async def test_a_run_of_compiled_misses_lets_the_loop_run(
    env: aiodbenv.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A miss served in C never awaits: a loop of them would hold the event loop for as long
    # as it lasts, but every MISS_RUN misses (or a millisecond) one yields.
    counting = Counting(monkeypatch)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    async with env.pool.open_file("m.db", page_size=PS) as f:
        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        ticks = 0
        for i in range(3000):
            async with f.get(i % PAGES):  # the cache holds a third: every pin misses
                pass
        seen = ticks
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert counting.in_ctx > 2500
    assert seen >= 3000 // 512, seen


async def test_a_dirty_best_victim_is_passed_over_for_a_clean_one(
    env: aiodbenv.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The victim search takes the best clean buffer of the buckets it looked at when the
    best one is dirty (a miss then waits for no write), and says so (the caller starts a
    batch of dirty victims in the background); without the compiled write-back (no such
    batches) it takes the dirty best."""
    monkeypatch.setattr(victims, "BACKGROUND", False)  # the dirty pages stay dirty
    pool = env.pool
    core = pool._core
    cache = core.caches[0]
    async with pool.open_file("m.db", page_size=PS) as f:
        for p in range(FRAMES):  # the cache holds pages 0..31 (and any it has more frames for)
            async with f.get(p):
                pass
        w = cache.words

        def pages(want_dirty: bool | None) -> list[tuple[int, int]]:
            return sorted(
                (int(w[(off >> 3) + BH.word.priority]), int(w[(off >> 3) + BH.word.pgno]))
                for b in range(cache.nbuckets)
                for off in cache.chain(b)
                if want_dirty is None
                or bool(w[(off >> 3) + BH.word.flags] & BH_DIRTY) == want_dirty
            )

        # Hits in the order of age: the older half dirty, the newer half clean. (By what the
        # cache holds, not by page number: the fixture's writes leave the cache in a state
        # that depends on its background batches' timing, and a frame more than FRAMES may
        # keep one of its pages.)
        cached = [pgno for _, pgno in pages(None)]
        for i, p in enumerate(cached):
            async with f.get(p) as page:
                if i < len(cached) // 2:
                    page.mark_dirty()
        dirty, clean = pages(True), pages(False)
        assert dirty and clean and dirty[0] < clean[0]  # the oldest page is dirty
        core.dirty_met = False
        victim = core.find_victim(cache, pool._io.registry, True)  # every bucket
        assert victim is not None
        if core.clean_first:  # dirty victims are written in the background (compiled)
            assert not victim.dirty
            assert victim.pgno == clean[0][1]  # the least recently used clean page
            assert core.dirty_met
        else:  # nobody else would write it: the dirty best is the victim
            assert victim.dirty and victim.pgno == dirty[0][1]
            assert not core.dirty_met
        core.dirty_met = False
        # With only dirty pages to choose from, the dirty best is the victim.
        for _, p in clean:
            async with f.get(p) as page:
                page.mark_dirty()
        victim = core.find_victim(cache, pool._io.registry, True)
        assert victim is not None and victim.dirty and victim.pgno == dirty[0][1]
        assert not core.dirty_met
    await pool.sync()


async def _workload(home: str, compiled_miss: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fixed sequence of pins (some held, some dirtied, some discarded) on a fresh pool;
    returns each pin's hit-or-miss, the final counters and the cached pages."""
    monkeypatch.setattr(fget, "COMPILED_MISS", compiled_miss)
    # Background batches of dirty victims end when their thread does: pin by pin, the two
    # runs would then see different pages clean.
    monkeypatch.setattr(victims, "BACKGROUND", False)
    e = await aiodbenv.Env.open(home, create=True, cache_size=FRAMES * PS, page_size=PS)
    try:
        rnd = random.Random(11)
        trace: list[int] = []
        async with e.pool.open_file("m.db", page_size=PS) as f:
            held: list[Any] = []
            for i in range(800):
                p = (
                    min(int(rnd.paretovariate(0.6)) - 1, PAGES - 1)
                    if i % 3
                    else rnd.randrange(PAGES)
                )
                before = e.pool.stat().cache_miss
                page = await f.pin(p)
                trace.append(e.pool.stat().cache_miss - before)
                assert bytes(page.data[4:]) == page_bytes(p)[4:]
                r = rnd.random()
                if r < 0.1:
                    page.data[:4] = b"dirt"
                    await f.unpin(page, dirty=True)
                elif r < 0.15:
                    await f.unpin(page, discard=True)
                elif r < 0.25:
                    held.append(page)
                    if len(held) > 5:
                        await f.unpin(held.pop(0))
                else:
                    await f.unpin(page)
            for page in held:
                await f.unpin(page)
            st = e.pool.stat()
            counters = (st.cache_hit, st.cache_miss, st.page_in, st.ro_evict, st.rw_evict)
            cached = sorted(
                (int(c.words[(off >> 3) + BH.word.file]), int(c.words[(off >> 3) + BH.word.pgno]))
                for c in e.pool._core.caches
                for b in range(c.nbuckets)
                for off in c.chain(b)
            )
        return trace, counters, cached
    finally:
        await e.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)  # the next run starts from fresh regions


@compiled
async def test_the_compiled_miss_follows_the_python_replacement_policy(
    home: str, env: aiodbenv.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.close()  # the file is on disk; each run opens a fresh pool over it
    await aiodbenv.Env.remove(home)
    python = await _workload(home, False, monkeypatch)
    counting = Counting(monkeypatch)
    c = await _workload(home, True, monkeypatch)
    assert counting.whole > 100  # the C path did serve misses
    assert c[1] == python[1]  # hits, misses, page-ins, clean and dirty evictions
    assert c[0] == python[0]  # every pin a hit or a miss alike
    assert c[2] == python[2]  # the same pages cached at the end


def _resident(path: str, npages: int) -> int:
    """How many of the file's first ``npages`` pages the OS page cache holds (mincore on a
    mapping: looking does not read anything in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = npages * PS
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = ctypes.create_string_buffer(size // mmap.PAGESIZE + 1)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw[: size // mmap.PAGESIZE])
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _drop_from_os_cache(path: str, npages: int) -> None:
    """Drop the file's first pages from the OS page cache (clean pages go on request on ext4
    or xfs, not on tmpfs: the test then fails). Pages still on a per-CPU list are skipped by
    one fadvise: try a few times."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(50):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not _resident(path, npages):
                return
            time.sleep(0.02)
        raise AssertionError(f"{_resident(path, npages)} pages stay in the OS page cache")
    finally:
        os.close(fd)


async def _evict_and_drop(f: aiodbenv.PoolFile, home: str) -> None:
    """Fill the cache with other pages (FRAMES to 2 * FRAMES - 1), then drop m.db's first 16
    pages from the OS page cache: their next pins go to the disk reader."""
    for p in range(FRAMES, 2 * FRAMES):
        async with f.get(p):
            pass
    _drop_from_os_cache(os.path.join(home, "m.db"), 16)


async def _read_first_pages_from_disk(
    pool: aiodbenv.Pool, f: aiodbenv.PoolFile, home: str, done: Callable[[], bool]
) -> None:
    """Read m.db's first 16 pages back from the disk (each right, each a page-in), in rounds
    until ``done()`` says a read found its page gone from the OS cache: something on the
    machine now and then brings the pages back in between the drop and the read (5 at most)."""
    for _ in range(5):
        await _evict_and_drop(f, home)
        s0 = pool.stat()
        for p in range(16):  # readahead of a disk read may bring in the next ones
            async with f.get(p) as page:
                assert bytes(page.data) == page_bytes(p)
        assert pool.stat().page_in - s0.page_in == 16
        if done():
            break


@pytest.mark.parametrize("kind", ["threads", "uring"])
async def test_a_page_not_in_the_os_cache_is_read_by_the_reader(
    env: aiodbenv.Env, home: str, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Pages gone from the OS page cache come back right through either disk reader (reader
    threads, io_uring), and the compiled miss hands them over linked and READING."""
    if kind == "uring" and uring.available() is not None:
        pytest.skip(f"io_uring: {uring.available()}")
    monkeypatch.setenv("AIODBENV_READER", kind)  # read when the pool makes its reader
    counting = Counting(monkeypatch)
    published = count_compiled_publishes(monkeypatch)
    pool = env.pool
    async with pool.open_file("m.db", page_size=PS) as f:
        # No readahead: the first miss's RWF_NOWAIT attempt would start a read of the pages
        # after its own, which then come back from the OS cache without the reader (CI, twice,
        # in all five rounds). Each page now comes back through its own read.
        assert f._fd is not None
        os.posix_fadvise(f._fd, 0, 0, os.POSIX_FADV_RANDOM)
        await _read_first_pages_from_disk(
            pool,
            f,
            home,
            lambda: bool(pool._io.reader.reads),  # type: ignore[union-attr]
        )
    reader = pool._io.reader
    assert isinstance(reader, ReaderThreads if kind == "threads" else uring.UringReader)
    assert reader.reads >= 1 and reader._running == 0
    if miss.COMPILED_MISS:  # the compiled call handed the page over, linked and READING
        assert accel.MISS_FILL_DISK in counting.handed, (counting.whole, counting.fallback)
        assert set(counting.handed) <= {accel.MISS_FILL_DISK, accel.MISS_FILL}
        # Each page the reader read whole was published by one compiled call.
        assert published == [0] * reader.reads
    assert pin_totals(env) == {}


def count_compiled_publishes(
    monkeypatch: pytest.MonkeyPatch, answer: int | None = None
) -> list[int]:
    """Record what each compiled publish of a page the reader read returned; with
    ``answer``, return that instead of calling it (nothing published)."""
    results: list[int] = []
    real = bhread._c_publish
    if real is None:
        return results

    def publish(ctx: Any, b: int, bh: int) -> int:
        rc = real(ctx, b, bh) if answer is None else answer
        results.append(rc)
        return int(rc)

    monkeypatch.setattr(bhread, "_c_publish", publish)
    return results


@compiled
async def test_disk_reads_into_either_of_two_caches_are_published_compiled(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two caches, each page read from the disk is published by one compiled call with
    its own cache's context. Pages of 4 KiB here: a read of a smaller one brings its
    neighbours in the same OS page into the OS cache, and those would not go to the disk."""
    ps = 4096
    monkeypatch.setenv("AIODBENV_READER", "threads")
    published = count_compiled_publishes(monkeypatch)
    contexts: list[int] = []  # the cache whose context each call was given
    e = await aiodbenv.Env.open(
        home, create=True, cache_size=2 * FRAMES * ps, page_size=ps, ncache=2
    )
    pages = 8 * FRAMES
    try:
        async with e.pool.open_file("n.db", create=True, page_size=ps) as f:
            for p in range(pages):
                async with f.get(p, create=True) as page:
                    page.data[:] = page_bytes(p) * (ps // PS)
                    page.mark_dirty()
            await e.pool.sync()
            assert f._fd is not None
            os.posix_fadvise(f._fd, 0, 0, os.POSIX_FADV_RANDOM)
            counting = bhread._c_publish

            def publish(ctx: Any, b: int, bh: int) -> int:
                contexts.extend(k for k, c in enumerate(f._miss_ctx[:-1]) if c == ctx)
                return int(counting(ctx, b, bh))

            monkeypatch.setattr(bhread, "_c_publish", publish)
            for p in range(2 * FRAMES, pages):  # 0 .. 2 * FRAMES - 1 are evicted
                async with f.get(p):
                    pass
            _drop_from_os_cache(os.path.join(home, "n.db"), 2 * FRAMES)
            for p in range(FRAMES):
                async with f.get(p) as page:
                    assert bytes(page.data) == page_bytes(p) * (ps // PS)
        # Read into both caches, and published there: a call given the other cache's
        # context would lock the wrong mutex, and fail its checks or publish blind.
        assert published and set(published) == {0}, published
        assert set(contexts) == {0, 1}, contexts
        assert pin_totals(e) == {}
    finally:
        await e.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


@compiled
@pytest.mark.parametrize("answer", [-errno.EBUSY, -errno.EAGAIN])
async def test_a_read_the_compiled_publish_leaves_is_published_the_python_way(
    env: aiodbenv.Env, home: str, monkeypatch: pytest.MonkeyPatch, answer: int
) -> None:
    """A held bucket mutex (or a buffer not as the compiled publish expects) leaves the page
    to the Python publish: the reader's pages still come back right, counted, unpinned."""
    monkeypatch.setenv("AIODBENV_READER", "threads")
    asked = count_compiled_publishes(monkeypatch, answer)
    pool = env.pool
    async with pool.open_file("m.db", page_size=PS) as f:
        assert f._fd is not None
        os.posix_fadvise(f._fd, 0, 0, os.POSIX_FADV_RANDOM)
        await _read_first_pages_from_disk(pool, f, home, lambda: bool(asked))
    assert asked and set(asked) == {answer}
    assert pin_totals(env) == {}


@compiled
async def test_a_read_buffer_failing_the_compiled_check_panics(
    env: aiodbenv.Env, home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buffer offset the compiled publish finds out of bounds panics the environment,
    as the compiled miss does."""
    monkeypatch.setenv("AIODBENV_READER", "threads")
    asked = count_compiled_publishes(monkeypatch, accel.CORRUPT)
    pool = env.pool
    async with pool.open_file("m.db", page_size=PS) as f:
        assert f._fd is not None
        os.posix_fadvise(f._fd, 0, 0, os.POSIX_FADV_RANDOM)
        await _evict_and_drop(f, home)
        with pytest.raises(aiodbenv.CorruptRegion):
            for p in range(16):
                async with f.get(p):
                    pass
    assert asked == [accel.CORRUPT]
    with pytest.raises(aiodbenv.RunRecovery):
        await env.close(nosync=True)


async def test_reads_overlap_in_several_reader_threads(env: aiodbenv.Env, home: str) -> None:
    """Eight reads, each made to take 0.3 s in its thread, overlap: together they take far
    less than one after another, and the loop is free meanwhile."""
    reader = ReaderThreads()
    fd = os.open(os.path.join(home, "m.db"), os.O_RDONLY)
    bufs = [bytearray(PS) for _ in range(8)]
    try:
        with _io.inject("pread", None, delay=0.3, times=8) as slow:
            t0 = time.monotonic()
            got = await asyncio.gather(
                *(reader.read(fd, memoryview(b), p * PS) for p, b in enumerate(bufs))
            )
            took = time.monotonic() - t0
        assert slow.fired == 8
        assert got == [PS] * 8
        assert [bytes(b) for b in bufs] == [page_bytes(p) for p in range(8)]
        assert took < 8 * 0.3 / 2, f"8 reads of 0.3 s took {took:.2f} s: not overlapping"
        assert reader.threads >= 4 and reader.reads == 8 and reader._running == 0
    finally:
        reader.close()
        os.close(fd)


async def test_a_read_cancelled_in_its_thread_still_completes(env: aiodbenv.Env, home: str) -> None:
    reader = ReaderThreads(2)
    fd = os.open(os.path.join(home, "m.db"), os.O_RDONLY)
    buf = bytearray(PS)
    try:
        with _io.inject("pread", None, delay=0.2, times=1) as slow:
            t = asyncio.ensure_future(reader.read(fd, memoryview(buf), 3 * PS))
            await asyncio.sleep(0.05)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            deadline = time.monotonic() + 10
            while reader._running and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        assert slow.fired == 1 and reader._running == 0 and reader.reads == 1
        assert bytes(buf) == page_bytes(3)  # the read ran to its end into the buffer
    finally:
        reader.close()
        os.close(fd)


# -- killed at each step inside the compiled miss --------------------------------------------

WORKER = r"""
import asyncio, os, random, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    f = await env.pool.open_file("m.db", page_size=1024)
    # "get": the compiled page context calls aiodb_miss itself; "pin": the Python slow path
    # calls it (miss.try_miss).
    pin = f.get if sys.argv[3] == "get" else f.pin
    print("READY", f._hotc is not None, flush=True)
    rnd = random.Random(os.getpid())
    held = []
    for n in range(2000):
        page = await pin(rnd.randrange(int(sys.argv[2])))
        held.append(page)
        if len(held) > 4:
            await f.unpin(held.pop(0))
        if n % 8 == 0:
            await asyncio.sleep(0)
    print("NOT KILLED", flush=True)

asyncio.run(main())
"""

#: The steps of 40_miss.c's MISS_STEP, as the reaper must find them.
KILL_STEPS = {
    1: "victim tagged, still linked (bucket mutex held)",
    2: "victim unlinked, in no chain",
    3: "frame linked as the page, count and tag not yet (bucket mutex held)",
    4: "linked, READING, pinned, nothing read",
    5: "read, still READING",
    6: "READING cleared, io_pid not yet (bucket mutex held)",
    7: "published, pinned",
}


@compiled
@pytest.mark.parametrize("how", ["get", "pin"])
@pytest.mark.parametrize("step", sorted(KILL_STEPS))
async def test_killed_at_each_step_of_the_compiled_miss(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]], step: int, how: str
) -> None:
    pool = env.pool
    child = spawn(WORKER, home, str(PAGES), how, env={"AIODBENV_TEST_MISS_KILL": str(step)})
    procs.append(child)
    assert child.stdout is not None
    # With "get" and the compiled context in use, the child's misses reach the hook from it.
    assert child.stdout.readline().strip() == f"READY {hot.COMPILED}"
    rc = child.wait(timeout=60)
    assert rc == -signal.SIGKILL, (KILL_STEPS[step], child.stdout.read(), child.stderr.read())
    pool.reap()
    assert pin_totals(env) == {}  # the dead child's pins are gone; we hold none
    assert_no_mutex_held(env)
    assert [p.pid for p in env.stat().processes] == [os.getpid()]
    for cache in pool._core.caches:
        w = cache.words
        for b in range(cache.nbuckets):
            assert len(cache.chain(b)) == w[cache.bucket_words[b] + BUCKET.word.count]
            for off in cache.chain(b):
                assert not w[(off >> 3) + BH.word.flags] & BH_READING, KILL_STEPS[step]
    # Nothing is stuck or lost: every frame at once (a frame the child held in limbo is
    # reclaimed), then every page with its contents.
    async with pool.open_file("m.db", page_size=PS) as f:
        held = [await f.pin(p) for p in range(FRAMES)]
        for page in held:
            await f.unpin(page)
        for p in range(PAGES):
            async with f.get(p) as page:
                assert bytes(page.data) == page_bytes(p)
    assert pin_totals(env) == {}


def test_the_reader_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIODBENV_READER", "anyio")
    assert use_threads() is False
    for kind in ("threads", "uring", "auto"):
        monkeypatch.setenv("AIODBENV_READER", kind)
        assert use_threads() is True
    monkeypatch.setenv("AIODBENV_READER", "aio")
    with pytest.raises(ValueError, match="AIODBENV_READER"):
        use_threads()


@compiled
async def test_the_compiled_miss_with_several_caches(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    e = await aiodbenv.Env.open(
        home, create=True, cache_size=2 * FRAMES * PS, page_size=PS, ncache=2
    )
    try:
        async with e.pool.open_file("n.db", create=True, page_size=PS) as f:
            for p in range(PAGES):
                async with f.get(p, create=True) as page:
                    page.data[:] = page_bytes(p)
                    page.mark_dirty()
            await e.pool.sync()
            rnd = random.Random(3)
            for _ in range(400):
                p = rnd.randrange(PAGES)
                async with f.get(p) as page:
                    assert bytes(page.data) == page_bytes(p)
        assert counting.whole > 100
        assert pin_totals(e) == {}
    finally:
        await e.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


async def test_misses_that_waited_for_the_disk_start_a_new_budget(
    env: aiodbenv.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of misses yields to the loop now and then, because a miss served from the OS
    page cache never awaits. A miss whose read went to the disk did await: the loop had its
    turn, and the misses after it start a new budget. Before, 32 coroutines missing on a
    cold cache yielded about twice per miss, for nothing. The reads go to reader threads, so
    that each one completes later, from the loop (io_uring would complete most of them within
    their submit here: the file is in the OS cache, and those are no turn of the loop)."""
    monkeypatch.setenv("AIODBENV_READER", "threads")  # read when the pool makes its reader
    yields = 0
    real_sleep = asyncio.sleep

    def counting_sleep(delay: float, *args: Any) -> Any:
        nonlocal yields
        if delay == 0:
            yields += 1
        return real_sleep(delay, *args)

    async with env.pool.open_file("m.db", page_size=PS) as f:
        assert f._fd is not None
        f._pool._io.no_nowait.add(f._fd)  # every read goes to the disk reader
        monkeypatch.setattr(asyncio, "sleep", counting_sleep)
        s0 = env.pool.stat()

        async def run(pages: list[int]) -> None:
            for p in pages:
                async with f.get(p) as page:
                    assert bytes(page.data[:4]) == p.to_bytes(4, "little")

        rng = random.Random(7)
        order = [rng.randrange(PAGES) for _ in range(1500)]
        await asyncio.gather(*(run(order[i::32]) for i in range(32)))
        misses = env.pool.stat().cache_miss - s0.cache_miss
        monkeypatch.undo()
    assert misses > 500
    assert yields < 0.5 * misses, (yields, misses)


async def test_reads_done_within_their_submit_still_let_the_loop_run(env: aiodbenv.Env) -> None:
    """io_uring may complete a read within its submit (the page was in the OS cache by then):
    nothing yielded, so such a read is not a turn of the loop, and a run of those misses must
    still yield now and then. Counting it as a turn starved the loop: a ticker beside 3,000
    such misses got 3 turns and a gap of 300 ms."""
    turns = 0
    stop = False

    async def ticker() -> None:
        nonlocal turns
        while not stop:
            await asyncio.sleep(0)
            turns += 1

    async with env.pool.open_file("m.db", page_size=PS) as f:
        assert f._fd is not None
        f._pool._io.no_nowait.add(f._fd)  # every miss goes to the disk reader
        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        turns = 0
        s0 = env.pool.stat()
        for i in range(3000):
            async with f.get(i % PAGES) as page:  # the cache holds a third: every pin misses
                assert bytes(page.data[:4]) == (i % PAGES).to_bytes(4, "little")
        misses = env.pool.stat().cache_miss - s0.cache_miss
        seen = turns
        stop = True
        await task
    assert misses > 2500
    assert seen >= misses // 100, (seen, misses)


async def test_a_cancelled_read_batch_fails_its_readers_not_cancels_them(home: str) -> None:
    """``AIODBENV_READER=anyio``: a batch task cancelled while its thread reads (a shutdown
    cancelling every task) waits for the thread, then gives each reader an OSError
    (ECANCELED) of its own -- the readers were not cancelled -- and ends cancelled itself."""
    path = os.path.join(home, "r.db")
    with open(path, "wb") as fh:
        fh.write(page_bytes(0) + page_bytes(1))
    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Any) -> asyncio.Task[None]:
        tasks.append(asyncio.ensure_future(coro))
        return tasks[-1]

    batcher = ReadBatcher(anyio.CapacityLimiter(2), spawn)
    fd = os.open(path, os.O_RDONLY)
    try:
        with _io.inject("pread", error=None, delay=0.3):
            bufs = [bytearray(PS), bytearray(PS)]
            reads = [
                asyncio.ensure_future(batcher.read(fd, memoryview(b), p * PS))
                for p, b in enumerate(bufs)
            ]
            await asyncio.sleep(0.1)  # the batches' threads are in their (slow) reads
            assert tasks
            for t in tasks:
                t.cancel()
            for r in reads:
                with pytest.raises(OSError) as err:
                    await r
                assert err.value.errno == errno.ECANCELED
            await asyncio.gather(*tasks, return_exceptions=True)
            assert all(t.cancelled() for t in tasks)
    finally:
        os.close(fd)
