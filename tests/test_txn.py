"""Transactions in one process: commit, abort, exceptions, own reads, the log record, limits,
task ownership, the order rule against deadlocks, and cancellation at every await."""

from __future__ import annotations

import asyncio
import ctypes
import os
import pickle
import random
import struct
from collections.abc import AsyncIterator

import pytest

import aiodbenv
from aiodbenv import LSN, Deadlock, InvalidArgument, TxnTooLarge, _io
from aiodbenv.mpool.layout import BH
from aiodbenv.txn import batch
from aiodbenv.txn.txn import MAX_PAGES

PS = 4096
LSN_OFF = 0  # the page LSN at the start of each page, as Berkeley DB does


@pytest.fixture(params=["file", "private"])
async def tenv(home: str, request: pytest.FixtureRequest) -> AsyncIterator[aiodbenv.Env]:
    region = "private" if request.param == "private" else "file"
    e = await aiodbenv.Env.open(home, create=True, log=True, region=region)
    yield e
    await e.close()
    await aiodbenv.Env.remove(home, force=True)  # dirty pages of the test files: dropped


async def open_data(env: aiodbenv.Env, name: str = "data.db") -> aiodbenv.PoolFile:
    return await env.pool.open_file(env.resolve(name), create=True, page_size=PS, lsn_offset=0)


def latch_of(page: aiodbenv.Page) -> int:
    cache = page._cache
    assert cache is not None
    return int(cache.words[(page._bh >> 3) + BH.word.latch])


async def read(f: aiodbenv.PoolFile, pgno: int) -> bytes:
    async with f.get(pgno) as p:
        return bytes(p.data)


async def test_commit_changes_pages_logs_one_record_and_stamps_lsn(
    tenv: aiodbenv.Env,
) -> None:
    f = await open_data(tenv)
    end0 = tenv.log.end_lsn
    async with tenv.txn() as tx:
        a = await tx.page(f, 0, create=True)
        b = await tx.page(f, 3, create=True)
        a.data[100:105] = b"hello"
        b.data[200:205] = b"world"
        # Nothing in shared memory yet.
        assert (await read(f, 0))[100:105] == bytes(5)
        # The transaction sees its own changes: taking the page again gives the same copy.
        assert (await tx.page(f, 0)).data[100:105] == b"hello"
    info = tx.result
    assert info is not None and info.durability == "sync" and info.pages == 2
    assert info.lsn == end0
    assert tenv.log.flushed_lsn > info.lsn  # sync: durable when commit returned
    p0, p3 = await read(f, 0), await read(f, 3)
    assert p0[100:105] == b"hello" and p3[200:205] == b"world"
    assert LSN.unpack(p0, LSN_OFF) == info.lsn == LSN.unpack(p3, LSN_OFF)
    records = [d async for lsn, d in tenv.log.cursor(end0)]
    assert len(records) == 1 and batch.is_batch(records[0])
    files, pages = batch.decode(records[0])
    assert [fl.path for fl in files] == ["data.db"]  # relative to the home
    assert sorted(p.pgno for p in pages) == [0, 3]
    assert all(p.full is not None for p in pages)  # first change of each page: full images
    # A second change of page 0 logs a fragment, not the page.
    async with tenv.txn() as tx:
        (await tx.page(f, 0)).data[300:301] = b"!"
    async with tenv.log.cursor() as c:
        last = await c.last()
    assert last is not None
    _, pages = batch.decode(last[1])
    assert pages[0].full is None and len(pages[0].frags) == 1
    off, data = pages[0].frags[0]
    assert off <= 300 < off + len(data) and len(data) <= batch.FRAG_CHUNK
    st = tenv.txn_stat()
    assert st.commits_sync == 2 and st.pages_logged == 3 and st.full_images == 2
    await f.close()


