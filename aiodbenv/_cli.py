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
from .region.environment import EnvStat

__all__ = ["format_env_stat", "main"]


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


def _stat_json(st: EnvStat) -> str:
    data = dataclasses.asdict(st)
    data["flags"] = sorted(st.flags)
    return json.dumps(data, indent=2)


async def _stat(args: argparse.Namespace) -> int:
    if not args.e:
        print("aiodbenv stat: give -e (environment regions)", file=sys.stderr)
        return 2
    async with Env.open(args.h) as env:
        st = env.stat()
    print(_stat_json(st) if args.json else format_env_stat(st))
    return 0


async def _remove(args: argparse.Namespace) -> int:
    await Env.remove(args.h, force=args.f)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    home = tempfile.mkdtemp(prefix="aiodbenv-demo-")
    kind = args.region
    shm_key = args.shm_key if kind == "system" else None
    try:
        print(f"1. Creating a {kind}-backed environment in {home}")
        async with Env.open(home, create=True, region=kind, shm_key=shm_key,
                            cache_size=1 << 20) as env:
            files = sorted(n for n in os.listdir(home) if n.startswith("__db."))
            print(f"   region files in the home: {', '.join(files)}")
            print("2. Joining it from a second process (python -m aiodbenv stat -e -h HOME):")
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aiodbenv", "stat", "-e", "-h", home,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await child.communicate()
            for line in out.decode().splitlines():
                print("   | " + line)
            if child.returncode:
                print("   the second process failed", file=sys.stderr)
                return 1
            st = env.stat()
            print(f"3. Back in the first process: {st.opens} handles were opened in all, "
                  f"{st.handles} is open now, mutex no-waits {st.mutex_nowaits}")
        print("4. Removing the environment")
        await Env.remove(home)
        left = [n for n in os.listdir(home) if n.startswith("__db.")]
        print(f"   region files left: {left or 'none'}")
        return 0
    finally:
        try:
            await Env.remove(home, force=True)
        finally:
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
            sp.add_argument("--json", action="store_true", help="print JSON instead of text")
        else:
            sp.add_argument("-f", action="store_true",
                            help="force: panic open handles and remove anyway")
    return p

