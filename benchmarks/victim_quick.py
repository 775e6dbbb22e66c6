"""Misses whose victims are dirty against misses whose victims are clean: the extra cost of a
dirty victim, amortised (a few seconds; compare two trees side by side on the same machine).

The pages are written first, in an environment of their own. Each run then opens a fresh
4 MiB cache (1,024 frames of 4 KiB), fills it by *reading* 1,024 of them (dirtying each in
the *dirty* run, none in the *clean* run; the dirty count is checked), and times 4,096 misses
of the others (``async with f.get(p)``: the compiled page context's miss, when installed),
dirtying each page in the dirty run. So every victim of the dirty run is dirty and must be
written first, and no victim of the clean run is. (A created page is dirty: a cache filled
with ``create=True`` would make the clean run write victims too.) Best of 3 per run,
interleaved. ``python -m benchmarks`` has the same measurement as rows of its table.

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
FRAMES = 1024


async def _write_pages(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, cache_size=4 << 20)
    try:
        async with env.pool.open_file("data", create=True) as f:
            for p in range(MISSES + FRAMES):
                async with f.get(p, create=True) as page:
                    page.data[0] = 1
                    page.mark_dirty()
                if p % 512 == 511:
                    await env.pool.sync()
            await env.pool.sync()
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


async def _run(home: str, dirty: bool) -> float:
    env = await aiodbenv.Env.open(home, create=True, cache_size=4 << 20)
    try:
        async with env.pool.open_file("data") as f:
            for p in range(MISSES, MISSES + FRAMES):  # a full cache, read from the file
                async with f.get(p) as page:
                    if dirty:
                        page.data[0] = 2
                        page.mark_dirty()
            st = env.pool.stat()
            want = st.pages if dirty else 0
            if st.page_dirty != want or st.pages < FRAMES * 9 // 10:
                raise RuntimeError(f"cache not as claimed: {st.pages} pages, {st.page_dirty} dirty")
            t0 = time.perf_counter()
            for p in range(MISSES):
                async with f.get(p) as page:
                    if dirty:
                        page.data[0] = 2
                        page.mark_dirty()
            elapsed = (time.perf_counter() - t0) / MISSES
            await env.pool.sync()  # untimed
            return elapsed
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


async def main() -> None:
    where = os.path.dirname(aiodbenv.__file__)
    home = tempfile.mkdtemp(prefix="aiodbenv-victimq-")
    try:
        await _write_pages(home)
        best = {True: float("inf"), False: float("inf")}
        for rep in range(3):
            for dirty in (True, False) if rep % 2 == 0 else (False, True):
                best[dirty] = min(best[dirty], await _run(home, dirty))
        print(
            f"{where}, misses of pages on disk: with a dirty victim {best[True] * 1e6:.1f} µs,"
            f" with a clean victim {best[False] * 1e6:.1f} µs: a dirty victim adds"
            f" {(best[True] - best[False]) * 1e6:.1f} µs per miss, amortised (best of 3)"
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
