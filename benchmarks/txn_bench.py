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

``pairs`` measures the ``sync`` reference alone, paired: one aiodbenv environment and one SQLite
WAL ``synchronous=FULL`` database, both kept open in one directory (the same file system) and
warmed up (SQLite past its first WAL checkpoint, so its steady state: the WAL overwritten in
place), then alternating slices of ``seconds`` each, the order swapped every pair, so a change
of the machine's load hits both sides of a pair alike. Each aiodbenv slice also reports its
fsyncs per commit and the disk's time for a 100-byte pwrite and fdatasync, probed in the same
directory right after the slice (not timed at the I/O seam: patching it turns the compiled log
rounds off), so the part of a commit beyond its fsync shows, and the event loop thread's CPU
time per commit
(the rest of that part is waiting: thread hand-offs and wake-ups). The summary gives the median
of each side and of the per-pair ratio:

    .venv/bin/python benchmarks/txn_bench.py pairs [seconds per slice] [pairs]
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
    t0 = time.perf_counter()
    n, deadline = 0, t0 + float(sys.argv[3])
    while time.perf_counter() < deadline:
        async with env.txn(durability="sync") as tx:
            p = await tx.page(f, pgno)
            p.data[64:164] = b"y" * 100 if n % 2 else bytes(100)
        n += 1
    print(n, time.perf_counter() - t0)
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
        # Not c.communicate() on the loop: this process may hold the log's writer role (its
        # first commit flushed), and a blocked loop would stall every child's flush.
        outs = await asyncio.gather(*(asyncio.to_thread(c.communicate) for c in children))
        counts = [int(out[0].split()[0]) for out in outs]
        # Each child times its own loop (as Berkeley DB's writers do): the slowest one's
        # time, not the interpreters' start-up and close, which cost 5-15% of a 1 s run.
        elapsed = max(float(out[0].split()[1]) for out in outs)
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


def probe_fsync(directory: str, seconds: float = 0.1) -> float:
    """Seconds per 100-byte pwrite + fdatasync on a preallocated file in ``directory``, in this
    thread: the disk's flush latency next to a slice. (Timing aiodbenv's own fdatasync calls
    by patching the I/O seam would send its log rounds down the Python path, which the seam's
    patches switch on: the slices would measure that path, not the default one.)"""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, bytes(1 << 20), 0)
        os.fsync(fd)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            os.pwrite(fd, CHANGE, (n * 100) % (1 << 20))
            os.fdatasync(fd)
            n += 1
        return (time.perf_counter() - t0) / max(1, n)
    finally:
        os.close(fd)
        os.unlink(path)


async def pairs(seconds: float, npairs: int) -> None:
    """The paired ``sync`` reference (see the module docstring)."""
    home = tempfile.mkdtemp(prefix="aiodbenv-txnb-")
    env = await aiodbenv.Env.open(home, create=True, log=True)
    db = sqlite3.connect(os.path.join(home, "t.db"), isolation_level=None)
    try:
        f = await env.pool.open_file("data.db", create=True, page_size=PS, lsn_offset=0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        db.execute("INSERT INTO t VALUES (1, ?)", (bytes(100),))
        n_sql = 0

        def sql_slice(until: float) -> int:
            nonlocal n_sql
            n = 0
            while time.perf_counter() < until:
                db.execute("BEGIN")
                db.execute("UPDATE t SET v = ? WHERE k = 1", (CHANGE if n_sql % 2 else bytes(100),))
                db.execute("COMMIT")
                n += 1
                n_sql += 1
            return n

        async def env_slice(until: float) -> tuple[int, int, float]:
            st0, c0 = env.log.stat().scount, time.thread_time()
            n = 0
            while time.perf_counter() < until:
                async with env.txn(durability="sync") as tx:
                    p = await tx.page(f, 0, create=True)
                    p.data[64:164] = CHANGE if n % 2 else bytes(100)
                n += 1
            cpu = time.thread_time() - c0
            return n, env.log.stat().scount - st0, cpu

        # Warm up: SQLite past its first checkpoint (1000 WAL frames), aiodbenv likewise.
        while n_sql < 1100:
            sql_slice(time.perf_counter() + seconds)
        await env_slice(time.perf_counter() + seconds)
        ours: list[float] = []
        theirs: list[float] = []
        ratios: list[float] = []
        for i in range(npairs):
            rates = {}
            for side in ("aiodbenv", "sqlite") if i % 2 == 0 else ("sqlite", "aiodbenv"):
                t0 = time.perf_counter()
                if side == "sqlite":
                    n = sql_slice(t0 + seconds)
                    rates[side] = n / (time.perf_counter() - t0)
                else:
                    n, fsyncs, cpu = await env_slice(t0 + seconds)
                    el = time.perf_counter() - t0
                    rates[side] = n / el
                    per = probe_fsync(home)
                    beyond = el / max(1, n) - per * fsyncs / max(1, n)
                    detail = (
                        f"{fsyncs / max(1, n):4.2f} fsyncs/commit, fdatasync {per * 1e6:6.0f} us, "
                        f"beyond it {beyond * 1e6:5.0f} us/commit, of which the event loop "
                        f"thread's CPU {cpu / max(1, n) * 1e6:4.0f} us"
                    )
            ours.append(rates["aiodbenv"])
            theirs.append(rates["sqlite"])
            ratios.append(rates["aiodbenv"] / rates["sqlite"])
            print(
                f"pair {i + 1:2d}: aiodbenv sync {rates['aiodbenv']:7,.0f}/s ({detail}); "
                f"sqlite WAL FULL {rates['sqlite']:7,.0f}/s; ratio {ratios[-1]:5.2f}"
            )
        print(
            f"-- medians over {npairs} pairs of {seconds:g} s: aiodbenv sync "
            f"{statistics.median(ours):,.0f}/s, sqlite WAL FULL "
            f"{statistics.median(theirs):,.0f}/s, ratio {statistics.median(ratios):.2f}"
        )
        await f.close()
    finally:
        db.close()
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "pairs":
        await pairs(
            float(sys.argv[2]) if len(sys.argv) > 2 else 0.5,
            int(sys.argv[3]) if len(sys.argv) > 3 else 10,
        )
        return
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
