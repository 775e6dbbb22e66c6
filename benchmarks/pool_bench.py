#!/usr/bin/env python3
"""aiodbenv's buffer pool against Berkeley DB 5.3's C mpool, side by side in one run.

Not a test: a measurement to run by hand.

    python benchmarks/pool_bench.py            # full run, 5 repetitions (~6-8 minutes)
    python benchmarks/pool_bench.py --quick    # 2 repetitions, small sizes (~1-2 minutes)

The anchor is benchmarks/anchors/bdb_mpool.c (see benchmarks/anchors/README.md), driven through
``run_anchor``. This VM is noisy (2-3x swings from one minute to the next), so every figure is
taken R times, interleaved with its anchor: within each repetition every workload runs its
aiodbenv part and its anchor part back to back (the anchor first in odd repetitions, to cancel
drift), and ratios are the median of the per-repetition ratios.

Workloads (full size; --quick sizes in brackets):

hot       pin+unpin of cached pages, ``async with f.get(pgno) as page: page.data[0]``, page
          numbers from a precomputed list (random uniform, or sequential), 4 KiB pages, a
          64 MiB [8 MiB] file in a 128 MiB [16 MiB] cache; regions file, system (shm key) and
          private; event loop asyncio's default and uvloop. Anchor: ``hot`` with the same
          region and pattern (for private both without DB_THREAD -- no mutexes at all -- and
          with it).
procs     the same, random, in 2 fresh interpreter processes (this script's hidden ``_worker``
          subcommand) joining one file or system environment and starting together (a byte on
          their stdin); total ops/s from the "go" to the last finish, and the 2-process /
          1-process scaling. Anchor: ``hot --procs 2``.
miss      8 MiB [2 MiB] cache over a 256 MiB [32 MiB] file that is in the OS page cache,
          uniform random pages, 1 coroutine, then 32 coroutines sharing the same work.
          Anchor: ``miss``.
sync      64 MiB [8 MiB] of pages created past EOF with ``f.get(pgno, create=True)`` (pages
          1..n of an empty file, as the anchor does) in a 128 MiB [16 MiB] cache, then
          ``await pool.sync()`` (writes + fsync). Also: the same pages dirtied again and synced
          over the now existing file (overwrite; the anchor cannot do that in 5.3). Anchors:
          BDB ``sync`` and ``dd bs=1M conv=fdatasync``.
lateness  a coroutine ticking ``await asyncio.sleep(0.001)`` while ``pool.sync()`` of 64 MiB
          of created pages runs: p50/p99/max lateness. Contrasts: the same ticker idle, and
          while the same 64 MiB is written with os.pwrite (+ fdatasync) on the loop thread.
          asyncio's default loop only (uvloop's clock has millisecond resolution).
trickle   ``pool.trickle(50)`` on 64 MiB of created (dirty) pages: pages written and ms.
          Anchor: BDB ``trickle`` with --pct 50.

Everything created (a temporary work directory, data files, environments, System V segments,
worker processes) is removed at the end, also on errors, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiodbenv  # noqa: E402
from aiodbenv import Env  # noqa: E402

uvloop: Any
sysv_ipc: Any
try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

try:
    import sysv_ipc  # type: ignore[no-redef]
except ImportError:  # pragma: no cover
    sysv_ipc = None

PAGE = 4096
MIB = 1 << 20
#: Keys reserved per system-memory environment (aiodbenv's and BDB's): base, base+1, ...
KEY_SPAN = 64
#: The start of every aiodbenv region ("aiodbreg").
REGION_MAGIC = b"aiodbreg"
CONCURRENCY = 32


# ------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes:
    reps: int
    hot_file_mb: int
    hot_cache_mb: int
    hot_ops: int  # aiodbenv ops per timed pass
    anchor_hot_ops: int
    miss_cache_mb: int
    miss_file_mb: int
    miss_ops: int
    anchor_miss_ops: int
    wb_mb: int
    wb_cache_mb: int


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
)
QUICK = Sizes(
    reps=2,
    hot_file_mb=8,
    hot_cache_mb=16,
    hot_ops=100_000,
    anchor_hot_ops=2_000_000,
    miss_cache_mb=2,
    miss_file_mb=32,
    miss_ops=20_000,
    anchor_miss_ops=100_000,
    wb_mb=8,
    wb_cache_mb=16,
)


# -------------------------------------------------------------------------- workspace


@dataclass
class Workspace:
    """Everything this run creates, so that all of it can be removed at the end."""

    root: str
    homes: list[str] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    counter: int = 0

    def path(self, prefix: str) -> str:
        self.counter += 1
        return os.path.join(self.root, f"{prefix}{self.counter}")

    def new_home(self) -> str:
        home = self.path("home-")
        os.mkdir(home)
        self.homes.append(home)
        return home

    def drop_home(self, home: str) -> list[str]:
        """Delete a home after Env.remove; returns what was left in it (should be nothing)."""
        left = sorted(os.listdir(home)) if os.path.isdir(home) else []
        shutil.rmtree(home, ignore_errors=True)
        if home in self.homes:
            self.homes.remove(home)
        return left

    def new_key(self) -> int:
        """A base SysV key whose KEY_SPAN keys are all unused right now."""
        rng = random.Random()
        for _ in range(1000):
            base = rng.randrange(0x4D000000, 0x4DFF0000, KEY_SPAN)
            if base in self.keys:
                continue
            if sysv_ipc is None or all(_key_free(base + i) for i in range(KEY_SPAN)):
                self.keys.append(base)
                return base
        raise RuntimeError("no free System V key range found")


def _key_free(key: int) -> bool:
    try:
        sysv_ipc.SharedMemory(key, 0, mode=0).detach()
    except sysv_ipc.ExistentialError:
        return True
    except sysv_ipc.Error:
        return False
    return False


def _segments_at(base: int) -> list[int]:
    if sysv_ipc is None:
        return []
    return [k for k in range(base, base + KEY_SPAN) if not _key_free(k)]


def _remove_segments(base: int, problems: list[str]) -> None:
    """Remove segments in our reserved key range (aiodbenv's or BDB's)."""
    if sysv_ipc is None:
        return
    for key in range(base, base + KEY_SPAN):
        try:
            shm = sysv_ipc.SharedMemory(key, 0, mode=0)
        except (sysv_ipc.Error, OSError, ValueError):
            continue
        try:
            shm.remove()
            problems.append(f"cleanup removed a leftover SysV segment, key {key:#x}")
        except sysv_ipc.Error as err:
            problems.append(f"could not remove SysV segment {key:#x}: {err}")
        finally:
            try:
                shm.detach()
            except sysv_ipc.Error:
                pass


def cleanup(ws: Workspace) -> list[str]:
    """Kill our workers, force-remove every environment, remove our segments and files."""
    problems: list[str] = []
    for p in ws.procs:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            problems.append(f"worker {p.pid} did not exit")
    ws.procs.clear()
    for home in list(ws.homes):
        try:
            asyncio.run(Env.remove(home, force=True))
        except Exception as err:
            problems.append(f"Env.remove({home}, force=True): {err!r}")
    for base in ws.keys:
        _remove_segments(base, problems)
    shutil.rmtree(ws.root, ignore_errors=True)
    if os.path.exists(ws.root):
        problems.append(f"could not delete {ws.root}")
    return problems


# ----------------------------------------------------------------------- loop helpers


LOOPS = ("asyncio", "uvloop") if uvloop is not None else ("asyncio",)


def run_on(loop: str, coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``coro_fn()`` in a fresh event loop of kind ``loop``."""
    if loop == "uvloop":
        return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())


