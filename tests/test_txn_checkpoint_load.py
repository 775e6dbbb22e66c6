"""Checkpoints under transaction load: a dirty page latched by a transaction that has not begun
to commit is written with its last commit's bytes (its transaction works on a private copy),
so transactions that keep hot pages latched do not leave them out of every sync and
checkpoint; a page a commit is copying into is never written half-changed; a latched read, a
plain pin or a commit under way still keeps the page from being written."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

import aiodbenv
from aiodbenv import Incomplete
from aiodbenv.txn import latch as latch_module
from tests.conftest import spawn

PS = 4096


async def open_env(home: str) -> tuple[aiodbenv.Env, aiodbenv.PoolFile]:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    return env, f


async def close_env(home: str, env: aiodbenv.Env, f: aiodbenv.PoolFile) -> None:
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)


def on_disk(env: aiodbenv.Env, pgno: int, size: int = PS) -> bytes:
    with open(env.resolve("data.db"), "rb") as fh:
        return os.pread(fh.fileno(), size, pgno * size)


async def test_latched_page_is_written_with_its_last_commit(home: str) -> None:
    env, f = await open_env(home)
    try:
        async with env.txn() as tx:
            p = await tx.page(f, 0, create=True)
            p.data[100:105] = b"first"
        tx = await env.txn()
        p = await tx.page(f, 0)
        p.data[100:105] = b"later"  # the private copy: not committed
        result = await env.checkpoint()  # was Incomplete: the page is pinned by its latch
        assert result.written >= 1
        disk = on_disk(env, 0)
        assert disk[100:105] == b"first"
        async with f.get(0) as page:
            assert page.data[100:105] == b"first"
        await tx.commit()
        await env.checkpoint()
        assert on_disk(env, 0)[100:105] == b"later"
    finally:
        await close_env(home, env, f)


async def test_still_busy_latched_read_plain_pin_and_commit(home: str) -> None:
    """A latched read's holder works on the buffer itself, and so may a plain pin's: their
    dirty pages stay unwritten (Incomplete), as before, unless a transaction holds the
    page's latch (nobody may change a page under it)."""
    env, f = await open_env(home)
    try:
        async with env.txn() as tx:
            (await tx.page(f, 0, create=True)).data[100:101] = b"a"
        async with f.get(0, latch=True):
            with pytest.raises(Incomplete):
                await env.checkpoint()
        async with env.txn() as tx:
            (await tx.page(f, 0)).data[100:101] = b"b"
        tx = await env.txn()
        await tx.page(f, 0)
        async with f.get(0):  # a plain pin besides the latch's: nobody may write under it
            await env.pool.sync()
        await tx.abort()
        async with env.txn() as tx:
            (await tx.page(f, 0)).data[100:101] = b"c"
        async with f.get(0):  # a plain pin alone: its holder may be writing
            with pytest.raises(Incomplete):
                await env.pool.sync()
    finally:
        await close_env(home, env, f)


async def test_checkpoints_complete_while_tasks_hold_latches(home: str) -> None:
    """Forty tasks keep transactions open across awaits on 60 pages (and wait for each
    other's latches): before, every checkpoint found some of those dirty pages pinned and
    raised Incomplete."""
    env, f = await open_env(home)
    stop = asyncio.Event()
    commits = 0

    async def worker(k: int) -> None:
        nonlocal commits
        i = 0
        while not stop.is_set():
            async with env.txn(durability="nosync") as tx:
                p = await tx.page(f, k + 10 * (i % 3), create=True)  # shared: latch waits
                struct.pack_into("<q", p.data, 8, i)
                await asyncio.sleep(0)
            i += 1
            commits += 1

    tasks = [asyncio.create_task(worker(k)) for k in range(40)]
    try:
        while commits < 500:
            await asyncio.sleep(0.01)
        done = 0
        for _ in range(5):
            await env.checkpoint()  # raises Incomplete if a latched page was left out
            done += 1
        assert done == 5
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await close_env(home, env, f)


WRITER = """
import asyncio, os, struct, sys, time
import aiodbenv

async def main():
    home, ps, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=ps, lsn_offset=0)
    print("ready", flush=True)
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        i += 1
        async with env.txn(durability="nosync") as tx:
            p = await tx.page(f, i % 4)
            p.data[8:] = struct.pack("<Q", i) * ((ps - 8) // 8)  # the whole page, one value
            await asyncio.sleep(0.0005)  # held latched most of the time
    await f.close()
    await env.close()
    print("done", i, flush=True)

asyncio.run(main())
"""

SYNCER = """
import asyncio, os, struct, sys, time
import aiodbenv

async def main():
    home, ps, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=ps, lsn_offset=0)
    fd = os.open(env.resolve("data.db"), os.O_RDONLY)
    ok = incomplete = torn = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            await env.pool.sync()
            ok += 1
        except aiodbenv.Incomplete:
            incomplete += 1
        for pgno in range(4):
            page = os.pread(fd, ps, pgno * ps)
            words = set(struct.unpack_from("<%dQ" % ((ps - 8) // 8), page, 8))
            torn += len(words) > 1
    os.close(fd)
    await f.close()
    await env.close()
    print(ok, incomplete, torn, flush=True)

asyncio.run(main())
"""


