"""How late the event loop runs while a SIGSTOPped process holds a region mutex.

For each mutex family an operation of this process needs (see tests/test_waits.py), a child
locks the mutex and is stopped; the operation runs with ``wait_timeout`` = 2 s while a ticker
measures the loop's longest lateness. Prints one line per case: the lateness, how long the
operation took and how it ended. A blocking wait shows as about a second (or more) of
lateness; an async back-off as a few milliseconds. Run from the repository root:

    python -m benchmarks.mutex_stall
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiodbenv
from aiodbenv.mpool import bhwrite
from tests.test_waits import Holder, Ticker

PS = 4096


async def _maybe(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


async def case(name: str, kind: str, prepare: Callable[..., Awaitable[Any]]) -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-stall-")
    procs: list[subprocess.Popen[str]] = []
    env = await aiodbenv.Env.open(home, create=True, region="file", cache_size=64 * PS)
    env.pool.wait_timeout = 2.0
    try:
        f = await env.pool.open_file("a.db", create=True)
        holder = await Holder.start(home, kind, procs)
        op = await prepare(env, f, holder)
        ticker = await Ticker.started()
        t0 = time.monotonic()
        try:
            await _maybe(op())
            how = "finished"
        except Exception as err:
            how = type(err).__name__
        took = time.monotonic() - t0
        worst = await ticker.stop()
        print(f"{name:34} loop late {worst * 1000:7.1f} ms   took {took:5.2f} s   {how}")
        await holder.release()
        while env.pool._io.tasks:
            await asyncio.gather(*list(env.pool._io.tasks), return_exceptions=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        await env.close()
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    async def open_file(env: aiodbenv.Env, f: Any, h: Holder) -> Any:
        h.lock_and_stop()
        return lambda: env.pool.open_file("b.db", create=True)

    async def close(env: aiodbenv.Env, f: Any, h: Holder) -> Any:
        h.lock_and_stop()
        return f.close

    async def sync_file_mutex(env: aiodbenv.Env, f: Any, h: Holder) -> Any:
        for i in range(8):
            async with f.get(i, create=True) as page:
                page.data[0] = 1
                page.mark_dirty()
        h.lock_and_stop()
        return env.pool.sync

    async def set_bucket(env: aiodbenv.Env, f: Any, h: Holder) -> Any:
        page = await f.pin(0, create=True)
        h.lock_and_stop()
        return lambda: f.set(page, dirty=True)

    async def snapshot_bucket(env: aiodbenv.Env, f: Any, h: Holder) -> Any:
        async with f.get(0, create=True) as page:
            page.mark_dirty()
        real = bhwrite._snapshot

        def snap(*args: Any) -> Any:
            bhwrite._snapshot = real  # type: ignore[assignment]
            h.lock_and_stop()
            return real(*args)

        bhwrite._snapshot = snap  # type: ignore[assignment]
        return env.pool.sync

    async def write_done_bucket(env: aiodbenv.Env, f: Any, h: Holder) -> Any:
        async with f.get(0, create=True) as page:
            page.mark_dirty()
        real = bhwrite._write_runs

        def runs(jobs: Any) -> Any:
            bhwrite._write_runs = real  # type: ignore[assignment]
            out = real(jobs)
            h.lock_and_stop()
            return out

        bhwrite._write_runs = runs  # type: ignore[assignment]

        async def sync_and_wait() -> None:
            await env.pool.sync()
            await asyncio.sleep(1.0)  # the claim's release, if deferred, keeps trying

        return sync_and_wait

    async def lease(env: aiodbenv.Env, f: Any, h: Holder) -> Any:
        worker = env.start_trickle(20, interval=3600)
        await asyncio.sleep(0.1)
        h.lock_and_stop()

        async def renew() -> None:
            await _maybe(worker._take_lease(10))
            await env.stop_workers()

        return renew

    await case("open_file, file table held", "pool", open_file)
    await case("close, file table held", "pool", close)
    await case("sync, file mutex held", "file", sync_file_mutex)
    await case("set(), bucket held", "bucket0", set_bucket)
    await case("sync, bucket held at snapshot", "bucket0", snapshot_bucket)
    await case("sync, bucket held at write_done", "bucket0", write_done_bucket)
    await case("worker lease renewal, pool held", "pool", lease)


if __name__ == "__main__":
    asyncio.run(main())
