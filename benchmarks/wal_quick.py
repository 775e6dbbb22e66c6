"""The write-ahead rule's cost in one ``pool.sync()``: 1,000 dirty 4 KiB pages whose LSNs are
those of 1,000 buffered (never flushed) 100-byte log records, in ascending or descending page
order, and the same pages in a file opened without ``lsn_offset`` (no log flush). Prints the
log fdatasyncs the sync made and its time; a few seconds, one repetition each, so compare rows
of one run only (the machine is shared and noisy):

    .venv/bin/python benchmarks/wal_quick.py [PAGES]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time

import aiodbenv
from aiodbenv import _io


async def one(pages: int, lsn_offset: int, descending: bool) -> tuple[int, float]:
    home = tempfile.mkdtemp(prefix="aiodbenv-walq-")
    real = _io.fdatasync
    log_syncs = 0

    def counted(fd: int) -> None:
        nonlocal log_syncs
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("log."):
            log_syncs += 1
        real(fd)

    _io.fdatasync = counted
    try:
        env = await aiodbenv.Env.open(
            home, create=True, log=True, cache_size=16 << 20, log_buffer_size=1 << 20
        )
        try:
            async with env.pool.open_file("data", create=True, lsn_offset=lsn_offset) as f:
                lsns = [await env.log.put(bytes(100)) for _ in range(pages)]
                if descending:
                    lsns.reverse()
                for p, lsn in enumerate(lsns):
                    async with f.get(p, create=True) as page:
                        page.data[0:8] = lsn.pack()
                        page.mark_dirty()
                log_syncs = 0
                t0 = time.perf_counter()
                await env.pool.sync()
                took = time.perf_counter() - t0
                synced = log_syncs  # before close, whose own flush is not the sync's
        finally:
            await env.close()
            await aiodbenv.Env.remove(home)
        return synced, took
    finally:
        _io.fdatasync = real
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    pages = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    for offset, desc, what in (
        (0, False, "lsn_offset=0, page LSNs ascending"),
        (0, True, "lsn_offset=0, page LSNs descending"),
        (-1, False, "no lsn_offset (no log flush)"),
    ):
        n, took = await one(pages, offset, desc)
        print(f"{pages} pages, {what}: {n} log fdatasync(s), sync {took * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
