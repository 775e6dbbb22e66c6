#!/usr/bin/env python3
"""Every benchmark of aiodbenv beside Berkeley DB and the Python peers, in one command.

    python -m benchmarks              # full run, 5 repetitions (about 6-10 minutes)
    python -m benchmarks --quick      # 2 repetitions, small sizes (under 2 minutes)
    python benchmarks/run.py --quick --tiny   # 1 repetition, tiny sizes (what the tests run)

Not a test: a measurement. It first installs or builds what the anchors need and can get --
Berkeley DB 5.3 (Debian's libdb5.3-dev, with apt-get when root), the C harness
benchmarks/anchors/bdb_mpool.c, and the ``lmdb`` and ``berkeleydb`` packages (with pip, into
this interpreter) -- and whatever it cannot get (not root, no network, no compiler) becomes
"unavailable: <reason>" in its anchor's rows while the run goes on. Then, in each repetition,
each workload runs its aiodbenv part and its anchors' parts back to back (A B A B ..., the
order reversed in odd repetitions), and at the end it prints one table -- median, min and max of
each side, and the median of the per-repetition aiodbenv/anchor ratios -- and writes the
results, every repetition's values and the raw measurements as JSON (default
benchmarks/results/bench-<mode>.json).

Workloads (4 KiB pages; see docs/performance.md for what each means to a user):

hot        pin+unpin of cached pages, random and sequential, in file, system and private
           regions, asyncio and uvloop (each repetition in a fresh interpreter: CPython's
           speed varies by process, see docs/performance.md); 2 processes sharing a file /
           system environment.
           Anchors: Berkeley DB's C memp_fget/memp_fput on the same sizes; lmdb txn.get
           (buffers=True; one long read txn, and one txn per get) and berkeleydb db.get (btree,
           hash) of the same number of cached 4 KiB records.
miss       a cache of 8 MiB over a 256 MiB file, uniform random pages, 1 and 32 coroutines;
           with the file in the OS page cache, and after ``sync; echo 3 >
           /proc/sys/vm/drop_caches`` (root only; skipped with a note otherwise). Anchor:
           Berkeley DB ``miss`` (one thread) on the same sizes.
hitratio   the replacement policy on zipf 0.99, and on zipf interrupted by sequential scans of
           twice the cache; a cache of 10% of the pages. Anchors: Berkeley DB on the same page
           sequence, and an exact LRU simulated here.
writeback  64 MiB dirty, then ``pool.sync()`` (writes + fsync), both creating the pages and
           overwriting them; ``pool.trickle(50)``. Anchors: memp_sync, memp_trickle(50),
           ``dd bs=1M conv=fdatasync``.
lateness   p50/p99/max lateness of a coroutine ticking every 1 ms during the miss runs, a
           sync and a trickle (asyncio's loop). Contrast: the same bytes written with
           os.pwrite on the loop thread.
memory     region bytes per cached page (aiodbenv: mpool region files / pages the cache holds;
           Berkeley DB: its region files / st_pages), and the RSS of a process holding a full
           cache (aiodbenv and the C anchor) or that has read the records (lmdb, berkeleydb).
log        100-byte log records: put with flush per record in 1 and 8 processes, written
           without fsync, without flush, and into an in-memory log (log_bench.py's cases,
           records/s and records per fsync). Anchor: Berkeley DB's log_put/log_flush
           (anchors/bdb_log.c). An aiodbenv without a log shows Berkeley DB's side alone.

Everything a run creates (a work directory, data files, environments, System V segments,
child processes) is removed at the end, also on errors, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aiodbenv import Env  # noqa: E402
from benchmarks import log_bench as lb  # noqa: E402
from benchmarks import pool_bench as pb  # noqa: E402
from benchmarks.anchors import build as anchors_build  # noqa: E402

PAGE = pb.PAGE
MIB = pb.MIB
CONC = pb.CONCURRENCY

#: The workloads, in table order, with what each row group measures.
WORKLOADS: dict[str, str] = {
    "hot": "pin+unpin of cached pages (random, sequential; file, system, private regions; "
    "1 and 2 processes); Python peers' gets of cached 4 KiB records",
    "miss": "misses: small cache over a large file, file in the OS page cache and after "
    "dropping it, 1 and 32 coroutines",
    "hitratio": "hit ratio of the replacement policy: zipf 0.99, and zipf interrupted by "
    "scans larger than the cache",
    "writeback": "write-back: sync of a dirty cache with fsync, trickle to 50% clean",
    "lateness": "event-loop lateness of a 1 ms ticker during misses, sync and trickle",
    "memory": "region bytes per cached page; RSS per process",
    "log": "log records put with flush per record (1 and 8 processes), written without "
    "fsync, without flush, in memory",
}

#: Writer processes in the log workload's group-commit case.
LOG_PROCS = 8

#: What --without accepts.
ANCHOR_NAMES = ("bdb", "lmdb", "berkeleydb", "dd", "drop_caches")

PEER_PACKAGES = {"lmdb": "lmdb>=1.4", "berkeleydb": "berkeleydb>=18.1.10"}


# ------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes(pb.Sizes):
    cold_ops: int  # timed misses after dropping the OS cache (aiodbenv and anchor alike)
    peer_ops: int  # timed gets per peer and mode
    hr_pages: int  # pages the hit-ratio traces draw from (cache = 10% of them)
    hr_refs: int  # references in the zipf trace
    mem_cache_mb: int  # the cache filled by the memory workload
    log_seconds: float  # time bound of each log run (per process; both sides)

    @property
    def peer_records(self) -> int:
        """As many 4 KiB records as the hot workload's file has pages."""
        return self.hot_file_mb * MIB // PAGE


FULL = Sizes(
    reps=5,
    hot_file_mb=64,
    hot_cache_mb=128,
    hot_ops=250_000,
    anchor_hot_ops=2_000_000,
    miss_cache_mb=8,
    miss_file_mb=256,
    miss_ops=60_000,
    anchor_miss_ops=400_000,
    wb_mb=64,
    wb_cache_mb=128,
    cold_ops=10_000,
    peer_ops=250_000,
    hr_pages=20_000,
    hr_refs=500_000,
    mem_cache_mb=64,
    log_seconds=2.0,
)
QUICK = Sizes(
    reps=2,
    hot_file_mb=8,
    hot_cache_mb=16,
    hot_ops=100_000,
    anchor_hot_ops=1_000_000,
    miss_cache_mb=2,
    miss_file_mb=32,
    miss_ops=20_000,
    anchor_miss_ops=100_000,
    wb_mb=8,
    wb_cache_mb=16,
    cold_ops=2_000,
    peer_ops=100_000,
    hr_pages=5_000,
    hr_refs=100_000,
    mem_cache_mb=8,
    log_seconds=0.5,
)
TINY = Sizes(
    reps=1,
    hot_file_mb=2,
    hot_cache_mb=4,
    hot_ops=20_000,
    anchor_hot_ops=200_000,
    miss_cache_mb=1,
    miss_file_mb=8,
    miss_ops=5_000,
    anchor_miss_ops=20_000,
    wb_mb=2,
    wb_cache_mb=4,
    cold_ops=500,
    peer_ops=20_000,
    hr_pages=2_000,
    hr_refs=20_000,
    mem_cache_mb=2,
    log_seconds=0.1,
)


# ----------------------------------------------------------------------- availability


@dataclass
class Avail:
    ok: bool
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def _first_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    out = " / ".join(lines[:n])
    return out[:300]