def prime_loops() -> None:
    """Run each loop kind once with a thread hop: uvloop keeps a pipe pair open for good after
    its first use, which the leak check must not blame on aiodbenv."""
    import anyio.to_thread

    async def hop() -> None:
        await anyio.to_thread.run_sync(lambda: None)

    for loop in LOOPS:
        run_on(loop, hop)


def _snapshot(root: str) -> tuple[int, int, int]:
    """(open fds, mappings of files under root, SysV mappings) of this process."""
    nfd = len(os.listdir("/proc/self/fd"))
    maps = sysv = 0
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                if root in line:
                    maps += 1
                elif "SYSV" in line:
                    sysv += 1
    except OSError:
        pass
    return nfd, maps, sysv


class LeakWatch:
    """Compare fds and mappings before and after an aiodbenv session."""

    def __init__(self, ws: Workspace, what: str, problems: list[str]) -> None:
        self.ws, self.what, self.problems = ws, what, problems

    def __enter__(self) -> LeakWatch:
        gc.collect()
        self.before = _snapshot(self.ws.root)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.collect()
        after = _snapshot(self.ws.root)
        names = ("open fds", "mappings of work files", "SysV mappings")
        for n, b, a in zip(names, self.before, after):
            if a > b:
                self.problems.append(f"{self.what}: {n} grew {b} -> {a} across the session")


async def hot_loop(f: Any, pgnos: list[int]) -> int:
    """The measured loop: pin, read one byte, unpin. Returns elapsed ns."""
    t0 = time.perf_counter_ns()
    for p in pgnos:
        async with f.get(p) as page:
            page.data[0]
    return time.perf_counter_ns() - t0


def _open_kwargs(region: str, cache_mb: int, key: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = dict(create=True, region=region, cache_size=cache_mb * MIB, page_size=PAGE)
    if region == "system":
        kw["shm_key"] = key
    return kw


async def _close_and_remove(env: Env | None, home: str) -> None:
    try:
        if env is not None:
            await env.close()
    finally:
        # A workload's dirty pages are not worth keeping: discard them (remove refuses to
        # without force).
        await Env.remove(home, force=True)


def _finish_home(ws: Workspace, home: str, key: int | None, what: str, problems: list[str]) -> None:
    left = ws.drop_home(home)
    if left:
        problems.append(f"{what}: Env.remove left {left} in the home")
    if key is not None:
        segs = _segments_at(key)
        if segs:
            problems.append(
                f"{what}: SysV segments left after Env.remove: {[hex(k) for k in segs]}"
            )


def _write_file(path: str, mb: int, fsync: bool = True) -> None:
    chunk = os.urandom(MIB)
    with open(path, "wb") as fh:
        for _ in range(mb):
            fh.write(chunk)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


def _read_file(path: str) -> None:
    with open(path, "rb", buffering=0) as fh:
        while fh.read(8 * MIB):
            pass


# ------------------------------------------------------------------------ aiodbenv: hot


async def _hot_session(
    home: str,
    region: str,
    key: int | None,
    cache_mb: int,
    data: str,
    npages: int,
    lists: dict[str, list[int]],
    order: list[str],
) -> dict[str, Any]:
    env = None
    try:
        env = await Env.open(home, **_open_kwargs(region, cache_mb, key))
        async with env.pool.open_file(data, page_size=PAGE) as f:
            for p in range(npages):  # warm: every page into the cache
                async with f.get(p):
                    pass
            st = env.pool.stat()
            if st.pages < npages:
                raise RuntimeError(f"cache holds {st.pages} pages < {npages}: too small")
            out: dict[str, Any] = {"cache_pages": st.pages}
            for pattern in order:
                pg = lists[pattern]
                s0 = env.pool.stat()
                ns = await hot_loop(f, pg)
                s1 = env.pool.stat()
                out[pattern] = {
                    "ns_per_op": ns / len(pg),
                    "ops_per_sec": len(pg) * 1e9 / ns,
                    "timed_cache_miss": s1.cache_miss - s0.cache_miss,
                    "timed_cache_hit": s1.cache_hit - s0.cache_hit,
                }
        return out
    finally:
        await _close_and_remove(env, home)


async def _prepare_shared(
    home: str, region: str, key: int | None, cache_mb: int, data: str, npages: int
) -> int:
    """Create an environment, pull every page of ``data`` in, close (the regions stay)."""
    async with Env.open(home, **_open_kwargs(region, cache_mb, key)) as env:
        async with env.pool.open_file(data, page_size=PAGE) as f:
            for p in range(npages):
                async with f.get(p):
                    pass
        return env.pool.stat().pages


# --------------------------------------------------------------------- 2-process worker


async def _worker_main(a: argparse.Namespace) -> None:
    rng = random.Random(a.seed)
    pgnos = [rng.randrange(a.npages) for _ in range(a.ops)]
    env = await Env.open(a.home)  # join
    try:
        async with env.pool.open_file(a.data, page_size=PAGE) as f:
            for p in range(a.npages):  # touch every page (hits: the parent warmed them)
                async with f.get(p):
                    pass
            s0 = env.pool.stat()
            sys.stdout.write(f"ready {source_hash()}\n")
            sys.stdout.flush()
            if os.read(0, 1) != b"g":  # the start barrier: nothing else runs meanwhile
                raise SystemExit("no go")
            t0 = time.monotonic_ns()
            for p in pgnos:
                async with f.get(p) as page:
                    page.data[0]
            t1 = time.monotonic_ns()
            s1 = env.pool.stat()
            sys.stdout.write(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "t0": t0,
                        "t1": t1,
                        "ops": a.ops,
                        "ns_per_op": (t1 - t0) / a.ops,
                        "ops_per_sec": a.ops * 1e9 / (t1 - t0),
                        "cache_miss_delta_all_procs": s1.cache_miss - s0.cache_miss,
                    }
                )
                + "\n"
            )
            sys.stdout.flush()
    finally:
        await env.close()


def worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pool_bench.py _worker")
    ap.add_argument("--home", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--npages", type=int, required=True)
    ap.add_argument("--ops", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--loop", default="asyncio")
    a = ap.parse_args(argv)
    try:
        run_on(a.loop, lambda: _worker_main(a))
    except KeyboardInterrupt:
        return 130
    return 0


def hot_child(argv: list[str]) -> int:
    """``pool_bench.py _hot JSON``: one repetition's hot session in this fresh interpreter;
    prints its result as one JSON line. Each repetition gets a process of its own, as the C
    anchor does: CPython's speed moves with where the kernel puts its stack (ASLR), by up to
    2x between two processes running the same code (docs/performance.md), and one process
    for every repetition would have measured one such draw five times."""
    a = json.loads(argv[0])
    with open(a["lists"]) as fh:
        lists = json.load(fh)
    r = run_on(
        a["loop"],
        lambda: _hot_session(
            a["home"],
            a["region"],
            a["key"],
            a["cache_mb"],
            a["data"],
            a["npages"],
            lists,
            a["order"],
        ),
    )
    sys.stdout.write(json.dumps(r) + "\n")
    return 0


def run_hot_child(ws: Workspace, args: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run :func:`hot_child` in a fresh interpreter; its result."""
    p = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "_hot", json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
    )
    ws.procs.append(p)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ws.procs.remove(p)
    if p.returncode != 0:
        raise RuntimeError(f"hot child failed ({p.returncode}): {err.decode()[-2000:]}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


START_HASH = ""


class LineReader:
    """Read lines from a child's stdout with a deadline (never blocks forever)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def readline(self, deadline: float) -> str:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("worker did not answer in time")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise RuntimeError(f"worker exited early (output so far: {self.buf!r})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def run_procs(
    ws: Workspace,
    region: str,
    sz: Sizes,
    data: str,
    npages: int,
    nprocs: int,
    ops: int,
    loop: str,
    problems: list[str],
) -> dict[str, Any]:
    home = ws.new_home()
    key = ws.new_key() if region == "system" else None
    what = f"procs {region}"
    try:
        with LeakWatch(ws, what + " (parent)", problems):
            run_on(
                "asyncio", lambda: _prepare_shared(home, region, key, sz.hot_cache_mb, data, npages)
            )
        procs = []
        errs = []
        for i in range(nprocs):
            err = open(ws.path("worker-stderr-"), "w+b")
            errs.append(err)
            p = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "_worker",
                    "--home",
                    home,
                    "--data",
                    data,
                    "--npages",
                    str(npages),
                    "--ops",
                    str(ops),
                    "--seed",
                    str(1000 + i),
                    "--loop",
                    loop,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                close_fds=True,
            )
            ws.procs.append(p)
            procs.append(p)
        readers = [LineReader(p) for p in procs]
        try:
            deadline = time.monotonic() + 120
            for r in readers:
                line = r.readline(deadline).split()
                if not line or line[0] != "ready":
                    raise RuntimeError(f"worker said {line!r}, not ready")
                if len(line) > 1 and line[1] != START_HASH:
                    problems.append(
                        f"{what}: a worker ran aiodbenv sources {line[1]}, not "
                        f"{START_HASH} as at the start (edited during the run)"
                    )
            t_go = time.monotonic_ns()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"g")
                p.stdin.close()
            deadline = time.monotonic() + 300
            results = [json.loads(r.readline(deadline)) for r in readers]
            for p in procs:
                p.wait(timeout=60)
                if p.returncode != 0:
                    raise RuntimeError(f"worker {p.pid} exited {p.returncode}")
        except Exception:
            for p, e in zip(procs, errs):
                if p.poll() is None:
                    p.kill()
                e.seek(0)
                tail = e.read()[-1500:].decode(errors="replace")
                if tail.strip():
                    problems.append(f"{what}: worker {p.pid} stderr: {tail}")
            raise
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                ws.procs.remove(p)
            for e in errs:
                e.close()
        t_end = max(r["t1"] for r in results)
        total = nprocs * ops * 1e9 / (t_end - t_go)
        return {
            "total_ops_per_sec": total,
            "sum_proc_ops_per_sec": sum(r["ops_per_sec"] for r in results),
            "per_proc": results,
            "timed_cache_miss": max(r["cache_miss_delta_all_procs"] for r in results),
        }
    finally:
        try:
            run_on("asyncio", lambda: Env.remove(home))
        finally:
            _finish_home(ws, home, key, what, problems)


# ----------------------------------------------------------------------- aiodbenv: miss


async def _miss_session(
    home: str, cache_mb: int, data: str, warm: list[int], timed: list[int], order: list[int]
) -> dict[str, Any]:
    env = None
    try:
        env = await Env.open(home, **_open_kwargs("file", cache_mb, None))
        out: dict[Any, Any] = {}
        async with env.pool.open_file(data, page_size=PAGE) as f:
            await hot_loop(f, warm)
            out["cache_pages"] = env.pool.stat().pages
            for conc in order:
                s0 = env.pool.stat()
                t0 = time.perf_counter_ns()
                if conc == 1:
                    await hot_loop(f, timed)
                else:
                    await asyncio.gather(*(hot_loop(f, timed[i::conc]) for i in range(conc)))
                ns = time.perf_counter_ns() - t0
                s1 = env.pool.stat()
                miss = s1.cache_miss - s0.cache_miss
                hit = s1.cache_hit - s0.cache_hit
                out[conc] = {
                    "ns_per_op": ns / len(timed),
                    "ops_per_sec": len(timed) * 1e9 / ns,
                    "cache_miss": miss,
                    "cache_hit": hit,
                    "miss_ratio": miss / max(1, miss + hit),
                    "page_in": s1.page_in - s0.page_in,
                }
        return out
    finally:
        await _close_and_remove(env, home)


# ------------------------------------------------------------------ aiodbenv: write-back


async def _create_pages(f: Any, n: int) -> None:
    """Pages 1..n past the end of an empty file (page 0 stays a hole, as in the anchor)."""
    for p in range(1, n + 1):
        async with f.get(p, create=True) as page:
            page.data[0:8] = p.to_bytes(8, "little")
            page.mark_dirty()


async def _dirty_again(f: Any, n: int) -> None:
    for p in range(1, n + 1):
        async with f.get(p) as page:
            page.data[8] = (page.data[8] + 1) & 0xFF
            page.mark_dirty()


async def _sync_session(home: str, cache_mb: int, data: str, n: int) -> dict[str, Any]:
    env = None
    try:
        env = await Env.open(home, **_open_kwargs("file", cache_mb, None))
        out: dict[str, Any] = {}
        async with env.pool.open_file(data, create=True, page_size=PAGE) as f:
            for label, dirty in (("extend", _create_pages), ("overwrite", _dirty_again)):
                await dirty(f, n)
                before = env.pool.stat()
                t0 = time.perf_counter_ns()
                res = await env.pool.sync()
                ns = time.perf_counter_ns() - t0
                after = env.pool.stat()
                out[label] = {
                    "ms": ns / 1e6,
                    "mib_per_sec": n * PAGE / MIB / (ns / 1e9),
                    "written": res.written,
                    "dirty_before": before.page_dirty,
                    "dirty_after": after.page_dirty,
                    "write_calls": after.write_calls - before.write_calls,
                }
        out["file_bytes"] = os.path.getsize(data)
        return out
    finally:
        try:
            await _close_and_remove(env, home)
        finally:
            if os.path.exists(data):
                os.unlink(data)


#: The syncs whose ticks one lateness measurement pools: at least LAT_SYNCS, and more (up to
#: LAT_SYNCS_MAX) until LAT_TICKS ticks are pooled. With a fixed 4 syncs, a sync of 64 MiB
#: lasting about 25 ms gave about 100 ticks, whose 99th percentile is their largest: the p99
#: and max rows measured the same tick. 400 make the p99 about the fourth-worst.
LAT_SYNCS = 4
LAT_TICKS = 400
LAT_SYNCS_MAX = 32


