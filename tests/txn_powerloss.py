"""The transaction workload of the power-loss tests (tests/test_txn_recover.py), run in the test's
own process or in child processes, and the check of a recovered environment against its model.

Transaction ``n`` writes ``n`` into slot ``n`` (8 bytes at ``16 + 8 n``) of each of 1-3 pages,
and sometimes 2 KiB of random bytes into the upper half of a page (a big change: a full image
in the log). Each slot belongs to one transaction, so after recovery a transaction is either in
every page it touched or in none. Before committing, a transaction journals a mark naming its
pages; after a ``sync`` commit returns, it journals an acknowledgement (see tests/powerloss.py:
marks after the crash point do not count).
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import sys

import aiodbenv
from tests import powerloss

PS = 4096
NPAGES = 6
#: Slots end below the random upper half of a page.
MAX_TXN = (PS // 2 - 16) // 8
ENV_ARGS = {"cache_size": 64 * 1024, "log_file_size": 64 * 1024}


async def open_data(env: aiodbenv.Env, create: bool = False) -> aiodbenv.PoolFile:
    return await env.pool.open_file(
        env.resolve("data.db"), create=create, page_size=PS, lsn_offset=0
    )


async def workload(
    env: aiodbenv.Env,
    f: aiodbenv.PoolFile,
    journal: powerloss.Journal,
    rng: random.Random,
    ids: range,
    stop_after_ios: int = 0,
) -> None:
    """Run transactions ``ids`` (see the module docstring), with checkpoints and pool syncs
    between some of them so that pages are written and fsynced while the log grows. Stops
    early once this process made ``stop_after_ios`` I/Os (0: never)."""
    assert ids.stop <= MAX_TXN
    for n in ids:
        if stop_after_ios and journal.ios >= stop_after_ios:
            return
        pgnos = sorted(rng.sample(range(NPAGES), rng.randint(1, 3)))
        durability = rng.choice(["sync", "sync", "nosync"])
        journal.mark(b"t %d %s" % (n, ",".join(map(str, pgnos)).encode()))
        async with env.txn(durability=durability) as tx:  # type: ignore[arg-type]
            for pgno in pgnos:  # ascending: no Deadlock between the processes
                p = await tx.page(f, pgno, create=True)
                p.data[16 + 8 * n : 24 + 8 * n] = struct.pack("<Q", n)
                if rng.random() < 0.3:
                    p.data[PS // 2 :] = rng.randbytes(PS // 2)
        if durability == "sync":
            journal.mark(b"a %d" % n)
        r = rng.random()
        try:
            if r < 0.1:
                await env.checkpoint()
            elif r < 0.3:
                await env.pool.sync()
        except aiodbenv.Incomplete:
            pass  # pages latched by another process's transaction: written next time


async def prepare(home: str) -> dict[str, bytes]:
    """Make the environment the children join (its regions stay) and the data file with its
    pages; returns the disk's contents before the workload (all of it synced)."""
    env = await aiodbenv.Env.open(home, create=True, log=True, **ENV_ARGS)  # type: ignore[arg-type]
    f = await open_data(env, create=True)
    async with env.txn() as tx:
        for pgno in range(NPAGES):
            p = await tx.page(f, pgno, create=True)
            p.data[8:16] = b"prepared"
    await f.close()
    await env.close()  # the final checkpoint writes and fsyncs everything
    return powerloss.Disk.snapshot(home)


async def child_main(home: str, journal_path: str, seed: str, first: str, count: str) -> None:
    """A child process: join the environment and run its share of the workload with its I/O
    journaled; prints ``done`` at the end, then waits to be killed."""
    journal = powerloss.install(journal_path)
    env = await aiodbenv.Env.open(home)
    f = await open_data(env)
    start = int(first)
    await workload(env, f, journal, random.Random(int(seed)), range(start, start + int(count)))
    print("done", flush=True)
    await asyncio.sleep(3600)


async def check(home: str, seed: int, marks: list[bytes]) -> None:
    """Recover ``home`` (its regions already removed, its files as the power loss left them)
    and check the pages against the marks: every acknowledged ``sync`` transaction is in all
    its pages, and no transaction is in some of its pages only."""
    touched: dict[int, list[int]] = {}
    acked: set[int] = set()
    for m in marks:
        kind, n, *rest = m.split()
        if kind == b"t":
            touched[int(n)] = [int(x) for x in rest[0].split(b",")]
        else:
            acked.add(int(n))
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    f = await open_data(env, create=True)
    contents = {}
    for pgno in range(NPAGES):
        async with f.get(pgno, create=True) as p:
            contents[pgno] = bytes(p.data)
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home)

    def has(n: int, pgno: int) -> bool:
        return bool(struct.unpack_from("<Q", contents[pgno], 16 + 8 * n)[0] == n)

    for n, pgnos in touched.items():
        found = [has(n, pg) for pg in pgnos]
        if n in acked:
            assert all(found), f"seed {seed}: sync-committed txn {n} lost on {pgnos}: {found}"
        assert all(found) or not any(found), f"seed {seed}: txn {n} in part: {found}"
    assert acked <= touched.keys()


def clean(home: str) -> None:
    """Remove every file of ``home`` (data, log, journal) for the next round."""
    for name in os.listdir(home):
        os.unlink(os.path.join(home, name))


if __name__ == "__main__":
    asyncio.run(child_main(*sys.argv[1:]))