@pytest.mark.one_loop
@pytest.mark.parametrize("mode", ["compiled", "python"])
async def test_no_half_commit_reaches_the_file(home: str, mode: str) -> None:
    """One process commits whole-page images of four pages, each held latched across a turn
    of its loop; another syncs in a loop and reads the four pages back from the file after
    each sync: every page on disk is one commit's image, never part of two."""
    ps = 65536  # a wide copy: a commit and a sync's copy of one page overlap often
    env = await aiodbenv.Env.open(home, create=True, log=True, cache_size=16 << 20)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=ps, lsn_offset=0)
    async with env.txn() as tx:
        for i in range(4):
            await tx.page(f, i, create=True)
    await env.pool.sync()
    child_env = {"AIODBENV_MUTEX": "abi"} if mode == "python" else {}
    writer = spawn(WRITER, home, str(ps), "3", env=child_env)
    syncer = None
    try:
        assert (await asyncio.to_thread(writer.stdout.readline)).strip() == "ready"  # type: ignore[union-attr]
        syncer = spawn(SYNCER, home, str(ps), "2", env=child_env)
        out, err = await asyncio.to_thread(syncer.communicate, timeout=60)
        assert syncer.returncode == 0, err
        ok, incomplete, torn = map(int, out.split())
        assert torn == 0
        assert ok > 10 * incomplete  # the latched pages were written, not left out
        wout, werr = await asyncio.to_thread(writer.communicate, timeout=60)
        assert writer.returncode == 0, werr
        assert wout.split()[0] == "done"
    finally:
        for p in (writer, syncer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        await close_env(home, env, f)


RECHECK = """
import asyncio, os, sys
import aiodbenv
from aiodbenv.mpool import bhwrite
from aiodbenv.mpool.layout import BH, BH_DIRTY, BH_WRITING, LATCH_COMMITTING, quiet_latch

flipped = []

def commit_begins_during_the_copy(w, bh):
    cur = quiet_latch(w, bh)
    if cur and not flipped:  # as if a commit flagged the latch right after this look
        w[(bh >> 3) + BH.word.latch] = cur | LATCH_COMMITTING
        flipped.append((w, bh, cur))
    return cur

async def main():
    home = sys.argv[1]
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    async with env.txn() as tx:
        (await tx.page(f, 0)).data[100:103] = b"new"
    tx = await env.txn()
    await tx.page(f, 0)
    bhwrite.quiet_latch = commit_begins_during_the_copy
    try:
        await env.pool.sync()
        print("written")
    except aiodbenv.Incomplete as err:
        print("incomplete", err.result.incomplete)
    w, bh, cur = flipped[0]
    flags = int(w[(bh >> 3) + BH.word.flags])
    print("dirty", bool(flags & BH_DIRTY), "claimed", bool(flags & BH_WRITING))
    w[(bh >> 3) + BH.word.latch] = cur
    await tx.abort()
    await f.close()
    await env.close()

asyncio.run(main())
"""


def test_python_twin_drops_a_copy_a_commit_began_under(home: str) -> None:
    """The Python write-back (AIODBENV_MUTEX=abi) keeps a latched page's copy only if the
    latch word reads the same after the copy: a commit flagged meanwhile leaves the page
    dirty, unclaimed and unwritten."""

    async def setup() -> None:
        env, f = await open_env(home)
        async with env.txn() as tx:
            (await tx.page(f, 0, create=True)).data[100:103] = b"old"
        await env.checkpoint()
        await f.close()
        await env.close()

    asyncio.run(setup())
    child = spawn(RECHECK, home, env={"AIODBENV_MUTEX": "abi"})
    out, err = child.communicate(timeout=60)
    try:
        assert child.returncode == 0, err
        assert out.split("\n")[:2] == ["incomplete 1", "dirty True claimed False"]

        async def check() -> None:
            env, f = await open_env(home)
            assert on_disk(env, 0)[100:103] == b"old"
            await f.close()
            await env.close()

        asyncio.run(check())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        asyncio.run(aiodbenv.Env.remove(home, force=True))


async def test_a_release_wakes_a_waiting_task_at_once(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task of this process that waits for a latch another task of it holds is woken by the
    release, not by its back-off (set to a minute here): a waiter's pin does not sit on a page
    whose latch is free (which a checkpoint could not write) for up to 5 ms per hand-off."""
    monkeypatch.setattr(latch_module, "_WAIT_MIN", 60.0)
    monkeypatch.setattr(latch_module, "_WAIT_MAX", 60.0)
    env, f = await open_env(home)
    try:
        async with env.txn() as tx:
            await tx.page(f, 0, create=True)
        first = await env.txn()
        await first.page(f, 0)

        async def second() -> None:
            async with env.txn() as tx:
                (await tx.page(f, 0)).data[100:101] = b"b"

        waiter = asyncio.create_task(second())
        while not env.pool._latch_sleepers:
            await asyncio.sleep(0.001)
        await first.commit()
        assert not env.pool._latch_sleepers  # woken by the release
        await asyncio.wait_for(waiter, 10)
    finally:
        await close_env(home, env, f)
