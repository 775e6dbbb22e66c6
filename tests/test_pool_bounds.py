"""Frames are never lost and no wait is unbounded (issue 9, items 3 and 5).

Frame accounting: insert races (1,000 coroutines on a 64-frame cache; two processes of 1,500),
cancellations and processes SIGKILLed between taking a frame and linking it; afterwards the
region itself must add up (:func:`check_accounting`: the cache's page bytes and buffer count
equal what its bucket chains hold, the allocator's used and free bytes tile the arena, no frame
is left outside a chain) and a full cache must again hold its nominal page count at once.

Bounded waits: a process SIGSTOPped holding a bucket mutex (a test-only child that locks that
bucket), a live process stalled in the middle of a read, eviction on a full disk (every write
fails with ENOSPC through the I/O seam; and a real tmpfs filled to the last byte), and 1,000
and 10,000 coroutines waiting for 64 frames (served in order, one wake-up per released
frame). Timings are never asserted beyond generous bounds that only an unbounded wait or a
frozen event loop would break.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.errors import Incomplete, LockTimeout, NoSpace, TryAgain
from aiodbenv.mpool.layout import BH, BUCKET, CACHE_HEADER, CHUNK_TAG_BEFORE_BH
from aiodbenv.region.mutex import trylock, unlock

from .conftest import spawn

PS = 4096
FRAMES = 64


@pytest.fixture
async def env(home: str) -> AsyncIterator[aiodbenv.Env]:
    """A file-backed environment with a 64-frame cache."""
    e = await aiodbenv.Env.open(home, create=True, region="file", cache_size=FRAMES * PS)
    yield e
    if not e.closed:
        await e.close()
    # The tests leave dirty pages on purpose (created pages, a full disk): discard them.
    await aiodbenv.Env.remove(home, force=True)


def check_accounting(pool: aiodbenv.Pool, pinned: int = 0) -> None:
    """The region adds up: every buffer is in a chain and counted once, with its exact size."""
    for cache in pool._core.caches:
        w = cache.words
        linked = 0
        linked_bytes = 0
        refs = 0
        for bw in cache.bucket_words:
            n = 0
            off = w[bw + BUCKET.word.head]
            while off:
                x = off >> 3
                n += 1
                linked_bytes += int(w[x + BH.word.page_size])
                refs += int(w[x + BH.word.ref])
                assert w[x - CHUNK_TAG_BEFORE_BH] == 0, "a linked buffer still carries a limbo tag"
                off = w[x + BH.word.next]
            assert n == w[bw + BUCKET.word.count], "bucket count differs from its chain"
            linked += n
        used = int(w[cache.hdr + CACHE_HEADER.word.page_bytes_used])
        assert used == linked_bytes, f"page bytes used {used} != bytes in chains {linked_bytes}"
        assert int(w[cache.hdr + CACHE_HEADER.word.buffers]) == linked, (
            "buffer count != buffers in chains"
        )
        assert used <= int(w[cache.hdr + CACHE_HEADER.word.page_bytes])
        assert refs == pinned, f"{refs} pins counted, {pinned} expected"
        with cache.alloc_mutex:
            assert cache.allocator.tagged() == [], "frames left outside every chain"
            st = cache.allocator.stats()
        assert st.used + st.free == st.arena, "allocator chunks do not add up"
        # Every bucket and allocator mutex is free.
        for b, p in enumerate(cache.mptrs):
            if p:
                assert trylock(p) == 0, f"bucket {b} mutex left held"
                unlock(p)
        for p in (cache.alloc_mutex.ptr,):
            if p is not None:
                assert trylock(p) == 0, "allocator mutex left held"
                unlock(p)


async def hold_full_cache(f: aiodbenv.PoolFile, first: int) -> None:
    """Pin the cache's nominal page count of distinct pages at once (no frame may be missing:
    with ``fail_fast`` a missing one raises CacheFull instead of waiting)."""
    pool = f._pool
    pool.fail_fast = True
    try:
        pages = [await f.pin(first + i, create=True) for i in range(FRAMES)]
        for p in pages:
            await f.unpin(p)
    finally:
        pool.fail_fast = False


def lost_frames(pool: aiodbenv.Pool) -> int:
    cache = pool._core.caches[0]
    w = cache.words
    linked = sum(_chain(w, bw) for bw in cache.bucket_words)
    return int(w[cache.hdr + CACHE_HEADER.word.page_bytes_used]) // PS - linked


def _chain(w: memoryview, bw: int) -> int:
    n = 0
    off = w[bw + BUCKET.word.head]
    while off:
        n += 1
        off = w[(off >> 3) + BH.word.next]
    return n


# -- exact frame accounting -----------------------------------------------------------------------


async def test_insert_races_of_1000_coroutines_lose_no_frame(env: aiodbenv.Env) -> None:
    f = await env.pool.open_file("a.db", create=True)
    rng = random.Random(9)

    async def one(i: int) -> None:
        # Few distinct pages, many coroutines: most pins race another for the same page.
        async with f.get(rng.randrange(200), create=True) as page:
            page.data[0] = i & 0xFF
            await asyncio.sleep(0)

    await asyncio.gather(*(one(i) for i in range(1000)))
    assert lost_frames(env.pool) == 0
    check_accounting(env.pool)
    await hold_full_cache(f, 1000)
    check_accounting(env.pool)
    await f.close()


async def test_cancelled_pins_lose_no_frame(env: aiodbenv.Env) -> None:
    f = await env.pool.open_file("a.db", create=True)
    rng = random.Random(3)

    async def one(i: int) -> None:
        async with f.get(rng.randrange(300), create=True):
            await asyncio.sleep(rng.random() * 0.002)

    for _ in range(3):
        tasks = [asyncio.create_task(one(i)) for i in range(1000)]
        for _ in range(20):
            await asyncio.sleep(rng.random() * 0.005)
            for t in rng.sample(tasks, 40):
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Deferred work (reads finishing for cancelled pins) settles.
    while env.pool._io.tasks:
        await asyncio.gather(*list(env.pool._io.tasks), return_exceptions=True)
    check_accounting(env.pool)
    await hold_full_cache(f, 1000)
    await f.close()


RACER = r"""
import asyncio, random, sys
import aiodbenv

