"""``python -m aiodbenv`` (also the ``aiodbenv`` command): Berkeley DB's utilities in one
entry point.

``demo`` shows an environment shared between two processes; ``stat -e``/``-m`` prints region
or pool statistics (``db_stat``); ``checkpoint`` keeps an environment checkpointed
(``db_checkpoint``), exiting cleanly on SIGTERM or SIGINT; ``watch`` shows live statistics;
``metrics`` prints the statistics as Prometheus metrics; ``remove`` removes an environment
(``DB_ENV->remove``). Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from ._env import Env, RegionKind
from ._workers import Health
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


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


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
        (st.page_pinned, "Current pinned page count (all processes)"),
        (_age(st.oldest_pin_age), "Age of the oldest pin now held"),
        (st.hash_buckets, "Number of hash buckets used for page location"),
        (st.hash_searches, "Total number of times hash chains searched for a page"),
        (st.hash_longest, "The longest hash chain searched for a page"),
        (st.hash_examined, "Total number of hash chain entries checked for page"),
        (st.region_wait, "The number of region locks that required waiting"),
        (st.region_nowait, "The number of region locks granted without waiting"),
        (st.alloc_waits, "Pins that waited for a free frame"),
        (st.sync_calls, "Sync calls"),
        (_size(st.dirtied_bytes), "Bytes of pages unpinned dirty"),
        (st.trickle_runs, "Trickle worker runs"),
        (st.trickle_pages, "Pages written by the trickle worker"),
        (st.trickle_write_calls, "Write calls by the trickle worker"),
        (_size(st.trickle_bytes), "Bytes written by the trickle worker"),
        (st.trickle_failures, "Trickle worker failures"),
        (st.checkpoint_runs, "Checkpoints completed by a checkpoint worker"),
        (st.checkpoint_pages, "Pages written by checkpoint workers"),
        (st.checkpoint_write_calls, "Write calls by checkpoint workers"),
        (_size(st.checkpoint_bytes), "Bytes written by checkpoint workers"),
        (st.checkpoint_failures, "Checkpoint worker failures"),
    ]
    lines = [f"{v!s:<12}{text}" for v, text in rows]
    for f in st.files:
        lines += [
            "=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=",
            "Pool File: " + (f.file_name or "(temporary)") + (" (nofile)" if f.nofile else ""),
        ]
        for v, text in [
            (f.page_size, "Page size"),
            (f.pages, "Pages known to the pool"),
            (f.open_handles, "Open handles"),
            (f.pinned, "Pages pinned now (all processes)"),
            (_age(f.oldest_pin_age), "Age of the oldest pin now held"),
            (f.cache_hit, "Requested pages found in the cache"),
            (f.cache_miss, "Requested pages not found in the cache"),
            (f.map, "Requested pages mapped into the process' address space"),
            (f.page_create, "Pages created in the cache"),
            (f.page_in, "Pages read into the cache"),
            (f.page_out, "Pages written from the cache to the backing file"),
            (f.write_calls, "Write calls"),
            (_size(f.bytes_out), "Bytes written"),
        ]:
            lines.append(f"{v!s:<12}{text}")
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


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


class _Progress:
    """One line, rewritten in place on a terminal; plain lines otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = 0.0

    def update(self, text: str, *, final: bool = False) -> None:
        if self._tty:
            self._stream.write("\r\x1b[K" + text + ("\n" if final else ""))
            self._stream.flush()
        elif final or time.monotonic() - self._last > 5:
            self._last = time.monotonic()
            self._stream.write(text + "\n")
            self._stream.flush()


