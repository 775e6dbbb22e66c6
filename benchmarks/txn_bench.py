"""Transactions: commits per second of a 100-byte change to one page, a second or so per row
(measured on whatever machine runs it: a loaded, shared one gives noisy figures; compare rows
of one run, not runs):

- ``sync``: one process, ``durability="sync"`` (an fdatasync per commit);
- ``N x sync``: N processes at once, each its own page (group commit shares the fsyncs);
- ``nosync``: one process, ``durability="nosync"``;
- ``sqlite WAL FULL`` / ``OFF``: SQLite in WAL mode, one ``UPDATE`` of a 100-byte blob per
  transaction, ``synchronous=FULL`` or ``OFF`` (the standard library's sqlite3);
- ``bdb ...``: Berkeley DB 5.3's btree, one 100-byte record update per transaction,
  ``DB_TXN_SYNC`` / ``DB_TXN_NOSYNC``, in 1 and N processes (benchmarks/anchors/bdb_txn.c;
  each writer updates its own record, on its own leaf page). Shown as unavailable if
  libdb5.3-dev cannot be had.

The three sides run alternately, row by row, ``reps`` times; the summary gives each row's
median and the issue's aims (sync commits at least SQLite FULL's rate in 1 process and 2x it
in N; nosync at least 50k commits/s).

    .venv/bin/python benchmarks/txn_bench.py [seconds per row] [reps]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import aiodbenv

try:  # run as a script (python benchmarks/txn_bench.py) or as a module
    from benchmarks.anchors.build import AnchorError, run_anchor
except ImportError:  # pragma: no cover - the repository root is not on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.anchors.build import AnchorError, run_anchor

CHANGE = b"y" * 100
PS = 4096


async def one(name: str, seconds: float, durability: str) -> float:
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
    return n / elapsed


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


async def processes(nproc: int, seconds: float) -> float:
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
            f"{f'{nproc} x sync':18s} {n / elapsed:>10,.0f} commits/s  "
            f"{n / max(1, st.scount - st0.scount):5.1f} commits per fsync"
        )
        await f.close()
        await env.checkpoint()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)
    return n / elapsed


def sqlite_row(name: str, seconds: float, synchronous: str) -> float:
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
    return n / elapsed


def bdb_row(name: str, seconds: float, sync: str, nproc: int) -> float | None:
    """Berkeley DB's btree anchor (None, with the reason printed, if it cannot run here)."""
    try:
        r = run_anchor(
            ["commit", "--sync", sync, "--procs", str(nproc), "--seconds", str(seconds)],
            harness="txn",
        )
    except AnchorError as err:
        print(f"{name:18s} unavailable: {str(err).splitlines()[0]}")
        return None
    rate = float(r["commits_per_s"])
    extra = (
        f"{r['commits'] / max(1, r['fsyncs']):5.1f} commits per fsync"
        if sync == "sync"
        else f"{1e6 / rate:9.1f} us/commit"
    )
    print(f"{name:18s} {rate:>10,.0f} commits/s  {extra}")
    return rate


async def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    nproc = 4
    rates: dict[str, list[float]] = {}

    def keep(name: str, rate: float | None) -> None:
        if rate is not None:
            rates.setdefault(name, []).append(rate)

    for rep in range(reps):
        print(f"-- repetition {rep + 1} of {reps}")
        # Alternating, so that the machine's load changes hit every side alike.
        keep("sync", await one("sync", seconds, "sync"))
        keep("bdb sync", bdb_row("bdb sync", seconds, "sync", 1))
        keep("sqlite WAL FULL", sqlite_row("sqlite WAL FULL", seconds, "FULL"))
        keep(f"{nproc} x sync", await processes(nproc, seconds * 2))
        keep(f"bdb {nproc} x sync", bdb_row(f"bdb {nproc} x sync", seconds * 2, "sync", nproc))
        keep("nosync", await one("nosync", seconds, "nosync"))
        keep("bdb nosync", bdb_row("bdb nosync", seconds, "nosync", 1))
        keep("sqlite WAL OFF", sqlite_row("sqlite WAL OFF", seconds, "OFF"))
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"-- median commits/s over {reps} repetition(s)")
    for name, rate in med.items():
        print(f"{name:18s} {rate:>10,.0f}")
    full = med.get("sqlite WAL FULL")
    if full:
        print(
            f"aim sync >= sqlite FULL: {med['sync']:,.0f} vs {full:,.0f} "
            f"({'met' if med['sync'] >= full else 'not met'}); "
            f"aim {nproc} x sync >= 2x sqlite FULL: {med[f'{nproc} x sync']:,.0f} vs "
            f"{2 * full:,.0f} ({'met' if med[f'{nproc} x sync'] >= 2 * full else 'not met'}); "
            f"aim nosync >= 50k: {med['nosync']:,.0f} "
            f"({'met' if med['nosync'] >= 50_000 else 'not met'})"
        )


if __name__ == "__main__":
    asyncio.run(main())
