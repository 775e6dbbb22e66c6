"""Misses that go to the disk: what the disk gives, and what the event loop thread pays per
miss (a few seconds; root, to drop the OS page cache; compare two trees side by side).

A 256 MiB file of random bytes, an 8 MiB cache. Each repetition:

- ``pread``: the disk alone, the OS cache dropped, 10,000 random 4 KiB ``os.pread`` calls
  from 1 and from 32 threads (what the device gives at depth 1 and 32);
- ``aiodbenv``: the OS cache dropped, 10,000 random misses ``async with f.get(p)`` from 1
  and from 32 coroutines: misses per second, and the loop thread's CPU per miss (user and
  kernel, from ``/proc``: 10 ms ticks, so only their sum over the run is meaningful); then,
  in the same pool, the cache dropped again, 10,000 other misses (round 2). Round 1 follows
  a warm-up that read the cache full from the OS page cache, so its first misses still try
  ``RWF_NOWAIT`` (which starts the kernel's readahead in the loop thread, and the pages it
  brings in are then misses served from the OS cache, which share the loop's turn budget);
  round 2 starts with the misses known to go to the disk.

    .venv/bin/python benchmarks/cold_quick.py [reps]
    PYTHONPATH=<other tree> .venv/bin/python benchmarks/cold_quick.py
    AIODBENV_READER=threads .venv/bin/python benchmarks/cold_quick.py
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import tempfile
import threading
import time

import aiodbenv

PAGES = 65536  # 256 MiB of 4 KiB pages
MISSES = 10_000


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3")


def _thread_ticks() -> tuple[int, int]:
    """This thread's user and kernel CPU, in clock ticks."""
    with open(f"/proc/self/task/{threading.get_native_id()}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def pread_rate(path: str, threads: int) -> float:
    """Random 4 KiB preads per second from ``threads`` threads, the OS cache dropped."""
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    rng = random.Random(1)
    pages = [rng.randrange(PAGES) for _ in range(MISSES)]

    def work(mine: list[int]) -> None:
        for p in mine:
            os.pread(fd, 4096, p * 4096)

    ts = [threading.Thread(target=work, args=(pages[i::threads],)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    os.close(fd)
    return MISSES / (time.perf_counter() - t0)


async def miss_rate(path: str, coroutines: int) -> list[tuple[float, float, float]]:
    """Per round: (misses per second, loop thread CPU per miss in µs, the kernel's share)."""
    home = tempfile.mkdtemp(prefix="aiodbenv-coldq-")
    env = await aiodbenv.Env.open(home, create=True, cache_size=8 << 20)
    rng = random.Random(2)
    rounds = []
    try:
        async with env.pool.open_file(path, page_size=4096) as f:

            async def run(mine: list[int]) -> None:
                for p in mine:
                    async with f.get(p):
                        pass

            await run(list(range(2048)))  # fill the cache: every timed get is a miss
            for _ in range(2):
                pages = [rng.randrange(PAGES) for _ in range(MISSES)]
                drop_caches()
                u0, k0 = _thread_ticks()
                t0 = time.perf_counter()
                await asyncio.gather(*(run(pages[i::coroutines]) for i in range(coroutines)))
                elapsed = time.perf_counter() - t0
                u1, k1 = _thread_ticks()
                cpu = ((u1 - u0) + (k1 - k0)) / os.sysconf("SC_CLK_TCK")
                kernel = (k1 - k0) / max(1, (u1 - u0) + (k1 - k0))
                rounds.append((MISSES / elapsed, cpu / MISSES * 1e6, kernel))
        return rounds
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)
        shutil.rmtree(home, ignore_errors=True)


def main(reps: int) -> None:
    work = tempfile.mkdtemp(prefix="aiodbenv-coldq-data-")
    path = os.path.join(work, "data")
    try:
        with open(path, "wb") as fh:
            for _ in range(PAGES // 256):
                fh.write(os.urandom(1 << 20))
        print(f"{os.path.dirname(aiodbenv.__file__)}, load average {os.getloadavg()}")
        for rep in range(reps):
            print(
                f"rep {rep}: pread 1 thread {pread_rate(path, 1):7,.0f}/s, "
                f"32 threads {pread_rate(path, 32):7,.0f}/s"
            )
            for conc in (1, 32) if rep % 2 == 0 else (32, 1):
                for k, (rate, cpu, kernel) in enumerate(asyncio.run(miss_rate(path, conc))):
                    print(
                        f"rep {rep}: aiodbenv {conc:2d} coroutine(s), round {k + 1}: "
                        f"{rate:7,.0f} misses/s, loop thread {cpu:5.1f} µs CPU per miss "
                        f"({kernel:.0%} in the kernel)"
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("cold_quick.py drops the OS page cache: run it as root")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
