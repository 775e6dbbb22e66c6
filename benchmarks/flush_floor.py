"""The floor of a log flush that keeps the fdatasync off the event loop, measured in C on this
machine (``benchmarks/anchors/flush_floor.c``, built here with ``cc``), beside aiodbenv's own
``put(flush=True)``:

- ``sync``: a 100-byte pwrite and an fdatasync in the calling thread, on a preallocated file
  (the shape of Berkeley DB's ``log_put(DB_FLUSH)``);
- ``handoff``: the same I/O in a worker thread woken through a futex, the caller sleeping in
  ``epoll_wait`` on an eventfd the worker signals (what any design must do that does not
  block its event loop on the disk), with no Python;
- ``empty``: that hand-off without the I/O;
- ``aiodbenv``: ``await env.log.put(record, flush=True)`` per record, one process.

Three repetitions, interleaved; medians in microseconds per record, and each one's ratio to
``sync``. The issue's aim for a flushed put is 1.2 times Berkeley DB's time::

    .venv/bin/python benchmarks/flush_floor.py [seconds per repetition]
"""

from __future__ import annotations

import asyncio
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

SOURCE = Path(__file__).resolve().parent / "anchors" / "flush_floor.c"
RECORD = b"x" * 100


def build(into: str) -> str:
    binary = os.path.join(into, "flush_floor")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-o", binary, str(SOURCE), "-lpthread"], check=True)
    return binary


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
        binary = build(work)
        rows: dict[str, list[float]] = {"sync": [], "handoff": [], "empty": [], "aiodbenv": []}
        for _ in range(3):
            c = run_c(binary, work, seconds)
            rows["sync"].append(c["sync_us"])
            rows["handoff"].append(c["handoff_us"])
            rows["empty"].append(c["empty_us"])
            home = tempfile.mkdtemp(dir=work)
            rows["aiodbenv"].append(asyncio.run(run_aiodbenv(home, seconds / 3)))
            shutil.rmtree(home, ignore_errors=True)
        base = statistics.median(rows["sync"])
        for name, vals in rows.items():
            med = statistics.median(vals)
            spread = f"{min(vals):.0f}-{max(vals):.0f}"
            print(f"{name:9s} {med:8.1f} us/record ({spread})  {med / base:5.2f} x sync")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
