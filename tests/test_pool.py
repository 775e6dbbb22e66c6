"""The buffer pool: files, page access flags and errors, replacement, sync, trickle, stats."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any

import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.errors import (
    CacheFull,
    Incomplete,
    InvalidArgument,
    NoSpace,
    NotFound,
    PageNotFound,
    PermissionDenied,
)

PS = 4096


def fill(n: int, page_size: int = PS) -> bytes:
    """n pages, page i starting with b'page i' and padded with its number's last byte."""
    return b"".join(f"page {i}".encode().ljust(page_size, bytes([i % 251])) for i in range(n))


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
async def small_env(home: str):  # type: ignore[no-untyped-def]
    """A file-backed environment with a 16-page (64 KiB) cache."""
    env = await aiodbenv.Env.open(home, create=True, cache_size=64 * 1024)
    yield env
    await env.close()
    await aiodbenv.Env.remove(home, force=True)  # dirty pages may be left: discard them


async def test_get_reads_existing_pages(small_env: aiodbenv.Env) -> None:
    path = small_env.resolve("a.db")
    write_file(path, fill(8))
    async with small_env.pool.open_file("a.db") as f:
        assert f.pages == 8 and f.page_size == PS
        for i in (0, 7, 3):
            async with f.get(i) as page:
                assert bytes(page.data[: len(f"page {i}")]) == f"page {i}".encode()
                assert page.pgno == i
        st = f.stat()
        assert (st.cache_miss, st.cache_hit, st.page_in) == (3, 0, 3)
        async with f.get(3):
            pass
        assert f.stat().cache_hit == 1


async def test_missing_page_without_create(small_env: aiodbenv.Env) -> None:
    write_file(small_env.resolve("a.db"), fill(2))
    async with small_env.pool.open_file("a.db") as f:
        with pytest.raises(PageNotFound):
            await f.get(2)
        with pytest.raises(InvalidArgument):
            f.get(-1)


async def test_create_new_last_are_zero_filled_and_dirty(small_env: aiodbenv.Env) -> None:
    async with small_env.pool.open_file("n.db", create=True) as f:
        assert f.pages == 0
        with pytest.raises(PageNotFound):
            async with f.last():
                pass
        async with f.get(5, create=True) as p:
            assert bytes(p.data) == bytes(PS)
        assert f.pages == 6
        async with f.new() as p:
            assert p.pgno == 6 and bytes(p.data) == bytes(PS)
        async with f.last() as p:
            assert p.pgno == 6
        st = small_env.pool.stat()
        assert st.page_create == 2 and st.page_dirty == 2
        await f.sync()
        assert os.path.getsize(small_env.resolve("n.db")) == 7 * PS


async def test_new_never_gives_two_callers_the_same_page(small_env: aiodbenv.Env) -> None:
    async with small_env.pool.open_file("n.db", create=True) as f:

        async def one() -> int:
            async with f.new() as p:
                await asyncio.sleep(0)
                return p.pgno

        got = await asyncio.gather(*(one() for _ in range(40)))
        assert sorted(got) == list(range(40))


async def test_changes_are_written_and_read_back(small_env: aiodbenv.Env) -> None:
    write_file(small_env.resolve("a.db"), fill(40))
    async with small_env.pool.open_file("a.db") as f:
        for i in range(40):  # more pages than the cache holds: evictions write them
            async with f.get(i) as p:
                p.data[0:6] = f"NEW{i:03d}".encode()[:6]
                p.mark_dirty()
        st = small_env.pool.stat()
        assert st.rw_evict > 0 and st.page_out > 0
        await small_env.pool.sync()
        for i in range(40):
            async with f.get(i) as p:
                assert bytes(p.data[:6]) == f"NEW{i:03d}".encode()[:6]
    with open(small_env.resolve("a.db"), "rb") as raw:
        data = raw.read()
    for i in range(40):
        assert data[i * PS : i * PS + 6] == f"NEW{i:03d}".encode()[:6]


