#!/usr/bin/env python3
"""How long creating, joining, closing and removing an environment takes, per region kind.

Not a test: a measurement to run by hand (see benchmarks/README.md).

For each repetition, and for each region kind in an order that rotates between repetitions
(file-backed, System V shared memory with a shm key, private), one cycle is timed step by step:

    create       await Env.open(home, create=True, region=KIND, ...) in an empty directory
    join         await Env.open(home), a second handle in the same process (file, system only)
    close        await joiner.close(), a handle that is not the last one (file, system only)
    close-last   await creator.close(), the last open handle
    remove       await Env.remove(home), nothing open any more

Every step includes its hop to a worker thread, as an application sees it.

Before timing, each kind is created once with each --cache-size and the regions it gets are
compared. When the cache size changes nothing that Env.open creates (the environment has only
its environment region), one cache size is measured and the output says so; when it does change
them (a buffer-pool region sized by the cache), every cache size is measured.

Everything the script creates (temporary homes, their region files, System V segments) is
removed before it exits, also after Ctrl-C or SIGTERM: the first signal stops after the current
step, a second one interrupts the step; either way the cleanup runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiodbenv
from aiodbenv import Env

try:
    import sysv_ipc
except ImportError:  # pragma: no cover - sysv_ipc is a dependency of aiodbenv
    sysv_ipc = None

KINDS = ("file", "system", "private")
STEPS = ("create", "join", "close", "close-last", "remove")
#: Keys reserved per system-memory environment: base, base+1, ... one per region.
KEY_SPAN = 64
#: The start of every aiodbenv region is this magic ("aiodbreg" in little-endian ASCII).
REGION_MAGIC = b"aiodbreg"


class Stop(Exception):
    """Raised between steps after the first SIGINT/SIGTERM."""


@dataclass
class Workspace:
    """What this run has created, so that all of it can be removed at the end."""

    root: str
    homes: list[str] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    handles: list[Env] = field(default_factory=list)

    def new_home(self) -> str:
        home = tempfile.mkdtemp(prefix="home-", dir=self.root)
        self.homes.append(home)
        return home

    def new_key(self) -> int:
        """A base shm key whose KEY_SPAN keys are all unused right now."""
        rng = random.Random()
        for _ in range(1000):
            base = rng.randrange(0x4E000000, 0x4EFF0000, KEY_SPAN)
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


class Signals:
    """First SIGINT/SIGTERM: stop after the current step. Second: cancel the running step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
        self.count = 0
        self.cleaning = False
        self._task = task
        self._loop = loop
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self.count += 1
        if self.cleaning:
            print(f"{signal.Signals(sig).name}: still cleaning up, please wait", file=sys.stderr)
        elif self.count == 1:
            print(
                f"\n{signal.Signals(sig).name}: stopping after the current step "
                "(again to interrupt it); cleaning up",
                file=sys.stderr,
            )
        else:
            self._task.cancel()

    def check(self) -> None:
        if self.count:
            raise Stop

    def uninstall(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.remove_signal_handler(sig)


def _open_args(kind: str, cache_size: int, ws: Workspace) -> dict[str, Any]:
    args: dict[str, Any] = {"create": True, "region": kind, "cache_size": cache_size}
    if kind == "system":
        args["shm_key"] = ws.new_key()
    return args


def _region_shape(env: Env) -> tuple[tuple[str, int], ...]:
    return tuple((r.type, r.size) for r in env.stat().regions)


async def _probe(ws: Workspace, cache_sizes: list[int]) -> dict[str, dict[int, Any]]:
    """The regions each kind gets at each cache size: [(type, size), ...]."""
    shapes: dict[str, dict[int, Any]] = {}
    for kind in KINDS:
        shapes[kind] = {}
        for cs in cache_sizes:
            home = ws.new_home()
            env = await Env.open(home, **_open_args(kind, cs, ws))
            ws.handles.append(env)
            shapes[kind][cs] = _region_shape(env)
            await env.close()
            ws.handles.remove(env)
            await Env.remove(home)
            _drop_home(ws, home)
    return shapes


def _drop_home(ws: Workspace, home: str) -> None:
    os.rmdir(home)  # empty after remove; anything left is a bug worth an error
    ws.homes.remove(home)


async def _timed(sig: Signals, samples: list[float], coro: Any) -> Any:
    sig.check()
    t0 = time.perf_counter_ns()
    result = await coro
    samples.append((time.perf_counter_ns() - t0) / 1e6)
    return result


async def _cycle(
    ws: Workspace, sig: Signals, kind: str, cache_size: int, out: dict[str, list[float]]
) -> None:
    home = ws.new_home()
    args = _open_args(kind, cache_size, ws)
    creator = await _timed(sig, out["create"], Env.open(home, **args))
    ws.handles.append(creator)
    if kind != "private":  # a private environment admits one handle
        joiner = await _timed(sig, out["join"], Env.open(home))
        ws.handles.append(joiner)
        await _timed(sig, out["close"], joiner.close())
        ws.handles.remove(joiner)
    await _timed(sig, out["close-last"], creator.close())
    ws.handles.remove(creator)
    await _timed(sig, out["remove"], Env.remove(home))
    _drop_home(ws, home)


async def _cleanup(ws: Workspace) -> list[str]:
    """Close, remove and delete everything in ``ws``; returns what could not be removed."""
    problems: list[str] = []
    # A step interrupted by a second signal finishes in its worker thread (and a cancelled
    # open is closed by aiodbenv itself); give those threads a moment before touching handles.
    await asyncio.sleep(0.2)
    for env in list(ws.handles):
        try:
            await env.close()
        except Exception:
            pass  # e.g. RunRecovery: the handle is released all the same
    ws.handles.clear()
    for home in list(ws.homes):
        try:
            await Env.remove(home, force=True)
        except Exception as err:
            problems.append(f"remove {home}: {err}")
    _sync_cleanup(ws, problems)
    return problems


def _sync_cleanup(ws: Workspace, problems: list[str]) -> None:
    """Last resort, without the event loop: our segments by key, then the directories."""
    if sysv_ipc is not None:
        for base in ws.keys:
            for key in range(base, base + KEY_SPAN):
                try:
                    shm = sysv_ipc.SharedMemory(key, 0, mode=0)
                except (sysv_ipc.Error, OSError, ValueError):
                    continue
                try:
                    if shm.read(len(REGION_MAGIC), 0) == REGION_MAGIC:
                        shm.remove()
                    else:
                        problems.append(f"shm key {key:#x} is not an aiodbenv region; left alone")
                finally:
                    shm.detach()
    shutil.rmtree(ws.root, ignore_errors=True)
    if os.path.exists(ws.root):
        problems.append(f"could not delete {ws.root}")


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
    }