async def _checkpoint(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    out = _Progress(sys.stdout)
    interval = args.p * 60.0
    async with Env.open(args.h) as env:
        if args.once:
            result = await env.checkpoint()
            out.update(
                f"checkpoint: {result.written} pages written, {result.files_synced} files synced",
                final=True,
            )
            return 0

        def progress(done: int, total: int) -> None:
            out.update(f"checkpoint: {done}/{total} pages written")

        worker = env.start_checkpoint(
            interval, kbytes=args.k, completion_target=args.completion_target, progress=progress
        )
        out.update(
            f"checkpoint worker for {env.home}: every {interval:g} s"
            + (f" or {args.k} KiB dirtied" if args.k else "")
            + " (SIGTERM or Ctrl-C to stop)",
            final=True,
        )
        seen = 0
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            st = worker.status()
            if st.runs != seen:
                seen = st.runs
                out.update(
                    f"checkpoint {st.runs} complete: {st.pages} pages, "
                    f"{_size(st.bytes)} written in all",
                    final=True,
                )
            if st.consecutive_failures:
                out.update(
                    f"checkpoint failing ({st.consecutive_failures} in a row), "
                    f"retrying in {st.backoff:.1f} s: {st.last_error}",
                    final=True,
                )
        await env.stop_workers()
        out.update("checkpoint worker stopped; taking a final checkpoint", final=True)
        # Leaving the block closes the handle, and close() takes a final checkpoint because a
        # worker ran: what was dirtied since the last round is written, so stopping this
        # process (then removing the environment) never throws changed pages away.
    return 0


async def _watch(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    tty = sys.stdout.isatty()
    async with Env.open(args.h) as env:
        rounds = 0
        while not stop.is_set():
            st, ps = env.stat(), env.pool.stat()
            text = _watch_text(st, ps, env.health())
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            else:
                sys.stdout.write(text + "\n\n")
            sys.stdout.flush()
            rounds += 1
            if args.count and rounds >= args.count:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
    return 0


def _watch_text(st: EnvStat, ps: PoolStat, health: Health) -> str:
    checkpoint = health.last_checkpoint
    searches = ps.cache_hit + ps.cache_miss
    ratio = f"{ps.cache_hit / searches:.1%}" if searches else "-"
    when = time.strftime("%H:%M:%S", time.localtime(checkpoint)) if checkpoint else "never"
    lines = [
        f"aiodbenv {st.home}  ({st.kind}, {st.handles} handles)  {time.strftime('%H:%M:%S')}",
        f"cache {_size(ps.cache_size)}: {ps.pages} pages, {ps.page_dirty} dirty, "
        f"hit ratio {ratio} ({ps.cache_hit} hits, {ps.cache_miss} misses)",
        f"pages in {ps.page_in}, created {ps.page_create}, out {ps.page_out} "
        f"({_size(ps.bytes_out)} in {ps.write_calls} writes), evicted {ps.ro_evict} clean "
        f"+ {ps.rw_evict} dirty",
        f"trickle: {ps.trickle_pages} pages in {ps.trickle_runs} runs, "
        f"{ps.trickle_failures} failures; checkpoints: {ps.checkpoint_runs} "
        f"({ps.checkpoint_pages} pages, {_size(ps.checkpoint_bytes)}), "
        f"{ps.checkpoint_failures} failures, last {when}",
        f"locks: {ps.region_nowait} immediate, {ps.region_wait} waited; "
        f"{ps.page_pinned} pages pinned, oldest pin {_age(ps.oldest_pin_age)}",
    ]
    for w in health.shared:  # trouble in any process, as the region records it
        if w.consecutive_failures:
            lines.append(
                f"{w.kind} FAILING: {w.consecutive_failures} in a row (process "
                f"{w.failed_pid}): {w.last_error}"
            )
    for f in ps.files:
        lines.append(
            f"  {f.file_name or '(temporary)'}: {f.cache_hit} hits, {f.cache_miss} "
            f"misses, {f.page_out} pages out in {f.write_calls} writes, {f.pinned} pinned"
        )
    return "\n".join(lines)


async def _metrics(args: argparse.Namespace) -> int:
    from .metrics import generate

    async with Env.open(args.h) as env:
        text = generate(env)
    sys.stdout.write(text)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler = {
        "demo": _demo,
        "stat": _stat,
        "remove": _remove,
        "checkpoint": _checkpoint,
        "watch": _watch,
        "metrics": _metrics,
    }[args.command]
    try:
        return asyncio.run(handler(args))
    except AiodbenvError as err:
        print(f"aiodbenv {args.command}: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`watch | head`): nothing more to say, and nobody to say it to.
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except OSError as err:  # an error of the system, not of aiodbenv: still one line
        print(f"aiodbenv {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within 0..1, not {text}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {text}")
        return value

    return parse


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="python -m aiodbenv",
        description="Berkeley DB's utilities for aiodbenv environments: statistics, "
        "checkpoints, metrics, removal. Errors are one line on stderr and a non-zero exit "
        "status.",
    )
    p.add_argument("--version", action="version", version=f"aiodbenv {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="create an environment, join it from a second process, "
        "print its statistics, remove it",
    )
    d.add_argument(
        "--region",
        choices=("file", "system"),
        default="file",
        help="where the regions live (default: file)",
    )
    d.add_argument(
        "--shm-key", type=int, default=0x41D8E0, help="base System V key for --region system"
    )
    for name, text in (
        ("stat", "print statistics (db_stat)"),
        ("remove", "remove an environment (DB_ENV->remove)"),
        ("checkpoint", "keep an environment checkpointed (db_checkpoint)"),
        ("watch", "live statistics, refreshed in place"),
        ("metrics", "print the statistics as Prometheus metrics (text exposition format)"),
    ):
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("--help", action="help", help="show this help and exit")
        sp.add_argument(
            "-h",
            metavar="HOME",
            default=None,
            help="environment home (default: $DB_HOME, then the current directory)",
        )
        if name == "stat":
            sp.add_argument("-e", action="store_true", help="environment region statistics")
            sp.add_argument("-m", action="store_true", help="buffer pool statistics")
            sp.add_argument("--json", action="store_true", help="print JSON instead of text")
        elif name == "remove":
            sp.add_argument(
                "-f",
                action="store_true",
                help="force: remove even while handles are open (they are panicked) or the "
                "cache holds dirty pages (they are discarded)",
            )
        elif name == "checkpoint":
            sp.add_argument(
                "-p",
                type=_positive_float,
                default=1.0,
                metavar="MINUTES",
                help="checkpoint at least every MINUTES minutes (default 1)",
            )
            sp.add_argument(
                "-k",
                type=_int_at_least(1),
                default=None,
                metavar="KBYTES",
                help="also checkpoint once KBYTES KiB of pages were dirtied",
            )
            sp.add_argument(
                "-1", dest="once", action="store_true", help="checkpoint once, now, and exit"
            )
            sp.add_argument(
                "--completion-target",
                type=_fraction,
                default=0.9,
                metavar="X",
                help="spread each checkpoint over this share (0..1) of the interval (default 0.9)",
            )
        elif name == "watch":
            sp.add_argument(
                "-i",
                "--interval",
                type=_positive_float,
                default=1.0,
                metavar="SECONDS",
                help="refresh every SECONDS seconds (default 1)",
            )
            sp.add_argument(
                "-c",
                "--count",
                type=_int_at_least(0),
                default=0,
                metavar="N",
                help="stop after N refreshes (default: until Ctrl-C)",
            )
    return p
