"""Commit space reserved in the in-memory log (aiodbenv.log.reserve): a commit never fails with
LogBufferFull; plain puts and tx.page are refused instead, abort and the reaper give the space
back, and a file log is unaffected. Run also under AIODBENV_MUTEX=abi (the Python append)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator

import pytest

import aiodbenv
from aiodbenv import LogBufferFull
from aiodbenv.log import accel
from aiodbenv.log.record import REC_USER
from tests.conftest import spawn

PS = 4096
# Four "files" of 64 KiB: a page's worst case (a full image, ~4.2 KB) fits about 30 times in
# half the ring.
RING = {"log_inmemory": True, "log_buffer_size": 4 * 65536, "log_file_size": 65536}


@pytest.fixture
async def menv(home: str) -> AsyncIterator[aiodbenv.Env]:
    e = await aiodbenv.Env.open(home, create=True, **RING)  # type: ignore[arg-type]
    yield e
    await e.close()
    await aiodbenv.Env.remove(home, force=True)


async def open_data(env: aiodbenv.Env) -> aiodbenv.PoolFile:
    return await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)


async def read(f: aiodbenv.PoolFile, pgno: int) -> bytes:
    async with f.get(pgno) as p:
        return bytes(p.data)


def reserved(env: aiodbenv.Env) -> int:
    assert env.log is not None
    return env.log._c.reserved()


async def fill(env: aiodbenv.Env, size: int = 1000, most: int = 2000) -> int:
    """Plain puts until LogBufferFull (it must come); how many went in."""
    assert env.log is not None
    for n in range(most):
        try:
            await env.log.put(bytes(size))
        except LogBufferFull as err:
            assert "reserved" in str(err) or "checkpoint" in str(err)
            return n
    raise AssertionError("the ring never filled")


async def test_commit_succeeds_after_plain_puts_fill_the_ring(menv: aiodbenv.Env) -> None:
    f = await open_data(menv)
    assert menv.log is not None
    await menv.log.checkpoint_record(menv.log.end_lsn)  # from now on the ring is bounded
    tx = await menv.txn()
    p = await tx.page(f, 0, create=True)
    p.data[100:105] = b"hello"
    q = await tx.page(f, 1, create=True)
    q.data[:] = bytes([7]) * PS  # a full image: the worst case
    held = reserved(menv)
    assert held > 2 * PS
    assert await fill(menv) > 10
    with pytest.raises(LogBufferFull, match="reserved"):
        await menv.log.put(bytes(1000))
    assert reserved(menv) == held  # a refused put changes nothing
    info = await tx.commit()
    assert info.pages == 2 and reserved(menv) == 0
    assert (await read(f, 0))[100:105] == b"hello"
    assert (await read(f, 1))[8:] == bytes([7]) * (PS - 8)
    async with menv.log.cursor(info.lsn) as c:
        got = await c.next()
    assert got is not None and got[0] == info.lsn  # the record is in the ring, readable
    await f.close()


async def test_many_transactions_reserve_until_page_refuses_and_all_earlier_commit(
    menv: aiodbenv.Env,
) -> None:
    f = await open_data(menv)
    assert menv.log is not None
    await menv.log.checkpoint_record(menv.log.end_lsn)
    go = asyncio.Event()
    joined: list[asyncio.Future[None]] = []

    async def one(i: int, ready: asyncio.Future[None]) -> int:
        async with menv.txn(durability="nosync") as tx:
            try:
                p = await tx.page(f, i, create=True)
            except LogBufferFull as err:
                ready.set_exception(err)
                await go.wait()
                # Still usable: once the others committed, there is room again.
                p = await tx.page(f, i, create=True)
            else:
                ready.set_result(None)
                await go.wait()
            p.data[:] = bytes([i]) * PS
        return i

    tasks = []
    refused = None
    for i in range(200):
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        joined.append(ready)
        tasks.append(asyncio.create_task(one(i, ready)))
        try:
            await ready
        except LogBufferFull:
            refused = i
            break
    assert refused is not None and refused > 5
    await fill(menv)  # and the ring is full of plain records too
    go.set()
    assert await asyncio.gather(*tasks) == list(range(refused + 1))
    assert reserved(menv) == 0
    for i in range(refused + 1):
        assert (await read(f, i))[8:] == bytes([i]) * (PS - 8)
    await f.close()


async def test_abort_and_a_failed_block_release(menv: aiodbenv.Env) -> None:
    f = await open_data(menv)
    tx = await menv.txn()
    await tx.page(f, 0, create=True)
    await tx.new(f)
    assert reserved(menv) > 0
    assert menv.log is not None
    assert menv.log._c.reserved(menv.log._c.rsv_slot) == reserved(menv)
    await tx.abort()
    assert reserved(menv) == 0
    with pytest.raises(ZeroDivisionError):
        async with menv.txn() as tx:
            await tx.page(f, 0, create=True)
            assert reserved(menv) > 0
            1 / 0  # noqa: B018
    assert reserved(menv) == 0
    # A read-only commit (nothing changed) gives it back too.
    async with menv.txn() as tx:
        await tx.page(f, 0)
    assert reserved(menv) == 0
    await f.close()


async def test_compiled_append_hands_puts_to_python_while_reserved(menv: aiodbenv.Env) -> None:
    assert menv.log is not None
    fast = menv.log._fast
    if not accel.COMPILED:
        assert fast is None
        pytest.skip("the compiled append is not in use (AIODBENV_MUTEX=abi)")
    assert fast is not None
    assert fast.fn(fast.args, REC_USER, b"x", 1) >= 0
    f = await open_data(menv)
    tx = await menv.txn()
    await tx.page(f, 0, create=True)
    assert fast.fn(fast.args, REC_USER, b"x", 1) == accel.PYTHON
    await menv.log.put(b"through python")  # and the Python path appends it (room left)
    await tx.abort()
    assert fast.fn(fast.args, REC_USER, b"x", 1) >= 0
    await f.close()


async def test_file_log_is_unaffected(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=65536) as env:
        f = await open_data(env)
        async with env.txn() as tx:
            for i in range(40):  # far more than a 64 KiB in-memory ring could reserve
                await tx.page(f, i, create=True)
            assert reserved(env) == 0
            for _ in range(200):
                assert env.log is not None
                await env.log.put(bytes(1000))
        await f.close()
    await aiodbenv.Env.remove(home, force=True)


HOLDER = """
import asyncio, itertools, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    pgnos = itertools.count(100)
    taken = 0

    async def hold(done):
        # One transaction (in its own task) takes pages until its record or the ring is
        # full, then stays open.
        nonlocal taken
        tx = await env.txn()
        try:
            while True:
                await tx.page(f, next(pgnos), create=True)
                taken += 1
        except aiodbenv.TxnTooLarge:
            done.set_result(False)
        except aiodbenv.LogBufferFull:
            done.set_result(True)
        await asyncio.sleep(3600)

    tasks = []
    while True:
        done = asyncio.get_running_loop().create_future()
        tasks.append(asyncio.create_task(hold(done)))
        if await done:
            break
    print("holding", taken, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    out = p.stdout.readline().strip()
    if not out:
        assert p.stderr is not None
        raise AssertionError(p.stderr.read())
    return out


async def test_sigkilled_process_reservation_is_dropped_by_the_reaper(
    menv: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    f = await open_data(menv)
    assert menv.log is not None
    await menv.log.checkpoint_record(menv.log.end_lsn)
    child = spawn(HOLDER, home)
    procs.append(child)
    out = await asyncio.to_thread(line, child)
    assert out.startswith("holding") and int(out.split()[1]) > 5
    assert reserved(menv) > 0 and menv.log._c.reserved(menv.log._c.rsv_slot) == 0
    tx = await menv.txn()
    with pytest.raises(LogBufferFull, match="reserv"):
        await tx.page(f, 0, create=True)  # the dead-to-be process holds the space
    child.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(child.wait, 30) == -signal.SIGKILL
    for _ in range(500):  # the registry notices the death (its lock byte freed) promptly
        if menv.pool.reap():
            break
        await asyncio.sleep(0.01)
    assert reserved(menv) == 0
    (await tx.page(f, 0, create=True)).data[64:68] = b"mine"
    await tx.commit()
    assert (await read(f, 0))[64:68] == b"mine"
    await f.close()


async def test_checkpoint_pinning_an_older_file_is_refused_while_space_is_reserved(
    menv: aiodbenv.Env,
) -> None:
    log = menv.log
    assert log is not None
    f = await open_data(menv)
    old = log.end_lsn
    while log.end_lsn.file < old.file + 3:  # no checkpoint yet: the ring just turns
        await log.put(bytes(1000))
    tx = await menv.txn()
    for i in range(12):  # about 50 KB of worst-case commit record
        await tx.page(f, i, create=True)
    assert reserved(menv) > 12 * PS
    # Pinning the "file" three back (the oldest in the ring) would leave only the current
    # "file"'s rest: too little for the reserved commit.
    with pytest.raises(LogBufferFull, match="checkpoint record"):
        await log.checkpoint_record(old)
    assert log.last_checkpoint is None  # nothing appended, nothing recorded
    await log.checkpoint_record(log.end_lsn)  # the current one is fine
    await tx.commit()
    assert reserved(menv) == 0
    await f.close()
