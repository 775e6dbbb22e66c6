"""The io_uring page reader (aiodbenv/mpool/uring.py, aiodbenv/_csrc/45_reader.c).

- it reads what a pread reads, overlapping reads beyond its depth (queued in order);
- a read error, a short read and an interrupted read (the C reap's test hook) come out as a
  pread loop's would: the error, the rest read again, the read issued again;
- a read that never ends (a pipe with no writer) is left running by a cancelled caller, its
  buffer written when it does end, and closing waits for it within a bound;
- nothing is left behind: the ring's descriptor is closed by close(), by the garbage collector
  once the loop that made it is gone, and in a forked child at the fork (the parent's goes on);
- in a pool, a page read through it is the page, and a failed read fails the get and frees
  the frame;
- with a test's fault armed, reads go through the I/O seam (reader threads) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import random
import time
from collections.abc import Iterator

import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.mpool import uring
from aiodbenv.region.mutex import speedups

from .test_miss import FRAMES, PAGES, PS, _drop_from_os_cache, page_bytes
from .test_miss import env as env  # the fixture: FRAMES frames, PAGES pages
from .test_reaper import pin_totals

pytestmark = pytest.mark.skipif(
    uring.available() is not None, reason=f"io_uring: {uring.available()}"
)


def _rings() -> int:
    """io_uring descriptors this process holds (uvloop's libuv may hold one of its own)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "io_uring" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def _is_ring(fd: int) -> bool:
    try:
        return "io_uring" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


@pytest.fixture
def data(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "data")
    with open(path, "wb") as fh:
        for p in range(64):
            fh.write(page_bytes(p))
    return path


async def test_reads_what_pread_reads_and_queues_beyond_its_depth(data: str) -> None:
    before = _rings()
    reader = uring.UringReader(depth=2)
    fd = os.open(data, os.O_RDONLY)
    try:
        assert _rings() == before + 1
        bufs = [bytearray(PS) for _ in range(9)]
        got = await asyncio.gather(
            *(reader.read(fd, memoryview(b), p * 7 * PS) for p, b in enumerate(bufs))
        )
        assert got == [PS] * 9
        assert [bytes(b) for b in bufs] == [page_bytes(p * 7) for p in range(9)]
        # The end of the file: a short count, then zero.
        tail = bytearray(PS)
        assert await reader.read(fd, memoryview(tail), 64 * PS - 100) == 100
        assert await reader.read(fd, memoryview(tail), 64 * PS) == 0
        assert reader.reads == 11 and reader._running == 0 and reader.threads == 0
    finally:
        reader.close()
        os.close(fd)
    assert _rings() == before


@pytest.mark.parametrize(
    ("fault", "expect"),
    [(-errno.EIO, "EIO"), (-errno.EINTR, "page"), (100, "page")],
    ids=["error", "interrupted", "short"],
)
async def test_an_error_a_short_and_an_interrupted_read(data: str, fault: int, expect: str) -> None:
    reader = uring.UringReader()
    fd = os.open(data, os.O_RDONLY)
    try:
        buf = bytearray(PS)
        speedups.aiodb_reader_test_result(reader._ring.r, fault)
        if expect == "EIO":
            with pytest.raises(OSError) as err:
                await reader.read(fd, memoryview(buf), 5 * PS)
            assert err.value.errno == errno.EIO
        else:
            # Interrupted: issued again whole; short (100 bytes counted): the rest read again.
            assert await reader.read(fd, memoryview(buf), 5 * PS) == PS
            assert bytes(buf) == page_bytes(5)
        assert reader._running == 0
        assert await reader.read(fd, memoryview(buf), 6 * PS) == PS  # and it goes on
        assert bytes(buf) == page_bytes(6)
    finally:
        reader.close()
        os.close(fd)


async def test_a_cancelled_read_runs_to_its_end_and_close_waits_within_a_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reader = uring.UringReader()
    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        buf = bytearray(8)
        t = asyncio.ensure_future(reader.read(r, memoryview(buf), 0))
        await asyncio.sleep(0.02)
        assert reader._running == 1  # in the kernel, waiting for the pipe
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        os.write(w, b"12345678")
        deadline = time.monotonic() + 5
        while reader._running and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert reader._running == 0 and reader.reads == 1
        assert bytes(buf) == b"12345678"  # the read ended into its buffer all the same
        # A read that never ends: close waits CLOSE_WAIT for it, then the kernel cancels it.
        monkeypatch.setattr(uring, "CLOSE_WAIT", 0.2)
        stuck = bytearray(8)
        reader.submit_call(r2, memoryview(stuck), 0, lambda res: None)
        t0 = time.monotonic()
        reader.close()
        assert 0.15 < time.monotonic() - t0 < 3
        assert "still in flight" in caplog.text
        os.write(w2, b"abcdefgh")
        await asyncio.sleep(0.05)
        assert bytes(stuck) == bytes(8)  # cancelled: never written
        with pytest.raises(RuntimeError, match="closed"):
            reader.submit_call(r, memoryview(buf), 0, lambda res: None)
    finally:
        reader.close()
        for fd in (r, w, r2, w2):
            os.close(fd)


@contextlib.contextmanager
def _held_read(
    data: str, depth: int
) -> Iterator[tuple[uring.UringReader, int, int, asyncio.Future[int], bytearray]]:
    """A reader of ``depth`` reads, ``data`` open, and one read in flight for as long as the
    test wants: of a pipe with no writer, until the test writes 8 bytes to ``w``. Yields
    ``(reader, fd, w, that read's future, its buffer)``; closes everything after."""
    reader = uring.UringReader(depth=depth)
    r, w = os.pipe()
    fd = os.open(data, os.O_RDONLY)
    try:
        slow = bytearray(8)
        yield reader, fd, w, reader.submit(r, memoryview(slow), 0), slow
    finally:
        reader.close()
        os.close(fd)
        os.close(r)
        os.close(w)


async def test_reads_made_while_others_are_at_the_disk_start_together(data: str) -> None:
    """A read made while none is in flight starts at once (before submit_call returns); the
    reads one turn of the loop makes while another is in flight start together at the end of
    that turn, in one io_uring_enter; beyond the depth they wait, in order. A pipe with no
    writer keeps one read in flight as long as the test wants."""
    with _held_read(data, 8) as (reader, fd, w, pipe_read, slow):
        assert reader.starts == 1 and reader._running == 1  # started within submit
        bufs = [bytearray(PS) for _ in range(12)]
        futs = [reader.submit(fd, memoryview(b), p * PS) for p, b in enumerate(bufs)]
        # Seven gathered for the end of this turn (the ring holds 8), five waiting behind.
        assert reader.starts == 1 and len(reader._batch) == 7 and len(reader._waiting) == 5
        assert await asyncio.gather(*futs) == [PS] * 12
        assert [bytes(b) for b in bufs] == [page_bytes(p) for p in range(12)]
        # The 7 in one call; the 5 in as few as room was made for them by completions.
        assert 2 <= reader.starts <= 1 + 1 + 5, reader.starts
        os.write(w, b"12345678")
        assert await pipe_read == 8 and bytes(slow) == b"12345678"
        # Nothing in flight: a lone read starts at once again.
        lone = bytearray(PS)
        before = reader.starts
        fut = reader.submit(fd, memoryview(lone), 5 * PS)
        assert reader.starts == before + 1 and not reader._batch
        assert await fut == PS and bytes(lone) == page_bytes(5)
        assert reader._running == 0


class _Recorder:
    """``speedups`` as uring.py sees it, with the pages of every submit_many and submit_one
    call kept."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def aiodb_reader_submit_many(self, r: object, n: int, *args: object) -> int:
        offs = args[3]
        self.calls.append([int(offs[k]) // PS for k in range(n)])  # type: ignore[index]
        return int(speedups.aiodb_reader_submit_many(r, n, *args))

    def aiodb_reader_submit_one(
        self, r: object, fd: int, buf: object, n: int, off: int, token: int
    ) -> int:
        self.calls.append([off // PS])
        return int(speedups.aiodb_reader_submit_one(r, fd, buf, n, off, token))

    def __getattr__(self, name: str) -> object:
        return getattr(speedups, name)


async def test_a_read_the_kernel_took_only_part_of_is_not_lost_or_mixed_up(
    data: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may take some of a batch's entries and then fail (no memory for the rest).
    Those it took are in flight: each read gets its own result into its own buffer, the rest
    start once there is room. When it takes none, threads read them and every read waiting
    behind them, so nothing stalls, and the ring works again afterwards."""
    rec = _Recorder()
    monkeypatch.setattr(uring, "speedups", rec)
    # Completions only when the loop reaps them, so each step's state can be seen.
    monkeypatch.setattr(uring.UringReader, "reap_on_submit", False)
    with _held_read(data, 8) as (reader, fd, w, pipe_read, slow):
        # Part of a batch: 2 of 5 taken, then "out of memory".
        speedups.aiodb_reader_test_enter(reader._ring.r, 2, errno.ENOMEM)
        bufs = [bytearray(PS) for _ in range(5)]
        futs = [reader.submit(fd, memoryview(b), (10 + p) * PS) for p, b in enumerate(bufs)]
        await asyncio.sleep(0)  # the end of the turn: the batch goes in
        assert rec.calls[-1] == [10, 11, 12, 13, 14]
        assert len(reader._calls) == 3 and len(reader._waiting) == 3  # pipe + 2 taken
        assert await asyncio.gather(*futs) == [PS] * 5
        assert [bytes(b) for b in bufs] == [page_bytes(10 + p) for p in range(5)]
        assert rec.calls[-1] == [12, 13, 14]  # the rest, once the first two made room
        # None of a batch taken: threads read it and the read waiting behind it.
        speedups.aiodb_reader_test_enter(reader._ring.r, 0, errno.ENOMEM)
        more = [bytearray(PS) for _ in range(3)]
        futs = [reader.submit(fd, memoryview(b), (20 + p) * PS) for p, b in enumerate(more)]
        reader._waiting.append(reader._batch.pop())  # as if the ring had been full for it
        assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [PS] * 3
        assert [bytes(b) for b in more] == [page_bytes(20 + p) for p in range(3)]
        assert reader.threads >= 1 and not reader._waiting and not reader._batch
        # The ring again, and the pipe read all along.
        again = bytearray(PS)
        assert await reader.read(fd, memoryview(again), 30 * PS) == PS
        assert bytes(again) == page_bytes(30)
        os.write(w, b"12345678")
        assert await pipe_read == 8 and bytes(slow) == b"12345678"
        assert reader._running == 0


async def test_reads_start_in_the_order_asked_and_a_bad_buffer_fails_its_caller(
    data: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the ring full, reads gathered for the end of the turn and reads waiting for room
    start in the order they were asked for, when a completion makes room. A buffer the kernel
    cannot write into fails its own caller at once, not the batch it would have joined."""
    rec = _Recorder()
    monkeypatch.setattr(uring, "speedups", rec)
    with _held_read(data, 2) as (reader, fd, w, pipe_read, _slow):
        bufs = [bytearray(PS) for _ in range(3)]
        futs = [reader.submit(fd, memoryview(b), (1 + p) * PS) for p, b in enumerate(bufs)]
        assert len(reader._batch) == 1 and len(reader._waiting) == 2
        with pytest.raises((BufferError, TypeError)):
            reader.submit(fd, memoryview(bytes(PS)), 0)  # read-only
        os.write(w, b"12345678")
        assert await pipe_read == 8
        assert await asyncio.gather(*futs) == [PS] * 3
        assert [bytes(b) for b in bufs] == [page_bytes(1 + p) for p in range(3)]
        started = [p for call in rec.calls for p in call]
        assert started == [0, 1, 2, 3], rec.calls  # the pipe's offset 0, then 1, 2, 3


async def test_cold_misses_side_by_side_skip_the_nowait_attempt_and_read_right(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 coroutines missing on a file the OS page cache lost: after a few RWF_NOWAIT reads
    found nothing, the misses made while other reads are at the disk skip the attempt (it
    would start a disk read, and a device notification, of its own) and the reader starts
    them together. Every page read is right, every frame comes back. Once the file is in the
    OS cache again, misses with no read at the disk try RWF_NOWAIT first and need no read at
    all."""
    monkeypatch.setenv("AIODBENV_READER", "uring")
    pages, frames, ps = 1024, 64, 4096  # a page per OS page: each miss its own read

    def content(p: int) -> bytes:
        return p.to_bytes(4, "little") * (ps // 4)

    env = await aiodbenv.Env.open(home, create=True, cache_size=frames * ps, page_size=ps)
    try:
        async with env.pool.open_file("big.db", create=True, page_size=ps) as f:
            for p in range(pages):
                async with f.get(p, create=True) as page:
                    page.data[:] = content(p)
                    page.mark_dirty()
            await env.pool.sync()
            path = os.path.join(home, "big.db")
            assert f._fd is not None
            # No readahead: each miss reads its own page, so each is a read at the disk.
            os.posix_fadvise(f._fd, 0, 0, os.POSIX_FADV_RANDOM)
            for p in range(frames):  # the cache holds pages 0..frames-1
                async with f.get(p):
                    pass
            _drop_from_os_cache(path, pages)
            skips0 = speedups.aiodb_miss_nowait_skips()

            async def run(pgnos: list[int]) -> None:
                for p in pgnos:
                    async with f.get(p) as page:
                        assert bytes(page.data) == content(p)

            order = list(range(frames, pages))
            random.Random(3).shuffle(order)
            reader = env.pool._io.reader
            assert isinstance(reader, uring.UringReader)
            reads0, starts0 = reader.reads, reader.starts
            await asyncio.gather(*(run(order[i::32]) for i in range(32)))
            reads, starts = reader.reads - reads0, reader.starts - starts0
            # Most misses: on a loaded machine a miss that tried RWF_NOWAIT before the skips
            # began finds its page read by then more often (477 of 960 once in CI).
            assert reads > len(order) // 4, reads
            assert starts < reads, (starts, reads)
            assert speedups.aiodb_miss_nowait_skips() > skips0
            assert pin_totals(env) == {}
            # The file back in the OS cache: no read goes to the ring.
            with open(path, "rb") as fh:
                while fh.read(1 << 20):
                    pass
            reads0 = reader.reads
            await asyncio.gather(*(run(list(range(i, frames * 4, 32))) for i in range(32)))
            assert reader.reads == reads0
        assert pin_totals(env) == {}
    finally:
        await env.close()
        await aiodbenv.Env.remove(home, force=True)


def test_a_reader_whose_loop_is_gone_is_closed_when_collected(
    data: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uring, "CLOSE_WAIT", 0.1)
    before = _rings()
    r, w = os.pipe()
    try:

        async def start() -> None:
            reader = uring.UringReader()
            reader.submit_call(r, memoryview(bytearray(8)), 0, lambda res: None)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(start())
        loop.close()  # the read still in flight, nobody to reap it
        gc.collect()
        assert _rings() == before
    finally:
        os.close(r)
        os.close(w)


async def test_a_forked_child_never_uses_the_parents_ring(data: str) -> None:
    reader = uring.UringReader()
    fd = os.open(data, os.O_RDONLY)
    try:
        buf = bytearray(PS)
        assert await reader.read(fd, memoryview(buf), PS) == PS
        pid = os.fork()
        if pid == 0:  # the child: its copy is closed; using it refuses
            code = 0
            try:
                if reader._ring.r is not None or _is_ring(reader._fd):
                    code = 3
                try:
                    reader.submit_call(fd, memoryview(buf), 0, lambda res: None)
                    code = 4
                except RuntimeError:
                    pass
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert await reader.read(fd, memoryview(buf), 9 * PS) == PS  # the parent's goes on
        assert bytes(buf) == page_bytes(9)
    finally:
        reader.close()
        os.close(fd)


async def test_reads_go_through_the_io_seam_while_a_fault_is_armed(data: str) -> None:
    reader = uring.UringReader()
    fd = os.open(data, os.O_RDONLY)
    try:
        buf = bytearray(PS)
        with _io.inject("pread", errno.EIO, times=1) as fault:
            with pytest.raises(OSError):
                await reader.read(fd, memoryview(buf), 0)
            assert await reader.read(fd, memoryview(buf), 3 * PS) == PS
        assert fault.fired == 1 and reader.reads == 0 and reader.threads >= 1
        assert bytes(buf) == page_bytes(3)
    finally:
        reader.close()
        os.close(fd)


async def _cold(env: aiodbenv.Env, home: str, f: aiodbenv.PoolFile) -> None:
    """Fill the cache with other pages and drop the file from the OS page cache."""
    for p in range(FRAMES, 2 * FRAMES):
        async with f.get(p):
            pass
    _drop_from_os_cache(os.path.join(home, "m.db"), 16)


async def test_a_pool_reads_pages_through_it_and_a_failed_read_frees_the_frame(
    env: aiodbenv.Env,
    home: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIODBENV_READER", "uring")
    pool = env.pool
    async with pool.open_file("m.db", page_size=PS) as f:
        # Every miss goes to the reader. A miss's RWF_NOWAIT attempt starts its page's read
        # itself; a miss that yields and tries again then finds the page in the OS cache, with
        # no read through the ring, and on a loaded machine every one of them did (CI, twice,
        # even over five cold rounds).
        assert f._fd is not None
        pool._io.no_nowait.add(f._fd)
        await _cold(env, home, f)
        reader = pool._io.reader
        assert isinstance(reader, uring.UringReader)
        for p in range(16):
            async with f.get(p) as page:
                assert bytes(page.data) == page_bytes(p)
        assert reader.reads >= 1
        await _cold(env, home, f)
        failed = 0
        for p in range(16):
            speedups.aiodb_reader_test_result(reader._ring.r, -errno.EIO)
            try:
                async with f.get(p):
                    pass
            except OSError as err:
                assert err.errno == errno.EIO
                failed += 1
        speedups.aiodb_reader_test_result(reader._ring.r, 0)
        assert failed >= 1  # (pages readahead brought back are read without the ring)
        # Nothing held, every frame usable, every page right.
        held = [await f.pin(p) for p in range(PAGES - FRAMES, PAGES)]
        for page in held:
            await f.unpin(page)
        for p in range(16):
            async with f.get(p) as page:
                assert bytes(page.data) == page_bytes(p)
    assert pin_totals(env) == {}


async def test_a_miss_cancelled_with_its_read_in_flight(
    env: aiodbenv.Env,
    home: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller goes; the read lands in the frame it pinned, the page is published, the
    caller's pin dropped; the page is right for the next reader."""
    monkeypatch.setenv("AIODBENV_READER", "uring")
    # A read the kernel finished inside its submit would be handed over before the caller
    # could be cancelled: hold completions until the loop reaps them.
    monkeypatch.setattr(uring.UringReader, "reap_on_submit", False)
    pool = env.pool
    async with pool.open_file("m.db", page_size=PS) as f:
        cancelled = 0
        for round_ in range(5):
            await _cold(env, home, f)
            reader = pool._io.reader
            assert isinstance(reader, uring.UringReader)

            async def get(p: int) -> None:
                async with f.get(p):
                    pass

            t = asyncio.ensure_future(get(3 + round_))
            for _ in range(50):
                await asyncio.sleep(0)
                if reader._running or t.done():
                    break
            if reader._running:  # in flight now: cancel it there
                t.cancel()
                cancelled += 1
            try:
                await t
            except asyncio.CancelledError:
                pass
            deadline = time.monotonic() + 5
            while reader._running and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert reader._running == 0
            async with f.get(3 + round_) as page:
                assert bytes(page.data) == page_bytes(3 + round_)
            if cancelled >= 2:
                break
        assert cancelled >= 1
    assert pin_totals(env) == {}
