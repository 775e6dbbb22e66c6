"""A batch of dirty victims in one compiled call (aiodbenv/mpool/victims.py,
aiodbenv/_csrc/35_batch.c): it agrees with the stepwise calls, a failed write leaves its pages
dirty and is reported, and each place where the call stops for Python -- a bucket or file
mutex whose holder died, a bucket that stays locked at release, a file mutex that stays held
-- leaves the pages as the protocol says; a process killed inside the call loses nothing a
sync reported durable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.errors import LockTimeout
from aiodbenv.mpool import batchcall, csync, victims
from aiodbenv.region.mutex import _W_OWNER_DIED, SYNC_WAIT, SharedMutex, lib, speedups

from .conftest import REPO, lock_in_dying_thread, spawn
from .test_writeback_faults import frames

PS = 4096
CACHE_PAGES = 256

needs_compiled = pytest.mark.skipif(
    not csync.ENABLED, reason="the compiled write-back is not installed (or switched off)"
)


def content(pgno: int, gen: int = 1) -> bytes:
    return bytes([(pgno * 7 + gen) % 251 + 1]) * PS


async def dirty(f: aiodbenv.PoolFile, pages: range | list[int], gen: int = 1) -> None:
    for p in pages:
        async with f.get(p, create=True) as page:
            page.data[:] = content(p, gen)
            page.mark_dirty()


def on_disk(path: str, pages: range | list[int], gen: int = 1) -> list[int]:
    with open(path, "rb") as fh:
        data = fh.read()
    return [p for p in pages if data[p * PS : (p + 1) * PS] == content(p, gen)]


@pytest.fixture
def one_call_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the one-call batches (``batchcall.run``) and keeps batches from starting on
    their own (a test starts the one it looks at)."""
    calls: list[int] = []
    real = batchcall.run

    def spy(pool: Any, run: Any) -> Any:
        calls.append(1)
        return real(pool, run)

    monkeypatch.setattr(batchcall, "run", spy)
    monkeypatch.setattr(victims, "BACKGROUND", False)
    yield calls


async def _filled(env: aiodbenv.Env, f: aiodbenv.PoolFile) -> None:
    """200 dirty pages in a cache of 256 frames, then 60 read again: the first 140 are the
    batch's (the 60 are among the most recently used)."""
    await dirty(f, range(200))
    for p in range(140, 200):
        async with f.get(p):
            pass