async def main():
    home, seed = sys.argv[1], int(sys.argv[2])
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file("a.db")
    rng = random.Random(seed)
    async def one(i):
        async with f.get(rng.randrange(150), create=True) as page:
            page.data[0] = 1
            await asyncio.sleep(0)
    await asyncio.gather(*(one(i) for i in range(1500)))
    await f.close()
    await env.close()
    print("done", flush=True)

asyncio.run(main())
"""


async def test_two_processes_of_1500_racing_lose_no_frame(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    f = await env.pool.open_file("a.db", create=True)
    async with f.get(0, create=True):
        pass
    await env.pool.sync()
    procs += [spawn(RACER, home, str(seed)) for seed in (1, 2)]
    for p in procs:
        out, err = await asyncio.to_thread(p.communicate, timeout=240)
        assert p.returncode == 0 and "done" in out, err
    check_accounting(env.pool)
    await hold_full_cache(f, 1000)
    await f.close()


TAKER = r"""
import asyncio, sys, time
import aiodbenv

async def main():
    home = sys.argv[1]
    env = await aiodbenv.Env.open(home)
    pool = env.pool
    core = pool._core
    cache = core.caches[0]
    # The two ways a pin holds a frame outside every chain, as a pin between _get_frame and
    # _insert does: a fresh frame, and a victim just unlinked. Then wait to be killed.
    fresh = core.alloc_buffer(cache, 4096)
    victim = core.find_victim(cache, pool._io.registry, aggressive=True)
    assert victim is not None and not victim.dirty
    assert core.unlink_victim(victim)
    print("taken", fresh, victim.bh, flush=True)
    time.sleep(600)