async def test_unpin_flags_and_errors(small_env: aiodbenv.Env) -> None:
    write_file(small_env.resolve("a.db"), fill(4))
    async with small_env.pool.open_file("a.db") as f:
        page = await f.get(1)
        with pytest.raises(InvalidArgument, match="exclude"):
            await f.unpin(page, dirty=True, clean=True)
        await f.unpin(page, dirty=True)
        with pytest.raises(InvalidArgument, match="more unpins than pins"):
            await f.unpin(page)
        with pytest.raises(ValueError):
            bytes(page.data)  # the view is released at unpin
        assert small_env.pool.stat().page_dirty == 1
        page = await f.get(1)
        f.set(page, clean=True)
        assert small_env.pool.stat().page_dirty == 0
        f.set(page, dirty=True)
        assert small_env.pool.stat().page_dirty == 1
        with pytest.raises(InvalidArgument):
            f.set(page)
        await f.unpin(page, clean=True)
        assert small_env.pool.stat().page_dirty == 0
    async with small_env.pool.open_file("a.db", readonly=True, nommap=True) as ro:
        page = await ro.get(0)
        with pytest.raises(PermissionDenied):
            await ro.unpin(page, dirty=True)
        assert not page.pinned  # refused, but unpinned all the same
        with pytest.raises(InvalidArgument):
            await ro.pin(new=True)


async def test_pin_many_times(small_env: aiodbenv.Env) -> None:
    write_file(small_env.resolve("a.db"), fill(2))
    async with small_env.pool.open_file("a.db") as f:
        pages = [await f.get(0) for _ in range(5)]
        assert len({id(p) for p in pages}) == 5
        for p in pages:
            await f.unpin(p)


async def test_discard_goes_first(small_env: aiodbenv.Env) -> None:
    write_file(small_env.resolve("a.db"), fill(32))
    async with small_env.pool.open_file("a.db") as f:
        for i in range(16):
            async with f.get(i) as p:
                if i == 3:
                    p.discard()
        async with f.get(20):  # needs a frame: page 3 must be the victim
            pass
        async with f.get(3):
            pass
        assert f.stat().cache_miss == 18  # 16 first reads, page 20, page 3 again


async def test_full_of_pinned_pages_waits_or_fails_fast(small_env: aiodbenv.Env) -> None:
    write_file(small_env.resolve("a.db"), fill(32))
    pool = small_env.pool
    async with pool.open_file("a.db") as f:
        pinned = [await f.get(i) for i in range(16)]
        pool.fail_fast = True
        with pytest.raises(CacheFull) as err:
            await f.get(20)
        assert err.value.errno == errno.ENOMEM
        pool.fail_fast = False
        waiter = asyncio.ensure_future(f.pin(20))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await f.unpin(pinned.pop())
        page = await asyncio.wait_for(waiter, 5)
        assert bytes(page.data[:7]) == b"page 20"
        pool.wait_timeout = 0.1
        with pytest.raises(CacheFull, match="stayed pinned"):
            await f.get(21)
        await f.unpin(page)
        for p in pinned:
            await f.unpin(p)


async def test_hundred_coroutines_missing_one_page_read_it_once(small_env: aiodbenv.Env) -> None:
    write_file(small_env.resolve("a.db"), fill(4))
    async with small_env.pool.open_file("a.db") as f:
        with _io.inject("pread", None, delay=0.05, times=1000) as slow:

            async def reader() -> bytes:
                async with f.get(2) as p:
                    return bytes(p.data[:6])

            got = await asyncio.gather(*(reader() for _ in range(100)))
        assert set(got) == {b"page 2"}
        st = f.stat()
        assert st.page_in == 1 and st.cache_miss == 1 and st.cache_hit == 99
        assert slow.calls <= 2  # one RWF_NOWAIT attempt, at most one thread read


async def test_max_pages_and_nofile(small_env: aiodbenv.Env) -> None:
    pool = small_env.pool
    async with pool.open_file("mem", nofile=True, max_pages=3) as f:
        for i in range(3):
            async with f.new() as p:
                p.data[0] = i + 1
        with pytest.raises(NoSpace):
            await f.pin(new=True)
        with pytest.raises(NoSpace):
            await f.get(3, create=True)
        await pool.sync()  # nofile pages are never written
        async with f.get(1) as p:
            assert p.data[0] == 2
    assert not os.path.exists(small_env.resolve("mem"))


