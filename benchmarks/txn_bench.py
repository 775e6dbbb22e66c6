"""Transactions: commits per second of a 100-byte change to one page, a second or so per row
(measured on whatever machine runs it: a loaded, shared one gives noisy figures; compare rows
of one run, not runs):

- ``sync``: one process, ``durability="sync"`` (an fdatasync per commit);
- ``N x sync``: N processes at once, each its own page (group commit shares the fsyncs);
- ``nosync``: one process, ``durability="nosync"``;
- ``sqlite WAL FULL`` / ``OFF``: SQLite in WAL mode, one ``UPDATE`` of a 100-byte blob per
  transaction, ``synchronous=FULL`` or ``OFF`` (the standard library's sqlite3).

Berkeley DB's btree anchor is not measured here.

    .venv/bin/python benchmarks/txn_bench.py [seconds per row]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import aiodbenv

CHANGE = b"y" * 100
PS = 4096


async def one(name: str, seconds: float, durability: str) -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-txnb-")
    env = await aiodbenv.Env.open(home, create=True, log=True)
    try:
        f = await env.pool.open_file("data.db", create=True, page_size=PS, lsn_offset=0)
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(20):
                async with env.txn(durability=durability) as tx:  # type: ignore[arg-type]
                    p = await tx.page(f, 0, create=True)
                    p.data[64 + n % 64 : 164 + n % 64] = CHANGE if n % 2 else bytes(100)
                n += 1
        elapsed = time.perf_counter() - t0
        print(f"{name:18s} {n / elapsed:>10,.0f} commits/s  {elapsed / n * 1e6:9.1f} us/commit")
        await f.close()
        await env.checkpoint()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)


CHILD = """
import asyncio, os, sys, time
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    f = await env.pool.open_file("data.db", page_size=4096, lsn_offset=0)
    pgno = int(sys.argv[4])
    while not os.path.exists(sys.argv[2]):
        await asyncio.sleep(0.001)
    n, deadline = 0, time.perf_counter() + float(sys.argv[3])
    while time.perf_counter() < deadline:
        async with env.txn(durability="sync") as tx:
            p = await tx.page(f, pgno)
            p.data[64:164] = b"y" * 100 if n % 2 else bytes(100)
        n += 1
    print(n)
    await f.close()
    await env.close()

asyncio.run(main())
"""


async def processes(nproc: int, seconds: float) -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-txnb-")
    env = await aiodbenv.Env.open(home, create=True, log=True)
    go = os.path.join(home, "go")
    try:
        f = await env.pool.open_file("data.db", create=True, page_size=PS, lsn_offset=0)
        async with env.txn() as tx:
            for i in range(nproc):
                await tx.page(f, i, create=True)
        children = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, home, go, str(seconds), str(i)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(nproc)
        ]
        await asyncio.sleep(1.0)  # let them open the environment
        st0 = env.log.stat()
        open(go, "w").close()
        t0 = time.perf_counter()
        # Not c.communicate() on the loop: this process may hold the log's writer role (its
        # first commit flushed), and a blocked loop would stall every child's flush.
        outs = await asyncio.gather(*(asyncio.to_thread(c.communicate) for c in children))
        counts = [int(out[0]) for out in outs]
        elapsed = time.perf_counter() - t0
        st = env.log.stat()
        n = sum(counts)
        print(
            f"{nproc} x sync{'':12s} {n / elapsed:>10,.0f} commits/s  "
            f"{n / max(1, st.scount - st0.scount):5.1f} commits per fsync"
        )
        await f.close()
        await env.checkpoint()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)


def sqlite_row(name: str, seconds: float, synchronous: str) -> None:
    d = tempfile.mkdtemp(prefix="aiodbenv-txnb-sqlite-")
    try:
        db = sqlite3.connect(os.path.join(d, "t.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        db.execute("INSERT INTO t VALUES (1, ?)", (bytes(100),))
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(20):
                db.execute("BEGIN")
                db.execute("UPDATE t SET v = ? WHERE k = 1", (CHANGE if n % 2 else bytes(100),))
                db.execute("COMMIT")
                n += 1
        elapsed = time.perf_counter() - t0
        print(f"{name:18s} {n / elapsed:>10,.0f} commits/s  {elapsed / n * 1e6:9.1f} us/commit")
        db.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    await one("sync", seconds, "sync")
    await processes(4, seconds * 2)
    await one("nosync", seconds, "nosync")
    sqlite_row("sqlite WAL FULL", seconds, "FULL")
    sqlite_row("sqlite WAL OFF", seconds, "OFF")


if __name__ == "__main__":
    asyncio.run(main())
