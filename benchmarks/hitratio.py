"""Hit ratio of aiodbenv's replacement policy, beside Berkeley DB's and an exact LRU.

The same page trace is replayed through aiodbenv's pool (a cache of exactly C pages), through
Berkeley DB 5.3's mpool (calibrated to hold about C buffers, see anchors/README.md), and
through an exact LRU of C pages simulated here. Workloads:

- ``zipf``: zipf(0.99) over P pages (ranks scrambled over page numbers);
- ``zipf+scan``: the same, with a sequential scan of 2C pages inserted every tenth of the
  trace (a scan larger than the cache, which pure LRU handles badly).

Usage: ``python benchmarks/hitratio.py [--quick] [--json PATH]``. Not a test: it prints a
table. Everything it creates is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "anchors"))

from build import run_anchor, write_trace, zipf_trace  # type: ignore[import-not-found]

import aiodbenv

PAGE = 4096


def exact_lru(trace: Sequence[int], capacity: int, warmup: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = misses = 0
    for i, pgno in enumerate(trace):
        if pgno in cache:
            cache.move_to_end(pgno)
            if i >= warmup:
                hits += 1
        else:
            cache[pgno] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
            if i >= warmup:
                misses += 1
    return hits / (hits + misses)


async def aiodbenv_ratio(trace: Sequence[int], capacity: int, warmup: int, npages: int) -> float:
    home = tempfile.mkdtemp(prefix="aiodbenv-hit-")
    try:
        path = os.path.join(home, "trace.db")
        with open(path, "wb") as f:
            f.truncate(npages * PAGE)
        async with aiodbenv.Env.open(home, create=True, cache_size=capacity * PAGE) as env:
            async with env.pool.open_file("trace.db") as f:
                for pgno in trace[:warmup]:
                    async with f.get(pgno):
                        pass
                before = f.stat()
                for pgno in trace[warmup:]:
                    async with f.get(pgno):
                        pass
                after = f.stat()
        await aiodbenv.Env.remove(home)
        hits = after.cache_hit - before.cache_hit
        misses = after.cache_miss - before.cache_miss
        return hits / (hits + misses)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def with_scans(trace: list[int], capacity: int, npages: int) -> list[int]:
    out: list[int] = []
    step = len(trace) // 10
    scan_start = npages  # pages beyond the zipf range: the scan pollutes, never helps
    for k in range(10):
        out.extend(trace[k * step : (k + 1) * step])
        out.extend(range(scan_start, scan_start + 2 * capacity))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small trace (seconds, not minutes)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--no-anchor", action="store_true", help="skip Berkeley DB")
    args = ap.parse_args(argv)
    npages, refs = (5000, 100_000) if args.quick else (20000, 500_000)
    capacity = npages // 10
    warmup = refs // 10
    base = zipf_trace(npages, refs, theta=0.99, seed=1)
    rows = []
    for name, trace in (
        ("zipf 0.99", list(base)),
        ("zipf 0.99 + scans of 2x the cache", with_scans(list(base), capacity, npages)),
    ):
        total_pages = max(trace) + 1
        t0 = time.perf_counter()
        ours = asyncio.run(aiodbenv_ratio(trace, capacity, warmup, total_pages))
        t_ours = time.perf_counter() - t0
        lru = exact_lru(trace, capacity, warmup)
        bdb = None
        if not args.no_anchor:
            with tempfile.NamedTemporaryFile(suffix=".trace", delete=False) as tf:
                trace_path = tf.name
            try:
                write_trace(trace_path, trace)
                r = run_anchor(
                    [
                        "hitratio",
                        "--cache-pages",
                        str(capacity),
                        "--trace",
                        trace_path,
                        "--warmup",
                        str(warmup),
                    ]
                )
                bdb = float(r["hit_ratio"])
            finally:
                os.unlink(trace_path)
        rows.append(
            {
                "workload": name,
                "cache_pages": capacity,
                "refs": len(trace),
                "aiodbenv": ours,
                "berkeley_db": bdb,
                "exact_lru": lru,
                "aiodbenv_seconds": t_ours,
            }
        )
    print(f"cache {capacity} pages of {npages}; warm-up {warmup} references excluded")
    print(f"{'workload':<36}{'aiodbenv':>10}{'Berkeley DB':>13}{'exact LRU':>11}")
    for r in rows:
        bdb = f"{r['berkeley_db']:.4f}" if r["berkeley_db"] is not None else "-"
        print(f"{r['workload']:<36}{r['aiodbenv']:>10.4f}{bdb:>13}{r['exact_lru']:>11.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
