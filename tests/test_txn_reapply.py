"""The reaper finishing, from the log, the commit of a process killed inside it
(aiodbenv/txn/reapply.py): where it starts reading the log, and what a stopped log writer
does to it. The kills at each step of one commit are in test_txn_processes.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import aiodbenv
from tests.conftest import end_stopped, spawn, wait_stopped

PS = 4096


async def _dead(child: subprocess.Popen[str]) -> None:
    assert await asyncio.to_thread(child.wait, 60) == -signal.SIGKILL, child.stderr


async def _page(f: aiodbenv.PoolFile, pgno: int, n: int = 8) -> bytes:
    async with f.get(pgno, latch=True) as p:
        return bytes(p.data[64 : 64 + n])


async def _recovered(home: str, pgnos: list[int], **kw: object) -> list[bytes]:
    await aiodbenv.Env.remove(home, force=True)  # the cache is lost; the log is not
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True, **kw)  # type: ignore[arg-type]
    try:
        f = await env.pool.open_file(env.resolve("data.db"), page_size=PS, lsn_offset=0)
        out = [await _page(f, p) for p in pgnos]
        await f.close()
        return out
    finally:
        await env.close()


TWO_COMMITS = """
import asyncio, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    c = env.log._c

    async def large():  # a record larger than the buffer: written to the file by the writer
        async with env.txn() as tx:
            for i in range(16):
                (await tx.page(f, i)).data[64:4096] = bytes([0xAA]) * 4032

    small = await env.txn()
    for i in (18, 19):
        (await small.page(f, i)).data[64:72] = b"BBBBBBBB"
    end0 = c.word("f_lsn")
    task = asyncio.ensure_future(large())
    for _ in range(100000):  # until the large record is written, its commit not yet back
        await asyncio.sleep(0)
        if c.word("f_lsn") - end0 > 60000 and c.word("w_lsn") >= c.word("f_lsn"):
            break
    await small.commit()  # killed once its first page is copied in
    print("survived", flush=True)

asyncio.run(main())
"""


async def test_two_commits_of_a_dead_process_the_later_one_partly_copied(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """A dead process had two commits under way: a large one, whose record the writer put in
    the file, and a later small one, killed with one page copied (so that page carries the
    newer LSN). The reaper reads the log from the *oldest* LSN on the dead process's pages:
    both commits are whole in the cache, and recovery agrees. Reading from the newest missed
    the large one (left unchanged in the cache, applied by recovery)."""
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=32768)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    async with env.txn() as tx:
        for i in range(20):
            (await tx.page(f, i, create=True)).data[100:101] = b"s"
    child = spawn(TWO_COMMITS, home, env={"AIODBENV_TEST_SIGNAL": "txn.copied:at:1:SIGKILL"})
    procs.append(child)
    await _dead(child)
    cache = [await _page(f, p) for p in (0, 15, 18, 19)]  # waits for the reaper
    assert not env._core.panicked
    assert cache == [b"\xaa" * 8, b"\xaa" * 8, b"BBBBBBBB", b"BBBBBBBB"]
    await f.close()
    await env.close()
    assert await _recovered(home, [0, 15, 18, 19]) == cache
    await aiodbenv.Env.remove(home, force=True)


ONE_PAGE = """
import asyncio, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    async with env.txn() as tx:
        (await tx.page(f, 0)).data[64:72] = b"COMMIT!!"
    print("survived", flush=True)

asyncio.run(main())
"""


async def test_a_dead_commit_of_a_page_last_logged_in_an_archived_file(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """The page's LSN is in a log file archive removed since: the reaper reads from the first
    record kept (the commit's own record cannot be before it), finishes the commit, and does
    not panic the environment (it did: no record starts at that LSN)."""
    kw = {"log_file_size": 65536}
    env = await aiodbenv.Env.open(home, create=True, log=True, **kw)  # type: ignore[arg-type]
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    async with env.txn() as tx:
        for i in range(8):
            (await tx.page(f, i, create=True)).data[100:108] = b"setup..."
    for n in range(60):  # other pages move the log on through several files
        async with env.txn() as tx:
            (await tx.page(f, 1 + n % 7)).data[64:4096] = os.urandom(4032)
    await env.checkpoint(force=True)
    async with env.txn() as tx:
        (await tx.page(f, 1)).data[64:72] = b"x" * 8
    await env.checkpoint(force=True)
    assert await env.log.archive(remove=True)  # page 0's file among them
    child = spawn(ONE_PAGE, home, env={"AIODBENV_TEST_SIGNAL": "txn.logged:at:1:SIGKILL"})
    procs.append(child)
    await _dead(child)
    assert await _page(f, 0) == b"COMMIT!!"
    assert not env._core.panicked
    await env.log.flush()
    await f.close()
    await env.close()
    assert await _recovered(home, [0], **kw) == [b"COMMIT!!"]
    await aiodbenv.Env.remove(home, force=True)


WRITER = """
import asyncio, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    await env.log.put(b"w" * 100, flush=True)  # stops itself before this round's write
    print("survived", flush=True)

asyncio.run(main())
"""


async def test_finishing_waits_out_a_stopped_log_writer(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """Another process holds the log writer role and is stopped while the reaper finishes a
    dead commit: reading the log times out, the buffers stay pinned and latched, and the next
    look of the reaper finishes the commit once the writer is gone. No panic (there was)."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    async with env.txn() as tx:
        (await tx.page(f, 0, create=True)).data[100:101] = b"s"
    await env.log.flush()
    env.log.wait_timeout = 1.0
    writer = spawn(WRITER, home, env={"AIODBENV_TEST_SIGNAL": "pwrite:before:1:SIGSTOP"})
    procs.append(writer)
    await wait_stopped(writer)
    child = spawn(ONE_PAGE, home, env={"AIODBENV_TEST_SIGNAL": "txn.logged:at:1:SIGKILL"})
    procs.append(child)
    await _dead(child)
    await asyncio.sleep(2.5)  # a look or two of the reaper, each timing out
    assert not env._core.panicked
    await asyncio.to_thread(end_stopped, writer)
    env.log.wait_timeout = 30.0
    assert await _page(f, 0) == b"COMMIT!!"  # finished once the writer is gone
    assert not env._core.panicked
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)