asyncio.run(main())
"""


async def test_frames_of_a_process_killed_before_linking_them_are_reclaimed(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    f = await env.pool.open_file("a.db", create=True)
    for i in range(FRAMES - 4):  # leave a few frames free, fill the rest with clean pages
        async with f.get(i, create=True):
            pass
    await env.pool.sync()
    procs.append(spawn(TAKER, home))
    child = procs[0]
    line = await asyncio.to_thread(child.stdout.readline)  # type: ignore[union-attr]
    assert line.startswith("taken"), child.stderr.read() if child.stderr else ""
    os.kill(child.pid, signal.SIGKILL)
    await asyncio.to_thread(child.wait)
    cache = env.pool._core.caches[0]
    with cache.alloc_mutex:
        tagged = cache.allocator.tagged()
    assert sorted(t for _, t in tagged) == [child.pid, child.pid]  # two frames in limbo
    # A full cache needs them back: the pin that finds no victim reclaims them.
    await hold_full_cache(f, 1000)
    check_accounting(env.pool)
    await f.close()


# -- fair, bounded frame waits --------------------------------------------------------------------


@pytest.mark.parametrize("waiters", [1000, 10000])
async def test_many_frame_waiters_all_finish_with_one_wakeup_per_release(
    env: aiodbenv.Env, waiters: int
) -> None:
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with f.get(i % 500, create=True):
            await asyncio.sleep(0)
        done += 1

    await asyncio.gather(*(one(i) for i in range(waiters)))
    assert done == waiters
    # Each pin released its frame once: at most one wake-up each (the old asyncio.Event woke
    # every waiter on every release).
    assert pool.frame_wakeups <= waiters
    assert not pool._frame_queue and pool._frame_waiting == 0
    check_accounting(pool)
    await f.close()


async def test_frame_waiters_are_served_in_order(env: aiodbenv.Env) -> None:
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    for i in range(FRAMES):
        async with f.get(i, create=True):
            pass
    await pool.sync()  # clean victims: taking a frame never awaits a write
    held = [await f.pin(i) for i in range(FRAMES)]
    order: list[int] = []

    async def waiter(i: int) -> None:
        page = await f.pin(1000 + i, create=True)
        order.append(i)
        await f.unpin(page, clean=True)  # a clean victim again: no write to wait for

    tasks = []
    for i in range(20):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0.002)  # queue in a known order
    for p in held:
        await f.unpin(p)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == list(range(20))
    await f.close()


async def test_eviction_on_a_full_disk_gives_nospace_at_wait_timeout(env: aiodbenv.Env) -> None:
    pool = env.pool
    pool.wait_timeout = 1.0
    f = await pool.open_file("a.db", create=True)
    for i in range(FRAMES):
        async with f.get(i, create=True) as page:
            page.data[0] = 7  # every frame dirty
    with _io.inject("pwrite", errno.ENOSPC) as fault:
        t0 = time.monotonic()
        with pytest.raises(NoSpace, match="disk is full"):
            async with f.get(FRAMES + 1, create=True):
                pass
        elapsed = time.monotonic() - t0
    # Backed off between attempts: a spin made ~5,000 failed writes a second.
    assert fault.fired < 200, f"{fault.fired} failed writes in {elapsed:.1f} s"
    assert elapsed < 15
    # Nothing lost: the dirty pages are still there and get written once the disk has room.
    result = await pool.sync()
    assert result.written == FRAMES
    check_accounting(pool)
    await f.close()


# -- SIGSTOP: a mutex holder, a reader ------------------------------------------------------------

HOLDER = r"""
import asyncio, sys, time
import aiodbenv

