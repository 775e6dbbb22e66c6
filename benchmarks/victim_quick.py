"""Misses whose victims are dirty against misses whose victims are clean: the extra cost of a
dirty victim, amortised (a few seconds; compare two trees side by side on the same machine).

A 4 MiB cache (1,024 frames of 4 KiB) full of pages; then 4,096 misses, each creating a new
page: in the *dirty* run every page is dirtied (so every victim is dirty and must be written
first), in the *clean* run none is. Best of 3 per run, interleaved. Then the same with misses
of pages already on disk (``async with f.get(p)``: the compiled page context's miss, when
installed).

    .venv/bin/python benchmarks/victim_quick.py
    PYTHONPATH=<other tree> .venv/bin/python benchmarks/victim_quick.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

import aiodbenv

MISSES = 4096


async def _run(dirty: bool, rep: int, on_disk: bool) -> float:
    home = tempfile.mkdtemp(prefix="aiodbenv-victimq-")
    env = await aiodbenv.Env.open(home, create=True, cache_size=4 << 20)
    try:
        async with env.pool.open_file("data", create=True) as f:
            if on_disk:  # the pages the misses read, written out first
                for p in range(MISSES):
                    async with f.get(p, create=True) as page:
                        page.data[0] = 1
                        page.mark_dirty()
                await env.pool.sync()
            for p in range(1024):  # a full cache (dirty or clean, like what follows)
                async with f.get(100000 + p, create=True) as page:
                    page.data[0] = rep
                    if dirty:
                        page.mark_dirty()
            t0 = time.perf_counter()
            for p in range(MISSES):
                async with f.get(p) if on_disk else f.get(p, create=True) as page:
                    page.data[0] = 1
                    if dirty:
                        page.mark_dirty()
            return (time.perf_counter() - t0) / MISSES
    finally:
        await env.close()
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    where = os.path.dirname(aiodbenv.__file__)
    for on_disk in (False, True):
        best = {True: float("inf"), False: float("inf")}
        for rep in range(3):
            for dirty in (True, False):
                best[dirty] = min(best[dirty], await _run(dirty, rep, on_disk))
        what = "misses of pages on disk" if on_disk else "misses creating pages"
        print(
            f"{where}, {what}: with a dirty victim {best[True] * 1e6:.1f} µs, with a clean "
            f"victim {best[False] * 1e6:.1f} µs: a dirty victim adds "
            f"{(best[True] - best[False]) * 1e6:.1f} µs per miss, amortised (best of 3)"
        )


if __name__ == "__main__":
    asyncio.run(main())