async def test_abort_and_exception_change_nothing(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    async with tenv.txn() as tx:
        (await tx.page(f, 0, create=True)).data[10:12] = b"ok"
    before = await read(f, 0)
    end = tenv.log.end_lsn
    tx = await tenv.txn()
    (await tx.page(f, 0)).data[10:12] = b"no"
    await tx.abort()
    with pytest.raises(RuntimeError):
        async with tenv.txn() as tx2:
            (await tx2.page(f, 0)).data[10:12] = b"NO"
            raise RuntimeError("boom")
    assert await read(f, 0) == before
    assert tenv.log.end_lsn == end  # nothing logged
    # Latches and pins are gone: a fresh transaction takes the page at once.
    async with tenv.txn(latch_timeout=0.5) as tx3:
        p = await tx3.page(f, 0)
        assert latch_of(p._page) != 0
    assert latch_of(p._page) == 0 or not p._page.pinned
    assert tenv.txn_stat().aborts == 2
    with pytest.raises(InvalidArgument):
        await tx.page(f, 0)  # ended
    await f.close()


async def test_unchanged_pages_commit_without_a_record(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    end = tenv.log.end_lsn
    async with tenv.txn() as tx:
        p = await tx.page(f, 0, create=True)
        p.data[LSN_OFF : LSN_OFF + 8] = b"\xff" * 8  # the library's bytes: ignored
    assert tx.result is not None and tx.result.lsn == LSN(0, 0) and tx.result.pages == 0
    assert tenv.log.end_lsn == end
    await f.close()


async def test_durabilities(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    for d in ("nosync", "write_nosync", "sync"):
        tx = await tenv.txn(durability=d)  # type: ignore[arg-type]
        (await tx.page(f, 0, create=True)).data[50] = 1 + len(d)
        info = await tx.commit()
        assert info.durability == d
        if d == "sync":
            assert tenv.log.flushed_lsn > info.lsn
    with pytest.raises(InvalidArgument):
        tenv.txn(durability="fast")  # type: ignore[arg-type]
    st = tenv.txn_stat()
    assert (st.commits_nosync, st.commits_write_nosync, st.commits_sync) == (1, 1, 1)
    await f.close()


async def test_needs_log_and_lsn_offset(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    with pytest.raises(InvalidArgument, match="log"):
        env.txn()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await env.pool.open_file(env.resolve("plain.db"), create=True, page_size=PS)
    async with env.txn() as tx:
        with pytest.raises(InvalidArgument, match="lsn_offset"):
            await tx.page(f, 0, create=True)
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)


async def test_limits(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    async with tenv.txn() as tx:
        for i in range(MAX_PAGES):
            await tx.page(f, i, create=True)
        with pytest.raises(TxnTooLarge):
            await tx.page(f, MAX_PAGES, create=True)
        (await tx.page(f, 0)).data[99] = 9  # still usable
    assert (await read(f, 0))[99] == 9
    await f.close()


async def test_record_size_limit(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True, log_file_size=64 * 1024)
    f = await open_data(env)
    async with env.txn() as tx:
        with pytest.raises(TxnTooLarge):
            for i in range(MAX_PAGES):
                await tx.page(f, i, create=True)
        assert 10 < len(tx._pages) < 16
        for tp in tx._pages.values():
            tp.data[:] = os.urandom(PS)  # the worst case fits in one record
    assert env.txn_stat().commits_sync == 1
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)


async def test_txn_belongs_to_its_task(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    tx = await tenv.txn()

    async def other() -> None:
        with pytest.raises(InvalidArgument, match="another task"):
            await tx.page(f, 0, create=True)
        with pytest.raises(InvalidArgument, match="another task"):
            await tx.commit()

    await asyncio.create_task(other())
    await tx.abort()
    await f.close()


async def test_latch_excludes_other_txn_and_latched_reader(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    order: list[str] = []
    tx = await tenv.txn()
    p = await tx.page(f, 0, create=True)
    p.data[8:16] = struct.pack("<Q", 1)

    async def second() -> None:
        async with tenv.txn() as t2:
            q = await t2.page(f, 0)  # waits for the first
            order.append("t2 got it")
            (n,) = struct.unpack_from("<Q", q.data, 8)
            q.data[8:16] = struct.pack("<Q", n + 1)

    async def reader() -> None:
        async with f.get(0, latch=True) as r:
            order.append(f"reader saw {struct.unpack_from('<Q', r.data, 8)[0]}")

    t2 = asyncio.create_task(second())
    rd = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    assert order == []  # both wait for the latch
    order.append("t1 commits")
    await tx.commit()
    await asyncio.gather(t2, rd)
    assert order[0] == "t1 commits"
    assert "reader saw 1" in order or "reader saw 2" in order  # never half a commit
    assert struct.unpack_from("<Q", await read(f, 0), 8)[0] == 2
    assert tenv.txn_stat().latch_waits >= 1
    await f.close()


async def test_explicit_latched_pin(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    async with tenv.txn() as tx:
        await tx.page(f, 0, create=True)
    page = await f.get(0, latch=True)
    assert latch_of(page) != 0
    await f.unpin(page)
    async with tenv.txn(latch_timeout=0.5) as tx:
        await tx.page(f, 0)  # free again
    await f.close()


async def test_order_rule_prevents_deadlock(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    async with tenv.txn() as tx:
        await tx.page(f, 1, create=True)
        await tx.page(f, 2, create=True)
    t1 = await tenv.txn()
    (await t1.page(f, 1)).data[100] = 1
    got2 = asyncio.Event()

    async def other() -> None:
        with pytest.raises(Deadlock):
            async with tenv.txn() as t2:
                (await t2.page(f, 2)).data[100] = 2
                got2.set()
                await asyncio.sleep(0.05)
                await t2.page(f, 1)  # held by t1, below 2: would wait in the wrong order

    task = asyncio.create_task(other())
    await got2.wait()
    (await t1.page(f, 2)).data[101] = 1  # waits for t2, which gives up
    await t1.commit()
    await task
    data = await read(f, 2)
    assert data[100] == 0 and data[101] == 1
    assert tenv.txn_stat().deadlocks == 1
    await f.close()


async def test_latch_timeout(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    t1 = await tenv.txn()
    await t1.page(f, 0, create=True)

    async def other() -> None:
        async with tenv.txn(latch_timeout=0.1) as t2:
            await t2.page(f, 0)

    with pytest.raises(aiodbenv.LockTimeout, match="latch"):
        await asyncio.create_task(other())
    await t1.abort()
    await f.close()


@pytest.mark.parametrize("where", ["page", "commit"])
async def test_cancellation_leaves_nothing_held(tenv: aiodbenv.Env, where: str) -> None:
    """Cancel at every await of a transaction in turn (by cancelling after k loop steps):
    afterwards no latch and no pin of it remains, and the page is either entirely committed
    or untouched."""
    f = await open_data(tenv)
    async with tenv.txn() as tx:
        for i in range(3):
            await tx.page(f, i, create=True)

    async def body(k: int) -> None:
        async with tenv.txn() as tx:
            for i in range(3):
                (await tx.page(f, i)).data[500:504] = struct.pack("<I", k)

    blocker = await tenv.txn()
    await blocker.page(f, 1)  # makes page 1 a real wait
    release_at = 3
    for k in range(1, 40):
        task = asyncio.create_task(body(k))
        for step in range(k):
            if step == release_at and blocker._state == 0:
                await blocker.abort()
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if blocker._state == 0:
            await blocker.abort()
        vals = {struct.unpack_from("<I", await read(f, i), 500)[0] for i in range(3)}
        assert len(vals) == 1  # all or nothing
        async with tenv.txn(latch_timeout=2) as tx:  # no latch left behind
            for i in range(3):
                await tx.page(f, i)
        for i in range(3):
            async with f.get(i) as p:
                c = p._cache
                assert c is not None
                assert int(c.words[(p._bh >> 3) + BH.word.ref]) == 1  # only this pin
        blocker = await tenv.txn()
        await blocker.page(f, 1)
        if where == "commit":
            release_at = 0
    await blocker.abort()
    await f.close()


def test_batch_roundtrip_and_diff() -> None:
    old = bytes(PS)
    new = bytearray(old)
    new[5] = 1
    new[130:200] = b"x" * 70
    assert batch.diff(old, new) == [(0, 64), (128, 256)]
    files = [batch.BatchFile(b"i" * 20, PS, PS, 0, "a/b.db")]
    pages = [
        batch.BatchPage(0, 7, full=bytes(new)),
        batch.BatchPage(0, 9, frags=[(0, b"ab"), (100, b"c")]),
    ]
    rec = batch.encode(files, pages)
    assert batch.decode(rec) == (files, pages)
    for cut in (17, 40, len(rec) - 1):
        with pytest.raises(ValueError):
            batch.decode(rec[:cut])


async def test_closing_the_file_releases_an_unended_txns_latches(tenv: aiodbenv.Env) -> None:
    f = await open_data(tenv)
    async with tenv.txn() as tx:
        await tx.page(f, 0, create=True)
    tx = await tenv.txn()
    (await tx.page(f, 0)).data[9] = 1  # never committed nor aborted
    await f.close()  # warns about the pin it drops, and releases the latch with it
    f = await open_data(tenv)
    async with tenv.txn(latch_timeout=0.5) as tx2:
        assert (await tx2.page(f, 0)).data[9] == 0
    await f.close()


def test_diff_covers_every_change_in_whole_chunks() -> None:
    import random

    rng = random.Random(1)
    for _ in range(1000):
        n = rng.choice([512, 1000, 4088, 4096])
        old = rng.randbytes(n)
        new = bytearray(old)
        for _ in range(rng.randint(0, 5)):
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 300))
            new[i:j] = rng.randbytes(j - i)
        ranges = batch.diff(old, bytes(new))
        rebuilt = bytearray(old)
        for s, e in ranges:
            assert s % batch.FRAG_CHUNK == 0 and (e % batch.FRAG_CHUNK == 0 or e == n)
            rebuilt[s:e] = new[s:e]
        assert rebuilt == new
        assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # merged when adjacent


async def test_txn_stat_counts_the_environment_and_keeps_closed_handles(home: str) -> None:
    """``env.txn_stat()`` sums every handle's counters in shared memory; a closed handle's
    stay counted, also after its registry slot is taken by a new handle (they are moved to
    the retired counts then); ``handle=True`` gives one handle's."""
    a = await aiodbenv.Env.open(home, create=True, log=True)
    b = await aiodbenv.Env.open(home)
    fa, fb = await open_data(a), await open_data(b)
    for env, f, n in ((a, fa, 3), (b, fb, 2)):
        for _ in range(n):
            async with env.txn(durability="nosync") as tx:
                (await tx.page(f, 0, create=True)).data[100] += 1
    tx = await b.txn()
    await tx.abort()
    assert a.txn_stat(handle=True).commits_nosync == 3
    assert b.txn_stat(handle=True).commits_nosync == 2
    for env in (a, b):
        st = env.txn_stat()
        assert (st.commits_nosync, st.begins, st.aborts, st.pages_logged) == (5, 6, 1, 5)
    await fb.close()
    await b.close()
    assert a.txn_stat().commits_nosync == 5  # b's counts outlive its handle
    for _ in range(3):  # new handles take b's slot again and again
        c = await aiodbenv.Env.open(home)
        assert c.txn_stat(handle=True).begins == 0  # a fresh handle starts at zero
        fc = await open_data(c)
        async with c.txn(durability="nosync") as tx:
            (await tx.page(fc, 0)).data[100] += 1
        await fc.close()
        await c.close()
    st = a.txn_stat()
    assert (st.commits_nosync, st.begins, st.aborts) == (8, 9, 1)
    await fa.close()
    await a.checkpoint()
    await a.close()
    await aiodbenv.Env.remove(home)


def test_compiled_diff_is_the_python_twin() -> None:
    """The compiled page diff (aiodb_txn_diff) gives exactly the ranges of the Python one, on
    pages of many sizes with changes of every shape (none, scattered, at the ends, all)."""
    rng = random.Random(11)
    for _ in range(2000):
        n = rng.choice([1, 63, 64, 65, 128, 129, 500, 4088, 4096, 8192])
        old = bytearray(rng.randbytes(n))
        new = bytearray(old) if rng.random() < 0.9 else bytearray(rng.randbytes(n))
        for _ in range(rng.randint(0, 8)):
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 300))
            new[i:j] = rng.randbytes(j - i)
        want = batch.diff_py(memoryview(old), memoryview(new))
        assert batch.diff(memoryview(old), memoryview(new)) == want
        assert batch.diff(bytes(old), bytes(new)) == want
    if os.environ.get("AIODBENV_MUTEX") != "abi":
        assert batch._c_diff is not None  # the accelerator is built: the compiled one ran


async def test_commit_cancelled_while_waiting_for_log_buffer_space(home: str) -> None:
    """A commit (without a task of its own) cancelled while its record waits for room in a
    full log buffer is aborted: nothing is logged, the page is unchanged, its latch and pin
    are gone, and the transaction counts as aborted."""
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192)
    f = await open_data(env)
    async with env.txn(durability="nosync") as tx:
        (await tx.page(f, 0, create=True)).data[100:104] = b"base"
    before = await read(f, 0)
    aborts = env.txn_stat().aborts
    txs: list[aiodbenv.Txn] = []
    committing = asyncio.Event()

    async def body() -> None:
        tx = await env.txn(durability="nosync")
        txs.append(tx)
        (await tx.page(f, 0)).data[2000:] = os.urandom(PS - 2000)  # a ~2 KiB fragment
        # Fill the buffer; the write that would make room is slow (the disk), so the
        # commit's append has to wait for it.
        while True:
            await env.log.put(bytes(1000))
            free = 8192 - (env.log.end_lsn.offset - env.log.written_lsn.offset)
            if free < 2000:  # less than the commit's record (a 2,112-byte fragment) needs
                break
        committing.set()
        await tx.commit()

    with _io.inject("pwrite", error=None, delay=1.0):
        task = asyncio.create_task(body())
        await committing.wait()
        await asyncio.sleep(0.1)
        assert not task.done()  # waiting for buffer space
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert txs[0].result is None
    assert env.txn_stat().aborts == aborts + 1
    assert await read(f, 0) == before
    async with env.txn(latch_timeout=0.5) as tx2:  # the latch is free
        await tx2.page(f, 0)
    await env.log.flush()
    async with env.log.cursor() as c:
        batches = [d async for _, d in c if batch.is_batch(d)]
    assert len(batches) == 1  # only the first commit: the cancelled one logged nothing
    await f.close()
    await env.checkpoint()
    await env.close()
    await aiodbenv.Env.remove(home)


async def test_a_taken_copy_is_released_when_the_transaction_ends(tenv: aiodbenv.Env) -> None:
    """Writes to a TxnPage after its transaction ended would change a copy nobody reads: they
    raise instead, as a Page's data does after its unpin. Commit, abort and a read-only commit
    all release it; a buffer still held by something else keeps its copy and is no error."""
    f = await open_data(tenv)
    async with tenv.txn() as tx:
        a = await tx.page(f, 0, create=True)
        a.data[100:105] = b"hello"
    with pytest.raises(ValueError, match="released"):
        a.data[100] = 1
    assert (await read(f, 0))[100:105] == b"hello"

    tx = await tenv.txn()
    b = await tx.page(f, 0)
    held = memoryview(b.data)  # a view of the copy's buffer, not an export of b.data
    b.data[100:105] = b"abort"
    await tx.abort()
    with pytest.raises(ValueError, match="released"):
        bytes(b.data)
    assert bytes(held[100:105]) == b"abort"  # its own view of the private copy
    assert (await read(f, 0))[100:105] == b"hello"  # the abort changed nothing shared

    async with tenv.txn() as tx:
        c = await tx.page(f, 0)  # read only: nothing is logged
    with pytest.raises(ValueError, match="released"):
        c.data[0]

    async with tenv.txn() as tx:
        d = await tx.page(f, 0)
        exported = d.data.cast("B")  # a derived view: d.data itself stays releasable
        with memoryview(d.data) as m:
            m[0:1] = m[0:1]
    with pytest.raises(ValueError, match="released"):
        d.data[0]
    assert len(exported) == PS

    async with tenv.txn() as tx:
        e = await tx.page(f, 0)
        pinned = (ctypes.c_char * PS).from_buffer(e.data)  # a view of its own over the copy
        pinned[17] = b"x"
    with pytest.raises(ValueError, match="released"):
        e.data[17]
    assert pinned[17] == b"x"  # the holder keeps the private copy alive
    pinned[17] = b"y"  # and changes it, which goes nowhere shared
    assert (await read(f, 0))[17:18] == b"x"

    async with tenv.txn() as tx:
        g = await tx.page(f, 0)
        export = pickle.PickleBuffer(g.data)  # an export of g.data: it cannot be released
        g.data[18:19] = b"z"
    with pytest.raises(ValueError, match="released"):
        g.data[18] = 1
    assert export.raw()[18:19] == b"z"  # the exporter keeps its copy
    export.release()
    assert (await read(f, 0))[18:19] == b"z"
