"""N processes committing ``sync`` at once, one coroutine each, each on its own page of one
file: commits per second in all, and each process's event loop CPU and process CPU per commit
(the machine's CPUs, not the disk, bound this on a small VM). Prints one line per process, the
total, and the log's records per flush (group commit):

    .venv/bin/python benchmarks/txn_procs_quick.py [processes] [seconds]

Run it with another checkout's interpreter (its own .venv) to compare two versions in the same
minutes.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time

import aiodbenv

CHANGE = b"y" * 100


async def worker(home: str, idx: int, seconds: float) -> None:
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file("d.db", page_size=4096, lsn_offset=0)
    n = 0
    for i in range(50):  # warm up
        async with env.txn(durability="sync") as tx:
            (await tx.page(f, idx)).data[64:164] = CHANGE if i % 2 else bytes(100)
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        async with env.txn(durability="sync") as tx:
            (await tx.page(f, idx)).data[64:164] = CHANGE if n % 2 else bytes(100)
        n += 1
    dt = time.perf_counter() - t0
    loop_us = (time.thread_time() - c0) / n * 1e6
    proc_us = (time.process_time() - p0) / n * 1e6
    print(f"{idx} {n / dt:.0f} {loop_us:.1f} {proc_us:.1f}", flush=True)
    await f.close()
    await env.close()


async def main(nproc: int, seconds: float) -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-txnp-")
    env = await aiodbenv.Env.open(home, create=True, log=True, cache_size=32 << 20)
    try:
        f = await env.pool.open_file("d.db", create=True, page_size=4096, lsn_offset=0)
        async with env.txn() as tx:
            for i in range(nproc):
                await tx.page(f, i, create=True)
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "_worker", home, str(i), str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(nproc)
        ]
        total = 0.0
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 120)
            idx, rate, loop_us, proc_us = out.split()
            total += float(rate)
            print(
                f"process {idx}: {float(rate):8,.0f} commits/s, loop CPU {loop_us} us, "
                f"process CPU {proc_us} us per commit"
            )
        st = env.log.stat()
        print(
            f"total {total:,.0f} commits/s; {st.records / max(1, st.flushes):.2f} records per "
            f"flush (at most {st.maxcommitperflush})"
        )
        await f.close()
    finally:
        await env.close()
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        asyncio.run(worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    else:
        asyncio.run(
            main(
                int(sys.argv[1]) if len(sys.argv) > 1 else 4,
                float(sys.argv[2]) if len(sys.argv) > 2 else 3.0,
            )
        )
