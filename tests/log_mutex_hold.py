"""Puts and flushes, some cancelled, while another process holds the log mutex three times
for 1.3 s (past the round thread's 1 s bound to publish a round): every acknowledged record
must be read back once, and the log must read back clean (run by
tests/test_log_waits.py with --run-slow, or alone)::

    .venv/bin/python tests/log_mutex_hold.py

Before the fix (stop 24), with the compiled round thread, reading the log back failed with
LogCorrupt in 3 runs of 4: a waiter that resumed after the next round had begun on the same
job array read that round's state as its own (stuck), and published the newer round's range
a second time, moving the log buffer twice.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import shutil
import tempfile
import time

import aiodbenv


def holder(home: str) -> None:
    async def run() -> None:
        env = await aiodbenv.Env.open(home, log=True)
        c = env.log._c
        for _ in range(3):
            await asyncio.sleep(0.3)
            c.mutex.__enter__()
            time.sleep(1.3)
            c.mutex.__exit__(None, None, None)
        await env.close()

    asyncio.run(run())


def key(data: bytes) -> bytes:
    return data[: data.index(b"-", data.index(b"-") + 1)] if data.startswith(b"r") else data


async def main() -> None:
    home = tempfile.mkdtemp(prefix="aiodbenv-stress-")
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=64 * 1024)
    log = env.log
    await log.put(b"warm", flush=True)
    p = mp.get_context("spawn").Process(target=holder, args=(home,))
    if not os.environ.get("NOHOLD"):
        p.start()
    acked: set[bytes] = set()
    errs: dict[str, int] = {}
    rnd = random.Random(1)

    async def worker(i: int) -> None:
        n = 0
        t_end = time.monotonic() + 6
        while time.monotonic() < t_end:
            rec = f"r{i}-{n}-".encode() + b"x" * rnd.randint(10, 3000)
            n += 1
            try:
                put = log.put(rec, flush=rnd.random() < 0.5)
                if rnd.random() < 0.3:
                    await asyncio.wait_for(put, rnd.uniform(0.001, 0.05))
                else:
                    await put
                acked.add(key(rec))
            except TimeoutError:
                pass
            except Exception as e:
                errs[type(e).__name__] = errs.get(type(e).__name__, 0) + 1

    try:
        await asyncio.gather(*(worker(i) for i in range(8)))
        await log.flush()
        if p.is_alive() or p.exitcode is not None:
            p.join()
        seen: set[bytes] = set()
        dup = 0
        async for _, data in log.cursor():
            k = key(data)
            dup += k in seen
            seen.add(k)
        print("acked", len(acked), "missing", len(acked - seen), "dup", dup, "errors", errs)
        assert not (acked - seen) and not dup and not errs
    finally:
        await env.close()
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