async def test_temporary_file_backs_itself_only_on_eviction(small_env: aiodbenv.Env) -> None:
    pool = small_env.pool
    f = await pool.open_file(None)
    assert f.temp and f.name is None
    for i in range(8):
        async with f.new() as p:
            p.data[0:2] = i.to_bytes(2, "little")
    assert f._fd is None  # no dirty page had to leave the cache yet
    for i in range(8, 40):  # overflow the 16-page cache: evictions need the backing file
        async with f.new() as p:
            p.data[0:2] = i.to_bytes(2, "little")
    assert f._fd is not None
    for i in range(40):
        async with f.get(i) as p:
            assert int.from_bytes(p.data[0:2], "little") == i
    await f.close()
    assert pool.stat().pages == 0 or all(not s.temp for s in pool.stat().files)


async def test_pgin_pgout_with_cookie(small_env: aiodbenv.Env) -> None:
    seen: list[tuple[str, int, bytes]] = []

    def pgin(pgno: int, page: memoryview, cookie: bytes) -> None:
        seen.append(("in", pgno, cookie))
        page[:] = bytes(b ^ 0x5A for b in page)

    def pgout(pgno: int, page: memoryview, cookie: bytes) -> None:
        seen.append(("out", pgno, cookie))
        page[:] = bytes(b ^ 0x5A for b in page)

    pool = small_env.pool
    pool.register(7, pgin, pgout)
    with pytest.raises(InvalidArgument):
        pool.register(0, pgin, pgout)
    async with pool.open_file("x.db", create=True, ftype=7, pgcookie=b"key") as f:
        async with f.get(0, create=True) as p:
            p.data[0:5] = b"plain"
            p.mark_dirty()
        await f.sync()
        with open(small_env.resolve("x.db"), "rb") as raw:
            disk = raw.read(5)
        assert disk == bytes(b ^ 0x5A for b in b"plain")  # stored transformed
        assert ("out", 0, b"key") in seen and ("in", 0, b"key") in seen  # pgin on create
    async with pool.open_file("x.db", ftype=7, pgcookie=b"key") as f:
        async with f.get(0) as p:
            assert bytes(p.data[:5]) == b"plain"  # stale cache or read back: plain either way


async def test_two_opens_share_one_pool_file(small_env: aiodbenv.Env, home: str) -> None:
    write_file(small_env.resolve("a.db"), fill(4))
    os.link(small_env.resolve("a.db"), small_env.resolve("b.db"))
    pool = small_env.pool
    f1 = await pool.open_file("a.db")
    f2 = await pool.open_file("b.db")
    assert f1.fileid == f2.fileid
    async with f1.get(1) as p:
        p.data[0:4] = b"SAME"
        p.mark_dirty()
    async with f2.get(1) as p:
        assert bytes(p.data[:4]) == b"SAME"
    assert len(pool.stat().files) == 1 and pool.stat().files[0].open_handles == 2
    await f1.close()
    await f2.close()


async def test_reopen_with_other_page_size_or_lsn_offset(small_env: aiodbenv.Env) -> None:
    write_file(small_env.resolve("a.db"), fill(4))
    pool = small_env.pool
    async with pool.open_file("a.db"):
        with pytest.raises(InvalidArgument, match="page size"):
            await pool.open_file("a.db", page_size=1024)
        with pytest.raises(InvalidArgument, match="lsn_offset"):
            await pool.open_file("a.db", lsn_offset=0)


async def test_open_file_errors(small_env: aiodbenv.Env) -> None:
    pool = small_env.pool
    with pytest.raises(NotFound):
        await pool.open_file("missing.db")
    write_file(small_env.resolve("odd.db"), b"x" * 5000)
    with pytest.raises(InvalidArgument, match="whole number"):
        await pool.open_file("odd.db")
    for bad in (1000, 0, 131072):
        with pytest.raises(InvalidArgument):
            await pool.open_file("n.db", create=True, page_size=bad)
    with pytest.raises(InvalidArgument):
        await pool.open_file(None, readonly=True)
    assert not os.path.exists(small_env.resolve("n.db"))


