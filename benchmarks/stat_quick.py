"""How long the statistics calls hold the event loop with a large cache (a few seconds; compare
two trees side by side on the same machine).

A 256 MiB cache filled with 60,000 pages of 4 KiB, then, best of 3 each: ``pool.stat()``,
``env.stat()`` (its pins per process walk every buffer), ``f.stat()``, ``env.health()`` and
``aiodbenv.metrics.collect(env)`` (what a Prometheus scrape calls). Each is synchronous and
runs on the loop: its time is how long every other coroutine waits.

    .venv/bin/python benchmarks/stat_quick.py
    PYTHONPATH=<other tree> .venv/bin/python benchmarks/stat_quick.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import aiodbenv
from aiodbenv import metrics

CACHE = 256 << 20
PAGES = 60_000


def best_ms(fn: Callable[[], object], reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


async def main() -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-statq-")
    env = await aiodbenv.Env.open(home, create=True, cache_size=CACHE)
    try:
        async with env.pool.open_file(env.resolve("a.db"), create=True, page_size=4096) as f:
            for p in range(PAGES):
                async with f.get(p, create=True):
                    pass
            print(f"{os.path.dirname(aiodbenv.__file__)}, {PAGES} pages in a 256 MiB cache")
            for name, fn in (
                ("pool.stat()", env.pool.stat),
                ("env.stat()", env.stat),
                ("f.stat()", f.stat),
                ("env.health()", env.health),
                ("metrics.collect(env)", lambda: metrics.collect(env)),
            ):
                print(f"{name:22s} {best_ms(fn):8.2f} ms on the loop (best of 3)")
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