def _fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _fmt_shape(shape: tuple[tuple[str, int], ...]) -> str:
    return ", ".join(f"{t} {_fmt_size(s)}" for t, s in shape)


def _table(results: list[dict[str, Any]]) -> str:
    head = f"{'cache':>9}  {'kind':<8} {'step':<11} {'median':>8} {'min':>8} {'max':>8}   n"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{_fmt_size(r['cache_size']):>9}  {r['kind']:<8} {r['step']:<11} "
            f"{r['median_ms']:8.3f} {r['min_ms']:8.3f} {r['max_ms']:8.3f} {r['n']:>3}"
        )
    lines.append("(milliseconds)")
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    sig = Signals(loop, task)
    ws = Workspace(tempfile.mkdtemp(prefix="aiodbenv-bench-", dir=args.dir))
    status = 0
    try:
        from aiodbenv.region.mutex import BACKEND  # which pthread binding is in use
    except ImportError:
        BACKEND = "unknown"
    meta = {
        "aiodbenv": getattr(aiodbenv, "__version__", "?"),
        "aiodbenv_path": os.path.dirname(aiodbenv.__file__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mutex_backend": BACKEND,
        "dir": args.dir or tempfile.gettempdir(),
        "reps": args.reps,
        "warmup": args.warmup,
    }
    try:
        shapes = await _probe(ws, args.cache_size)
        varies = any(len({shapes[k][cs] for cs in args.cache_size}) > 1 for k in KINDS)
        measured = args.cache_size if varies else args.cache_size[:1]
        print(
            f"aiodbenv {meta['aiodbenv']} from {meta['aiodbenv_path']}, Python "
            f"{meta['python']}, mutexes: {BACKEND}, homes under {meta['dir']}"
        )
        print("Regions Env.open creates:")
        for kind in KINDS:
            for cs in args.cache_size:
                print(f"  {kind:<8} cache_size {_fmt_size(cs):>8}: {_fmt_shape(shapes[kind][cs])}")
        if not varies and len(args.cache_size) > 1:
            print(
                f"cache_size does not change the regions created; measuring cache_size "
                f"{_fmt_size(measured[0])} only."
            )
        samples = {(cs, k, s): [] for cs in measured for k in KINDS for s in STEPS}
        total = args.warmup + args.reps
        progress = not args.quiet and sys.stderr.isatty()
        for rep in range(total):
            order = KINDS[rep % 3 :] + KINDS[: rep % 3]  # rotate which kind goes first
            for cs in measured:
                for kind in order:
                    out: dict[str, list[float]] = {s: [] for s in STEPS}
                    await _cycle(ws, sig, kind, cs, out)
                    if rep >= args.warmup:
                        for step, vals in out.items():
                            samples[(cs, kind, step)] += vals
            if progress:
                print(f"\r{rep + 1}/{total} repetitions", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        results = [
            {"cache_size": cs, "kind": k, "step": s, **_summary(v)}
            for (cs, k, s), v in samples.items()
            if v
        ]
        print()
        print(_table(results))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "meta": meta,
                        "regions": {
                            k: {str(cs): [list(r) for r in shapes[k][cs]] for cs in args.cache_size}
                            for k in KINDS
                        },
                        "cache_size_changes_regions": varies,
                        "results": results,
                        "samples_ms": {
                            f"{cs}/{k}/{s}": v for (cs, k, s), v in samples.items() if v
                        },
                    },
                    f,
                    indent=2,
                )
            print(f"JSON written to {args.json}")
    except (Stop, asyncio.CancelledError):
        status = 130
    finally:
        sig.cleaning = True  # from here on, signals no longer interrupt anything
        problems = await _cleanup(ws)
        sig.uninstall()
        for p in problems:
            print(f"cleanup: {p}", file=sys.stderr)
        if problems:
            status = status or 1
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    p.add_argument(
        "--cache-size",
        type=lambda s: int(s, 0),
        action="append",
        default=None,
        metavar="BYTES",
        help="cache size to create with; repeat for several (default: 262144 and 67108864)",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="where to make the temporary homes (default: the system temp dir)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument(
        "--quiet", action="store_true", help="no progress line (shown only on a terminal anyway)"
    )
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be at least 1 and --warmup at least 0")
    args.cache_size = args.cache_size or [256 * 1024, 64 << 20]
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