def _importable(module: str) -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, timeout=120
    )
    return proc.returncode == 0


def _pip_install(requirement: str) -> str | None:
    """pip install into this interpreter; None on success, else the reason."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "1",
        "--timeout",
        "20",
        requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"pip install {requirement} timed out"
    except OSError as err:
        return f"pip install {requirement}: {err}"
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in tail if "error" in ln.lower()] or tail
        return f"pip install {requirement} failed: {_first_lines(chr(10).join(errs[-3:]))}"
    return None


def prepare_anchors(
    without: set[str], install: bool, log: Callable[[str], None]
) -> dict[str, Avail]:
    """Install or build each anchor if possible; say why not otherwise."""
    out: dict[str, Avail] = {}
    # Berkeley DB 5.3 and the C harness.
    if "bdb" in without:
        out["bdb"] = Avail(False, "disabled with --without bdb")
    elif not install and not anchors_build._libdb_present():
        out["bdb"] = Avail(False, "libdb5.3-dev is not installed (and --no-install)")
    else:
        log("building the Berkeley DB 5.3 anchor (installs libdb5.3-dev when root)")
        try:
            binary = anchors_build.build()
            out["bdb"] = Avail(True, detail={"binary": str(binary)})
        except (anchors_build.AnchorError, OSError, subprocess.SubprocessError) as err:
            out["bdb"] = Avail(False, _first_lines(str(err)))
    # The Python peers, into this interpreter.
    for mod, req in PEER_PACKAGES.items():
        if mod in without:
            out[mod] = Avail(False, f"disabled with --without {mod}")
            continue
        if _importable(mod):
            out[mod] = Avail(True)
            continue
        if not install:
            out[mod] = Avail(False, f"the {mod} package is not installed (and --no-install)")
            continue
        if mod == "berkeleydb" and not anchors_build._libdb_present():
            why = out["bdb"].reason if not out["bdb"].ok else "libdb5.3-dev is missing"
            out[mod] = Avail(False, f"building berkeleydb needs libdb5.3-dev: {why}")
            continue
        log(f"pip install {req}")
        why_not = _pip_install(req)
        if why_not is None and not _importable(mod):
            why_not = f"pip installed {req} but `import {mod}` still fails"
        out[mod] = Avail(why_not is None, why_not or "", {"installed_now": why_not is None})
    if "dd" in without:
        out["dd"] = Avail(False, "disabled with --without dd")
    elif shutil.which("dd") is None:
        out["dd"] = Avail(False, "dd not found")
    else:
        out["dd"] = Avail(True)
    if "drop_caches" in without:
        out["drop_caches"] = Avail(False, "disabled with --without drop_caches")
    elif os.geteuid() != 0:
        out["drop_caches"] = Avail(False, "not root: cannot write /proc/sys/vm/drop_caches")
    elif not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        out["drop_caches"] = Avail(False, "/proc/sys/vm/drop_caches is not writable")
    else:
        out["drop_caches"] = Avail(True)
    return out


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def rss() -> dict[str, int]:
    """This process's resident memory from /proc/self/status, in KiB."""
    from benchmarks.peers import rss as _rss

    return _rss()


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a child that prints one JSON object as its last stdout line."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        out: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(
            f"no JSON from {' '.join(argv[:4])}... (exit {proc.returncode}): "
            f"{_first_lines(proc.stderr[-2000:], 6)}"
        ) from None
    if proc.returncode != 0 or not out.get("ok", True):
        raise RuntimeError(
            f"{' '.join(argv[1:3])} failed: {out.get('error')} "
            f"{_first_lines(proc.stderr[-1500:], 4)}"
        )
    return out


# --------------------------------------------------------------- aiodbenv sessions

#: Misses timed per victim measurement, and the cache they run in (1,024 frames of 4 KiB).
VICTIM_MISSES, VICTIM_CACHE_MB = 4096, 4


async def victim_session(home: str, data: str, first_dirty: bool) -> dict[str, float]:
    """Misses (``async with f.get(p)``) of pages in the OS cache, in a full cache whose every
    victim is dirty (each page read is dirtied, so the next victims are too), and in one
    whose every victim is clean: seconds per miss, the dirty victims' writes amortised over
    the misses. The pages are written first; each run then fills a fresh environment by
    reading pages (dirtying them in the dirty run) and times the misses of the others.
    ``first_dirty`` says which runs first."""
    frames = VICTIM_CACHE_MB * MIB // PAGE
    async with Env.open(home, create=True, cache_size=VICTIM_CACHE_MB * MIB) as env:
        async with env.pool.open_file(data, create=True, page_size=PAGE) as f:
            for p in range(VICTIM_MISSES + frames):
                async with f.get(p, create=True) as page:
                    page.data[0] = 1
        await env.pool.sync()
    await Env.remove(home)
    out: dict[str, float] = {}
    for dirty in (first_dirty, not first_dirty):
        env = await Env.open(home, create=True, cache_size=VICTIM_CACHE_MB * MIB)
        try:
            async with env.pool.open_file(data, page_size=PAGE) as f:
                for p in range(VICTIM_MISSES, VICTIM_MISSES + frames):  # fill the cache
                    async with f.get(p) as page:
                        if dirty:
                            page.data[0] = 2
                            page.mark_dirty()
                st = env.pool.stat()
                assert st.page_dirty == (frames if dirty else 0), st.page_dirty
                t0 = time.perf_counter()
                for p in range(VICTIM_MISSES):
                    async with f.get(p) as page:
                        if dirty:
                            page.data[0] = 3
                            page.mark_dirty()
                out["dirty" if dirty else "clean"] = (time.perf_counter() - t0) / VICTIM_MISSES
            await env.pool.sync()  # what the dirty run left dirty, untimed
        finally:
            await env.close()
            await Env.remove(home)
    return out


async def miss_session(
    home: str,
    cache_mb: int,
    data: str,
    warm: list[int],
    timed: dict[int, list[int]],
    order: list[int],
    drop: Callable[[], None] | None,
    lateness: bool,
) -> dict[Any, Any]:
    """Misses with 1 and ``CONC`` coroutines (in ``order``), optionally dropping the OS cache
    before each, with a 1 ms ticker running during each timed part (``lateness``)."""
    loop = asyncio.get_running_loop()
    env = None
    try:
        env = await Env.open(home, **pb._open_kwargs("file", cache_mb, None))
        out: dict[Any, Any] = {}
        async with env.pool.open_file(data, page_size=PAGE) as f:
            await pb.hot_loop(f, warm)
            out["cache_pages"] = env.pool.stat().pages
            for conc in order:
                pages = timed[conc]
                if drop is not None:
                    drop()
                tk = pb.Ticker() if lateness else None
                if tk is not None:
                    tk.start()
                    await asyncio.sleep(0.01)
                s0 = env.pool.stat()
                t0 = loop.time()
                n0 = time.perf_counter_ns()
                if conc == 1:
                    await pb.hot_loop(f, pages)
                else:
                    await asyncio.gather(*(pb.hot_loop(f, pages[i::conc]) for i in range(conc)))
                ns = time.perf_counter_ns() - n0
                t1 = loop.time()
                s1 = env.pool.stat()
                miss, hit = s1.cache_miss - s0.cache_miss, s1.cache_hit - s0.cache_hit
                out[conc] = {
                    "ns_per_op": ns / len(pages),
                    "ops_per_sec": len(pages) * 1e9 / ns,
                    "cache_miss": miss,
                    "cache_hit": hit,
                    "miss_ratio": miss / max(1, miss + hit),
                    "page_in": s1.page_in - s0.page_in,
                }
                if tk is not None:
                    await asyncio.sleep(0.003)
                    await tk.stop()
                    out[conc]["lateness"] = pb._lat_stats(tk.window(t0, t1))
        return out
    finally:
        await pb._close_and_remove(env, home)