async def test_sync_reports_pinned_dirty_pages_as_incomplete(small_env: aiodbenv.Env) -> None:
    async with small_env.pool.open_file("a.db", create=True) as f:
        async with f.get(0, create=True):
            pass
        pinned = await f.get(1, create=True)
        await f.unpin(pinned, dirty=True)
        pinned = await f.get(1)
        with pytest.raises(Incomplete) as err:
            await small_env.pool.sync()
        assert err.value.result.written == 1 and err.value.result.incomplete == 1  # type: ignore[attr-defined]
        await f.unpin(pinned)
        result = await small_env.pool.sync()
        assert result.written == 1 and result.incomplete == 0
        with pytest.raises(InvalidArgument, match="needs a log"):
            await small_env.pool.sync(lsn=(1, 0))


async def test_failed_write_leaves_page_dirty(small_env: aiodbenv.Env) -> None:
    async with small_env.pool.open_file("a.db", create=True) as f:
        async with f.get(0, create=True) as p:
            p.data[0:3] = b"abc"
        with _io.inject("pwrite", errno.ENOSPC):
            with pytest.raises(NoSpace):
                await small_env.pool.sync()
        st = small_env.pool.stat()
        assert st.page_dirty == 1 and st.write_failures == 1
        await small_env.pool.sync()
        assert small_env.pool.stat().page_dirty == 0
        with open(small_env.resolve("a.db"), "rb") as raw:
            assert raw.read(3) == b"abc"


async def test_trickle(small_env: aiodbenv.Env) -> None:
    pool = small_env.pool
    with pytest.raises(InvalidArgument):
        await pool.trickle(0)
    with pytest.raises(InvalidArgument):
        await pool.trickle(101)
    async with pool.open_file("a.db", create=True) as f:
        for i in range(16):
            async with f.get(i, create=True):
                pass
        assert pool.stat().page_dirty == 16
        wrote = await pool.trickle(50)
        assert wrote == 8
        st = pool.stat()
        assert st.page_clean == 8 and st.page_trickle == 8
        assert await pool.trickle(50) == 0


async def test_read_only_file_is_mapped(home: str) -> None:
    """Berkeley DB's memp004: read-only files under mmap_size are served from a map."""
    async with aiodbenv.Env.open(home, create=True) as env:
        write_file(env.resolve("ro.db"), fill(20))
        async with env.pool.open_file("ro.db", readonly=True) as f:
            assert f.mapped
            for i in range(20):
                async with f.get(i) as p:
                    label = f"page {i}".encode()
                    assert bytes(p.data[: len(label)]) == label
                    with pytest.raises(TypeError):
                        p.data[0] = 1  # a read-only view
            assert f.stat().map == 20 and f.stat().cache_miss == 0
        async with env.pool.open_file("ro.db", readonly=True, nommap=True) as f:
            assert not f.mapped
        env.pool.register(3, lambda *a: None, None)
        async with env.pool.open_file("ro.db", readonly=True, ftype=3) as f:
            assert not f.mapped
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, mmap_size=4096) as env:  # file too big
        async with env.pool.open_file("ro.db", readonly=True) as f:
            assert not f.mapped
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, nommap=True) as env:
        async with env.pool.open_file("ro.db", readonly=True) as f:
            assert not f.mapped
    await aiodbenv.Env.remove(home)
    os.remove(os.path.join(home, "ro.db"))


async def test_env_and_file_page_sizes(home: str) -> None:
    """Berkeley DB's memp005: the file's page size does not change the environment's."""
    async with aiodbenv.Env.open(home, create=True, page_size=1024) as env:
        assert env.pool.page_size == 1024 and env.pool.stat().page_size == 1024
        async with env.pool.open_file("a.db", create=True, page_size=2048) as f:
            assert f.page_size == 2048
            async with f.new():
                pass
            assert env.pool.stat().files[0].page_size == 2048
        assert env.pool.page_size == 1024
    await aiodbenv.Env.remove(home, force=True)  # the new page is dirty: discard it
    os.remove(os.path.join(home, "a.db"))


@pytest.mark.parametrize("kind", ["file", "system", "private"])
async def test_private_and_shared_kinds_serve_pages(home: str, shm_key: int, kind: str) -> None:
    async with aiodbenv.Env.open(
        home, create=True, region=kind, shm_key=shm_key if kind == "system" else None
    ) as env:
        async with env.pool.open_file("k.db", create=True) as f:
            for i in range(100):
                async with f.get(i, create=True) as p:
                    p.data[0] = i
            for i in range(100):
                async with f.get(i) as p:
                    assert p.data[0] == i
            # The created pages still cached may be dirty (how many, the background batches'
            # timing decides): write them, remove refuses to discard them.
            await env.pool.sync()
    await aiodbenv.Env.remove(home)
    os.remove(os.path.join(home, "k.db"))


