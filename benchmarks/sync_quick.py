"""``pool.sync()`` of 64 MiB (16,384 dirty 4 KiB pages, overwritten in place): best of 3.

A few seconds; for comparing two trees side by side on the same (shared, noisy) machine:

    .venv/bin/python benchmarks/sync_quick.py
    PYTHONPATH=<other tree> .venv/bin/python benchmarks/sync_quick.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

import aiodbenv

PAGES = 16384


async def main() -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-syncq-")
    env = await aiodbenv.Env.open(home, create=True, cache_size=96 << 20)
    best = float("inf")
    try:
        async with env.pool.open_file("data", create=True) as f:
            for p in range(PAGES):
                async with f.get(p, create=True) as page:
                    page.data[0:8] = p.to_bytes(8, "little")
                    page.mark_dirty()
            await env.pool.sync()
            for _ in range(3):
                for p in range(PAGES):
                    async with f.get(p) as page:
                        page.data[8] = (page.data[8] + 1) & 0xFF
                        page.mark_dirty()
                t0 = time.perf_counter()
                r = await env.pool.sync()
                best = min(best, time.perf_counter() - t0)
                assert r.written == PAGES
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)
        shutil.rmtree(home, ignore_errors=True)
    print(
        f"{os.path.dirname(aiodbenv.__file__)}: sync of 64 MiB, best of 3: "
        f"{best * 1000:.0f} ms ({64 / best:.0f} MiB/s)"
    )


if __name__ == "__main__":
    asyncio.run(main())
