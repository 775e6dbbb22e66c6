"""``demo``: an environment shared between two processes, from creation to removal."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

from .._env import Env, RegionKind
from .text import format_env_stat, format_pool_stat

__all__ = ["demo_command"]

_DEMO_CHILD = """
import asyncio, sys, aiodbenv
async def main(home):
    async with aiodbenv.Env.open(home) as env:
        st = env.stat()
        print(f"joined environment {st.env_id:#x}: {st.handles} handles open, "
              f"{len(st.regions)} regions ({', '.join(r.type for r in st.regions)})")
        async with env.pool.open_file("demo.db") as f:
            async with f.get(1) as page:
                print("page 1 as the first process left it:", bytes(page.data[:32]).rstrip(b"\\0"))
            async with f.get(2) as page:
                page.data[0:23] = b"written by the child   "
                page.mark_dirty()
            s = f.stat()
            print(f"this process: {s.cache_hit} cache hits, {s.page_in} pages read from disk")
asyncio.run(main(sys.argv[1]))
"""


async def demo_command(args: argparse.Namespace) -> int:
    home = tempfile.mkdtemp(prefix="aiodbenv-demo-")
    kind: RegionKind = "system" if args.region == "system" else "file"
    shm_key = args.shm_key if kind == "system" else None
    try:
        print(f"1. Creating a {kind}-backed environment with a 1 MiB cache in {home}")
        async with Env.open(
            home, create=True, region=kind, shm_key=shm_key, cache_size=1 << 20
        ) as env:
            files = sorted(n for n in os.listdir(home) if n.startswith("__db."))
            print(f"   region files in the home: {', '.join(files)}")
            async with env.pool.open_file("demo.db", create=True) as f:
                for pgno in range(8):
                    async with f.get(pgno, create=True) as page:
                        text = f"page {pgno}, from process {os.getpid()}".encode()
                        page.data[: len(text)] = text
                        page.mark_dirty()
                print(
                    f"2. Wrote 8 pages into the shared cache ({env.pool.stat().page_dirty} "
                    "dirty, none on disk yet)"
                )
                print("3. A second process joins, reads page 1 from the cache, changes page 2:")
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _DEMO_CHILD,
                    home,
                    stdout=asyncio.subprocess.PIPE,
                )
                out, _ = await child.communicate()
                for line in out.decode().splitlines():
                    print("   | " + line)
                if child.returncode:
                    print("   the second process failed", file=sys.stderr)
                    return 1
                async with f.get(2) as page:
                    print(
                        "4. Page 2 seen from the first process:",
                        bytes(page.data[:23]).decode().rstrip(),
                    )
                result = await env.pool.sync()
                print(
                    f"5. sync wrote {result.written} pages and fsynced {result.files_synced} file"
                )
            print("6. Buffer pool statistics (python -m aiodbenv stat -m):")
            for line in format_pool_stat(env.pool.stat()).splitlines():
                print("   | " + line)
            print("7. Region statistics (python -m aiodbenv stat -e):")
            for line in format_env_stat(env.stat()).splitlines():
                print("   | " + line)
        print("8. Removing the environment")
        await Env.remove(home)
        left = [n for n in os.listdir(home) if n.startswith("__db.")]
        print(f"   region files left: {left or 'none'}")
        return 0
    finally:
        try:
            await Env.remove(home, force=True)
        finally:
            for name in os.listdir(home):
                if name == "demo.db":
                    os.remove(os.path.join(home, name))
            if not os.listdir(home):
                os.rmdir(home)
