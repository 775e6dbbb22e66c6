"""Latch waits that could never end, within one process: a task asking for a latch it holds
itself (its transaction's, or a latched read it has not ended), and a cycle of this process's
tasks through latched reads (which stand outside the transactions' order rule). Each raises
Deadlock at once, not LockTimeout after the full wait; waits that can end still wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

import aiodbenv
from aiodbenv import Deadlock

PS = 4096
#: Every wait here could run this long: a test that finishes well within it did not wait.
LONG = 30.0
QUICK = 5.0


@pytest.fixture
async def env(home: str) -> AsyncIterator[aiodbenv.Env]:
    # A small log buffer: a commit of several pages is larger, and runs in a task of its own.
    e = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=1024)
    assert e.pool.wait_timeout >= LONG  # the latched reads' bound
    yield e
    await e.close()
    await aiodbenv.Env.remove(home, force=True)


@pytest.fixture
async def f(env: aiodbenv.Env) -> AsyncIterator[aiodbenv.PoolFile]:
    pf = await env.pool.open_file(env.resolve("d.db"), create=True, page_size=PS, lsn_offset=0)
    async with env.txn() as tx:
        for pgno in range(4):
            await tx.page(pf, pgno, create=True)
    yield pf
    await pf.close()


def no_latches_left(env: aiodbenv.Env) -> None:
    pool = env.pool
    assert not pool._latch_tasks and not pool._latch_waits and not pool._latch_reads


async def test_latched_read_of_a_page_the_tasks_transaction_holds(
    env: aiodbenv.Env, f: aiodbenv.PoolFile
) -> None:
    async with env.txn(latch_timeout=LONG) as tx:
        (await tx.page(f, 2)).data[100] = 7
        t0 = time.monotonic()
        with pytest.raises(Deadlock, match="this task itself"):
            await f.get(2, latch=True)
        assert time.monotonic() - t0 < QUICK
    # The transaction was not harmed: it committed, and the page is free again.
    async with f.get(2, latch=True) as p:
        assert p.data[100] == 7
    assert env.txn_stat().deadlocks == 0  # transactions' statistics: a read is not one
    no_latches_left(env)


async def test_transaction_taking_a_page_the_task_reads_latched(
    env: aiodbenv.Env, f: aiodbenv.PoolFile
) -> None:
    async with f.get(1, latch=True):
        t0 = time.monotonic()
        with pytest.raises(Deadlock, match="this task itself"):
            async with env.txn(latch_timeout=LONG) as tx:
                (await tx.page(f, 0)).data[100] = 1
                await tx.page(f, 1)
        assert time.monotonic() - t0 < QUICK
    async with env.txn(latch_timeout=LONG) as tx:  # once the read ended, it goes through
        (await tx.page(f, 1)).data[100] = 2
    async with f.get(0) as p0, f.get(1) as p1:
        assert p0.data[100] == 0 and p1.data[100] == 2  # the first one aborted whole
    assert env.txn_stat().deadlocks == 1
    no_latches_left(env)


async def test_two_transactions_of_one_task_on_one_page(
    env: aiodbenv.Env, f: aiodbenv.PoolFile
) -> None:
    outer = await env.txn(latch_timeout=LONG)
    (await outer.page(f, 3)).data[100] = 3
    t0 = time.monotonic()
    with pytest.raises(Deadlock, match="this task itself"):
        async with env.txn(latch_timeout=LONG) as inner:
            await inner.page(f, 3)
    assert time.monotonic() - t0 < QUICK
    await outer.commit()
    no_latches_left(env)


async def test_latched_read_twice_in_one_task(env: aiodbenv.Env, f: aiodbenv.PoolFile) -> None:
    async with f.get(0, latch=True):
        t0 = time.monotonic()
        with pytest.raises(Deadlock, match="this task itself"):
            await f.get(0, latch=True)
        assert time.monotonic() - t0 < QUICK
    no_latches_left(env)


async def test_cycle_of_two_tasks_through_a_latched_read(
    env: aiodbenv.Env, f: aiodbenv.PoolFile
) -> None:
    # B's transaction holds page 1 and waits for page 2 (ascending: the order rule allows
    # it), which A reads latched; A then asks for page 1 latched. Neither can go on.
    a_reads = asyncio.Event()
    b_waits = asyncio.Event()

    async def task_b() -> None:
        async with env.txn(latch_timeout=LONG) as tx:
            (await tx.page(f, 1)).data[200] = 0xB
            await a_reads.wait()
            b_waits.set()
            (await tx.page(f, 2)).data[200] = 0xB  # waits for A's read

    b = asyncio.create_task(task_b())
    t0 = time.monotonic()
    async with f.get(2, latch=True):
        a_reads.set()
        await b_waits.wait()
        while env.txn_stat().latch_waits == 0:  # B is waiting for page 2 now
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        with pytest.raises(Deadlock, match="waits for this one"):
            await f.get(1, latch=True)
    await asyncio.wait_for(b, QUICK)  # A's read ended: B got page 2 and committed
    assert time.monotonic() - t0 < QUICK
    async with f.get(1) as p1, f.get(2) as p2:
        assert p1.data[200] == p2.data[200] == 0xB
    no_latches_left(env)


async def test_a_wait_that_can_end_still_waits(env: aiodbenv.Env, f: aiodbenv.PoolFile) -> None:
    # Another task of this process holds the latch and waits for nothing: no Deadlock, the
    # latched read gets the page once it is released.
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with env.txn(latch_timeout=LONG) as tx:
            (await tx.page(f, 0)).data[300] = 9
            held.set()
            await release.wait()

    h = asyncio.create_task(holder())
    await held.wait()
    asyncio.get_running_loop().call_later(0.1, release.set)
    t0 = time.monotonic()
    async with f.get(0, latch=True) as p:
        assert p.data[300] == 9
    assert 0.05 < time.monotonic() - t0 < QUICK
    await h
    assert env.txn_stat().deadlocks == 0
    no_latches_left(env)


async def test_a_cancelled_commit_finishing_in_its_own_task_is_waited_for(
    env: aiodbenv.Env, f: aiodbenv.PoolFile
) -> None:
    # Its record is larger than the log buffer: the commit runs in a task of its own and goes
    # on when its caller is cancelled; the caller's retry waits for that task, it is not told
    # it waits for itself (before: Deadlock at once, and a retry loop that never yielded kept
    # the commit from ever finishing).
    async def caller() -> int:
        tx = await env.txn(latch_timeout=LONG)
        for pgno in range(4):
            (await tx.page(f, pgno)).data[100] = 9
        try:
            await tx.commit()
        except asyncio.CancelledError:
            me = asyncio.current_task()
            assert me is not None
            me.uncancel()
        deadlocks = 0
        while True:
            try:
                async with env.txn(latch_timeout=LONG) as tx2:
                    (await tx2.page(f, 0)).data[101] = 1
                return deadlocks
            except Deadlock:
                deadlocks += 1
                assert deadlocks < 1000

    task = asyncio.create_task(caller())
    for _ in range(1000):
        await asyncio.sleep(0)
        if env.pool._committing:
            break
    assert env.pool._committing, "the commit was not under way"
    task.cancel()
    assert await asyncio.wait_for(task, QUICK) == 0
    async with f.get(0) as p:
        assert p.data[100] == 9 and p.data[101] == 1
    no_latches_left(env)


async def test_a_latched_page_handed_to_another_task_to_unpin(
    env: aiodbenv.Env, f: aiodbenv.PoolFile
) -> None:
    page = await f.get(0, latch=True)  # the await form: another task may unpin it

    async def consumer() -> None:
        await asyncio.sleep(0.05)
        await f.unpin(page)

    c = asyncio.create_task(consumer())
    t0 = time.monotonic()
    async with f.get(0, latch=True):  # waits for the consumer's unpin, no Deadlock
        assert time.monotonic() - t0 >= 0.04
    await c
    no_latches_left(env)


async def test_closing_a_file_keeps_a_transactions_other_latches_known(
    env: aiodbenv.Env, f: aiodbenv.PoolFile
) -> None:
    g = await env.pool.open_file(env.resolve("e.db"), create=True, page_size=PS, lsn_offset=0)
    tx = await env.txn(latch_timeout=LONG)
    await tx.page(f, 0)
    await tx.page(g, 0, create=True)
    await g.close()  # releases the transaction's latch in g, not its knowledge of f's
    t0 = time.monotonic()
    with pytest.raises(Deadlock, match="this task itself"):
        await f.get(0, latch=True)
    assert time.monotonic() - t0 < QUICK
    with pytest.raises(aiodbenv.InvalidArgument, match="already unpinned"):
        await tx.abort()  # (its page of the closed file is said to be gone; the rest released)
    no_latches_left(env)
