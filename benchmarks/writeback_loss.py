"""Pages lost by write-back under faults: one line per scenario (not a speed benchmark).

A child process dirties pages and runs sync, trickle, a checkpoint or evicting pins; it
kills itself (``AIODBENV_TEST_SIGNAL``, see ``aiodbenv/_io.py``) just before its first
``pwritev`` (the pages are claimed, nothing written). A surviving process then calls
``sync()`` and the script reports what it said, how many pages are missing from the data file,
and how many frames are left flagged WRITING. Also: a sync in a process that never opened the
file (512 pages written by another process's sync), a failed fsync followed by a second sync,
and a stopped writer.

    .venv/bin/python benchmarks/writeback_loss.py

Run it against another tree (with this tree's ``aiodbenv/_io.py``, which has the hook) with
``PYTHONPATH=<tree>``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable

import aiodbenv
from aiodbenv import _io

PAGE = 4096

CHILD = r"""
import asyncio, sys
import aiodbenv
from aiodbenv._workers import run_checkpoint

async def main():
    home, op, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    stride = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file("data", create=True)
    for i in range(0, n * stride, stride):
        async with f.get(i, create=True) as p:
            p.data[:] = bytes([i % 251 + 1]) * len(p.data)
            p.mark_dirty()
    if op == "sync":
        await env.pool.sync()
    elif op == "trickle":
        await env.pool.trickle(100)
    elif op == "checkpoint":
        await run_checkpoint(env.pool)
    elif op == "evict":
        for i in range(n, 2 * n):
            async with f.get(i, create=True) as p:
                p.data[:] = bytes([i % 251 + 1]) * len(p.data)
                p.mark_dirty()
    await f.close()
    await env.close()

asyncio.run(main())
"""


def _child(home: str, op: str, n: int, plan: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if plan:
        env["AIODBENV_TEST_SIGNAL"] = plan
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), home, op, str(n)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _lost(home: str, pages: range) -> int:
    try:
        with open(os.path.join(home, "data"), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return len(pages)
    return sum(1 for p in pages if data[p * PAGE : (p + 1) * PAGE] != bytes([p % 251 + 1]) * PAGE)


def _writing(pool: aiodbenv.Pool) -> int:
    from aiodbenv.mpool.layout import BH, BH_WRITING, BUCKET

    n = 0
    for cache in pool._core.caches:
        w = cache.words
        for bw in cache.bucket_words:
            off = w[bw + BUCKET.word.head]
            while off:
                n += bool(w[(off >> 3) + BH.word.flags] & BH_WRITING)
                off = w[(off >> 3) + BH.word.next]
    return n


async def _outcome(make: Callable[[], Awaitable[object]]) -> str:
    try:
        r = await make()
        return f"success (written {getattr(r, 'written', r)})"
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:90]}"


async def killed(op: str, n: int, cache: int, plan: str) -> str:
    home = tempfile.mkdtemp(prefix="aiodbenv-loss-")
    try:
        env = await aiodbenv.Env.open(home, create=True, cache_size=cache)
        env.pool.wait_timeout = 2.0
        child = _child(home, op, n, plan)
        rc = child.wait(120)
        said = await _outcome(lambda: env.pool.sync())
        pages = range(2 * n if op == "evict" else n)
        # only pages the child finished are expected; for evict, the first n are
        lost = _lost(home, range(n) if op == "evict" else pages)
        line = (
            f"{op:10s} killed at {plan:24s} rc={rc:4d}  survivor sync: {said:60s} "
            f"lost {lost}/{n}  frames WRITING {_writing(env.pool)}"
        )
        try:
            await env.close()
        except Exception:
            pass
        await aiodbenv.Env.remove(home, force=True)
        return line
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def never_opened(stride: int) -> str:
    home = tempfile.mkdtemp(prefix="aiodbenv-loss-")
    try:
        env = await aiodbenv.Env.open(home, create=True, cache_size=4 << 20)
        env.pool.wait_timeout = 2.0
        # The child dirties 512 pages (every ``stride``-th: one run per page when 2) and
        # closes without writing them.
        code = CHILD.replace(
            'if op == "sync":', 'if op == "none":\n        pass\n    elif op == "sync":'
        )
        p = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), home, "none", "512", str(stride)],
            check=True,
        )
        assert p.returncode == 0
        said = await _outcome(lambda: env.pool.sync())
        line = (
            f"sync in a process that never opened the file (stride {stride}): {said:50s} "
            f"lost {_lost(home, range(0, 512 * stride, stride))}/512  "
            f"frames WRITING {_writing(env.pool)}"
        )
        await env.close()
        await aiodbenv.Env.remove(home, force=True)
        return line
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def fsync_eio() -> str:
    home = tempfile.mkdtemp(prefix="aiodbenv-loss-")
    try:
        env = await aiodbenv.Env.open(home, create=True, cache_size=4 << 20)
        f = await env.pool.open_file("data", create=True)
        for i in range(16):
            async with f.get(i, create=True) as p:
                p.data[:] = b"x" * PAGE
                p.mark_dirty()
        with _io.inject("fsync", errno.EIO):
            first = await _outcome(lambda: env.pool.sync())
        second = await _outcome(lambda: env.pool.sync())
        line = f"fsync EIO: first sync: {first[:50]}; second sync: {second[:50]}"
        try:
            await f.close()
            await env.close()
        except Exception:
            pass
        await aiodbenv.Env.remove(home, force=True)
        return line
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def stopped() -> str:
    home = tempfile.mkdtemp(prefix="aiodbenv-loss-")
    try:
        env = await aiodbenv.Env.open(home, create=True, cache_size=4 << 20)
        env.pool.wait_timeout = 2.0
        child = _child(home, "sync", 128, "pwrite:before:1:SIGSTOP")
        for _ in range(3000):
            with open(f"/proc/{child.pid}/stat") as fh:
                st = fh.read()
            if st[st.rfind(")") + 2] in "Tt":
                break
            time.sleep(0.01)
        t0 = time.monotonic()
        said = await _outcome(lambda: env.pool.sync())
        took = time.monotonic() - t0
        lost = _lost(home, range(128))
        os.kill(child.pid, signal.SIGCONT)
        child.wait(60)
        line = (
            f"writer SIGSTOPped after its claim: survivor sync after {took:.1f} s: {said[:70]}; "
            f"pages not on disk at that point {lost}/128"
        )
        await env.close()
        await aiodbenv.Env.remove(home, force=True)
        return line
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    print(f"aiodbenv from {os.path.dirname(aiodbenv.__file__)} (a loaded shared machine)")
    for op, n, cache in (
        ("sync", 128, 4 << 20),
        ("trickle", 128, 4 << 20),
        ("checkpoint", 128, 4 << 20),
        ("evict", 48, 64 * PAGE),
    ):
        print(await killed(op, n, cache, "pwrite:before:1:SIGKILL"), flush=True)
    print(await never_opened(1), flush=True)
    print(await never_opened(2), flush=True)
    print(await fsync_eio(), flush=True)
    print(await stopped(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