async def trickle_session(home: str, cache_mb: int, data: str, n: int) -> dict[str, Any]:
    """pb's trickle(50) of n created pages, with the 1 ms ticker running during it."""
    loop = asyncio.get_running_loop()
    env = None
    try:
        env = await Env.open(home, **pb._open_kwargs("file", cache_mb, None))
        async with env.pool.open_file(data, create=True, page_size=PAGE) as f:
            await pb._create_pages(f, n)
            # The statistics are taken outside the ticker's life: pool.stat() walks every
            # bucket on the loop (2-3 ms for 64 MiB here), and a tick it made late would be
            # counted against the trickle (its window overlaps the trickle's).
            before = env.pool.stat()
            tk = pb.Ticker()
            tk.start()
            await asyncio.sleep(0.01)
            t0 = loop.time()
            n0 = time.perf_counter_ns()
            written = await env.pool.trickle(50)
            ns = time.perf_counter_ns() - n0
            t1 = loop.time()
            await asyncio.sleep(0.003)
            await tk.stop()
            after = env.pool.stat()
            return {
                "ms": ns / 1e6,
                "pages_written": written,
                "page_trickle": after.page_trickle - before.page_trickle,
                "dirty_before": before.page_dirty,
                "dirty_after": after.page_dirty,
                "pages_in_cache": after.pages,
                "mib_per_sec": written * PAGE / MIB / (ns / 1e9) if written else 0.0,
                "lateness": pb._lat_stats(tk.window(t0, t1)),
            }
    finally:
        try:
            await pb._close_and_remove(env, home)
        finally:
            if os.path.exists(data):
                os.unlink(data)


async def _memory_main(home: str, cache_mb: int) -> dict[str, Any]:
    before = rss()
    data = os.path.join(home, "memory.dat")
    npages = cache_mb * MIB * 2 // PAGE + 1000  # more distinct pages than the cache holds
    env = await Env.open(
        home, create=True, region="file", cache_size=cache_mb * MIB, page_size=PAGE
    )
    try:
        with open(data, "wb") as fh:
            fh.truncate(npages * PAGE)
        async with env.pool.open_file("memory.dat", page_size=PAGE) as f:
            for p in range(npages):
                async with f.get(p):
                    pass
            st = env.pool.stat()
            files: list[dict[str, Any]] = []
            for name in sorted(os.listdir(home)):
                if name.startswith("__db."):
                    s = os.stat(os.path.join(home, name))
                    files.append({"name": name, "bytes": s.st_size, "allocated": s.st_blocks * 512})
            after = rss()
        mpool = sum(f_["bytes"] for f_ in files if f_["name"] != "__db.001")
        total = sum(f_["bytes"] for f_ in files)
        return {
            "ok": True,
            "cache_mb": cache_mb,
            "touched_pages": npages,
            "pages": st.pages,
            "cache_size": st.cache_size,
            "region_files": files,
            "mpool_region_bytes": mpool,
            "region_bytes": total,
            "mpool_bytes_per_cached_page": mpool / max(1, st.pages),
            "all_regions_bytes_per_cached_page": total / max(1, st.pages),
            "rss_before_open": before,
            "rss": after,
        }
    finally:
        try:
            await env.close()
        finally:
            await Env.remove(home)
            if os.path.exists(data):
                os.unlink(data)


def memory_worker(argv: list[str]) -> int:
    """``run.py _memory --home H --cache-mb N``: one JSON object on stdout."""
    ap = argparse.ArgumentParser(prog="run.py _memory")
    ap.add_argument("--home", required=True)
    ap.add_argument("--cache-mb", type=int, required=True)
    a = ap.parse_args(argv)
    try:
        out = asyncio.run(_memory_main(a.home, a.cache_mb))
    except Exception as err:
        out = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print(json.dumps(out))
    return 0 if out.get("ok") else 1


# ------------------------------------------------------------------------ the bench


def _zipf_traces(sz: Sizes) -> dict[str, list[int]]:
    from benchmarks import hitratio as hr

    cap = sz.hr_pages // 10
    base = anchors_build.zipf_trace(sz.hr_pages, sz.hr_refs, theta=0.99, seed=1)
    return {"zipf": list(base), "scan": hr.with_scans(list(base), cap, sz.hr_pages)}


