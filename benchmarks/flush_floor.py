"""The floor of a log flush that keeps the fdatasync off the event loop, measured in C on this
machine (``benchmarks/anchors/flush_floor.c``, built here with ``cc``), beside aiodbenv's own
``put(flush=True)``:

- ``sync``: a 100-byte pwrite and an fdatasync in the calling thread, on a preallocated file
  (the shape of Berkeley DB's ``log_put(DB_FLUSH)``);
- ``handoff``: the same I/O in a worker thread woken through a futex, the caller sleeping in
  ``epoll_wait`` on an eventfd the worker signals (what any design must do that does not
  block its event loop on the disk), with no Python;
- ``empty``: that hand-off without the I/O;
- ``asyncio``: the same C worker (the program built as a library, called through ctypes),
  an asyncio event loop waiting for its eventfd (``loop.add_reader``, a future per record):
  the floor with an event loop and no library;
- ``aiodbenv``: ``await env.log.put(record, flush=True)`` per record, one process;
- ``uvloop`` and ``aiodbenv-uvloop``: the last two under uvloop's event loop (if installed).

Three repetitions, interleaved; medians in microseconds per record, and each one's ratio to
``sync``. The issue's aim for a flushed put is 1.2 times Berkeley DB's time::

    .venv/bin/python benchmarks/flush_floor.py [seconds per repetition]
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiodbenv

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional
    uvloop = None  # type: ignore[assignment]

SOURCE = Path(__file__).resolve().parent / "anchors" / "flush_floor.c"
RECORD = b"x" * 100


PREALLOC = 16 << 20  # as flush_floor.c's


def build(into: str) -> tuple[str, str]:
    """The program and the library, built in ``into``."""
    binary = os.path.join(into, "flush_floor")
    lib = os.path.join(into, "libflush_floor.so")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-o", binary, str(SOURCE), "-lpthread"], check=True)
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-DFLOOR_LIB", "-o", lib, str(SOURCE), "-lpthread"],
        check=True,
    )
    return binary, lib


class AsyncioFloor:
    """The C worker of the library on a preallocated file, woken per record by a coroutine
    that then awaits the eventfd on its loop."""

    def __init__(self, lib_path: str, home: str) -> None:
        self.lib = ctypes.CDLL(lib_path)
        self.path = os.path.join(home, "asyncio_floor.log")
        self.fd = os.open(self.path, os.O_CREAT | os.O_TRUNC | os.O_RDWR | os.O_CLOEXEC, 0o644)
        os.write(self.fd, bytes(PREALLOC))
        os.fsync(self.fd)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if self.lib.floor_start(self.fd, self.efd) != 0:
            raise OSError("floor_start failed")

    async def run(self, seconds: float) -> float:
        loop = asyncio.get_running_loop()
        waiter: list[asyncio.Future[None]] = []

        def ready() -> None:
            os.eventfd_read(self.efd)
            if waiter and not waiter[0].done():
                waiter[0].set_result(None)

        loop.add_reader(self.efd, ready)
        try:
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for _ in range(50):
                    fut = loop.create_future()
                    waiter[:] = [fut]
                    self.lib.floor_go()
                    await fut
                n += 50
            return (time.perf_counter() - t0) / n * 1e6
        finally:
            loop.remove_reader(self.efd)

    def close(self) -> None:
        self.lib.floor_stop()  # returns once the worker has ended
        os.close(self.efd)
        os.close(self.fd)
        os.unlink(self.path)


def run_c(binary: str, home: str, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [binary, home, str(seconds)], check=True, capture_output=True, text=True
    ).stdout
    r = json.loads(out)
    if not r.get("ok"):
        raise RuntimeError(r.get("error"))
    return {k: float(r[k]) for k in ("sync_us", "handoff_us", "empty_us")}


async def run_aiodbenv(home: str, seconds: float) -> float:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    try:
        log = env.log
        for _ in range(200):
            await log.put(RECORD, flush=True)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(50):
                await log.put(RECORD, flush=True)
            n += 50
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home)


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    work = tempfile.mkdtemp(prefix="aiodbenv-floor-")
    try:
        binary, lib = build(work)
        rows: dict[str, list[float]] = {
            "sync": [],
            "handoff": [],
            "empty": [],
            "asyncio": [],
            "aiodbenv": [],
        }
        if uvloop is not None:
            rows["uvloop"], rows["aiodbenv-uvloop"] = [], []
        floor = AsyncioFloor(lib, work)
        try:
            for _ in range(3):
                c = run_c(binary, work, seconds)
                rows["sync"].append(c["sync_us"])
                rows["handoff"].append(c["handoff_us"])
                rows["empty"].append(c["empty_us"])
                rows["asyncio"].append(asyncio.run(floor.run(seconds / 3)))
                home = tempfile.mkdtemp(dir=work)
                rows["aiodbenv"].append(asyncio.run(run_aiodbenv(home, seconds / 3)))
                shutil.rmtree(home, ignore_errors=True)
                if uvloop is not None:
                    rows["uvloop"].append(uvloop.run(floor.run(seconds / 3)))
                    home = tempfile.mkdtemp(dir=work)
                    rows["aiodbenv-uvloop"].append(uvloop.run(run_aiodbenv(home, seconds / 3)))
                    shutil.rmtree(home, ignore_errors=True)
        finally:
            floor.close()
        base = statistics.median(rows["sync"])
        for name, vals in rows.items():
            med = statistics.median(vals)
            spread = f"{min(vals):.0f}-{max(vals):.0f}"
            print(f"{name:15s} {med:8.1f} us/record ({spread})  {med / base:5.2f} x sync")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