@needs_compiled
@pytest.mark.parametrize("one_call", [True, False])
async def test_one_call_and_stepwise_batches_agree(
    home: str, one_call: bool, one_call_spy: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same batch by both paths: the same pages written (the least recently used ones),
    clean after, on disk with their content; and a run of misses over dirty pages ends with
    every page on disk."""
    monkeypatch.setattr(batchcall, "ONE_CALL", one_call)
    async with aiodbenv.Env.open(home, create=True, cache_size=CACHE_PAGES * PS) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            await _filled(env, f)
            cache = env.pool._core.caches[0]
            r = await victims.write_lru_batch(env.pool, cache, 0)
            assert not r.errors
            assert bool(one_call_spy) == one_call
            # Not the recently used tenth (about 25 of the 60 read last).
            written = on_disk(env.resolve("a.db"), range(200))
            assert r.written == len(written) and 140 <= r.written < 200, r.written
            assert set(range(140)) <= set(written)
            assert frames(env.pool) == (0, 200 - r.written, 200 - r.written)
            monkeypatch.setattr(victims, "BACKGROUND", True)
            await dirty(f, range(200, 1500))  # misses over dirty victims, in batches
            await env.pool.sync()
            assert on_disk(env.resolve("a.db"), range(1500)) == list(range(1500))
            assert frames(env.pool) == (0, 0, 0)
    await aiodbenv.Env.remove(home)


@needs_compiled
async def test_a_failed_write_leaves_its_pages_dirty(home: str, one_call_spy: list[int]) -> None:
    """The third write of the batch fails (through the I/O seam, which the C code calls while
    a fault is armed): the batch reports it, the pages of that write and after stay dirty and
    unclaimed, those written before are clean; the next sync writes the rest."""
    async with aiodbenv.Env.open(home, create=True, cache_size=CACHE_PAGES * PS) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            pages = list(range(0, 280, 2))  # every page its own run: one write each
            await dirty(f, pages)
            cache = env.pool._core.caches[0]
            with _io.inject("pwrite", after=2, times=1) as fault:
                r = await victims.write_lru_batch(env.pool, cache, 0)
            assert fault.fired == 1 and one_call_spy
            assert r.written == 2 and len(r.errors) == 1 and isinstance(r.errors[0], OSError)
            assert frames(env.pool) == (0, len(pages) - 2, len(pages) - 2)
            assert len(on_disk(env.resolve("a.db"), pages)) == 2
            await env.pool.sync()
            assert on_disk(env.resolve("a.db"), pages) == pages
    await aiodbenv.Env.remove(home)


def _hold_in_thread(ptr: Any) -> threading.Event:
    """Lock the mutex at ``ptr`` in a new thread that keeps it until the returned event is
    set."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        assert lib.pthread_mutex_lock(ptr) == 0
        locked.set()
        release.wait(30)
        lib.pthread_mutex_unlock(ptr)

    threading.Thread(target=hold).start()
    assert locked.wait(10)
    return release


@needs_compiled
async def test_a_dead_bucket_holder_is_repaired_and_the_batch_goes_on(
    home: str, one_call_spy: list[int]
) -> None:
    """A thread that died holding the mutex of a bucket with dirty pages: the call stops
    there, Python repairs the bucket, the call goes on and writes every page."""
    async with aiodbenv.Env.open(home, create=True, cache_size=CACHE_PAGES * PS) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            await _filled(env, f)
            cache, b = env.pool._core.locate(f._fidx, 70)
            lock_in_dying_thread(cache.mptrs[b])
            r = await victims.write_lru_batch(env.pool, cache, 0)
            assert not r.errors and r.written >= 140
            assert set(range(140)) <= set(on_disk(env.resolve("a.db"), range(200)))
            mx = cache.mutexes[b]
            assert isinstance(mx, SharedMutex)
            assert cache.words[mx._w + _W_OWNER_DIED] == 1  # repaired the Python way
            await env.pool.sync()
            assert frames(env.pool) == (0, 0, 0)
    await aiodbenv.Env.remove(home)


@needs_compiled
async def test_a_dead_file_mutex_holder_is_repaired(home: str, one_call_spy: list[int]) -> None:
    """The file mutex's holder died: repaired, the written generation bumped, pages clean."""
    async with aiodbenv.Env.open(home, create=True, cache_size=CACHE_PAGES * PS) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            await _filled(env, f)
            core = env.pool._core
            e = core.entry(f._fidx)
            gen = core.file_field(f._fidx, "written_gen")
            mx = core.file_mutex(f._fidx)
            assert isinstance(mx, SharedMutex)
            lock_in_dying_thread(mx.ptr)
            r = await victims.write_lru_batch(env.pool, core.caches[0], 0)
            assert e and not r.errors and r.written >= 140
            assert core.file_field(f._fidx, "written_gen") == gen + 1
            assert core.meta_words[mx._w + _W_OWNER_DIED] == 1
            assert frames(env.pool) == (0, 200 - r.written, 200 - r.written)
            await env.pool.sync()
    await aiodbenv.Env.remove(home)


@pytest.fixture
def short_lock_wait() -> Iterator[float]:
    """The compiled code's lock wait cut to 50 ms for the test."""
    assert speedups is not None
    speedups.aiodb_set_lock_wait(50_000_000)
    try:
        yield 0.05
    finally:
        speedups.aiodb_set_lock_wait(int(SYNC_WAIT * 1e9))


async def _held_during_write(
    env: aiodbenv.Env, ptr: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, threading.Event]:
    """Write a batch while another thread takes the mutex at ``ptr`` at the batch's first
    write (after the claims) and holds it until the returned event is set."""
    held: list[threading.Event] = []
    real = _io.pwritev

    def writing(fd: int, bufs: Any, off: int) -> int:
        if not held:
            held.append(_hold_in_thread(ptr))
        return real(fd, bufs, off)

    monkeypatch.setattr(_io, "pwritev", writing)  # the C writes call it (csync._hook)
    try:
        r = await victims.write_lru_batch(env.pool, env.pool._core.caches[0], 0)
    finally:
        monkeypatch.setattr(_io, "pwritev", real)
    assert held
    return r, held[0]


@needs_compiled
async def test_a_bucket_held_at_release_keeps_its_claim_until_let_go(
    home: str, one_call_spy: list[int], short_lock_wait: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket locked by someone else from the write to past the release's bounded wait:
    that page's claim is left to a task of the pool (the page stays dirty meanwhile), every
    other page is clean; once the bucket is let go the claim is released and the page clean."""
    async with aiodbenv.Env.open(home, create=True, cache_size=CACHE_PAGES * PS) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            await _filled(env, f)
            cache, b = env.pool._core.locate(f._fidx, 70)
            r, release = await _held_during_write(env, cache.mptrs[b], monkeypatch)
            try:
                assert not r.errors and r.written >= 140
                writing, _, _ = frames(env.pool)
                assert writing >= 1  # still claimed: its bucket is held
            finally:
                release.set()
            for _ in range(200):  # the pool's task retries without blocking the loop
                if frames(env.pool)[0] == 0:
                    break
                await asyncio.sleep(0.02)
            assert frames(env.pool) == (0, 200 - r.written, 200 - r.written)
            assert set(range(140)) <= set(on_disk(env.resolve("a.db"), range(200)))
            await env.pool.sync()
    await aiodbenv.Env.remove(home)


@needs_compiled
async def test_a_file_mutex_held_past_the_bound_leaves_the_pages_dirty(
    home: str, one_call_spy: list[int], short_lock_wait: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file mutex stays held when the batch would note its write: written, but no sync
    would know to fsync it, so nothing is marked clean and the batch reports a LockTimeout."""
    async with aiodbenv.Env.open(home, create=True, cache_size=CACHE_PAGES * PS) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            await _filled(env, f)
            core = env.pool._core
            gen = core.file_field(f._fidx, "written_gen")
            r, release = await _held_during_write(env, core.file_mutex(f._fidx).ptr, monkeypatch)
            release.set()
            assert r.written == 0 and any(isinstance(e, LockTimeout) for e in r.errors)
            assert core.file_field(f._fidx, "written_gen") == gen
            assert frames(env.pool) == (0, 200, 200)
            await env.pool.sync()
            assert on_disk(env.resolve("a.db"), range(200)) == list(range(200))
    await aiodbenv.Env.remove(home)


KILLED_IN_BATCH = r"""
import asyncio, os, signal, sys
import aiodbenv
from aiodbenv import _io
from aiodbenv.mpool import victims

PS = 4096

def content(p, gen):
    return bytes([(p * 7 + gen) % 251 + 1]) * PS

async def main():
    env = await aiodbenv.Env.open(sys.argv[1], create=True, cache_size=256 * PS)
    f = await env.pool.open_file("a.db", create=True)
    for p in range(400):
        async with f.get(p, create=True) as page:
            page.data[:] = content(p, 1)
            page.mark_dirty()
    await env.pool.sync()
    print("SYNCED", flush=True)
    calls = []
    real = _io.pwritev

    def writing(fd, bufs, off):  # inside the one compiled call: claims held, pages copied
        calls.append(1)
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(fd, bufs, off)

    _io.pwritev = writing
    victims.BACKGROUND = False
    for p in range(400):  # generation 2 of every page: misses over dirty victims
        async with f.get(p) as page:
            page.data[:] = content(p, 2)
            page.mark_dirty()
    print("NOT KILLED", len(calls), flush=True)

asyncio.run(main())
"""


@needs_compiled
@pytest.mark.parametrize("at", [1, 2])
async def test_killed_inside_the_call_loses_nothing_synced(
    home: str, at: int, procs: list[subprocess.Popen[str]]
) -> None:
    """A process SIGKILLed at its batches' first or second write (claims held, pages copied,
    none or some written): every page is on disk as the sync left it or newer, and the next process
    takes the dead writer's claims over and syncs every page clean."""
    child = spawn(KILLED_IN_BATCH, home, str(at), env={**os.environ, "PYTHONPATH": str(REPO)})
    procs.append(child)
    out, err = child.communicate(timeout=120)
    assert "SYNCED" in out and child.returncode == -signal.SIGKILL, out + err[-2000:]
    path = os.path.join(home, "a.db")
    assert set(on_disk(path, range(400), 1)) | set(on_disk(path, range(400), 2)) == set(range(400))
    async with aiodbenv.Env.open(home) as env:
        await env.pool.sync()
        assert frames(env.pool)[0] == 0
    await aiodbenv.Env.remove(home, force=True)