@pytest.mark.parametrize("kind", ["file", "system", "private"])
async def test_a_view_kept_past_unpin_does_not_break_close(
    home: str, kind: str, shm_key: int, caplog: pytest.LogCaptureFixture
) -> None:
    extra: dict[str, Any] = {"shm_key": shm_key} if kind == "system" else {}
    env = await aiodbenv.Env.open(home, create=True, region=kind, **extra)
    f = await env.pool.open_file("v.db", create=True)
    async with f.get(0, create=True) as page:
        page.data[0:16] = b"still mapped\0\0\0\0"
        kept = page.data[0:16]  # a slice outlives the pin: a caller's bug, not a crash
    await env.close()
    # The memory stays mapped (System V: attached) while the view lives, and the log says
    # so; sysv_ipc alone would detach it and this read would crash.
    assert bytes(kept) == b"still mapped\0\0\0\0"
    assert "outlived the region" in caplog.text
    del kept
    await aiodbenv.Env.remove(home, force=True)  # the created page is dirty: discard it
    os.remove(os.path.join(home, "v.db"))


async def test_large_page_only_partly_in_the_os_cache_is_read_whole(home: str) -> None:
    """RWF_NOWAIT stops short where the OS cache stops; that is not the end of the file. The
    seam makes the first read (the RWF_NOWAIT one) report half the page."""
    big = 65536
    data = bytes(range(256)) * (big // 256)
    write_file(os.path.join(home, "big.db"), data)
    async with aiodbenv.Env.open(home, create=True) as env:
        async with env.pool.open_file("big.db", page_size=big, nommap=True) as f:
            with _io.inject("pread", None, short=True, times=1) as partial:
                async with f.get(0) as p:
                    assert bytes(p.data) == data  # not zero-filled past the cached part
            assert partial.fired == 1 and partial.calls == 2  # then read whole in a thread
            assert f.stat().page_in == 1 and f.stat().page_create == 0
    await aiodbenv.Env.remove(home)
    os.remove(os.path.join(home, "big.db"))


async def test_stat_shows_pinned_pages_and_the_oldest_pins_age(small_env: aiodbenv.Env) -> None:
    """Pinned pages now, globally and per file, and the age of the oldest pin: stamped when
    a buffer's pin count goes from 0 to 1, by a miss (the read path) and by a hit (the
    compiled or the Python hit path, whichever this run uses)."""
    write_file(small_env.resolve("a.db"), fill(4))
    write_file(small_env.resolve("b.db"), fill(4))
    pool = small_env.pool
    async with pool.open_file("a.db") as a, pool.open_file("b.db") as b:
        assert (pool.stat().page_pinned, pool.stat().oldest_pin_age) == (0, None)
        old = await a.pin(1)  # a miss
        async with a.get(2):
            pass
        await asyncio.sleep(0.2)
        async with a.get(2) as hit, a.get(2):  # a hit, pinned twice: one pinned page
            assert hit.pinned
            st = pool.stat()
            assert st.page_pinned == 2
            assert st.oldest_pin_age is not None and 0.15 <= st.oldest_pin_age < 60
            fa, fb = sorted(st.files, key=lambda f: f.file_name or "")
            assert (fa.pinned, fb.pinned) == (2, 0)
            assert fa.oldest_pin_age == st.oldest_pin_age and fb.oldest_pin_age is None
        await a.unpin(old)
        async with b.get(3):  # a fresh pin is young again
            st = pool.stat()
            assert st.page_pinned == 1 and st.oldest_pin_age is not None
            assert st.oldest_pin_age < 0.15
            assert b.stat().pinned == 1 and a.stat().pinned == 0
        assert pool.stat().page_pinned == 0


async def test_page_past_a_truncation_is_not_found(env: aiodbenv.Env, home: str) -> None:
    """The file shrank behind the pool's back: a page it had when the pool opened it is not
    read back as zeros; ``get`` raises PageNotFound, ``get(create=True)`` makes it again."""
    path = os.path.join(home, "data.db")
    with open(path, "wb") as fh:
        for i in range(8):
            fh.write(bytes([i + 1]) * 4096)
    f = await env.pool.open_file(path)
    async with f.get(2) as page:
        assert page.data[0] == 3
    os.truncate(path, 3 * 4096 + 100)  # pages 3..7 gone, page 3 torn
    for pgno in (3, 5, 7):
        with pytest.raises(aiodbenv.PageNotFound, match="truncated"):
            await f.get(pgno)
    async with f.get(2) as page:  # cached, and on disk: unaffected
        assert page.data[0] == 3
    async with f.get(6, create=True) as page:
        assert bytes(page.data) == bytes(4096)
    await env.pool.sync()  # the page made again is dirty: leave nothing for remove to refuse
    await f.close()


# -- flags and pins the caller got wrong -------------------------------------------------


async def test_flags_on_a_page_already_unpinned_are_refused(home: str) -> None:
    """A flag set after the unpin would apply to nothing: the change would silently never be
    written. Refused, after an ``async with`` and after an explicit unpin."""
    async with aiodbenv.Env.open(home, create=True) as env:
        async with env.pool.open_file("f.db", create=True) as f:
            async with f.get(0, create=True) as page:
                page.data[0:5] = b"hello"
            for mark in (page.mark_dirty, page.mark_clean, page.discard):
                with pytest.raises(InvalidArgument, match="page 0 is not pinned"):
                    mark()
            page = await f.get(0)
            await f.unpin(page)
            with pytest.raises(InvalidArgument, match=r"mark_dirty\(\) applies at its unpin"):
                page.mark_dirty()
            assert env.pool.stat().page_pinned == 0
            # Marked while pinned, it is written.
            async with f.get(0) as page:
                page.mark_dirty()
            assert (await env.pool.sync()).written == 1
    await aiodbenv.Env.remove(home)


async def test_a_dirty_mark_on_a_read_only_file_is_refused_and_the_pin_still_goes(
    home: str,
) -> None:
    """The unpin refuses the mark but releases the pin: kept, it held its frame for good and
    made every close of the file, and of the environment, fail again."""
    os.makedirs(home, exist_ok=True)
    write_file(os.path.join(home, "ro.db"), fill(2))
    async with aiodbenv.Env.open(home, create=True) as env:
        for nommap in (False, True):
            f = await env.pool.open_file("ro.db", readonly=True, nommap=nommap)
            with pytest.raises(PermissionDenied, match="unpinned without it"):
                async with f.get(1) as page:
                    page.mark_dirty()
            assert not page.pinned
            assert f.stat().pinned == 0 and env.pool.stat().page_pinned == 0
            page = await f.get(0)
            page.mark_dirty()
            with pytest.raises(PermissionDenied):
                await f.unpin(page)
            assert not page.pinned and env.pool.stat().page_pinned == 0
            # A page left pinned with the mark: the close unpins it without the mark.
            page = await f.get(1)
            page.mark_dirty()
            with pytest.warns(ResourceWarning, match="1 pin"):
                await f.close()
            assert f.closed and env.pool.stat().page_pinned == 0
            assert env.pool.stat().page_dirty == 0
    await aiodbenv.Env.remove(home)


async def test_a_private_environment_writes_a_page_left_pinned_dirty_at_close(
    home: str,
) -> None:
    """Closing unpins a page the caller left pinned, with the flags set on it, before a
    private cache's final writes: the region goes with the handle, so a dirty page the writes
    missed was lost (the close reported a sync it said to retry, which no one could)."""
    env = await aiodbenv.Env.open(home, create=True, region="private")
    f = await env.pool.open_file("d.db", create=True)
    async with f.get(1, create=True) as page:
        page.data[0:5] = b"world"
        page.mark_dirty()
    page = await f.get(0, create=True)
    page.data[0:5] = b"hello"
    page.mark_dirty()
    with pytest.warns(ResourceWarning, match="page\\(s\\) 0"):
        await env.close()
    with open(os.path.join(home, "d.db"), "rb") as fh:
        data = fh.read()
    assert data[:5] == b"hello" and data[PS : PS + 5] == b"world"


async def test_a_read_only_handle_gets_read_only_views_of_the_cache(home: str) -> None:
    """A read-only handle's pages come from the shared cache once the file is not mapped (a
    writer had it open, or nommap): their views are read-only too, or a write through one
    would change the page for every process, unmarked."""
    async with aiodbenv.Env.open(home, create=True) as env:
        w = await env.pool.open_file("d.db", create=True)
        async with w.get(0, create=True) as page:
            page.data[0:5] = b"clean"
            page.mark_dirty()
        await w.sync()
        await w.close()
        for nommap in (False, True):
            async with env.pool.open_file("d.db", readonly=True, nommap=nommap) as ro:
                assert not ro.mapped
                async with ro.get(0) as page:
                    assert page.data.readonly
                    with pytest.raises(TypeError):
                        page.data[0:5] = b"EVIL!"
                    assert bytes(page.data[0:5]) == b"clean"
                page = await ro.get(0)  # the await form, and a second pin of the page
                assert page.data.readonly
                await ro.unpin(page)
        async with env.pool.open_file("d.db") as rw, rw.get(0) as page:
            assert not page.data.readonly  # a writer's view stays writable
    await aiodbenv.Env.remove(home)


async def test_no_file_opens_once_the_close_has_begun_closing_files(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file opened after the close closed the files, before its final writes, was accepted,
    and a page written to it was lost with a private region. Opens are refused from then on."""
    env = await aiodbenv.Env.open(home, create=True, region="private")
    f = await env.pool.open_file("a.db", create=True)
    async with f.get(0, create=True) as page:
        page.data[0:1] = b"a"
        page.mark_dirty()
    real_sync = env.pool.sync
    raced: list[BaseException] = []

    async def sync_after_a_racer(*args: Any, **kwargs: Any) -> Any:
        try:
            g = await env.pool.open_file("b.db", create=True)
            async with g.get(0, create=True) as p:  # pragma: no cover - the bug
                p.data[0:1] = b"b"
                p.mark_dirty()
        except InvalidArgument as err:
            raced.append(err)
        return await real_sync(*args, **kwargs)

    monkeypatch.setattr(env.pool, "sync", sync_after_a_racer)
    await env.close()
    assert [str(e) for e in raced] == ["the environment is closing"]
    with open(os.path.join(home, "a.db"), "rb") as fh:
        assert fh.read(1) == b"a"


async def test_a_cancelled_close_leaves_its_error_to_the_next_close(home: str) -> None:
    """The close goes on after its caller is cancelled; if it fails, the next close raises the
    error (it returned None, and the failure was never seen), and a close after that does
    nothing."""
    env = await aiodbenv.Env.open(home, create=True)
    await aiodbenv.Env.remove(home, force=True)  # panics the handle: its close raises
    task = asyncio.create_task(env.close())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The close ends in the background meanwhile (a few ms). Had it not, the next close
    # would wait for it and raise all the same.
    await asyncio.sleep(0.5)
    with pytest.raises(aiodbenv.RunRecovery):
        await env.close()
    await env.close()
    assert env.closed


async def test_a_close_waiting_for_a_blocked_open_says_so(
    home: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The close lets the opens under way end before closing the files; one that does not end
    (here a FIFO, whose open blocks until a writer comes) is waited for, as it was before,
    but no longer silently."""
    from aiodbenv.mpool import handle as handle_module

    monkeypatch.setattr(handle_module, "SAY_EVERY", 0.05, raising=False)
    env = await aiodbenv.Env.open(home, create=True)
    fifo = os.path.join(home, "p.db")
    os.mkfifo(fifo)

    async def open_it() -> Any:
        return await env.pool.open_file("p.db", readonly=True)

    opener = asyncio.create_task(open_it())
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(env.close())
    try:
        with caplog.at_level(logging.WARNING, logger="aiodbenv"):
            await asyncio.sleep(0.3)
            assert not closing.done()
        assert "waits for 1 file open(s) under way" in caplog.text
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the open ends now
        await asyncio.wait_for(closing, 10)
        with pytest.raises(aiodbenv.AiodbenvError):
            await opener  # not a regular file
        os.unlink(fifo)
    await aiodbenv.Env.remove(home)
