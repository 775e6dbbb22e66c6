"""The hot pin: ``async with f.get(p)`` on a cached page, best ns per pin over 40 batches.

A few seconds; for comparing two trees side by side on the same (shared, noisy) machine, as
issue 10's per-slot pin accounting was measured (alternate the two a few times):

    .venv/bin/python benchmarks/hot_pin_quick.py
    PYTHONPATH=<other tree> .venv/bin/python benchmarks/hot_pin_quick.py

``AIODBENV_HOT=python`` measures the Python context over the cffi hit and unpin instead of the
compiled context (aiodbenv._hot); ``AIODBENV_MUTEX=abi`` the pure-Python twin of the hit path.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time

import aiodbenv

BATCH = 5000


async def main(batches: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        env = await aiodbenv.Env.open(home, create=True, cache_size=1 << 20, page_size=4096)
        f = await env.pool.open_file("b.db", create=True, page_size=4096)
        for p in range(8):
            async with f.get(p, create=True):
                pass
        best = float("inf")
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(BATCH):
                async with f.get(3):
                    pass
            best = min(best, (time.perf_counter() - t0) / BATCH)
        await f.close()
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
    print(f"{aiodbenv.__file__}: best {best * 1e9:.0f} ns per hot pin")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 40))
