"""The event loop during write-back of 64 MiB: how late a 1 ms ticker wakes, the longest
synchronous slice the loop runs (thread CPU time per callback: the loop's own work, not the
machine's preemption), and the garbage collector's passes. Idle control first; then
``pool.sync()``, ``trickle(100)`` and a checkpoint, under asyncio and uvloop (a few seconds).
Each tick later than 1 ms is put down to the loop's own CPU (more than half of the tick on the
loop thread), to this process's other threads (worker threads' CPU, in user or kernel mode,
more than half of it: they held the GIL or the CPU the loop needed), or to nobody here (the
machine's other processes preempted the loop):

    .venv/bin/python benchmarks/lateness_quick.py
    PYTHONPATH=<other tree> .venv/bin/python benchmarks/lateness_quick.py
"""

from __future__ import annotations

import asyncio
import asyncio.events
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiodbenv

PAGES = int(sys.argv[1]) if len(sys.argv) > 1 else 16384

_slices: list[float] = []
_run = asyncio.events.Handle._run


def _timed_run(self: Any) -> None:
    t = time.thread_time()
    _run(self)
    _slices.append(time.thread_time() - t)


async def _measure(
    work: Callable[[], Awaitable[Any]],
) -> tuple[float, float, float, float, int, tuple[int, int, int]]:
    """(p99 lateness, max lateness, max slice, loop CPU, GC passes, late ticks put down to
    the loop / other threads / nobody here) while ``work`` runs."""
    late: list[float] = []
    blame = [0, 0, 0]
    stop = False

    async def ticker() -> None:
        while not stop:
            t, c, p = time.perf_counter(), time.thread_time(), time.process_time()
            await asyncio.sleep(0.001)
            lag = time.perf_counter() - t - 0.001
            late.append(lag)
            if lag > 0.001:
                loop_cpu = time.thread_time() - c
                others = time.process_time() - p - loop_cpu
                blame[0 if loop_cpu > lag / 2 else 1 if others > lag / 2 else 2] += 1

    passes: list[int] = []

    def gc_seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.005)
    late.clear()
    blame[:] = [0, 0, 0]
    _slices.clear()
    gc.callbacks.append(gc_seen)
    cpu = time.thread_time()
    try:
        await work()
    finally:
        cpu = time.thread_time() - cpu
        gc.callbacks.remove(gc_seen)
        stop = True
        await tick
    late.sort()
    n = len(late) or 1
    return (
        late[min(n - 1, int(n * 0.99))] if late else 0.0,
        late[-1] if late else 0.0,
        max(_slices, default=0.0),
        cpu,
        len(passes),
        (blame[0], blame[1], blame[2]),
    )


async def main(loop_name: str) -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-latq-")
    env = await aiodbenv.Env.open(home, create=True, cache_size=(PAGES * 4096 * 3) // 2)
    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
    try:
        async with env.pool.open_file("data", create=True) as f:

            async def dirty(gen: int) -> None:
                for p in range(PAGES):
                    async with f.get(p, create=True) as page:
                        page.data[0] = gen
                        page.mark_dirty()

            await dirty(0)
            await env.pool.sync()  # the file exists: later runs overwrite in place
            rows: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("idle 0.1 s", lambda: asyncio.sleep(0.1)),
                ("pool.sync()", env.pool.sync),
                ("trickle(100)", lambda: env.pool.trickle(100)),
                ("checkpoint", env.checkpoint),
            ]
            for gen, (name, work) in enumerate(rows, 1):
                await dirty(gen)
                p99, worst, slice_, cpu, passes, blame = await _measure(work)
                # uvloop's callbacks are not asyncio Handles: its slices are not seen.
                shown = f"{slice_ * 1e3:5.2f} ms" if loop_name == "asyncio" else "  n/a   "
                print(
                    f"{loop_name:8s} {name:13s} {PAGES * 4096 >> 20} MiB: lateness p99 "
                    f"{p99 * 1e3:5.2f} ms, max {worst * 1e3:5.2f} ms; longest loop slice "
                    f"{shown}, loop CPU {cpu * 1e3:6.1f} ms, GC passes {passes}; late ticks "
                    f"(> 1 ms) loop/threads/preempted {blame[0]}/{blame[1]}/{blame[2]}"
                )
    finally:
        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        await env.close()
        await aiodbenv.Env.remove(home)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    print(f"{os.path.dirname(aiodbenv.__file__)}, load average {os.getloadavg()}")
    asyncio.run(main("asyncio"))
    import uvloop

    uvloop.run(main("uvloop"))
