"""The compiled write-back (aiodbenv/mpool/csync.py, aiodbenv/_csrc/50_sync.c).

Its faults and crashes are the existing suites' (tests/test_writeback_faults.py,
tests/test_log_pool.py, tests/test_pool_cancel.py run it: its writes go through aiodbenv/_io.py
while a test uses that seam); here: that it is the path taken, that it agrees with the Python
path, that a failing ``pwrite`` of the C code itself (strace fault injection, no Python seam)
is never reported as success, that it makes no per-page garbage, and the suites run again
with ``AIODBENV_WRITEBACK=python``.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from typing import Any

import anyio.to_thread
import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.mpool import csync, staging, synchop, victims
from aiodbenv.mpool import frames as frames_mod
from aiodbenv.region.mutex import speedups

from .conftest import REPO, run_suites
from .test_writeback_faults import frames

PS = 4096

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


def on_disk(path: str, pages: list[int] | range, gen: int = 1) -> list[int]:
    """The pages of ``pages`` whose content on disk is generation ``gen``'s."""
    with open(path, "rb") as fh:
        data = fh.read()
    return [p for p in pages if data[p * PS : (p + 1) * PS] == content(p, gen)]


def test_compiled_writeback_is_installed_when_the_accelerator_is() -> None:
    if os.environ.get("AIODBENV_WRITEBACK") == "python" or speedups is None:
        assert not csync.ENABLED
    else:
        assert csync.ENABLED


@needs_compiled
async def test_sync_takes_the_compiled_path(home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a log, a sync is one worker-thread call (synchop): collect, write, fsync."""
    calls: list[tuple[int, int, bool]] = []
    real = synchop._run

    def spy(*args: Any) -> synchop.Hop:
        hop = real(*args)
        written = sum(c.written for _, c in hop.chunks)
        calls.append((len(hop.chunks), written, hop.fsync is not None))
        return hop

    monkeypatch.setattr(synchop, "_run", spy)
    monkeypatch.setattr(csync, "write_fast", None)  # the steps' path is not taken
    async with aiodbenv.Env.open(home, create=True, cache_size=8 << 20) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            await dirty(f, range(300))
            r = await env.pool.sync()
            assert calls == [(1, 300, True)] and r.written == 300 and r.incomplete == 0
            assert r.files_synced == 1
            # Runs of adjacent pages: one write per 256 pages at most.
            assert r.write_calls == 2 and r.bytes_written == 300 * PS
            assert frames(env.pool) == (0, 0, 0)
            st = env.pool.stat()
            assert st.page_out >= 300 and st.page_dirty == 0
            assert on_disk(env.resolve("a.db"), range(300)) == list(range(300))
    await aiodbenv.Env.remove(home)


@needs_compiled
async def test_a_sync_without_a_log_wakes_the_loop_once(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker-thread call ends with a wake-up of the event loop, and a wake-up while a
    timer is due within the millisecond makes that timer up to 1 ms late (both loops count
    whole milliseconds). Without a log, a sync of several chunks and two files is one call:
    collect, write, fsync. With a log (the write-ahead rule flushes it between a chunk's
    claim and its write) the steps remain."""
    # 300 pages: 5 chunks per file, in the one call and in the steps with a log
    monkeypatch.setattr(csync, "CHUNK_BYTES", 64 * PS)
    monkeypatch.setattr(csync, "STEPPED_CHUNK_BYTES", 64 * PS)
    calls: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kw: Any) -> Any:
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    lanes: list[object] = []
    real_call = synchop.sync_in_one_call

    async def spy(pool: Any, *args: Any, **kw: Any) -> Any:
        lanes.append(pool._io.writeback_lane)
        return await real_call(pool, *args, **kw)

    monkeypatch.setattr(synchop, "sync_in_one_call", spy)
    for log in (False, True):
        async with aiodbenv.Env.open(home, create=True, cache_size=8 << 20, log=log) as env:
            async with env.pool.open_file("a.db", create=True) as f:
                async with env.pool.open_file("b.db", create=True) as g:
                    await dirty(f, range(300))
                    await dirty(g, range(300), 2)
                    calls.clear()
                    r = await env.pool.sync()
                    assert r.written == 600 and r.files_synced == 2 and r.incomplete == 0
                    if log:
                        assert len(calls) > 2, calls
                    else:
                        assert calls == ["_run"], calls
                        assert lanes == [env.pool._io.writeback_lane]  # not the I/O threads
                    assert env.pool.stat().page_dirty == 0
                    assert frames(env.pool) == (0, 0, 0)
                    assert on_disk(env.resolve("a.db"), range(300)) == list(range(300))
                    assert on_disk(env.resolve("b.db"), range(300), 2) == list(range(300))
        await aiodbenv.Env.remove(home)