async def main():
    home, pgno = sys.argv[1], int(sys.argv[2])
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file("a.db")
    cache, b = env.pool._core.locate(f._fidx, pgno)
    cache.lock(b)  # test-only: hold the page's bucket mutex
    print("locked", b, flush=True)
    sys.stdin.readline()  # released on request (after SIGCONT)
    cache.unlock(b)
    print("unlocked", flush=True)
    await f.close()
    await env.close()

asyncio.run(main())
"""


class Ticker:
    """Measures event-loop lateness: the longest a 5 ms sleep overran."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.monotonic() - t - 0.005)

    async def stop(self) -> float:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.worst


async def _start_holder(home: str, pgno: int, procs: list[subprocess.Popen[str]]) -> Any:
    p = spawn(HOLDER, home, str(pgno))
    procs.append(p)
    line = await asyncio.to_thread(p.stdout.readline)  # type: ignore[union-attr]
    assert line.startswith("locked"), p.stderr.read() if p.stderr else ""
    os.kill(p.pid, signal.SIGSTOP)
    return p


async def test_stopped_bucket_mutex_holder_gives_lock_timeout_and_never_blocks_the_loop(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    pool = env.pool
    pool.wait_timeout = 1.0
    f = await pool.open_file("a.db", create=True)
    b = pool._core.locate(f._fidx, 0)[1]
    same = next(p for p in range(1, 10000) if pool._core.locate(f._fidx, p)[1] == b)
    for i in (0, 1, 2, same):
        async with f.get(i, create=True):
            pass
    await pool.sync()
    held = await f.pin(same)  # to unpin while the holder keeps the bucket
    child = await _start_holder(home, 0, procs)

    # A cached page of that bucket: the hit path's trylock fails, the slow path backs off.
    ticker = Ticker()
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        async with f.get(0):
            pass
    elapsed = time.monotonic() - t0
    assert info.value.pid == child.pid and str(child.pid) in str(info.value)
    assert 0.9 < elapsed < 15
    # Other buckets are served meanwhile.
    async with f.get(next(p for p in (1, 2) if pool._core.locate(f._fidx, p)[1] != b)):
        pass

    # The unpin of a page in that bucket waits (without blocking the loop) and completes
    # once the holder resumes and lets go; so does a pin started meanwhile.
    pool.wait_timeout = 30.0
    unpin = asyncio.create_task(f.unpin(held))
    pin = asyncio.create_task(f.pin(0))
    await asyncio.sleep(0.3)
    assert not unpin.done() and not pin.done()
    os.kill(child.pid, signal.SIGCONT)
    child.stdin.write("\n")
    child.stdin.flush()
    assert "unlocked" in await asyncio.to_thread(child.stdout.readline)
    await unpin
    await f.unpin(await pin)
    worst = await ticker.stop()
    assert worst < 0.5, f"event loop stalled {worst:.3f} s"
    await asyncio.to_thread(child.wait, 30)
    check_accounting(pool)
    await f.close()


async def test_stopped_bucket_mutex_holder_fails_a_sync_set_within_a_second(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """``set`` cannot await: it waits SYNC_WAIT at most, then raises, changing nothing."""
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    page = await f.pin(0, create=True)
    child = await _start_holder(home, 0, procs)
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        f.set(page, clean=True)
    assert time.monotonic() - t0 < 10
    assert info.value.pid == child.pid
    os.kill(child.pid, signal.SIGKILL)  # dies holding it: the next locker repairs
    await asyncio.to_thread(child.wait, 30)
    await f.unpin(page)
    check_accounting(pool)
    await f.close()


READER = r"""
import asyncio, sys, time
import aiodbenv

async def main():
    home, pgno = sys.argv[1], int(sys.argv[2])
    env = await aiodbenv.Env.open(home)
    pool = env.pool
    f = await pool.open_file("a.db")
    cache, b = pool._core.locate(f._fidx, pgno)
    # A read that started (the buffer is linked, READING, pinned by us) and then stalls.
    frame = await pool._get_frame(cache, 4096)
    assert f._insert(cache, b, frame, pgno)
    print("reading", flush=True)
    time.sleep(600)

asyncio.run(main())
"""


async def test_stopped_reader_gives_tryagain_naming_it_then_a_kill_frees_the_page(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    with open(os.path.join(home, "a.db"), "wb") as out:
        out.write(b"x" * (PS * 50))
    pool = env.pool
    pool.wait_timeout = 1.0
    f = await pool.open_file("a.db")
    child = spawn(READER, home, "7")
    procs.append(child)
    line = await asyncio.to_thread(child.stdout.readline)  # type: ignore[union-attr]
    assert line.startswith("reading"), child.stderr.read() if child.stderr else ""
    os.kill(child.pid, signal.SIGSTOP)
    ticker = Ticker()
    t0 = time.monotonic()
    with pytest.raises(TryAgain) as info:
        async with f.get(7):
            pass
    assert 0.9 < time.monotonic() - t0 < 15
    assert f"process {child.pid}" in str(info.value)
    assert await ticker.stop() < 0.5
    os.kill(child.pid, signal.SIGKILL)
    await asyncio.to_thread(child.wait, 30)
    pool.wait_timeout = 30.0
    async with f.get(7) as page:  # the dead reader's read is taken over
        assert bytes(page.data[:1]) == b"x"
    check_accounting(pool)
    await f.close()


async def test_sync_with_a_stopped_bucket_holder_is_bounded_and_loses_nothing(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """Write-back meets the held bucket: it reports it (LockTimeout or Incomplete) within a
    bound instead of hanging, and writes everything once the holder is gone."""
    pool = env.pool
    f = await pool.open_file("a.db", create=True)
    for i in range(8):
        async with f.get(i, create=True) as page:
            page.data[0] = 1
    child = await _start_holder(home, 0, procs)
    pool.wait_timeout = 2.0
    ticker = Ticker()
    await asyncio.sleep(0.02)  # the ticker is ticking before the sync starts
    t0 = time.monotonic()
    with pytest.raises((LockTimeout, Incomplete)):
        await pool.sync()
    assert time.monotonic() - t0 < 15
    # The wait for the held bucket backs off asynchronously: the loop is never held for the
    # lock's whole wait (a blocking lock would stall it for a second or more).
    worst = await ticker.stop()
    assert worst < 0.5, f"event loop stalled {worst:.3f} s"
    os.kill(child.pid, signal.SIGKILL)  # dies holding the mutex: the next locker repairs
    await asyncio.to_thread(child.wait, 30)
    await pool.sync()
    assert pool.stat().page_dirty == 0
    while pool._io.tasks:
        await asyncio.gather(*list(pool._io.tasks), return_exceptions=True)
    check_accounting(pool)
    await f.close()


@pytest.fixture
def full_tmpfs() -> Iterator[str]:
    """A 256 KiB tmpfs filled to the last byte (needs root and mount; skipped otherwise)."""
    path = tempfile.mkdtemp(prefix="aiodbenv-full-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", path], check=False)
    if r.returncode:
        os.rmdir(path)
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 512)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


async def test_eviction_on_a_real_full_tmpfs_gives_nospace(
    env: aiodbenv.Env, full_tmpfs: str
) -> None:
    pool = env.pool
    pool.wait_timeout = 1.0
    f = await pool.open_file(os.path.join(full_tmpfs, "a.db"), create=True)
    for i in range(FRAMES):
        async with f.get(i, create=True) as page:
            page.data[0] = 7
    t0 = time.monotonic()
    with pytest.raises(NoSpace):
        async with f.get(FRAMES + 1, create=True):
            pass
    assert time.monotonic() - t0 < 15
    assert pool.stat().page_dirty == FRAMES  # nothing marked clean that is not on disk
    os.remove(os.path.join(full_tmpfs, "filler"))  # room again: everything gets written
    assert (await pool.sync()).written == FRAMES
    check_accounting(pool)
    await f.close()