class Ticker:
    """``while True: t = loop.time(); await asyncio.sleep(0.001); late = ...`` as a task.
    Lateness is timed with ``time.perf_counter`` (uvloop's ``loop.time()`` counts whole
    milliseconds); the windows stay in loop time."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (start, end, late)
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t, p = loop.time(), time.perf_counter()
            await asyncio.sleep(0.001)
            late = time.perf_counter() - p - 0.001
            self.samples.append((t, loop.time(), late))

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    def window(self, t0: float, t1: float) -> list[tuple[float, float]]:
        """(start - t0, lateness) of the ticks overlapping [t0, t1]."""
        return [(s - t0, late) for s, e, late in self.samples if e >= t0 and s <= t1]


def _lat_stats(ticks: list[tuple[float, float]]) -> dict[str, Any]:
    if not ticks:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    v = sorted(late for _, late in ticks)

    def pick(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    worst = max(ticks, key=lambda t: t[1])
    over2 = [t for t in ticks if t[1] > 0.002]
    return {
        "n": len(v),
        "p50_ms": pick(0.50) * 1e3,
        "p99_ms": pick(0.99) * 1e3,
        "max_ms": v[-1] * 1e3,
        "max_tick_started_at_ms": worst[0] * 1e3,
        "ticks_over_2ms": len(over2),
        "worst5_ms_at": [
            (round(a * 1e3, 1), round(b * 1e3, 2))
            for a, b in sorted(ticks, key=lambda t: -t[1])[:5]
        ],
    }


async def _lateness_session(
    home: str, cache_mb: int, data: str, pwrite_path: str, n: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    env = None
    out: dict[str, Any] = {}
    try:
        # Idle: the ticker alone.
        tk = Ticker()
        tk.start()
        await asyncio.sleep(0.02)
        t0 = loop.time()
        await asyncio.sleep(0.3)
        t1 = loop.time()
        await tk.stop()
        out["idle"] = _lat_stats(tk.window(t0, t1))

        env = await Env.open(home, **_open_kwargs("file", cache_mb, None))
        async with env.pool.open_file(data, create=True, page_size=PAGE) as f:
            await _create_pages(f, n)
            tk = Ticker()
            tk.start()
            await asyncio.sleep(0.02)
            # Several syncs, their ticks pooled (see LAT_TICKS). The pages are dirtied again
            # between them, outside the windows.
            ticks: list[tuple[float, float]] = []
            elapsed, written, syncs = 0.0, 0, 0
            while syncs < LAT_SYNCS or (len(ticks) < LAT_TICKS and syncs < LAT_SYNCS_MAX):
                if syncs:
                    await _dirty_again(f, n)
                    await asyncio.sleep(0.005)
                t0 = loop.time()
                res = await env.pool.sync()
                t1 = loop.time()
                ticks += tk.window(t0, t1)
                elapsed += t1 - t0
                written += res.written
                syncs += 1
            await asyncio.sleep(0.005)
            await tk.stop()
            out["sync"] = _lat_stats(ticks)
            out["sync"].update(
                ms=elapsed / syncs * 1e3,
                written=written // syncs,
                syncs=syncs,
                mib_per_sec=n * PAGE / MIB / (elapsed / syncs),
            )

        # Contrast: the same bytes with os.pwrite (+ fdatasync) on the loop thread.
        buf = os.urandom(PAGE)
        fd = os.open(pwrite_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            tk = Ticker()
            tk.start()
            await asyncio.sleep(0.02)
            t0 = loop.time()
            for pgno in range(1, n + 1):
                os.pwrite(fd, buf, pgno * PAGE)
            os.fdatasync(fd)
            t1 = loop.time()
            await asyncio.sleep(0.005)
            await tk.stop()
        finally:
            os.close(fd)
        out["pwrite"] = _lat_stats(tk.window(t0, t1))
        out["pwrite"].update(ms=(t1 - t0) * 1e3, mib_per_sec=n * PAGE / MIB / (t1 - t0))
        return out
    finally:
        try:
            await _close_and_remove(env, home)
        finally:
            for path in (data, pwrite_path):
                if os.path.exists(path):
                    os.unlink(path)


async def _trickle_session(home: str, cache_mb: int, data: str, n: int) -> dict[str, Any]:
    env = None
    try:
        env = await Env.open(home, **_open_kwargs("file", cache_mb, None))
        async with env.pool.open_file(data, create=True, page_size=PAGE) as f:
            await _create_pages(f, n)
            before = env.pool.stat()
            t0 = time.perf_counter_ns()
            written = await env.pool.trickle(50)
            ns = time.perf_counter_ns() - t0
            after = env.pool.stat()
            out = {
                "ms": ns / 1e6,
                "pages_written": written,
                "page_trickle": after.page_trickle - before.page_trickle,
                "dirty_before": before.page_dirty,
                "dirty_after": after.page_dirty,
                "pages_in_cache": after.pages,
                "mib_per_sec": written * PAGE / MIB / (ns / 1e9) if written else 0.0,
            }
        return out
    finally:
        try:
            await _close_and_remove(env, home)
        finally:
            if os.path.exists(data):
                os.unlink(data)


# ------------------------------------------------------------------------------ anchor


def anchor(ws: Workspace, args: list[str]) -> dict[str, Any]:
    from benchmarks.anchors.build import run_anchor

    argv = [*args, "--dir", ws.path("anchor-")]
    if "--region" in args and args[args.index("--region") + 1] == "system":
        argv += ["--shm-key", str(ws.new_key())]
    r = run_anchor(argv, timeout=600)
    if r.get("shm_segments_left"):
        raise RuntimeError(f"anchor left {r['shm_segments_left']} SysV segments")
    return r


def dd_anchor(ws: Workspace, mb: int) -> dict[str, Any]:
    path = ws.path("dd-")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mb}", "conv=fdatasync"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"dd failed: {proc.stderr}")
        m = re.search(r"copied, ([0-9.,]+) s", proc.stderr)
        secs = float(m.group(1).replace(",", ".")) if m else wall
        return {"seconds": secs, "mib_per_sec": mb / secs, "wall_incl_exec": wall}
    finally:
        if os.path.exists(path):
            os.unlink(path)


# ---------------------------------------------------------------------------- results


@dataclass
class Row:
    key: str
    label: str
    unit: str
    kind: str | None  # "time": a/b is the slowdown; "rate": b/a is; None: no ratio
    anchor_label: str = ""
    a: dict[int, float] = field(default_factory=dict)  # rep -> value
    b: dict[int, float] = field(default_factory=dict)
    # Used by run.py: the workload group, "lower"/"higher" is better, the anchor's kind
    # ("bdb", "lmdb", ...) and a note such as "unavailable: <reason>".
    workload: str = ""
    better: str = ""
    source: str = ""
    note: str = ""


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.raw: list[dict[str, Any]] = []
        self.problems: list[str] = []

    def row(self, key: str, label: str, unit: str, kind: str | None, anchor_label: str = "") -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, label, unit, kind, anchor_label)
        return self.rows[key]

    def put(self, key: str, side: str, rep: int, value: float | None) -> None:
        if value is None:
            return
        getattr(self.rows[key], side)[rep] = float(value)


def _summ(vals: list[float]) -> dict[str, float] | None:
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _ratios(r: Row) -> list[float]:
    out = []
    for rep in sorted(set(r.a) & set(r.b)):
        a, b = r.a[rep], r.b[rep]
        if r.kind == "time" and b > 0:
            out.append(a / b)
        elif r.kind == "rate" and a > 0:
            out.append(b / a)
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    av = abs(v)
    if av >= 100_000:
        return f"{v / 1e6:.2f}M" if av < 1e9 else f"{v / 1e9:.2f}G"
    if av >= 1000:
        return f"{v:,.0f}"
    if av >= 100:
        return f"{v:.0f}"
    if av >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render(results: Results) -> str:
    head = (
        f"{'workload':<46} {'unit':<8} {'aiodbenv med':>12} {'min':>8} {'max':>8}  "
        f"{'anchor med':>10} {'min':>8} {'max':>8}  {'ratio':>7}  anchor"
    )
    lines = [head, "-" * len(head)]
    for r in results.rows.values():
        if not r.a and not r.b:
            continue
        sa, sb = _summ(list(r.a.values())), _summ(list(r.b.values()))
        ratios = _ratios(r)
        rt = f"{statistics.median(ratios):.2f}x" if ratios else "-"

        def cell(s: dict[str, float] | None, k: str) -> str:
            return _fmt(s[k]) if s else "-"

        lines.append(
            f"{r.label:<46} {r.unit:<8} {cell(sa, 'median'):>12} {cell(sa, 'min'):>8} "
            f"{cell(sa, 'max'):>8}  {cell(sb, 'median'):>10} {cell(sb, 'min'):>8} "
            f"{cell(sb, 'max'):>8}  {rt:>7}  {r.anchor_label}"
        )
    lines.append("")
    lines.append(
        "ratio = median over repetitions of (aiodbenv time / anchor time), from the "
        "same repetition: for ns/op and ms rows aiodbenv/anchor, for ops/s and MiB/s "
        "rows anchor/aiodbenv. >1 means aiodbenv is slower by that factor."
    )
    lines.append(
        "M = million (ops/s). Lateness rows: anchor column = the contrast named on "
        "the right, no ratio."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ machine


def source_hash() -> str:
    """A hash of the aiodbenv sources this interpreter imported (to notice edits mid-run)."""
    import hashlib

    pkg = Path(aiodbenv.__file__).resolve().parent
    h = hashlib.sha256()
    for src in sorted(pkg.rglob("*")):
        if src.suffix in (".py", ".so") and "__pycache__" not in src.parts:
            try:
                h.update(str(src.relative_to(pkg)).encode() + b"\0" + src.read_bytes())
            except OSError:
                pass
    return h.hexdigest()[:16]


def machine() -> dict[str, Any]:
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from aiodbenv.region.mutex import BACKEND
    except ImportError:
        BACKEND = "?"

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    fs = ""
    try:
        fs = (
            subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True)
            .stdout.splitlines()[-1]
            .split()[1]
        )
    except (OSError, IndexError):
        pass
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "memory": mem,
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "uvloop": getattr(uvloop, "__version__", None),
        "aiodbenv": getattr(aiodbenv, "__version__", "?"),
        "mutex_backend": BACKEND,
        "git_head": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": git(
            "status", "--porcelain", "--untracked-files=no", "aiodbenv"
        ).splitlines(),
        "aiodbenv_source_sha256": source_hash(),
        "tmp_fs": fs,
    }


# ---------------------------------------------------------------------------------- run


WORKLOADS = ("hot", "procs", "miss", "sync", "lateness", "trickle")


class Bench:
    def __init__(self, args: argparse.Namespace, ws: Workspace, res: Results) -> None:
        self.args, self.ws, self.res = args, ws, res
        self.sz: Sizes = QUICK if args.quick else FULL
        self.verbose = not args.quiet

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def raw(self, rep: int, what: str, data: dict[str, Any]) -> None:
        self.res.raw.append({"rep": rep, "what": what, **data})

    def check(self, cond: bool, msg: str) -> None:
        if not cond:
            self.res.problems.append(msg)
            self.log("PROBLEM: " + msg)

    # -- setup

    def setup(self) -> None:
        sz = self.sz
        self.npages = sz.hot_file_mb * MIB // PAGE
        self.hot_data = os.path.join(self.ws.root, "hot.dat")
        _write_file(self.hot_data, sz.hot_file_mb)
        rng = random.Random(12345)
        self.lists = {
            "random": [rng.randrange(self.npages) for _ in range(sz.hot_ops)],
            "seq": [i % self.npages for i in range(sz.hot_ops)],
        }
        self.miss_pages = sz.miss_file_mb * MIB // PAGE
        self.miss_data = os.path.join(self.ws.root, "miss.dat")
        if "miss" in self.args.only:
            _write_file(self.miss_data, sz.miss_file_mb)
        mrng = random.Random(777)
        cache_pages = sz.miss_cache_mb * MIB // PAGE
        self.miss_warm = [mrng.randrange(self.miss_pages) for _ in range(3 * cache_pages)]
        self.miss_timed = [mrng.randrange(self.miss_pages) for _ in range(sz.miss_ops)]
        self.wb_pages = sz.wb_mb * MIB // PAGE
        self._rows()

    def _rows(self) -> None:
        R = self.res.row
        sz = self.sz
        for region in ("file", "system", "private"):
            for pattern in ("random", "seq"):
                for loop in LOOPS:
                    k = f"hot/{region}/{pattern}/{loop}"
                    if region == "private":
                        R(
                            k,
                            f"hot {region} {pattern} ({loop})",
                            "ns/op",
                            "time",
                            "BDB hot DB_PRIVATE, no DB_THREAD (no mutexes)",
                        )
                        R(
                            k + "/thread",
                            f"hot {region} {pattern} ({loop})",
                            "ns/op",
                            "time",
                            "BDB hot DB_PRIVATE|DB_THREAD (mutexes)",
                        )
                    else:
                        R(
                            k,
                            f"hot {region} {pattern} ({loop})",
                            "ns/op",
                            "time",
                            f"BDB hot {region}{' (DB_SYSTEM_MEM)' if region == 'system' else ''}",
                        )
        for region in ("file", "system"):
            R(
                f"procs/{region}",
                f"hot {region} random, 2 procs total (asyncio)",
                "ops/s",
                "rate",
                "BDB hot --procs 2, total",
            )
            R(
                f"procs/{region}/scale",
                f"  2-proc / 1-proc scaling ({region})",
                "x",
                None,
                "BDB 2-proc / 1-proc scaling",
            )
        for loop in LOOPS:
            for conc in (1, CONCURRENCY):
                R(
                    f"miss/{conc}/{loop}",
                    f"miss {sz.miss_cache_mb}M/{sz.miss_file_mb}M, {conc} coro ({loop})",
                    "ops/s",
                    "rate",
                    "BDB miss (1 thread)",
                )
        R("miss/ratio", "  miss ratio (1 coro, asyncio)", "ratio", None, "BDB miss ratio")
        R(
            "sync/extend",
            f"sync {sz.wb_mb} MiB created past EOF (asyncio)",
            "MiB/s",
            "rate",
            "BDB memp_sync (extends the file)",
        )
        R(
            "sync/extend/dd",
            f"sync {sz.wb_mb} MiB created past EOF (asyncio)",
            "MiB/s",
            "rate",
            f"dd bs=1M count={sz.wb_mb} conv=fdatasync",
        )
        R(
            "sync/overwrite",
            f"sync {sz.wb_mb} MiB overwriting in place",
            "MiB/s",
            "rate",
            "BDB memp_sync (extends; 5.3 cannot overwrite)",
        )
        R("lat/idle/p99", "lateness idle ticker: p99", "ms", None, "")
        R("lat/idle/max", "lateness idle ticker: max", "ms", None, "")
        R("lat/idle-uvloop/p99", "lateness idle ticker, uvloop: p99", "ms", None, "")
        R("lat/idle-uvloop/max", "lateness idle ticker, uvloop: max", "ms", None, "")
        for stat in ("p50", "p99", "max"):
            R(
                f"lat/sync/{stat}",
                f"lateness during pool.sync ({LAT_TICKS}+ ticks): {stat}",
                "ms",
                None,
                f"os.pwrite x{self.wb_pages} + fdatasync on loop thread",
            )
        for stat in ("p50", "p99", "max"):
            R(
                f"lat/sync-uvloop/{stat}",
                f"lateness during pool.sync, uvloop ({LAT_TICKS}+ ticks): {stat}",
                "ms",
                None,
                "",
            )
        R(
            "trickle/ms",
            f"trickle(50) on {sz.wb_mb} MiB dirty",
            "ms",
            "time",
            "BDB memp_trickle(50)",
        )
        R("trickle/pages", "  pages written by trickle(50)", "pages", None, "BDB nwrote")

    # -- steps (each records into the rows of one repetition)

    @functools.cached_property
    def lists_path(self) -> str:
        """The hot page lists, in a file for the hot children (:func:`hot_child`)."""
        path = os.path.join(self.ws.root, "hot-lists.json")
        with open(path, "w") as fh:
            json.dump(self.lists, fh)
        return path

    def a_hot(self, rep: int, region: str, loop: str) -> None:
        key = self.ws.new_key() if region == "system" else None
        home = self.ws.new_home()
        order = ["random", "seq"] if rep % 2 == 0 else ["seq", "random"]
        what = f"hot {region} {loop}"
        try:
            with LeakWatch(self.ws, what, self.res.problems):
                r = run_hot_child(
                    self.ws,
                    dict(
                        home=home,
                        region=region,
                        key=key,
                        cache_mb=self.sz.hot_cache_mb,
                        data=self.hot_data,
                        npages=self.npages,
                        lists=self.lists_path,
                        order=order,
                        loop=loop,
                    ),
                )
        finally:
            _finish_home(self.ws, home, key, what, self.res.problems)
        for pattern in ("random", "seq"):
            d = r[pattern]
            self.check(
                d["timed_cache_miss"] == 0,
                f"{what} {pattern}: {d['timed_cache_miss']} misses in the timed loop",
            )
            k = f"hot/{region}/{pattern}/{loop}"
            self.res.put(k, "a", rep, d["ns_per_op"])
            if region == "private":
                self.res.put(k + "/thread", "a", rep, d["ns_per_op"])
        self.raw(rep, f"aiodbenv {what}", r)
        self.log(
            f"aiodbenv {what}: random {r['random']['ns_per_op']:.0f} ns/op, "
            f"seq {r['seq']['ns_per_op']:.0f} ns/op"
        )

    def b_hot(self, rep: int, region: str, thread: bool = False) -> None:
        sz = self.sz
        for pattern in ["random", "seq"] if rep % 2 == 0 else ["seq", "random"]:
            args = [
                "hot",
                "--region",
                region,
                "--cache-mb",
                str(sz.hot_cache_mb),
                "--file-mb",
                str(sz.hot_file_mb),
                "--ops",
                str(sz.anchor_hot_ops),
                "--pattern",
                pattern,
                "--repeat",
                "1",
            ]
            if thread:
                args.append("--thread")
            r = anchor(self.ws, args)
            self.check(
                r.get("timed_cache_miss", 0) == 0,
                f"anchor hot {region} {pattern}: timed misses {r.get('timed_cache_miss')}",
            )
            for loop in LOOPS:
                k = f"hot/{region}/{pattern}/{loop}" + ("/thread" if thread else "")
                self.res.put(k, "b", rep, r["ns_per_op"])
            self.raw(rep, f"anchor hot {region} {pattern}{' thread' if thread else ''}", r)
            self.log(
                f"anchor hot {region} {pattern}{' DB_THREAD' if thread else ''}: "
                f"{r['ns_per_op']:.0f} ns/op"
            )

    def a_procs(self, rep: int, region: str) -> None:
        r = run_procs(
            self.ws,
            region,
            self.sz,
            self.hot_data,
            self.npages,
            2,
            self.sz.hot_ops,
            "asyncio",
            self.res.problems,
        )
        self.check(
            r["timed_cache_miss"] == 0,
            f"procs {region}: {r['timed_cache_miss']} misses in the timed loops",
        )
        self.res.put(f"procs/{region}", "a", rep, r["total_ops_per_sec"])
        one = self.res.rows[f"hot/{region}/random/asyncio"].a.get(rep)
        if one:
            self.res.put(f"procs/{region}/scale", "a", rep, r["total_ops_per_sec"] / (1e9 / one))
        self.raw(rep, f"aiodbenv procs {region}", r)
        self.log(
            f"aiodbenv 2 procs {region}: total {r['total_ops_per_sec']:,.0f} ops/s "
            f"(per proc {[round(p['ns_per_op']) for p in r['per_proc']]} ns/op)"
        )

    def b_procs(self, rep: int, region: str) -> None:
        sz = self.sz
        r = anchor(
            self.ws,
            [
                "hot",
                "--region",
                region,
                "--procs",
                "2",
                "--cache-mb",
                str(sz.hot_cache_mb),
                "--file-mb",
                str(sz.hot_file_mb),
                "--ops",
                str(sz.anchor_hot_ops),
                "--pattern",
                "random",
            ],
        )
        total = r["total_ops_per_sec"]
        self.res.put(f"procs/{region}", "b", rep, total)
        one = self.res.rows[f"hot/{region}/random/asyncio"].b.get(rep)
        if one:
            self.res.put(f"procs/{region}/scale", "b", rep, total / (1e9 / one))
        self.raw(rep, f"anchor procs {region}", r)
        self.log(f"anchor 2 procs {region}: total {total:,.0f} ops/s")

    def a_miss(self, rep: int, loop: str) -> None:
        _read_file(self.miss_data)  # make sure it is in the OS page cache
        home = self.ws.new_home()
        order = [1, CONCURRENCY] if rep % 2 == 0 else [CONCURRENCY, 1]
        what = f"miss {loop}"
        try:
            with LeakWatch(self.ws, what, self.res.problems):
                r = run_on(
                    loop,
                    lambda: _miss_session(
                        home,
                        self.sz.miss_cache_mb,
                        self.miss_data,
                        self.miss_warm,
                        self.miss_timed,
                        order,
                    ),
                )
        finally:
            _finish_home(self.ws, home, None, what, self.res.problems)
        for conc in (1, CONCURRENCY):
            self.res.put(f"miss/{conc}/{loop}", "a", rep, r[conc]["ops_per_sec"])
            self.check(
                r[conc]["miss_ratio"] > 0.5,
                f"{what} {conc}: miss ratio only {r[conc]['miss_ratio']:.3f}",
            )
        if loop == "asyncio":
            self.res.put("miss/ratio", "a", rep, r[1]["miss_ratio"])
        self.raw(rep, f"aiodbenv {what}", {str(k): v for k, v in r.items()})
        self.log(
            f"aiodbenv {what}: 1 coro {r[1]['ns_per_op'] / 1e3:.1f} us/op, "
            f"{CONCURRENCY} coros {r[CONCURRENCY]['ns_per_op'] / 1e3:.1f} us/op, "
            f"miss ratio {r[1]['miss_ratio']:.3f}"
        )

    def b_miss(self, rep: int) -> None:
        sz = self.sz
        r = anchor(
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
        for loop in LOOPS:
            for conc in (1, CONCURRENCY):
                self.res.put(f"miss/{conc}/{loop}", "b", rep, r["ops_per_sec"])
        self.res.put("miss/ratio", "b", rep, r.get("miss_ratio"))
        self.raw(rep, "anchor miss", r)
        self.log(f"anchor miss: {r['us_per_op']:.2f} us/op, miss ratio {r.get('miss_ratio')}")

    def a_sync(self, rep: int) -> None:
        home = self.ws.new_home()
        data = self.ws.path("wb-")
        n = self.wb_pages
        try:
            with LeakWatch(self.ws, "sync", self.res.problems):
                r = run_on("asyncio", lambda: _sync_session(home, self.sz.wb_cache_mb, data, n))
        finally:
            _finish_home(self.ws, home, None, "sync", self.res.problems)
        for label in ("extend", "overwrite"):
            d = r[label]
            self.check(
                d["written"] == n and d["dirty_before"] == n and d["dirty_after"] == 0,
                f"sync {label}: written {d['written']}, dirty before {d['dirty_before']}"
                f", after {d['dirty_after']} (expected {n}, {n}, 0)",
            )
        self.check(
            r["file_bytes"] == (n + 1) * PAGE,
            f"sync: file is {r['file_bytes']} bytes, expected {(n + 1) * PAGE}",
        )
        self.res.put("sync/extend", "a", rep, r["extend"]["mib_per_sec"])
        self.res.put("sync/extend/dd", "a", rep, r["extend"]["mib_per_sec"])
        self.res.put("sync/overwrite", "a", rep, r["overwrite"]["mib_per_sec"])
        self.raw(rep, "aiodbenv sync", r)
        self.log(
            f"aiodbenv sync: extend {r['extend']['mib_per_sec']:.0f} MiB/s "
            f"({r['extend']['ms']:.0f} ms), overwrite "
            f"{r['overwrite']['mib_per_sec']:.0f} MiB/s"
        )

    def b_sync(self, rep: int) -> None:
        sz = self.sz
        r = anchor(
            self.ws, ["sync", "--cache-mb", str(sz.wb_cache_mb), "--dirty-mb", str(sz.wb_mb)]
        )
        self.res.put("sync/extend", "b", rep, r["mib_per_sec"])
        self.res.put("sync/overwrite", "b", rep, r["mib_per_sec"])
        d = dd_anchor(self.ws, sz.wb_mb)
        self.res.put("sync/extend/dd", "b", rep, d["mib_per_sec"])
        self.raw(rep, "anchor sync", r)
        self.raw(rep, "dd", d)
        self.log(
            f"anchor sync: {r['mib_per_sec']:.0f} MiB/s ({r['ms']:.0f} ms); "
            f"dd {d['mib_per_sec']:.0f} MiB/s"
        )

    def a_lateness(self, rep: int) -> None:
        # The earlier steps leave the kernel with dirty page cache (the 256 MiB miss file, the
        # written files); its flusher threads write it back in the next seconds and take the
        # CPU from the loop on a small machine: idle ticks 3-10 ms late with 0.1-0.3 ms of
        # loop CPU. Let that finish first: the rows measure what the pool's write-back does
        # to the loop, not the earlier steps' leftovers.
        os.sync()
        home = self.ws.new_home()
        data, pw = self.ws.path("lat-"), self.ws.path("pwrite-")
        try:
            with LeakWatch(self.ws, "lateness", self.res.problems):
                r = run_on(
                    "asyncio",
                    lambda: _lateness_session(home, self.sz.wb_cache_mb, data, pw, self.wb_pages),
                )
        finally:
            _finish_home(self.ws, home, None, "lateness", self.res.problems)
        self.res.put("lat/idle/p99", "a", rep, r["idle"]["p99_ms"])
        self.res.put("lat/idle/max", "a", rep, r["idle"]["max_ms"])
        for stat in ("p50", "p99", "max"):
            self.res.put(f"lat/sync/{stat}", "a", rep, r["sync"][f"{stat}_ms"])
            self.res.put(f"lat/sync/{stat}", "b", rep, r["pwrite"][f"{stat}_ms"])
        self.raw(rep, "aiodbenv lateness", r)
        if "uvloop" in LOOPS:  # the same syncs under uvloop (its timers count whole ms too)
            home = self.ws.new_home()
            try:
                with LeakWatch(self.ws, "lateness (uvloop)", self.res.problems):
                    ru = run_on(
                        "uvloop",
                        lambda: _lateness_session(
                            home, self.sz.wb_cache_mb, data + "u", pw + "u", self.wb_pages
                        ),
                    )
            finally:
                _finish_home(self.ws, home, None, "lateness (uvloop)", self.res.problems)
            for stat in ("p99", "max"):
                self.res.put(f"lat/idle-uvloop/{stat}", "a", rep, ru["idle"][f"{stat}_ms"])
            for stat in ("p50", "p99", "max"):
                self.res.put(f"lat/sync-uvloop/{stat}", "a", rep, ru["sync"][f"{stat}_ms"])
            self.raw(rep, "aiodbenv lateness (uvloop)", ru)
        s = r["sync"]
        self.log(
            f"aiodbenv lateness during sync: p50 {s['p50_ms']:.3f} p99 {s['p99_ms']:.3f} "
            f"max {s['max_ms']:.3f} ms (tick started {s['max_tick_started_at_ms']:+.1f} ms "
            f"after its sync began) over {s['n']} ticks of {s['syncs']} syncs "
            f"({s['ms']:.0f} ms each); pwrite on loop: max {r['pwrite']['max_ms']:.1f} ms; "
            f"idle max {r['idle']['max_ms']:.3f}"
        )

    def a_trickle(self, rep: int) -> None:
        home = self.ws.new_home()
        data = self.ws.path("tr-")
        try:
            with LeakWatch(self.ws, "trickle", self.res.problems):
                r = run_on(
                    "asyncio",
                    lambda: _trickle_session(home, self.sz.wb_cache_mb, data, self.wb_pages),
                )
        finally:
            _finish_home(self.ws, home, None, "trickle", self.res.problems)
        want = self.wb_pages // 2
        self.check(
            r["pages_written"] == want,
            f"trickle(50): wrote {r['pages_written']} pages, expected {want} "
            f"({r['pages_in_cache']} pages in cache, {r['dirty_before']} dirty)",
        )
        self.check(
            r["page_trickle"] == r["pages_written"],
            f"trickle: st page_trickle {r['page_trickle']} != written {r['pages_written']}",
        )
        self.res.put("trickle/ms", "a", rep, r["ms"])
        self.res.put("trickle/pages", "a", rep, r["pages_written"])
        self.raw(rep, "aiodbenv trickle", r)
        self.log(f"aiodbenv trickle(50): {r['pages_written']} pages in {r['ms']:.1f} ms")

    def b_trickle(self, rep: int) -> None:
        sz = self.sz
        r = anchor(
            self.ws,
            [
                "trickle",
                "--cache-mb",
                str(sz.wb_cache_mb),
                "--dirty-mb",
                str(sz.wb_mb),
                "--pct",
                "50",
            ],
        )
        self.res.put("trickle/ms", "b", rep, r["ms"])
        self.res.put("trickle/pages", "b", rep, r["pages_written"])
        self.raw(rep, "anchor trickle", r)
        self.log(f"anchor trickle(50): {r['pages_written']} pages in {r['ms']:.1f} ms")

    # -- the schedule

    def plan(self, rep: int) -> list[list[tuple[str, Callable[[], None]]]]:
        """Groups of steps; within a group aiodbenv and anchor alternate, and odd
        repetitions run each group in reverse order."""
        only = self.args.only
        P = functools.partial
        g: list[list[tuple[str, Callable[[], None]]]] = []
        if "hot" in only:
            for region in ("file", "system", "private"):
                grp: list[tuple[str, Callable[[], None]]] = [
                    (f"a hot {region} asyncio", P(self.a_hot, rep, region, "asyncio")),
                    (f"b hot {region}", P(self.b_hot, rep, region)),
                ]
                if region == "private":
                    grp.append((f"b hot {region} thread", P(self.b_hot, rep, region, True)))
                if "uvloop" in LOOPS:
                    grp.append((f"a hot {region} uvloop", P(self.a_hot, rep, region, "uvloop")))
                g.append(grp)
        if "procs" in only:
            for region in ("file", "system"):
                g.append(
                    [
                        (f"a procs {region}", P(self.a_procs, rep, region)),
                        (f"b procs {region}", P(self.b_procs, rep, region)),
                    ]
                )
        if "miss" in only:
            grp = [
                ("a miss asyncio", P(self.a_miss, rep, "asyncio")),
                ("b miss", P(self.b_miss, rep)),
            ]
            if "uvloop" in LOOPS:
                grp.append(("a miss uvloop", P(self.a_miss, rep, "uvloop")))
            g.append(grp)
        if "sync" in only:
            g.append([("a sync", P(self.a_sync, rep)), ("b sync", P(self.b_sync, rep))])
        if "lateness" in only:
            g.append([("a lateness", P(self.a_lateness, rep))])
        if "trickle" in only:
            g.append([("a trickle", P(self.a_trickle, rep)), ("b trickle", P(self.b_trickle, rep))])
        if rep % 2:
            g = [list(reversed(grp)) for grp in g]
        return g

    def run(self) -> None:
        for rep in range(self.sz.reps):
            self.log(f"repetition {rep + 1}/{self.sz.reps}")
            for grp in self.plan(rep):
                for name, step in grp:
                    try:
                        step()
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as err:
                        msg = f"rep {rep + 1} step '{name}' failed: {err!r}"
                        self.res.problems.append(msg + "\n" + traceback.format_exc(limit=6))
                        self.log("PROBLEM: " + msg)


def profile_hot(ws: Workspace, sz: Sizes) -> str:
    """cProfile of the hot loop (file region, random), top functions by own time."""
    import cProfile
    import io
    import pstats

    npages = sz.hot_file_mb * MIB // PAGE
    data = os.path.join(ws.root, "hot.dat")
    if not os.path.exists(data):
        _write_file(data, sz.hot_file_mb)
    rng = random.Random(5)
    pg = [rng.randrange(npages) for _ in range(min(sz.hot_ops, 200_000))]
    home = ws.new_home()
    prof = cProfile.Profile()

    async def go() -> None:
        env = await Env.open(home, **_open_kwargs("file", sz.hot_cache_mb, None))
        try:
            async with env.pool.open_file(data, page_size=PAGE) as f:
                for p in range(npages):
                    async with f.get(p):
                        pass
                prof.enable()
                await hot_loop(f, pg)
                prof.disable()
        finally:
            await _close_and_remove(env, home)

    try:
        asyncio.run(go())
    finally:
        ws.drop_home(home)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    return s.getvalue()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        return worker(argv[1:])
    if argv and argv[0] == "_hot":
        return hot_child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions, small sizes")
    ap.add_argument("--reps", type=int, help="repetitions (default 5, --quick 2)")
    ap.add_argument(
        "--json",
        default=str(HERE / "results" / "pool_bench.json"),
        help="where to write the JSON (default benchmarks/results/pool_bench.json)",
    )
    ap.add_argument("--dir", default=None, help="parent of the work directory (default: TMPDIR)")
    ap.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of the hot loop (file region, random)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    args.only = {w.strip() for w in args.only.split(",") if w.strip()}
    bad = args.only - set(WORKLOADS)
    if bad:
        ap.error(f"unknown workloads: {sorted(bad)}")
    sz = QUICK if args.quick else FULL
    if args.reps:
        sz = Sizes(**{**asdict(sz), "reps": args.reps})

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    global START_HASH
    m = machine()
    START_HASH = m["aiodbenv_source_sha256"]
    print(
        f"machine: nproc {m['nproc']} (affinity {m['affinity']}), memory {m['memory']}, {m['cpu']}"
    )
    print(
        f"         Python {m['python']} ({m['implementation']}), kernel {m['kernel']}, "
        f"uvloop {m['uvloop']}, tmp fs {m['tmp_fs']}"
    )
    changed = m["git_dirty_files"]
    dirty = f" + uncommitted changes in {len(changed)} files" if changed else ""
    print(
        f"aiodbenv {m['aiodbenv']} at git {m['git_head']}"
        f"{dirty}"
        f", sources sha256 {m['aiodbenv_source_sha256']}, mutex backend {m['mutex_backend']}"
    )
    print(f"load average at start: {os.getloadavg()}")
    print(f"sizes: {asdict(sz)}  ({'quick' if args.quick else 'full'})")
    sys.stdout.flush()

    ws = Workspace(tempfile.mkdtemp(prefix="aiodbenv-pool-bench-", dir=args.dir))
    res = Results()
    bench = Bench(args, ws, res)
    bench.sz = sz
    status = 0
    t_start = time.monotonic()
    prof_text = None
    try:
        bench.log("building the anchor and writing data files")
        from benchmarks.anchors.build import build

        build()
        prime_loops()
        bench.setup()
        bench.run()
        if args.profile:
            prof_text = profile_hot(ws, sz)
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
            res.problems += cleanup(ws)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    elapsed = time.monotonic() - t_start
    end_hash = source_hash()
    if end_hash != START_HASH:
        res.problems.insert(
            0,
            f"WARNING: the aiodbenv sources changed during the run "
            f"({START_HASH} -> {end_hash}): results may mix versions",
        )
    print()
    print(render(res))
    print(f"\n{sz.reps} repetitions in {elapsed:.0f} s; load average at the end: {os.getloadavg()}")
    if prof_text:
        print("\ncProfile of the hot loop (file region, random):\n" + prof_text)
    if res.problems:
        print("\nproblems seen:")
        for p in res.problems:
            print("  - " + p.rstrip().replace("\n", "\n    "))
    out = {
        "machine": m,
        "sizes": asdict(sz),
        "elapsed_s": elapsed,
        "status": status,
        "rows": [
            {
                "key": r.key,
                "label": r.label,
                "unit": r.unit,
                "ratio_kind": r.kind,
                "anchor": r.anchor_label,
                "aiodbenv": _summ(list(r.a.values())),
                "anchor_values": _summ(list(r.b.values())),
                "aiodbenv_by_rep": r.a,
                "anchor_by_rep": r.b,
                "ratio_by_rep": _ratios(r),
                "ratio_median": statistics.median(_ratios(r)) if _ratios(r) else None,
            }
            for r in res.rows.values()
        ],
        "loadavg_end": os.getloadavg(),
        "raw": res.raw,
        "problems": res.problems,
        "profile": prof_text,
    }
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, default=str)
        print(f"\nJSON written to {args.json}")
    except OSError as err:
        print(f"could not write {args.json}: {err}", file=sys.stderr)
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
