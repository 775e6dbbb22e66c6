"""What page checksums cost: write-back and read-in throughput with and without them.

    python benchmarks/checksum_cost.py [--pages 4096] [--reps 3]

For each setting it writes ``--pages`` 4 KiB pages through the pool and syncs them (the
trailer is computed on every page written), then reads them all back in a fresh environment
(nothing cached in the pool; the OS page cache is warm, so the read side is the pool's own
cost, checksum verification included). Best of ``--reps``; side by side in one run, since the
machines are shared and noisy. Hits in the cache never touch the checksum.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiodbenv import Env

PS = 4096


async def _once(home: str, pages: int, checksum: bool) -> tuple[float, float]:
    path = os.path.join(home, "data.db")
    cache = max(1 << 20, pages * PS * 2)
    async with Env.open(home, create=True, cache_size=cache) as env:
        f = await env.pool.open_file(path, create=True, checksum=checksum)
        for i in range(pages):
            async with f.get(i, create=True) as page:
                page.data[:8] = i.to_bytes(8, "little")
                page.mark_dirty()
        t0 = time.perf_counter()
        await env.pool.sync()
        write = time.perf_counter() - t0
        await f.close()
    await Env.remove(home)
    async with Env.open(home, create=True, cache_size=cache) as env:
        f = await env.pool.open_file(path, checksum=checksum)
        t0 = time.perf_counter()
        for i in range(pages):
            async with f.get(i):
                pass
        read = time.perf_counter() - t0
        await f.close()
    await Env.remove(home)
    os.unlink(path)
    return write, read


async def _run(pages: int, reps: int) -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-cksum-")
    try:
        best: dict[bool, list[float]] = {False: [1e9, 1e9], True: [1e9, 1e9]}
        for _ in range(reps):
            for checksum in (False, True):  # interleaved: both see the same machine load
                w, r = await _once(home, pages, checksum)
                best[checksum][0] = min(best[checksum][0], w)
                best[checksum][1] = min(best[checksum][1], r)
        mib = pages * PS / (1 << 20)
        print(f"{pages} pages of {PS} bytes ({mib:.0f} MiB), best of {reps}")
        print(f"{'checksum':>9} {'sync MiB/s':>11} {'read-in MiB/s':>14}")
        for checksum in (False, True):
            w, r = best[checksum]
            print(f"{checksum!s:>9} {mib / w:11.0f} {mib / r:14.0f}")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    """Run the comparison and print a small table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    asyncio.run(_run(args.pages, args.reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
