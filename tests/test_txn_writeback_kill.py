"""A process SIGKILLed at a step of write-back (``pool.sync()`` or a checkpoint) while other
processes run transactions: the others keep committing, the pages stay consistent (a counter
that every transaction adds 1 to equals the number of commits), and after the regions are
lost, recovery gives back every acknowledged commit."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess

import pytest

import aiodbenv
from tests.conftest import spawn

PS = 4096
N = 40  # transactions per worker

WORKER = """
import asyncio, os, struct, sys
import aiodbenv

async def main():
    home, w, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    print("ready", flush=True)
    while not os.path.exists(go):
        await asyncio.sleep(0.001)
    for k in range(n):
        async with env.txn(durability="sync") as tx:
            c = await tx.page(f, 0)
            (v,) = struct.unpack_from("<Q", c.data, 64)
            c.data[64:72] = struct.pack("<Q", v + 1)
            # This worker's own pages: slot k of one, and a big change of another.
            p = await tx.page(f, 1 + w * 8 + k % 8, create=True)
            p.data[16 + 8 * k : 24 + 8 * k] = struct.pack("<Q", k + 1)
            p.data[2048:] = os.urandom(2048)
        print("acked", k, flush=True)
    print("done", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""

SYNCER = """
import asyncio, os, sys
import aiodbenv

async def main():
    home, op, go = sys.argv[1], sys.argv[2], sys.argv[3]
    env = await aiodbenv.Env.open(home)
    print("ready", flush=True)
    while not os.path.exists(go):
        await asyncio.sleep(0.001)
    for _ in range(2000):
        try:
            if op == "checkpoint":
                await env.checkpoint()
            else:
                await env.pool.sync()
        except aiodbenv.Incomplete:
            pass  # pages latched by a transaction: written next time
        await asyncio.sleep(0.005)
    print("survived", flush=True)

asyncio.run(main())
"""


def _line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None and p.stderr is not None
    out = p.stdout.readline()
    if not out:
        raise AssertionError(p.stderr.read())
    return out.strip()


async def line(p: subprocess.Popen[str]) -> str:
    return await asyncio.to_thread(_line, p)


@pytest.mark.parametrize(
    ("op", "plan"),
    [
        ("sync", "claimed:at:3:SIGKILL"),
        ("sync", "pwrite:after:4:SIGKILL"),
        ("checkpoint", "write_done:at:3:SIGKILL"),
        ("checkpoint", "fsync_begin:at:2:SIGKILL"),
    ],
)
async def test_writer_killed_during_write_back(
    home: str, procs: list[subprocess.Popen[str]], op: str, plan: str
) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True, cache_size=256 * 1024)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    async with env.txn() as tx:
        await tx.page(f, 0, create=True)
    await f.close()
    go = os.path.join(home, "go")
    workers = [spawn(WORKER, home, str(w), str(N), go) for w in range(2)]
    procs.extend(workers)
    syncer = spawn(SYNCER, home, op, go, env={"AIODBENV_TEST_SIGNAL": plan})
    procs.append(syncer)
    for p in (*workers, syncer):
        assert await line(p) == "ready"
    open(go, "w").close()
    acked: list[list[int]] = [[], []]

    async def follow(w: int) -> None:
        while (out := await line(workers[w])) != "done":
            acked[w].append(int(out.split()[1]))

    await asyncio.wait_for(asyncio.gather(follow(0), follow(1)), 120)
    # The syncer died at its step of write-back, and the workers went on to the end.
    assert await asyncio.to_thread(syncer.wait, 30) == -signal.SIGKILL
    assert acked == [list(range(N)), list(range(N))]

    def check(pages: dict[int, bytes]) -> None:
        assert struct.unpack_from("<Q", pages[0], 64)[0] == 2 * N  # no update lost or doubled
        for w in range(2):
            for k in range(N):
                page = pages[1 + w * 8 + k % 8]
                assert struct.unpack_from("<Q", page, 16 + 8 * k)[0] == k + 1, (w, k)

    async def read(e: aiodbenv.Env) -> dict[int, bytes]:
        g = await e.pool.open_file(e.resolve("data.db"), page_size=PS, lsn_offset=0)
        out = {}
        for pgno in range(17):
            async with g.get(pgno, latch=True) as p:
                out[pgno] = bytes(p.data)
        await g.close()
        return out

    check(await read(env))  # consistent in the shared cache, the killed writer reaped
    for p in workers:
        p.kill()
        await asyncio.to_thread(p.wait, 10)
    await env.close(nosync=True)
    # The regions are lost, with whatever the dead writer left half done: recovery gives
    # every acknowledged commit back.
    await aiodbenv.Env.remove(home, force=True)
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    check(await read(env))
    await env.close()
    await aiodbenv.Env.remove(home)
