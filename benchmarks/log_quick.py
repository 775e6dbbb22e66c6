"""The log, 100-byte records, a second or so per row (measured on whatever machine runs it:
a loaded, shared one gives noisy figures; compare rows of one run, not runs):

- ``put+flush``: one process, ``put(flush=True)`` per record (an fdatasync each, unless group
  commit merges them: one caller here, so none merge);
- ``put``: one process, no flush (the buffer is written when full, fsynced at file switches);
- ``write_nosync``: one process, ``put(write_nosync=True)`` per record (written, no fsync);
- ``in-memory``: ``log_inmemory=True``, ``put(flush=True)`` (a flush only marks records durable);
- ``8 x put+flush``: 8 processes each doing ``put(flush=True)`` at once (group commit: the
  records per fsync are printed).

    .venv/bin/python benchmarks/log_quick.py [seconds per row]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time

import aiodbenv

RECORD = b"x" * 100


async def row(
    name: str, seconds: float, flush: bool, write_nosync: bool = False, **kwargs: object
) -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-logq-")
    env = await aiodbenv.Env.open(home, create=True, **kwargs)  # type: ignore[arg-type]
    try:
        log = env.log
        st0 = log.stat()
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(100):
                await log.put(RECORD, flush=flush, write_nosync=write_nosync)
            n += 100
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - t0
        st = log.stat()
        print(
            f"{name:12s} {n / elapsed:>12,.0f} records/s  {elapsed / n * 1e6:8.2f} us/record  "
            f"fsyncs {st.scount - st0.scount}"
        )
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home)
        shutil.rmtree(home, ignore_errors=True)


CHILD = """
import asyncio, os, sys, time
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    while not os.path.exists(sys.argv[2]):
        await asyncio.sleep(0.001)
    n, t0 = 0, time.perf_counter()
    deadline = t0 + float(sys.argv[3])
    while time.perf_counter() < deadline:
        await env.log.put(b"x" * 100, flush=True)
        n += 1
    print(n, time.perf_counter() - t0)
    await env.close()

asyncio.run(main())
"""


async def processes(nproc: int, seconds: float) -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-logq-")
    env = await aiodbenv.Env.open(home, create=True, log=True)
    go = os.path.join(home, "go")
    try:
        st0 = env.log.stat()
        children = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, home, go, str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(nproc)
        ]
        await asyncio.sleep(1.0)  # let them open the environment
        open(go, "w").close()
        # Each child times its own loop: the sum of their rates leaves out start-up and close.
        outs = [c.communicate()[0].split() for c in children]
        st = env.log.stat()
        n = sum(int(o[0]) for o in outs)
        rate = sum(int(o[0]) / float(o[1]) for o in outs)
        fsyncs = st.scount - st0.scount
        print(
            f"{nproc} x put+flush {rate:>10,.0f} records/s  "
            f"{n / max(1, fsyncs):5.1f} records per fsync  max per flush {st.maxcommitperflush}"
        )
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home)
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    await row("put+flush", seconds, True, log=True)
    await row("put", seconds, False, log=True)
    await row("write_nosync", seconds, False, True, log=True)
    await row(
        "in-memory",
        seconds,
        True,
        log_inmemory=True,
        log_buffer_size=4 << 20,
        log_file_size=1 << 20,
    )
    await processes(8, seconds * 2)


if __name__ == "__main__":
    asyncio.run(main())
