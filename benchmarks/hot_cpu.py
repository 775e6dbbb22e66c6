"""The hot pin in CPU time, beside Berkeley DB's: a comparison that a loaded machine disturbs
less than wall time (preemption does not count; other processes' cache pollution still does).

aiodbenv: ``async with f.get(p) as page: page.data[0]`` over 200,000 random pages of an 8 MiB
file in a 16 MiB cache, ``time.thread_time`` of the loop, best of 3, in a child process per
tree, region and loop. Berkeley DB: the C anchor (benchmarks/anchors, built by ``python -m
benchmarks`` first) run for 1M and 3M pins; the difference of the two runs' CPU time over 2M
pins is its CPU time per pin without its set-up.

    .venv/bin/python benchmarks/hot_cpu.py 3 /path/to/other/tree /path/to/this/tree

Each tree is imported through PYTHONPATH (build its accelerator first). A minute or two.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHOR = HERE / ".build" / "bdb_mpool"
PAGES = 2048


async def _pins(region: str) -> float:
    import aiodbenv

    with tempfile.TemporaryDirectory() as home:
        kw: dict[str, object] = dict(create=True, cache_size=16 << 20, page_size=4096)
        kw["region"] = region
        if region == "system":
            kw["shm_key"] = 0x5A7000 + random.randrange(1000) * 16
        env = await aiodbenv.Env.open(home, **kw)  # type: ignore[arg-type]
        f = await env.pool.open_file("b.db", create=True, page_size=4096)
        for p in range(PAGES):
            async with f.get(p, create=True):
                pass
        rng = random.Random(1)
        pgnos = [rng.randrange(PAGES) for _ in range(200_000)]
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time_ns()
            for p in pgnos:
                async with f.get(p) as page:
                    page.data[0]
            best = min(best, (time.thread_time_ns() - t0) / len(pgnos))
        await f.close()
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
        return best


def _child(region: str, loop: str) -> None:
    if loop == "uvloop":
        import uvloop

        print(uvloop.run(_pins(region)))
    else:
        print(asyncio.run(_pins(region)))


def _aiodbenv(tree: str, region: str, loop: str) -> float:
    r = subprocess.run(
        [sys.executable, __file__, "--child", region, loop],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": tree},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(r.stdout.split()[-1])


def _bdb_cpu(region: str, ops: int) -> float:
    work = tempfile.mkdtemp(prefix="hot-cpu-")
    args = [str(ANCHOR), "hot", "--region", region, "--cache-mb", "16", "--file-mb", "8"]
    args += ["--ops", str(ops), "--pattern", "random", "--repeat", "1"]
    args += ["--dir", os.path.join(work, "w")]
    if region == "system":
        args += ["--shm-key", str(0x5B7000)]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        subprocess.run(args, capture_output=True, text=True, timeout=600, check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def main(reps: int, trees: list[str]) -> None:
    out: dict[tuple[str, ...], list[float]] = {}
    for _ in range(reps):
        for region in ("file", "system", "private"):
            bdb = (_bdb_cpu(region, 3_000_000) - _bdb_cpu(region, 1_000_000)) / 2e6 * 1e9
            out.setdefault((region, "bdb"), []).append(bdb)
            for loop in ("asyncio", "uvloop"):
                for tree in trees:
                    out.setdefault((region, loop, tree), []).append(_aiodbenv(tree, region, loop))
    for region in ("file", "system", "private"):
        bdb = statistics.median(out[(region, "bdb")])
        print(f"{region}: Berkeley DB {bdb:.0f} ns CPU per pin")
        for loop in ("asyncio", "uvloop"):
            for tree in trees:
                v = out[(region, loop, tree)]
                m = statistics.median(v)
                print(f"  {loop} {tree}: {m:.0f} ns ({min(v):.0f}-{max(v):.0f}), {m / bdb:.2f}x")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main(int(sys.argv[1]), sys.argv[2:] or [str(HERE.parent)])