@needs_compiled
async def test_the_one_call_write_back_reads_no_pool_state_the_loop_changes(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's worker thread must not walk the pool's open files (the loop adds and
    removes them: "set changed size during iteration"): the descriptors are taken on the
    loop. And one staging buffer serves every file (a buffer per file held up to
    ``CHUNK_BYTES`` each until the end)."""
    import threading

    from aiodbenv.mpool.bh import BufferIO

    real_fd = BufferIO.fd_for_write
    off_loop: list[str] = []

    def on_loop_only(self: BufferIO, fidx: int) -> int | None:
        if threading.current_thread() is not threading.main_thread():
            off_loop.append(threading.current_thread().name)
        return real_fd(self, fidx)

    monkeypatch.setattr(BufferIO, "fd_for_write", on_loop_only)
    maps: list[int] = []
    real_zeroed = staging.zeroed

    def counting(nbytes: int) -> Any:
        maps.append(nbytes)
        return real_zeroed(nbytes)

    monkeypatch.setattr(csync, "zeroed", counting)  # the collect's array
    monkeypatch.setattr(synchop, "zeroed", counting)  # the staging buffer
    async with aiodbenv.Env.open(home, create=True, cache_size=8 << 20) as env:
        handles = [await env.pool.open_file(f"{n}.db", create=True) for n in "abcd"]
        for i, f in enumerate(handles):
            await dirty(f, range(100), i + 1)
        maps.clear()
        r = await env.pool.sync()
        assert r.written == 400 and r.files_synced == 4
        assert not off_loop, off_loop
        # The collect's array of entries, then the staging buffer: empty, then grown once to
        # the 100 pages of a file, for all four files.
        assert maps[1:] == [0, 100 * PS], maps
        for i, f in enumerate(handles):
            assert on_disk(env.resolve(f"{'abcd'[i]}.db"), range(100), i + 1) == list(range(100))
            await f.close()
    await aiodbenv.Env.remove(home)


@needs_compiled
async def test_trickle_picks_the_oldest_pages_of_files_this_handle_has_not_opened(
    home: str,
) -> None:
    """Trickle writes the least recently used dirty pages, whichever process opened their
    files. One call can only write through descriptors this handle has, so a file it has
    not opened makes it take the steps (which open one): else the older pages of that file
    were left dirty and newer ones written."""
    async with aiodbenv.Env.open(home, create=True, cache_size=8 << 20) as a:
        async with aiodbenv.Env.open(home) as b:
            async with a.pool.open_file("old.db", create=True) as fa:
                await dirty(fa, range(100))  # older: only a has this file open
                async with b.pool.open_file("new.db", create=True) as fb:
                    await dirty(fb, range(100), 2)  # newer
                    assert synchop.prepare(b.pool, None) is None
                    written = await b.pool.trickle(50)
                    assert written >= 50
                    old = on_disk(b.resolve("old.db"), range(100))
                    new = on_disk(b.resolve("new.db"), range(100), 2)
                    # The oldest first: old.db's pages, then (past 100) new.db's.
                    assert len(old) == min(written, 100), (len(old), len(new), written)
                    assert len(new) == max(0, written - 100), (len(old), len(new), written)
                    await b.pool.sync()
            await a.pool.sync()
    await aiodbenv.Env.remove(home)


async def test_private_region_keeps_the_python_path(home: str) -> None:
    # A private region's buffers have no mutexes: no worker thread may claim them.
    async with aiodbenv.Env.open(home, create=True, region="private") as env:
        assert not csync.usable(env.pool._core)
        async with env.pool.open_file("a.db", create=True) as f:
            await dirty(f, range(20))
            assert (await env.pool.sync()).written == 20
            assert on_disk(env.resolve("a.db"), range(20)) == list(range(20))
    await aiodbenv.Env.remove(home)


async def _scenario(home: str) -> tuple[list[Any], bytes, bytes]:
    """Dirty two files in a pattern (runs, holes, a pinned page, a page with a pgout
    transform), then trickle, sync, dirty again and checkpoint: what each returns, and the
    files' bytes."""
    out: list[Any] = []
    async with aiodbenv.Env.open(home, create=True, cache_size=4 << 20) as env:
        pool = env.pool

        def pgout(pgno: int, page: memoryview, cookie: bytes) -> None:
            page[0] ^= 0xFF

        pool.register(7, pgin=None, pgout=pgout)
        async with (
            pool.open_file("a.db", create=True) as f,
            pool.open_file("b.db", create=True, ftype=7) as g,
        ):
            await dirty(f, [*range(0, 100), *range(150, 400, 3), 1000])
            await dirty(g, range(0, 40, 2))
            out.append(await pool.trickle(90))
            assert out[-1] > 0
            await dirty(f, [5], gen=3)
            pinned = await f.pin(5)  # dirty and pinned: the sync cannot write it
            try:
                with pytest.raises(aiodbenv.Incomplete) as info:
                    await pool.sync()
                res = info.value.result  # type: ignore[attr-defined]
                out.append((res.incomplete, pool.stat().page_dirty))
            finally:
                await f.unpin(pinned)
            r2 = await pool.sync()
            out.append((r2.incomplete, pool.stat().page_dirty))
            await dirty(f, range(50, 80), gen=2)
            await env.checkpoint()
            out.append(pool.stat().page_dirty)
        a = open(env.resolve("a.db"), "rb").read()
        b = open(env.resolve("b.db"), "rb").read()
    await aiodbenv.Env.remove(home)
    return out, a, b


@needs_compiled
async def test_compiled_and_python_paths_agree(home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = await _scenario(home)
    monkeypatch.setattr(csync, "ENABLED", False)
    shutil.rmtree(home)
    os.mkdir(home)
    plain = await _scenario(home)
    assert compiled[0] == plain[0]
    assert compiled[1] == plain[1] and compiled[2] == plain[2]


@needs_compiled
async def test_injected_pwrite_error_leaves_pages_dirty(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, cache_size=8 << 20) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            pages = list(range(0, 128, 2))  # every page its own run: one write each
            await dirty(f, pages)
            with _io.inject("pwrite", after=10, times=1) as fault:
                with pytest.raises(OSError):
                    await env.pool.sync()
            assert fault.fired == 1
            writing, dirty_now, counted = frames(env.pool)
            assert writing == 0 and dirty_now == counted == len(pages) - 10
            r = await env.pool.sync()
            assert r.written == len(pages) - 10
            assert on_disk(env.resolve("a.db"), pages) == pages
    await aiodbenv.Env.remove(home)


STRACE_CHILD = r"""
import asyncio, sys
import aiodbenv
from aiodbenv.mpool import csync, victims
from aiodbenv.mpool import frames as frames_mod
sys.path.insert(0, sys.argv[2])
from tests.test_writeback_faults import frames

async def main():
    env = await aiodbenv.Env.open(sys.argv[1], create=True, cache_size=8 << 20)
    assert csync.usable(env.pool._core)
    f = await env.pool.open_file("a.db", create=True)
    for p in range(0, 64, 2):
        async with f.get(p, create=True) as page:
            page.data[:] = bytes([p + 1]) * len(page.data)
            page.mark_dirty()
    try:
        await env.pool.sync()
        print("SYNC OK")
    except OSError as err:
        print("SYNC FAILED", err.errno, frames(env.pool))
    r = await env.pool.sync()
    print("AGAIN", r.written, frames(env.pool))
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(sys.argv[1])

asyncio.run(main())
"""


@needs_compiled
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_a_failing_c_pwrite_is_never_success(home: str) -> None:
    """The C code's own pwrite64 (no Python seam in the way) fails with EIO at its 5th call:
    the sync raises, the four pages written are clean, the rest dirty and unclaimed; the
    next sync writes them."""
    r = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=pwrite64",
            "-e",
            "inject=pwrite64:error=EIO:when=5",
            "-o",
            os.devnull,
            sys.executable,
            "-c",
            STRACE_CHILD,
            home,
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "SYNC FAILED 5 (0, 28, 28)" in r.stdout, r.stdout
    assert "AGAIN 28 (0, 0, 0)" in r.stdout, r.stdout


@needs_compiled
async def test_compiled_sync_makes_no_per_page_garbage(home: str) -> None:
    """A sync of 4,096 pages: the Python path made tens of thousands of objects (20+ GC
    passes); the compiled one a few per chunk."""
    passes = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    async with aiodbenv.Env.open(home, create=True, cache_size=24 << 20) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            await dirty(f, range(4096))
            gc.collect()
            gc.callbacks.append(count)
            try:
                r = await env.pool.sync()
            finally:
                gc.callbacks.remove(count)
            assert r.written == 4096
    await aiodbenv.Env.remove(home)
    assert len(passes) <= 3, passes


# Slow (minutes): CI covers the Python write-back in test_mutex's AIODBENV_MUTEX=abi rerun
# (pool, write-back fault, wait and reaper suites); this isolates the one switch.
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("AIODBENV_WRITEBACK") == "python" or not csync.ENABLED,
    reason="already the Python write-back's run",
)
def test_suites_pass_with_the_python_writeback() -> None:
    """The write-back suites again with ``AIODBENV_WRITEBACK=python`` (compiled mutexes, the
    Python write-back): both paths stay complete. The ABI run (tests/test_mutex.py) covers
    the machine without a compiler."""
    run_suites(
        "tests/test_pool.py",
        "tests/test_writeback_faults.py",
        "tests/test_log_pool.py",
        "tests/test_workers.py",
        "tests/test_writeback_compiled.py",
        env={"AIODBENV_WRITEBACK": "python"},
    )


@needs_compiled
async def test_dirty_victims_are_written_in_batches(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Misses in a full cache of dirty pages: the victims go out in batches (one worker-thread
    call for many misses, not one per victim), and every page ends on disk with its content."""
    batches: list[int] = []
    real = victims._batch

    async def spy(pool: Any, cache: Any, bucket: int, *started: Any) -> Any:
        r = await real(pool, cache, bucket, *started)
        batches.append(r.written)
        return r

    monkeypatch.setattr(victims, "_batch", spy)
    single: list[int] = []
    real_items = frames_mod.write_items

    async def spy_items(io: Any, items: list[Any]) -> Any:
        single.append(len(items))
        return await real_items(io, items)

    monkeypatch.setattr(frames_mod, "write_items", spy_items)
    async with aiodbenv.Env.open(home, create=True, cache_size=64 * PS) as env:
        async with env.pool.open_file("a.db", create=True) as f:
            await dirty(f, range(1000))  # 64 frames: ~936 dirty victims
            assert sum(batches) >= 900, batches
            assert len(batches) <= 936 // 8, len(batches)  # many victims per call
            assert not single  # no victim written alone
            await env.pool.sync()
            assert on_disk(env.resolve("a.db"), range(1000)) == list(range(1000))
            assert frames(env.pool) == (0, 0, 0)
    await aiodbenv.Env.remove(home)


def _permissions_of(buf: Any) -> str:
    """The permissions of the mapping that holds ``buf`` (``rw-p``: private; /proc/self/maps)."""
    import ctypes

    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    with open("/proc/self/maps") as fh:
        for line in fh:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms
    raise AssertionError("mapping not found")


def test_staging_memory_is_private() -> None:
    """The staging buffers are private anonymous memory, not shmem (``mmap``'s default shared
    anonymous mapping: its page cache made every first touch and the unmap cost a third of a
    sync's worker-thread time), zero when first read."""
    from aiodbenv.mpool.staging import zeroed

    big, small = zeroed(4 << 20), zeroed(64 << 10)
    try:
        for buf in (big, small):
            assert _permissions_of(buf) == "rw-p"
        assert bytes(big[:16]) == bytes(16) and bytes(small[-16:]) == bytes(16)
    finally:
        big.close()
        small.close()