class Bench(pb.Bench):
    """pool_bench's steps, plus the peers, cold misses, hit ratio, lateness and memory."""

    def __init__(
        self,
        args: argparse.Namespace,
        ws: pb.Workspace,
        res: pb.Results,
        sz: Sizes,
        avail: dict[str, Avail],
    ) -> None:
        super().__init__(args, ws, res)
        self.sz: Sizes = sz
        self.avail = avail
        self.failed_steps: list[str] = []

    # -- rows

    def R(
        self,
        workload: str,
        key: str,
        label: str,
        unit: str,
        better: str,
        source: str,
        anchor_label: str,
    ) -> None:
        self.res.rows[key] = pb.Row(
            key,
            label,
            unit,
            kind=None,
            anchor_label=anchor_label,
            workload=workload,
            better=better,
            source=source,
        )

    def _rows(self) -> None:
        R, sz = self.R, self.sz
        for region in ("file", "system", "private"):
            for pattern in ("random", "seq"):
                for loop in pb.LOOPS:
                    k = f"hot/{region}/{pattern}/{loop}"
                    lab = f"pin+unpin {region} region, {pattern} ({loop})"
                    if region == "private":
                        R(
                            "hot",
                            k,
                            lab,
                            "ns/op",
                            "lower",
                            "bdb",
                            "BDB memp_fget+fput, DB_PRIVATE, no DB_THREAD (no mutexes)",
                        )
                        R(
                            "hot",
                            k + "/thread",
                            lab,
                            "ns/op",
                            "lower",
                            "bdb",
                            "BDB memp_fget+fput, DB_PRIVATE|DB_THREAD (mutexes)",
                        )
                    else:
                        sysmem = " DB_SYSTEM_MEM" if region == "system" else ""
                        R(
                            "hot",
                            k,
                            lab,
                            "ns/op",
                            "lower",
                            "bdb",
                            f"BDB memp_fget+fput, {region} region{sysmem}",
                        )
        for region in ("file", "system"):
            R(
                "hot",
                f"procs/{region}",
                f"pin+unpin {region}, random, 2 procs: total",
                "ops/s",
                "higher",
                "bdb",
                "BDB memp_fget+fput, 2 processes, total",
            )
            R(
                "hot",
                f"procs/{region}/scale",
                f"  2-proc / 1-proc throughput ({region})",
                "x",
                "higher",
                "bdb",
                "BDB 2-proc / 1-proc",
            )
        n = sz.peer_records
        lab = f"pin+unpin file random (asyncio) vs get of {n} x 4 KiB records"
        R(
            "hot",
            "peer/lmdb/long_txn",
            lab,
            "ns/op",
            "lower",
            "lmdb",
            "lmdb txn.get, buffers=True, one long read txn",
        )
        R(
            "hot",
            "peer/lmdb/txn_per_get",
            lab,
            "ns/op",
            "lower",
            "lmdb",
            "lmdb txn.get, buffers=True, one read txn per get",
        )
        R(
            "hot",
            "peer/berkeleydb/btree",
            lab,
            "ns/op",
            "lower",
            "berkeleydb",
            "berkeleydb (Python) btree db.get",
        )
        R(
            "hot",
            "peer/berkeleydb/hash",
            lab,
            "ns/op",
            "lower",
            "berkeleydb",
            "berkeleydb (Python) hash db.get",
        )
        size = f"{sz.miss_cache_mb}M cache / {sz.miss_file_mb}M file"
        for loop in pb.LOOPS:
            for conc in (1, CONC):
                R(
                    "miss",
                    f"miss/{conc}/{loop}",
                    f"miss, file OS-cached, {size}, {conc} coro ({loop})",
                    "ops/s",
                    "higher",
                    "bdb",
                    "BDB miss, 1 thread",
                )
        R(
            "miss",
            "miss/ratio",
            "  miss ratio of the timed part (1 coro, asyncio)",
            "ratio",
            "",
            "bdb",
            "BDB miss ratio",
        )
        for conc in (1, CONC):
            R(
                "miss",
                f"cold/{conc}",
                f"miss, OS cache dropped, {size}, {conc} coro (asyncio)",
                "ops/s",
                "higher",
                "bdb",
                "BDB miss --drop-caches, 1 thread",
            )
        frames = VICTIM_CACHE_MB * MIB // PAGE
        for key, lab in (
            ("dirty", f"miss, page in the OS cache, every victim dirty ({frames} frames)"),
            ("clean", "  the same, every victim clean"),
            ("extra", "  a dirty victim's cost per miss, amortised (dirty - clean)"),
        ):
            R("miss", f"victim/{key}", lab, "us/op", "lower", "", "")
        cap = sz.hr_pages // 10
        for name, lab in (
            ("zipf", f"zipf 0.99, cache {cap} of {sz.hr_pages} pages"),
            ("scan", f"zipf 0.99 + scans of {2 * cap} pages, cache {cap}"),
        ):
            R(
                "hitratio",
                f"hit/{name}",
                lab,
                "ratio",
                "higher",
                "bdb",
                "BDB on the same page sequence",
            )
            R(
                "hitratio",
                f"hit/{name}/lru",
                lab,
                "ratio",
                "higher",
                "lru",
                "exact LRU (simulated) on the same sequence",
            )
        R(
            "writeback",
            "sync/extend",
            f"sync {sz.wb_mb} MiB of pages created past EOF",
            "MiB/s",
            "higher",
            "bdb",
            "BDB memp_sync (extends the file)",
        )
        R(
            "writeback",
            "sync/extend/dd",
            f"sync {sz.wb_mb} MiB of pages created past EOF",
            "MiB/s",
            "higher",
            "dd",
            f"dd bs=1M count={sz.wb_mb} conv=fdatasync",
        )
        R(
            "writeback",
            "sync/overwrite",
            f"sync {sz.wb_mb} MiB overwriting in place",
            "MiB/s",
            "higher",
            "bdb",
            "BDB memp_sync (extends; 5.3 cannot dirty existing pages)",
        )
        R(
            "writeback",
            "trickle/ms",
            f"trickle(50) of {sz.wb_mb} MiB dirty",
            "ms",
            "lower",
            "bdb",
            "BDB memp_trickle(50)",
        )
        R(
            "writeback",
            "trickle/pages",
            "  pages written by trickle(50)",
            "pages",
            "",
            "bdb",
            "BDB memp_trickle nwrote",
        )
        R("lateness", "lat/idle/p99", "idle ticker: p99", "ms", "lower", "", "")
        R("lateness", "lat/idle/max", "idle ticker: max", "ms", "lower", "", "")
        # uvloop's timers count whole milliseconds: its idle ticker is the floor of its rows.
        R("lateness", "lat/idle-uvloop/p99", "idle ticker, uvloop: p99", "ms", "lower", "", "")
        R("lateness", "lat/idle-uvloop/max", "idle ticker, uvloop: max", "ms", "lower", "", "")
        for stat in ("p50", "p99", "max"):
            R(
                "lateness",
                f"lat/sync/{stat}",
                f"during pool.sync of {sz.wb_mb} MiB ({pb.LAT_TICKS}+ ticks): {stat}",
                "ms",
                "lower",
                "contrast",
                f"os.pwrite x{sz.wb_mb * MIB // PAGE} + fdatasync on the loop thread",
            )
        for stat in ("p50", "p99", "max"):
            R(
                "lateness",
                f"lat/sync-uvloop/{stat}",
                f"during pool.sync of {sz.wb_mb} MiB, uvloop ({pb.LAT_TICKS}+ ticks): {stat}",
                "ms",
                "lower",
                "",
                "",
            )
        for stat in ("p50", "p99", "max"):
            R(
                "lateness",
                f"lat/trickle/{stat}",
                f"during trickle(50): {stat}",
                "ms",
                "lower",
                "",
                "",
            )
        for what in ("miss", "cold"):
            for conc in (1, CONC):
                for stat in ("p50", "p99", "max"):
                    R(
                        "lateness",
                        f"lat/{what}/{conc}/{stat}",
                        f"during {'OS-cached' if what == 'miss' else 'dropped-cache'} misses, "
                        f"{conc} coro: {stat}",
                        "ms",
                        "lower",
                        "",
                        "",
                    )
        C = sz.mem_cache_mb
        R(
            "memory",
            "mem/bytes_per_page",
            f"region bytes per cached page, {C} MiB cache",
            "bytes",
            "lower",
            "bdb",
            "BDB: all region files / st_pages",
        )
        R(
            "memory",
            "mem/pages",
            f"  pages a {C} MiB cache holds",
            "pages",
            "higher",
            "bdb",
            "BDB st_pages (it adds 25% below 500 MB)",
        )
        R(
            "memory",
            "mem/rss",
            f"RSS, process holding a full {C} MiB cache",
            "MiB",
            "lower",
            "bdb",
            "BDB C harness process (VmRSS)",
        )
        R(
            "memory",
            "mem/rss_growth",
            "  RSS growth from opening + filling it",
            "MiB",
            "lower",
            "bdb",
            "BDB C harness process",
        )
        R(
            "memory",
            "mem/rss_anon",
            "  of which private (RssAnon)",
            "MiB",
            "lower",
            "bdb",
            "BDB C harness process",
        )
        R(
            "memory",
            "mem/rss/lmdb",
            f"RSS, process with {C} MiB cached vs peer reader",
            "MiB",
            "lower",
            "lmdb",
            f"lmdb, read {sz.peer_records} x 4 KiB records",
        )
        R(
            "memory",
            "mem/rss/berkeleydb",
            f"RSS, process with {C} MiB cached vs peer reader",
            "MiB",
            "lower",
            "berkeleydb",
            f"berkeleydb, read {sz.peer_records} x 4 KiB records (btree+hash)",
        )
        for case in lb.cases(LOG_PROCS):
            R(
                "log",
                f"log/{case.key}",
                f"{case.label} ({self.log_size} B)",
                "rec/s",
                "higher",
                "bdb",
                f"BDB log_put {lb.BDB_FLAGS[(case.sync, case.log)]}"
                + (f", {case.procs} processes" if case.procs > 1 else ""),
            )
            if case.sync == "flush":
                R(
                    "log",
                    f"log/{case.key}/per_fsync",
                    "  records per fsync (group commit)",
                    "rec",
                    "higher",
                    "bdb",
                    "BDB log_stat: st_record / st_scount",
                )
        # Notes for anchors that are not there.
        for row in self.res.rows.values():
            av = self.avail.get(row.source)
            if av is not None and not av.ok:
                row.note = f"unavailable: {av.reason}"
            if row.key.startswith("cold/") or row.key.startswith("lat/cold/"):
                dc = self.avail["drop_caches"]
                if not dc.ok:
                    row.note = f"skipped: {dc.reason}"
            if row.key.startswith("log/") and not lb.has_log():
                ours = f"aiodbenv side: {lb.NO_LOG}"
                row.note = f"{row.note}; {ours}" if row.note else ours

    # -- setup

    def setup(self) -> None:
        sz, only = self.sz, self.args.only
        self.npages = sz.hot_file_mb * MIB // PAGE
        self.hot_data = os.path.join(self.ws.root, "hot.dat")
        if "hot" in only:
            pb._write_file(self.hot_data, sz.hot_file_mb)
        rng = random.Random(12345)
        self.lists = {
            "random": [rng.randrange(self.npages) for _ in range(sz.hot_ops)],
            "seq": [i % self.npages for i in range(sz.hot_ops)],
        }
        self.miss_pages = sz.miss_file_mb * MIB // PAGE
        self.miss_data = os.path.join(self.ws.root, "miss.dat")
        if "miss" in only:
            pb._write_file(self.miss_data, sz.miss_file_mb)
        mrng = random.Random(777)
        cache_pages = sz.miss_cache_mb * MIB // PAGE
        self.miss_warm = [mrng.randrange(self.miss_pages) for _ in range(3 * cache_pages)]
        self.miss_timed = [mrng.randrange(self.miss_pages) for _ in range(sz.miss_ops)]
        self.cold_timed = {
            c: [mrng.randrange(self.miss_pages) for _ in range(sz.cold_ops)] for c in (1, CONC)
        }
        self.wb_pages = sz.wb_mb * MIB // PAGE
        self.traces = _zipf_traces(sz) if "hitratio" in only else {}
        self.log_size = 100
        self.log_ws = lb.Workspace(os.path.join(self.ws.root, "log"))
        self.log_sizes = lb.Sizes(reps=1, seconds=sz.log_seconds, records=10_000_000)
        if "log" in only and not lb.has_log():
            self.res.problems.append(
                f"log: {lb.NO_LOG} (aiodbenv.Env.open has no `log` parameter): the log rows "
                "show Berkeley DB's side alone"
            )
        self._rows()

    def has(self, name: str) -> bool:
        return self.avail[name].ok

    def put(self, key: str, side: str, rep: int, value: float | None) -> None:
        self.res.put(key, side, rep, value)

    # -- hot: the Python peers

    def b_peer(self, rep: int, peer: str) -> None:
        d = self.ws.path(f"{peer}-")
        r = run_json(
            [
                sys.executable,
                str(HERE / "peers.py"),
                peer,
                "--dir",
                d,
                "--records",
                str(self.sz.peer_records),
                "--ops",
                str(self.sz.peer_ops),
                "--seed",
                str(100 + rep),
            ],
            timeout=900,
        )
        shutil.rmtree(d, ignore_errors=True)
        modes = ("long_txn", "txn_per_get") if peer == "lmdb" else ("btree", "hash")
        for mode in modes:
            self.put(f"peer/{peer}/{mode}", "b", rep, r[mode]["ns_per_op"])
            if r[mode].get("timed_cache_miss"):
                self.check(False, f"{peer} {mode}: {r[mode]['timed_cache_miss']} timed misses")
        self.put(f"mem/rss/{peer}", "b", rep, r["rss"].get("VmRSS_kb", 0) / 1024)
        self.raw(rep, f"peer {peer}", r)
        self.log(f"{peer}: " + ", ".join(f"{m} {r[m]['ns_per_op']:.0f} ns/op" for m in modes))

    # -- miss: OS-cached, and after dropping the OS cache

    def a_miss(self, rep: int, loop: str) -> None:
        pb._read_file(self.miss_data)  # in the OS page cache
        home = self.ws.new_home()
        order = [1, CONC] if rep % 2 == 0 else [CONC, 1]
        lat = loop == "asyncio"  # uvloop's clock has millisecond resolution
        what = f"miss {loop}"
        try:
            with pb.LeakWatch(self.ws, what, self.res.problems):
                r = pb.run_on(
                    loop,
                    lambda: miss_session(
                        home,
                        self.sz.miss_cache_mb,
                        self.miss_data,
                        self.miss_warm,
                        {1: self.miss_timed, CONC: self.miss_timed},
                        order,
                        None,
                        lat,
                    ),
                )
        finally:
            pb._finish_home(self.ws, home, None, what, self.res.problems)
        for conc in (1, CONC):
            self.put(f"miss/{conc}/{loop}", "a", rep, r[conc]["ops_per_sec"])
            self.check(
                r[conc]["miss_ratio"] > 0.5,
                f"{what} {conc}: miss ratio only {r[conc]['miss_ratio']:.3f}",
            )
            if lat:
                for stat in ("p50", "p99", "max"):
                    self.put(f"lat/miss/{conc}/{stat}", "a", rep, r[conc]["lateness"][f"{stat}_ms"])
        if lat:
            self.put("miss/ratio", "a", rep, r[1]["miss_ratio"])
        self.raw(rep, f"aiodbenv {what}", {str(k): v for k, v in r.items()})
        self.log(
            f"aiodbenv {what}: 1 coro {r[1]['ns_per_op'] / 1e3:.1f} us/op, {CONC} coros "
            f"{r[CONC]['ns_per_op'] / 1e3:.1f} us/op, miss ratio {r[1]['miss_ratio']:.3f}"
        )

    def b_miss(self, rep: int) -> None:
        sz = self.sz
        r = pb.anchor(
            self.ws,
            [
                "miss",
                "--cache-mb",
                str(sz.miss_cache_mb),
                "--file-mb",
                str(sz.miss_file_mb),
                "--ops",
                str(sz.anchor_miss_ops),
            ],
        )
        for loop in pb.LOOPS:
            for conc in (1, CONC):
                self.put(f"miss/{conc}/{loop}", "b", rep, r["ops_per_sec"])
        self.put("miss/ratio", "b", rep, r.get("miss_ratio"))
        self.raw(rep, "anchor miss", r)
        self.log(f"anchor miss: {r['us_per_op']:.2f} us/op, miss ratio {r.get('miss_ratio')}")

    def a_victim(self, rep: int) -> None:
        home, data = self.ws.new_home(), self.ws.path("victim-")
        try:
            with pb.LeakWatch(self.ws, "victim", self.res.problems):
                r = pb.run_on("asyncio", lambda: victim_session(home, data, rep % 2 == 0))
        finally:
            pb._finish_home(self.ws, home, None, "victim", self.res.problems)
            if os.path.exists(data):
                os.unlink(data)
        us = {k: v * 1e6 for k, v in r.items()}
        for key in ("dirty", "clean"):
            self.put(f"victim/{key}", "a", rep, us[key])
        self.put("victim/extra", "a", rep, us["dirty"] - us["clean"])
        self.raw(rep, "aiodbenv victim", us)
        self.log(f"aiodbenv victim: dirty {us['dirty']:.1f} us/miss, clean {us['clean']:.1f}")

    def a_cold(self, rep: int) -> None:
        if not self.has("drop_caches"):
            return
        pb._read_file(self.miss_data)  # the warm-up reads from the OS cache
        home = self.ws.new_home()
        order = [1, CONC] if rep % 2 == 0 else [CONC, 1]
        try:
            with pb.LeakWatch(self.ws, "cold miss", self.res.problems):
                r = pb.run_on(
                    "asyncio",
                    lambda: miss_session(
                        home,
                        self.sz.miss_cache_mb,
                        self.miss_data,
                        self.miss_warm,
                        self.cold_timed,
                        order,
                        drop_caches,
                        True,
                    ),
                )
        except OSError as err:
            if "drop_caches" in str(err) or err.errno in (1, 13, 30):
                self.avail["drop_caches"] = Avail(False, f"dropping the OS cache failed: {err}")
                for row in self.res.rows.values():
                    if row.key.startswith(("cold/", "lat/cold/")):
                        row.note = f"skipped: {self.avail['drop_caches'].reason}"
                return
            raise
        finally:
            pb._finish_home(self.ws, home, None, "cold miss", self.res.problems)
        for conc in (1, CONC):
            self.put(f"cold/{conc}", "a", rep, r[conc]["ops_per_sec"])
            for stat in ("p50", "p99", "max"):
                self.put(f"lat/cold/{conc}/{stat}", "a", rep, r[conc]["lateness"][f"{stat}_ms"])
        self.raw(rep, "aiodbenv cold miss", {str(k): v for k, v in r.items()})
        self.log(
            f"aiodbenv cold miss: 1 coro {r[1]['ns_per_op'] / 1e3:.1f} us/op, {CONC} "
            f"coros {r[CONC]['ns_per_op'] / 1e3:.1f} us/op"
        )

    def b_cold(self, rep: int) -> None:
        if not self.has("drop_caches"):
            return
        sz = self.sz
        r = pb.anchor(
            self.ws,
            [
                "miss",
                "--drop-caches",
                "--cache-mb",
                str(sz.miss_cache_mb),
                "--file-mb",
                str(sz.miss_file_mb),
                "--ops",
                str(sz.cold_ops),
            ],
        )
        if not r.get("drop_caches", {}).get("done"):
            self.check(
                False, f"anchor cold miss: the OS cache was not dropped ({r.get('drop_caches')})"
            )
            return
        for conc in (1, CONC):
            self.put(f"cold/{conc}", "b", rep, r["ops_per_sec"])
        self.raw(rep, "anchor cold miss", r)
        self.log(f"anchor cold miss: {r['us_per_op']:.1f} us/op")

    # -- hit ratio (deterministic: once)

    def a_hit(self, rep: int) -> None:
        from benchmarks import hitratio as hr

        cap, warm = self.sz.hr_pages // 10, self.sz.hr_refs // 10
        for name, trace in self.traces.items():
            t0 = time.perf_counter()
            ours = asyncio.run(hr.aiodbenv_ratio(trace, cap, warm, max(trace) + 1))
            secs = time.perf_counter() - t0
            lru = hr.exact_lru(trace, cap, warm)
            self.put(f"hit/{name}", "a", rep, ours)
            self.put(f"hit/{name}/lru", "a", rep, ours)
            self.put(f"hit/{name}/lru", "b", rep, lru)
            self.raw(
                rep,
                f"aiodbenv hitratio {name}",
                {"hit_ratio": ours, "exact_lru": lru, "refs": len(trace), "seconds": secs},
            )
            self.log(f"aiodbenv hit ratio {name}: {ours:.4f} (exact LRU {lru:.4f})")

    def b_hit(self, rep: int) -> None:
        cap, warm = self.sz.hr_pages // 10, self.sz.hr_refs // 10
        for name, trace in self.traces.items():
            path = self.ws.path("trace-")
            try:
                anchors_build.write_trace(path, trace)
                r = pb.anchor(
                    self.ws,
                    ["hitratio", "--cache-pages", str(cap), "--trace", path, "--warmup", str(warm)],
                )
            finally:
                if os.path.exists(path):
                    os.unlink(path)
            self.put(f"hit/{name}", "b", rep, r["hit_ratio"])
            self.raw(rep, f"anchor hitratio {name}", r)
            self.log(f"anchor hit ratio {name}: {r['hit_ratio']:.4f}")

    # -- write-back

    def b_sync(self, rep: int) -> None:
        sz = self.sz
        if self.has("bdb"):
            r = pb.anchor(
                self.ws, ["sync", "--cache-mb", str(sz.wb_cache_mb), "--dirty-mb", str(sz.wb_mb)]
            )
            self.put("sync/extend", "b", rep, r["mib_per_sec"])
            self.put("sync/overwrite", "b", rep, r["mib_per_sec"])
            self.raw(rep, "anchor sync", r)
            self.log(f"anchor sync: {r['mib_per_sec']:.0f} MiB/s ({r['ms']:.0f} ms)")
        if self.has("dd"):
            d = pb.dd_anchor(self.ws, sz.wb_mb)
            self.put("sync/extend/dd", "b", rep, d["mib_per_sec"])
            self.raw(rep, "dd", d)
            self.log(f"dd: {d['mib_per_sec']:.0f} MiB/s")

    def a_trickle(self, rep: int) -> None:
        home = self.ws.new_home()
        data = self.ws.path("tr-")
        try:
            with pb.LeakWatch(self.ws, "trickle", self.res.problems):
                r = pb.run_on(
                    "asyncio",
                    lambda: trickle_session(home, self.sz.wb_cache_mb, data, self.wb_pages),
                )
        finally:
            pb._finish_home(self.ws, home, None, "trickle", self.res.problems)
        want = self.wb_pages // 2
        self.check(
            r["pages_written"] == want,
            f"trickle(50): wrote {r['pages_written']} pages, expected {want}",
        )
        self.put("trickle/ms", "a", rep, r["ms"])
        self.put("trickle/pages", "a", rep, r["pages_written"])
        for stat in ("p50", "p99", "max"):
            self.put(f"lat/trickle/{stat}", "a", rep, r["lateness"][f"{stat}_ms"])
        self.raw(rep, "aiodbenv trickle", r)
        self.log(
            f"aiodbenv trickle(50): {r['pages_written']} pages in {r['ms']:.1f} ms, "
            f"lateness max {r['lateness']['max_ms']:.2f} ms"
        )

    # -- memory

    def a_mem(self, rep: int) -> None:
        home = self.ws.new_home()
        try:
            r = run_json(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "_memory",
                    "--home",
                    home,
                    "--cache-mb",
                    str(self.sz.mem_cache_mb),
                ],
                timeout=600,
            )
        finally:
            pb._finish_home(self.ws, home, None, "memory", self.res.problems)
        self.put("mem/bytes_per_page", "a", rep, r["mpool_bytes_per_cached_page"])
        self.put("mem/pages", "a", rep, r["pages"])
        mib = r["rss"].get("VmRSS_kb", 0) / 1024
        self.put("mem/rss", "a", rep, mib)
        self.put("mem/rss_growth", "a", rep, mib - r["rss_before_open"].get("VmRSS_kb", 0) / 1024)
        self.put("mem/rss_anon", "a", rep, r["rss"].get("RssAnon_kb", 0) / 1024)
        for peer in ("lmdb", "berkeleydb"):
            self.put(f"mem/rss/{peer}", "a", rep, mib)
        self.raw(rep, "aiodbenv memory", r)
        self.log(
            f"aiodbenv memory: {r['pages']} pages, "
            f"{r['mpool_bytes_per_cached_page']:.0f} B/page, RSS {mib:.1f} MiB"
        )

    def b_mem(self, rep: int) -> None:
        r = pb.anchor(self.ws, ["memory", "--cache-mb", str(self.sz.mem_cache_mb)])
        self.put("mem/bytes_per_page", "b", rep, r["region_bytes_per_cached_page"])
        self.put("mem/pages", "b", rep, r["cache"]["st_pages"])
        mib = r["rss"].get("VmRSS_kb", 0) / 1024
        self.put("mem/rss", "b", rep, mib)
        self.put("mem/rss_growth", "b", rep, mib - r["rss_before_open"].get("VmRSS_kb", 0) / 1024)
        self.put("mem/rss_anon", "b", rep, r["rss"].get("RssAnon_kb", 0) / 1024)
        self.raw(rep, "anchor memory", r)
        self.log(
            f"anchor memory: {r['cache']['st_pages']} pages, "
            f"{r['region_bytes_per_cached_page']:.0f} B/page, RSS {mib:.1f} MiB"
        )

    # -- log

    def a_log(self, rep: int, case: lb.Case) -> None:
        try:
            r = lb.run_aiodbenv(self.log_ws, case, self.log_sizes, self.log_size)
        finally:
            self.res.problems.extend(self.log_ws.cleanup())
        self._put_log(rep, "a", case, r, "aiodbenv")

    def b_log(self, rep: int, case: lb.Case) -> None:
        try:
            r = lb.run_anchor(self.log_ws, case, self.log_sizes, self.log_size)
        finally:
            self.res.problems.extend(self.log_ws.cleanup())
        self._put_log(rep, "b", case, r, "anchor")

    def _put_log(self, rep: int, side: str, case: lb.Case, r: dict[str, Any], who: str) -> None:
        self.res.problems.extend(r.pop("problems", []))
        self.put(f"log/{case.key}", side, rep, r["records_per_sec"])
        if case.sync == "flush":
            self.put(f"log/{case.key}/per_fsync", side, rep, r.get("records_per_fsync"))
        self.raw(rep, f"{who} log {case.key}", r)
        self.log(
            f"{who} log {case.key}: {r['records_per_sec']:,.0f} rec/s, "
            f"records per fsync {r.get('records_per_fsync')}"
        )

    # -- the schedule

    def plan(self, rep: int) -> list[list[tuple[str, Callable[[], None]]]]:
        """Groups of steps: aiodbenv ("a ...") and its anchors ("b ...") alternate within a
        group, and odd repetitions run each group in reverse order."""
        only, P = self.args.only, functools.partial
        bdb = self.has("bdb")
        g: list[list[tuple[str, Callable[[], None]]]] = []

        def grp(*steps: tuple[str, Callable[[], None]] | None) -> None:
            g.append([s for s in steps if s is not None])

        uv = "uvloop" in pb.LOOPS
        if "hot" in only:
            for region in ("file", "system", "private"):
                grp(
                    (f"a hot {region} asyncio", P(self.a_hot, rep, region, "asyncio")),
                    (f"b hot {region}", P(self.b_hot, rep, region)) if bdb else None,
                    (f"a hot {region} uvloop", P(self.a_hot, rep, region, "uvloop"))
                    if uv
                    else None,
                    (f"b hot {region} thread", P(self.b_hot, rep, region, True))
                    if bdb and region == "private"
                    else None,
                )
                if region == "file":  # the peers right after aiodbenv's file/random figure
                    grp(
                        *[
                            (f"b peer {p}", P(self.b_peer, rep, p)) if self.has(p) else None
                            for p in ("lmdb", "berkeleydb")
                        ]
                    )
            for region in ("file", "system"):
                grp(
                    (f"a procs {region}", P(self.a_procs, rep, region)),
                    (f"b procs {region}", P(self.b_procs, rep, region)) if bdb else None,
                )
        if "miss" in only:
            grp(
                ("a miss asyncio", P(self.a_miss, rep, "asyncio")),
                ("b miss", P(self.b_miss, rep)) if bdb else None,
                ("a miss uvloop", P(self.a_miss, rep, "uvloop")) if uv else None,
            )
            grp(("a victim", P(self.a_victim, rep)))
            if self.has("drop_caches"):
                grp(
                    ("a cold", P(self.a_cold, rep)),
                    ("b cold", P(self.b_cold, rep)) if bdb else None,
                )
        if "hitratio" in only and rep == 0:
            grp(
                ("a hitratio", P(self.a_hit, rep)),
                ("b hitratio", P(self.b_hit, rep)) if bdb else None,
            )
        if "writeback" in only:
            grp(("a sync", P(self.a_sync, rep)), ("b sync", P(self.b_sync, rep)))
            grp(
                ("a trickle", P(self.a_trickle, rep)),
                ("b trickle", P(self.b_trickle, rep)) if bdb else None,
            )
        if "lateness" in only:
            grp(("a lateness", P(self.a_lateness, rep)))
        if "memory" in only:
            grp(("a memory", P(self.a_mem, rep)), ("b memory", P(self.b_mem, rep)) if bdb else None)
        if "log" in only:
            ours = lb.has_log()
            for case in lb.cases(LOG_PROCS):
                grp(
                    (f"a log {case.key}", P(self.a_log, rep, case)) if ours else None,
                    (f"b log {case.key}", P(self.b_log, rep, case)) if bdb else None,
                )
        if rep % 2:
            g = [list(reversed(x)) for x in g]
        return [x for x in g if x]

    def run(self) -> None:
        for rep in range(self.sz.reps):
            self.log(f"repetition {rep + 1}/{self.sz.reps}")
            for group in self.plan(rep):
                for name, step in group:
                    try:
                        step()
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as err:
                        msg = f"rep {rep + 1} step '{name}' failed: {err!r}"
                        self.res.problems.append(msg + "\n" + traceback.format_exc(limit=6))
                        self.log("PROBLEM: " + msg)
                        if name.startswith("a "):
                            self.failed_steps.append(name)
        # The peers are compared with aiodbenv's file/random figure of the same repetition,
        # also when a peer could not run.
        ours = self.res.rows["hot/file/random/asyncio"].a
        for key, row in self.res.rows.items():
            if key.startswith("peer/"):
                row.a.update(ours)


