"""The maintenance commands: ``checkpoint`` (``db_checkpoint``: once, or a worker until
stopped), ``failchk`` (reclaim what dead processes held, and say what) and ``remove``
(``DB_ENV->remove``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from typing import TextIO

from .._env import Env
from .signals import stop_on_signals
from .text import human_size

__all__ = ["checkpoint_command", "failchk_command", "remove_command"]


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


async def checkpoint_command(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    out = _Progress(sys.stdout)
    interval = args.p * 60.0
    async with Env.open(args.h) as env:
        if args.once:
            # As db_checkpoint -1: forced (a record even if nothing was logged since).
            result = await env.checkpoint(force=True)
            at = f", checkpoint LSN {result.lsn}" if result.lsn is not None else ""
            out.update(
                f"checkpoint: {result.written} pages written, {result.files_synced} files "
                f"synced{at}",
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
                    f"{human_size(st.bytes)} written in all",
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


async def failchk_command(args: argparse.Namespace) -> int:
    async with Env.open(args.h) as env:
        # Opening reaps already (as every open does); then look once more. A process that died
        # inside a commit is reaped once its commit is finished from the log: wait for that.
        reaped = env.pool._reaped_at_open + env.pool.reap()
        if env.pool._finishing:
            await asyncio.wait(set(env.pool._finishing))
        reaped += env.pool._finished
        for r in reaped:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.opened))
            pages = ", ".join(f"{name}:{pgno}" for name, pgno in r.pages[:16])
            more = f" and {len(r.pages) - 16} more" if len(r.pages) > 16 else ""
            print(
                f"failchk: process {r.pid} (open since {since}) is dead: dropped {r.pins} "
                f"pin(s) of {len(r.pages)} page(s){f' [{pages}{more}]' if pages else ''}, "
                f"{r.dirty} dirty page(s) kept dirty, {r.reads} read(s) failed for retry, "
                f"{r.claims} write claim(s) released"
            )
        live = [p.pid for p in env.stat().processes if p.pid != os.getpid()]
        print(
            f"failchk: {len(reaped)} dead handle(s) reaped; "
            f"{len(live)} other live handle(s)" + (f" (pids {sorted(live)})" if live else "")
        )
    return 0


async def remove_command(args: argparse.Namespace) -> int:
    await Env.remove(args.h, force=args.f)
    return 0
