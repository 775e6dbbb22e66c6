"""Closing a file (or the environment) while transactions hold its pages: a commit under way
is waited for, never cut off halfway (its pins dropped, its pages then written and marked
clean before its images land); an active transaction loses its pages and its commit is
refused before anything is logged."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

import aiodbenv
from aiodbenv.log.log import Log

NP = 3


async def _setup(home: str) -> tuple[aiodbenv.Env, aiodbenv.PoolFile]:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await env.pool.open_file(env.resolve("a.db"), create=True, lsn_offset=0)
    async with env.txn() as tx:
        for pg in range(NP):
            struct.pack_into("<Q", (await tx.page(f, pg, create=True)).data, 8, 1)
    await env.checkpoint()
    return env, f


def _hold_puts(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Log.put returns only once ``go`` is set (``appended`` is set when its record is in):
    a commit whose task stays inside its put, after the append, as under a slow log."""
    appended, go = asyncio.Event(), asyncio.Event()
    real = Log.put

    async def held(self: Log, *args: Any, **kw: Any) -> Any:
        lsn = await real(self, *args, **kw)
        appended.set()
        await go.wait()
        return lsn

    monkeypatch.setattr(Log, "put", held)
    return appended, go


async def _cancelled_commit(
    env: aiodbenv.Env, f: aiodbenv.PoolFile, monkeypatch: pytest.MonkeyPatch
) -> asyncio.Future[None]:
    """A ``write_nosync`` commit setting every page's counter to 2, its caller cancelled while
    its record is being logged (a shutdown's cancelled request); it goes on in the background
    and its put returns 50 ms from now. Returns the caller's task."""
    appended, go = _hold_puts(monkeypatch)

    async def commit() -> None:
        async with env.txn(durability="write_nosync") as tx:
            for pg in range(NP):
                struct.pack_into("<Q", (await tx.page(f, pg)).data, 8, 2)

    t = asyncio.ensure_future(commit())
    await asyncio.wait_for(appended.wait(), 10)
    t.cancel()
    asyncio.get_running_loop().call_later(0.05, go.set)
    return t


def _counter(raw: bytes | memoryview, pg: int = 0) -> int:
    return int(struct.unpack_from("<Q", raw, pg * 4096 + 8)[0])


@pytest.mark.parametrize("durability", ["write_nosync", "nosync"])
async def test_closing_a_file_waits_for_a_commit_under_way(
    home: str, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """The committing task's caller is cancelled (a request's timeout) while its record is
    being logged, then the file is closed (shutdown) and the pool synced: the close waits
    for the commit, whose images are in the buffers, dirty, and reach the file."""
    env, f = await _setup(home)
    try:
        appended, go = _hold_puts(monkeypatch)

        async def commit() -> None:
            async with env.txn(durability=durability) as tx:
                for pg in range(NP):
                    struct.pack_into("<Q", (await tx.page(f, pg)).data, 8, 2)

        t = asyncio.ensure_future(commit())
        await asyncio.wait_for(appended.wait(), 10)
        if durability == "write_nosync":  # its commit runs in a task of its own: cancel
            t.cancel()
        closing = asyncio.ensure_future(f.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # waiting for the commit, its pages still held
        go.set()
        await asyncio.wait_for(closing, 10)
        await asyncio.gather(t, return_exceptions=True)
        res = await env.pool.sync()
        assert res.incomplete == 0
        with open(env.resolve("a.db"), "rb") as fh:
            raw = fh.read()
        assert [_counter(raw, pg) for pg in range(NP)] == [2] * NP
        assert env.pool.stat().page_pinned == 0
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


async def test_closing_the_environment_waits_for_a_commit_under_way(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above through ``env.close()`` alone (an application's shutdown after it cancelled
    its request tasks): the commit ends whole before the log and the files close; its pages
    stay dirty in the shared cache (a close does not write them) and the next checkpoint
    writes them. Before, the log closed under the commit, whose copy-in then failed."""
    env, f = await _setup(home)
    path = env.resolve("a.db")
    t = await _cancelled_commit(env, f, monkeypatch)
    await env.close()
    await asyncio.gather(t, return_exceptions=True)
    env = await aiodbenv.Env.open(home, log=True)
    try:
        assert not env._core.panicked
        f = await env.pool.open_file(path, lsn_offset=0)
        for pg in range(NP):
            async with f.get(pg, latch=True) as p:
                assert _counter(p.data) == 2
        await env.checkpoint()
        with open(path, "rb") as fh:
            raw = fh.read()
        assert [_counter(raw, pg) for pg in range(NP)] == [2] * NP
        await f.close()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


async def test_an_active_transaction_whose_file_was_closed_cannot_commit(home: str) -> None:
    """Pages taken, not committing, when their file is closed: the close takes them back
    (latches released, pins dropped); the transaction's commit then refuses, with nothing
    logged, and its abort is quiet."""
    env, f = await _setup(home)
    try:
        tx = await env.txn()
        struct.pack_into("<Q", (await tx.page(f, 0)).data, 8, 9)
        await f.close()
        end = env.log.end_lsn
        with pytest.raises(aiodbenv.InvalidArgument, match="closed"):
            await tx.commit()
        assert env.log.end_lsn == end and not env._core.panicked
        await tx.abort()
        f = await env.pool.open_file(env.resolve("a.db"), lsn_offset=0)
        async with env.txn(latch_timeout=0.5) as tx2:  # the latch is free
            assert _counter((await tx2.page(f, 0)).data) == 1
        assert env.pool.stat().page_pinned == 0
        await f.close()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


async def test_a_transaction_whose_environment_handle_was_closed_cannot_commit(
    home: str,
) -> None:
    """The handle closed under an active transaction: its commit says so (InvalidArgument),
    instead of failing on the detached region's memory; its abort is quiet."""
    env, f = await _setup(home)
    try:
        tx = await env.txn()
        struct.pack_into("<Q", (await tx.page(f, 0)).data, 8, 9)
        await env.close()
        with pytest.raises(aiodbenv.InvalidArgument, match="closed under the transaction"):
            await tx.commit()
        await tx.abort()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


async def test_closing_a_private_environment_writes_a_commit_that_was_under_way(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private environment's close writes its dirty pages (nobody else ever could): a
    commit under way (a cancelled caller's) ends first, so its pages are written too. Before,
    the close wrote the pages first and found the commit's pinned (Incomplete), and the next
    open needed recovery."""
    env = await aiodbenv.Env.open(home, create=True, log=True, region="private")
    path = env.resolve("a.db")
    f = await env.pool.open_file(path, create=True, lsn_offset=0)
    async with env.txn() as tx:
        for pg in range(NP):
            struct.pack_into("<Q", (await tx.page(f, pg, create=True)).data, 8, 1)
    await env.pool.sync()
    t = await _cancelled_commit(env, f, monkeypatch)
    await env.close()
    await asyncio.gather(t, return_exceptions=True)
    with open(path, "rb") as fh:
        raw = fh.read()
    assert [_counter(raw, pg) for pg in range(NP)] == [2] * NP
    await aiodbenv.Env.remove(home, force=True)