# ---------------------------------------------------------------------------- output


def _ratios(row: pb.Row) -> list[float]:
    return [row.a[r] / row.b[r] for r in sorted(set(row.a) & set(row.b)) if row.b[r]]


def _summ(vals: list[float]) -> dict[str, float] | None:
    return pb._summ(vals)


def _cells(row: pb.Row) -> tuple[list[str], list[str], str]:
    sa, sb = _summ(list(row.a.values())), _summ(list(row.b.values()))
    a = [pb._fmt(sa[k]) if sa else "-" for k in ("median", "min", "max")]
    b = [pb._fmt(sb[k]) if sb else "-" for k in ("median", "min", "max")]
    rs = _ratios(row)
    if not rs:
        ratio = "-"
    elif len(rs) == 1:
        ratio = _fmt_ratio(rs[0])
    else:
        ratio = f"{_fmt_ratio(statistics.median(rs))} ({_fmt_ratio(min(rs))}-{_fmt_ratio(max(rs))})"
    return a, b, ratio


def _fmt_ratio(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _anchor_text(row: pb.Row) -> str:
    if row.note and not row.b:
        return f"{row.anchor_label}: {row.note}" if row.anchor_label else row.note
    if row.source and row.source not in ("lru", "contrast") and not row.b:
        return f"{row.anchor_label}: no value (see problems)"
    return row.anchor_label


def render(res: pb.Results) -> str:
    lw = max([len("measurement")] + [len(r.label) for r in res.rows.values()]) + 2
    head = (
        f"{'workload':<10}{'measurement':<{lw}}{'unit':<7}{'better':<7}"
        f"{'aiodbenv':>10}{'min':>9}{'max':>9}  {'anchor':>9}{'min':>9}{'max':>9}  "
        f"{'aiodbenv/anchor':<24}anchor"
    )
    lines = [head, "-" * len(head)]
    for w in WORKLOADS:
        for row in res.rows.values():
            if row.workload != w:
                continue
            a, b, ratio = _cells(row)
            lines.append(
                f"{w:<10}{row.label:<{lw}}{row.unit:<7}{row.better:<7}"
                f"{a[0]:>10}{a[1]:>9}{a[2]:>9}  {b[0]:>9}{b[1]:>9}{b[2]:>9}  "
                f"{ratio:<24}{_anchor_text(row)}"
            )
    lines += ["", LEGEND]
    return "\n".join(lines)


LEGEND = (
    "aiodbenv/anchor: the median over repetitions of (aiodbenv value / anchor value) "
    "from the same repetition, with the range over repetitions in brackets; whether "
    "above 1 is worse depends on the unit ('better': lower or higher). M = million. "
    "Rows with no anchor value say why."
)


def render_markdown(res: pb.Results) -> str:
    out = [
        "| workload | measurement | unit | aiodbenv median (min-max) | anchor median "
        "(min-max) | aiodbenv/anchor | anchor |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for w in WORKLOADS:
        for row in res.rows.values():
            if row.workload != w:
                continue
            a, b, ratio = _cells(row)
            ac = f"{a[0]} ({a[1]}-{a[2]})" if a[0] != "-" and a[1] != a[2] else a[0]
            bc = f"{b[0]} ({b[1]}-{b[2]})" if b[0] != "-" and b[1] != b[2] else b[0]
            unit = row.unit + (f" ({row.better})" if row.better else "")
            cells = [w, row.label.strip(), unit, ac, bc, ratio, _anchor_text(row)]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def rows_json(res: pb.Results) -> list[dict[str, Any]]:
    out = []
    for row in res.rows.values():
        rs = _ratios(row)
        out.append(
            {
                "workload": row.workload,
                "key": row.key,
                "label": row.label.strip(),
                "unit": row.unit,
                "better": row.better,
                "anchor": row.anchor_label,
                "anchor_kind": row.source,
                "note": row.note,
                "aiodbenv": _summ(list(row.a.values())),
                "anchor_values": _summ(list(row.b.values())),
                "aiodbenv_by_rep": row.a,
                "anchor_by_rep": row.b,
                "ratio_by_rep": rs,
                "ratio_median": statistics.median(rs) if rs else None,
            }
        )
    return out


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_memory":
        return memory_worker(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions, small sizes")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="1 repetition, tiny sizes: a smoke test of every workload",
    )
    ap.add_argument("--reps", type=int, help="repetitions (default 5; --quick 2; --tiny 1)")
    ap.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    ap.add_argument(
        "--without",
        default="",
        help=f"comma-separated anchors to leave out: {','.join(ANCHOR_NAMES)}",
    )
    ap.add_argument(
        "--no-install", action="store_true", help="use only what is installed (no apt-get, no pip)"
    )
    ap.add_argument(
        "--json",
        default=None,
        help="where to write the JSON (default benchmarks/results/bench-MODE.json)",
    )
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown")
    ap.add_argument("--dir", default=None, help="parent of the work directory (default TMPDIR)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    args.only = {w.strip() for w in args.only.split(",") if w.strip()}
    if args.only - set(WORKLOADS):
        ap.error(f"unknown workloads: {sorted(args.only - set(WORKLOADS))}")
    without = {w.strip() for w in args.without.split(",") if w.strip()}
    if without - set(ANCHOR_NAMES):
        ap.error(f"unknown anchors: {sorted(without - set(ANCHOR_NAMES))}")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sz = {"tiny": TINY, "quick": QUICK, "full": FULL}[mode]
    if args.reps:
        sz = Sizes(**{**asdict(sz), "reps": args.reps})
    args.quick = mode != "full"  # what pool_bench's Bench looks at
    json_path = args.json or str(HERE / "results" / f"bench-{mode}.json")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t_start = time.monotonic()
    load_start = os.getloadavg()
    m = pb.machine()
    pb.START_HASH = m["aiodbenv_source_sha256"]
    print(
        f"machine: nproc {m['nproc']} (affinity {m['affinity']}), memory {m['memory']}, {m['cpu']}"
    )
    print(
        f"         Python {m['python']}, kernel {m['kernel']}, uvloop {m['uvloop']}, "
        f"tmp fs {m['tmp_fs']}"
    )
    dirty = m["git_dirty_files"]
    print(
        f"aiodbenv {m['aiodbenv']} at git {m['git_head']}"
        f"{f' + uncommitted changes in {len(dirty)} files' if dirty else ''}, mutex backend "
        f"{m['mutex_backend']}"
    )
    print(f"mode {mode}: {asdict(sz)}")
    print(f"load average at start: {load_start}")
    sys.stdout.flush()

    status = 0
    avail: dict[str, Avail] = {}
    res = pb.Results()
    bench: Bench | None = None
    ws = pb.Workspace(tempfile.mkdtemp(prefix="aiodbenv-bench-", dir=args.dir))
    try:
        avail = prepare_anchors(without, not args.no_install, log)
        for name, av in avail.items():
            print(f"anchor {name}: {'available' if av.ok else 'unavailable: ' + av.reason}")
        sys.stdout.flush()
        bench = Bench(args, ws, res, sz, avail)
        pb.prime_loops()
        log("writing data files")
        bench.setup()
        bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        status = 130
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            res.problems += pb.cleanup(ws)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    elapsed = time.monotonic() - t_start
    if bench is not None and bench.failed_steps and status == 0:
        status = 1
    end_hash = pb.source_hash()
    if end_hash != pb.START_HASH:
        res.problems.insert(
            0,
            f"WARNING: the aiodbenv sources changed during the run "
            f"({pb.START_HASH} -> {end_hash}): results may mix versions",
        )
    load_end = os.getloadavg()
    print()
    print(render(res))
    print(
        f"\n{mode} run, {sz.reps} repetitions in {elapsed:.0f} s; load average at the "
        f"start {load_start}, at the end {load_end}"
    )
    if res.problems:
        print("\nproblems seen:")
        for p in res.problems:
            print("  - " + p.rstrip().replace("\n", "\n    "))
    out = {
        "schema": 1,
        "mode": mode,
        "argv": argv,
        "machine": m,
        "sizes": asdict(sz),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - elapsed)),
        "elapsed_s": elapsed,
        "status": status,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "workloads": WORKLOADS,
        "anchors": {
            k: {"available": v.ok, "reason": v.reason, **v.detail} for k, v in avail.items()
        },
        "rows": rows_json(res),
        "problems": res.problems,
        "raw": res.raw,
    }
    try:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, default=str)
        print(f"\nJSON written to {json_path}")
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as fh:
                fh.write(render_markdown(res) + "\n")
            print(f"Markdown table written to {args.markdown}")
    except OSError as err:
        print(f"could not write the results: {err}", file=sys.stderr)
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
