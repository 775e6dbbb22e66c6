"""``python -m aiodbenv``: Berkeley DB's utilities in one entry point.

``demo`` shows an environment shared between two processes; ``stat -e`` prints region
statistics (as ``db_stat -e``); ``remove`` removes an environment (as ``DB_ENV->remove``).
Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from ._env import Env
from .errors import AiodbenvError
from .mpool.stat import PoolStat
from .region.environment import EnvStat

__all__ = ["format_env_stat", "format_pool_stat", "main"]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def format_env_stat(st: EnvStat) -> str:
    """``db_stat -e``-style text for an :class:`~aiodbenv.EnvStat`."""
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.created))
    lines = [
        f"Environment home:           {st.home}",
        f"Region kind:                {st.kind}",
        f"Layout version:             {st.version}",
        f"Environment id:             {st.env_id:#018x}",
        f"Created:                    {created} by process {st.creator_pid}",
        f"Open handles:               {st.handles}",
        f"Handles ever opened:        {st.opens}",
        f"Panicked:                   {'yes' if st.panicked else 'no'}",
        f"Cache size:                 {_size(st.cache_size)} in {st.ncache} cache(s)",
        f"Default page size:          {st.page_size}",
        f"Maximum mmap file size:     {_size(st.mmap_size)}",
        f"System memory key:          {st.shm_key if st.shm_key is not None else '-'}",
        f"Region mode:                {st.mode:#05o}",
        f"Flags:                      {', '.join(sorted(st.flags)) or '-'}",
        f"Mutexes:                    {st.mutex_backend}",
        f"Mutex waits:                {st.mutex_waits}",
        f"Mutex no-waits:             {st.mutex_nowaits}",
        f"Mutex holders found dead:   {st.mutex_owner_died}",
        f"Regions:                    {len(st.regions)}",
    ]
    for r in st.regions:
        lines += [
            "=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=",
            f"Region {r.region_id} ({r.type})",
            f"  Size:                     {_size(r.size)} ({r.size} bytes)",
            f"  Backing:                  {r.backing}",
            f"  Allocator arena:          {r.alloc.arena} bytes, {r.alloc.used} used, "
            f"{r.alloc.free} free in {r.alloc.free_chunks} chunk(s)",
            f"  Allocations:              {r.alloc.allocs} ({r.alloc.frees} freed, "
            f"{r.alloc.failures} failed)",
        ]
    return "\n".join(lines)


def format_pool_stat(st: PoolStat) -> str:
    """``db_stat -m``-style text for a :class:`~aiodbenv.PoolStat`: value, then meaning."""
    rows: list[tuple[object, str]] = [
        (_size(st.cache_size), "Total cache size"),
        (st.ncache, "Number of caches"),
        (st.page_size, "Default pagesize"),
        (_size(st.mmap_size), "Maximum memory-mapped file size"),
        (st.cache_hit, "Requested pages found in the cache"),
        (st.cache_miss, "Requested pages not found in the cache"),
        (st.map, "Requested pages mapped into the process' address space"),
        (st.page_create, "Pages created in the cache"),
        (st.page_in, "Pages read into the cache"),
        (st.page_out, "Pages written from the cache to the backing file"),
        (st.write_calls, "Write calls (runs of adjacent pages)"),
        (_size(st.bytes_out), "Bytes written"),
        (st.write_failures, "Failed writes"),
        (st.ro_evict, "Clean pages forced from the cache"),
        (st.rw_evict, "Dirty pages forced from the cache"),
        (st.page_trickle, "Dirty pages written by trickle-sync thread"),
        (st.pages, "Current total page count"),
        (st.page_clean, "Current clean page count"),
        (st.page_dirty, "Current dirty page count"),
        (st.hash_buckets, "Number of hash buckets used for page location"),
        (st.hash_searches, "Total number of times hash chains searched for a page"),
        (st.hash_longest, "The longest hash chain searched for a page"),
        (st.hash_examined, "Total number of hash chain entries checked for page"),
        (st.region_wait, "The number of region locks that required waiting"),
        (st.region_nowait, "The number of region locks granted without waiting"),
        (st.alloc_waits, "Pins that waited for a free frame"),
        (st.sync_calls, "Sync calls"),
    ]
    lines = [f"{str(v):<12}{text}" for v, text in rows]
    for f in st.files:
        lines += [
            "=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=",
            "Pool File: " + (f.file_name or "(temporary)") + (" (nofile)" if f.nofile else ""),
        ]
        for v, text in [
            (f.page_size, "Page size"),
            (f.pages, "Pages known to the pool"),
            (f.open_handles, "Open handles"),
            (f.cache_hit, "Requested pages found in the cache"),
            (f.cache_miss, "Requested pages not found in the cache"),
            (f.map, "Requested pages mapped into the process' address space"),
            (f.page_create, "Pages created in the cache"),
            (f.page_in, "Pages read into the cache"),
            (f.page_out, "Pages written from the cache to the backing file"),
            (f.write_calls, "Write calls"),
            (_size(f.bytes_out), "Bytes written"),
        ]:
            lines.append(f"{str(v):<12}{text}")
    return "\n".join(lines)


def _stat_json(st: EnvStat | PoolStat) -> str:
    data = dataclasses.asdict(st)
    if isinstance(st, EnvStat):
        data["flags"] = sorted(st.flags)
    return json.dumps(data, indent=2)


async def _stat(args: argparse.Namespace) -> int:
    if not (args.e or args.m):
        print("aiodbenv stat: give -e (environment regions) or -m (buffer pool)", file=sys.stderr)
        return 2
    async with Env.open(args.h) as env:
        out = []
        if args.e:
            st = env.stat()
            out.append(_stat_json(st) if args.json else format_env_stat(st))
        if args.m:
            ps = env.pool.stat()
            out.append(_stat_json(ps) if args.json else format_pool_stat(ps))
    print("\n".join(out))
    return 0


async def _remove(args: argparse.Namespace) -> int:
    await Env.remove(args.h, force=args.f)
    return 0


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


async def _demo(args: argparse.Namespace) -> int:
    home = tempfile.mkdtemp(prefix="aiodbenv-demo-")
    kind = args.region
    shm_key = args.shm_key if kind == "system" else None
    try:
        print(f"1. Creating a {kind}-backed environment with a 1 MiB cache in {home}")
        async with Env.open(home, create=True, region=kind, shm_key=shm_key,
                            cache_size=1 << 20) as env:
            files = sorted(n for n in os.listdir(home) if n.startswith("__db."))
            print(f"   region files in the home: {', '.join(files)}")
            async with env.pool.open_file("demo.db", create=True) as f:
                for pgno in range(8):
                    async with f.get(pgno, create=True) as page:
                        text = f"page {pgno}, from process {os.getpid()}".encode()
                        page.data[: len(text)] = text
                        page.mark_dirty()
                print(f"2. Wrote 8 pages into the shared cache ({env.pool.stat().page_dirty} "
                      "dirty, none on disk yet)")
                print("3. A second process joins, reads page 1 from the cache, changes page 2:")
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", _DEMO_CHILD, home, stdout=asyncio.subprocess.PIPE,
                )
                out, _ = await child.communicate()
                for line in out.decode().splitlines():
                    print("   | " + line)
                if child.returncode:
                    print("   the second process failed", file=sys.stderr)
                    return 1
                async with f.get(2) as page:
                    print("4. Page 2 seen from the first process:",
                          bytes(page.data[:23]).decode().rstrip())
                result = await env.pool.sync()
                print(f"5. sync wrote {result.written} pages and fsynced {result.files_synced} "
                      "file")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler = {"demo": _demo, "stat": _stat, "remove": _remove}[args.command]
    try:
        return asyncio.run(handler(args))
    except AiodbenvError as err:
        print(f"aiodbenv {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aiodbenv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="create an environment, join it from a second process, "
                       "print its statistics, remove it")
    d.add_argument("--region", choices=("file", "system"), default="file",
                   help="where the regions live (default: file)")
    d.add_argument("--shm-key", type=int, default=0x41D8E0,
                   help="base System V key for --region system")
    for name, text in (("stat", "print statistics (db_stat)"),
                       ("remove", "remove an environment (DB_ENV->remove)")):
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("--help", action="help", help="show this help and exit")
        sp.add_argument("-h", metavar="HOME", default=None,
                        help="environment home (default: $DB_HOME, then the current directory)")
        if name == "stat":
            sp.add_argument("-e", action="store_true", help="environment region statistics")
            sp.add_argument("-m", action="store_true", help="buffer pool statistics")
            sp.add_argument("--json", action="store_true", help="print JSON instead of text")
        else:
            sp.add_argument("-f", action="store_true",
                            help="force: panic open handles and remove anyway")
    return p

