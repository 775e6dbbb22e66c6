"""Event-loop lateness while a checkpoint runs, and what a trickle worker sustains.

A request-serving coroutine pins a random cached page, sleeps 1 ms, and measures how late it
wakes (p50, p99, max), in four settings, interleaved over several repetitions:

- ``idle``: no write-back at all (the floor);
- ``background``: a checkpoint of a 64 MiB dirty cache by the checkpoint worker, spread over
  ``--spread`` seconds (completion_target);
- ``foreground``: the same checkpoint awaited at once (``await env.checkpoint()``): unpaced,
  still in worker threads;
- ``blocking``: the same 64 MiB written with ``os.pwrite`` on the event-loop thread and
  fsynced: what a synchronous library's checkpoint does to a loop (the anti-pattern).

Then the trickle worker is given a 64 MiB dirty cache and a target of 100% clean: pages per
second it writes.

Usage: ``python benchmarks/workers_bench.py [--quick] [--reps N] [--json PATH]``. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiodbenv

PAGE = 4096


async def dirty_all(f: aiodbenv.PoolFile, pages: int) -> None:
    for i in range(pages):
        async with f.get(i, create=True) as p:
            p.data[0:8] = i.to_bytes(8, "little")
            p.mark_dirty()


async def serve_requests(f: aiodbenv.PoolFile, pages: int, stop: asyncio.Event) -> list[float]:
    """A request loop: pin a random page, sleep 1 ms; returns lateness samples (seconds)."""
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    late: list[float] = []
    rng = random.Random(7)
    while not stop.is_set():
        async with f.get(rng.randrange(pages)) as p:
            _ = p.data[0]
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        late.append(max(0.0, time.perf_counter() - t - 0.001))
    return late


def blocking_checkpoint(path: str, pages: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytes(PAGE)
        for i in range(pages):
            os.pwrite(fd, buf, i * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)


async def one_run(mode: str, pages: int, spread: float) -> dict[str, float]:
    home = tempfile.mkdtemp(prefix="aiodbenv-wb-")
    try:
        async with aiodbenv.Env.open(home, create=True, cache_size=2 * pages * PAGE) as env:
            async with env.pool.open_file("ck.db", create=True) as f:
                await dirty_all(f, pages)
                await env.pool.sync()  # the file exists in full: a checkpoint overwrites
                await dirty_all(f, pages)
                stop = asyncio.Event()
                server = asyncio.ensure_future(serve_requests(f, pages, stop))
                await asyncio.sleep(0.2)  # the request loop is running
                t0 = time.perf_counter()
                if mode == "idle":
                    await asyncio.sleep(spread)
                elif mode == "background":
                    # The checkpoint worker's first checkpoint comes after one interval and
                    # spreads its writes over completion_target of it: ~``spread`` seconds.
                    worker = env.start_checkpoint(
                        aiodbenv.CheckpointSettings(interval=spread / 0.9, completion_target=0.9)
                    )
                    while worker.status().runs == 0:
                        await asyncio.sleep(0.01)
                    await worker.stop()
                elif mode == "foreground":
                    await env.checkpoint()
                elif mode == "blocking":
                    blocking_checkpoint(env.resolve("ck.db"), pages)
                elapsed = time.perf_counter() - t0
                stop.set()
                late = sorted(await server)
                await env.pool.sync()
        await aiodbenv.Env.remove(home)
        ms = [x * 1000 for x in late]
        return {
            "p50_ms": ms[len(ms) // 2],
            "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "max_ms": ms[-1],
            "seconds": elapsed,
            "requests": len(ms),
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def trickle_rate(pages: int) -> dict[str, float]:
    home = tempfile.mkdtemp(prefix="aiodbenv-tr-")
    try:
        async with aiodbenv.Env.open(home, create=True, cache_size=2 * pages * PAGE) as env:
            async with env.pool.open_file("tr.db", create=True) as f:
                await dirty_all(f, pages)
                await env.pool.sync()
                await dirty_all(f, pages)
                t0 = time.perf_counter()
                worker = env.start_trickle(aiodbenv.TrickleSettings(percent=100, interval=0.01))
                while env.pool.stat().page_dirty:
                    await asyncio.sleep(0.005)
                elapsed = time.perf_counter() - t0
                await worker.stop()
        await aiodbenv.Env.remove(home)
        return {
            "pages": pages,
            "seconds": elapsed,
            "pages_per_second": pages / elapsed,
            "mib_per_second": pages * PAGE / elapsed / 2**20,
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(coro: Callable[[], Awaitable[dict[str, float]]], loop_kind: str) -> dict[str, float]:
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro())  # type: ignore[no-any-return]
    return asyncio.run(coro())  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 MiB, 2 repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument(
        "--spread", type=float, default=2.0, help="seconds a background checkpoint takes"
    )
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    pages = (8 << 20) // PAGE if args.quick else (64 << 20) // PAGE
    reps = args.reps or (2 if args.quick else 3)
    modes = ["idle", "background", "foreground", "blocking"]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(reps):  # interleaved: every mode once per repetition
        for mode in modes:
            results[mode].append(run(lambda m=mode: one_run(m, pages, args.spread), args.loop))
    trickle = [run(lambda: trickle_rate(pages), args.loop) for _ in range(reps)]
    print(
        f"{pages * PAGE >> 20} MiB dirty, {args.loop} loop, {reps} repetitions (medians; "
        f"max is the worst of all runs)"
    )
    print(
        f"{'checkpoint':<12}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'seconds':>9}{'requests':>10}"
    )
    table = {}
    for mode in modes:
        rs = results[mode]
        row = {
            k: statistics.median(r[k] for r in rs)
            for k in ("p50_ms", "p99_ms", "seconds", "requests")
        }
        row["max_ms"] = max(r["max_ms"] for r in rs)
        table[mode] = row
        print(
            f"{mode:<12}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['max_ms']:>9.3f}"
            f"{row['seconds']:>9.2f}{row['requests']:>10.0f}"
        )
    rate = statistics.median(t["pages_per_second"] for t in trickle)
    mib = statistics.median(t["mib_per_second"] for t in trickle)
    print(f"trickle worker: {rate:,.0f} pages/s ({mib:.0f} MiB/s), median of {reps}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"lateness": table, "runs": results, "trickle": trickle}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
