"""The statistics commands: ``stat`` (``db_stat -e``/``-m``/``-l``, as text or JSON), ``watch``
(refreshed in place until stopped) and ``metrics`` (Prometheus text exposition)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys

from .._env import Env
from ..log.stat import LogStat
from ..metrics import generate
from ..mpool.stat import PoolStat
from ..region.environment import EnvStat
from .signals import stop_on_signals
from .text import format_env_stat, format_log_stat, format_pool_stat, watch_text

__all__ = ["metrics_command", "stat_command", "watch_command"]


def _stat_json(st: EnvStat | PoolStat | LogStat) -> str:
    data = dataclasses.asdict(st)
    if isinstance(st, EnvStat):
        data["flags"] = sorted(st.flags)
    return json.dumps(data, indent=2)


async def stat_command(args: argparse.Namespace) -> int:
    if not (args.e or args.m or args.l):
        print(
            "aiodbenv stat: give -e (environment regions), -m (buffer pool) or -l (log)",
            file=sys.stderr,
        )
        return 2
    async with Env.open(args.h) as env:
        out = []
        if args.e:
            st = env.stat()
            out.append(_stat_json(st) if args.json else format_env_stat(st))
        if args.m:
            ps = env.pool.stat()
            out.append(_stat_json(ps) if args.json else format_pool_stat(ps))
        if args.l:
            ls = env.log.stat()  # InvalidArgument (one line, status 1) without a log
            out.append(_stat_json(ls) if args.json else format_log_stat(ls))
    print("\n".join(out))
    return 0


async def watch_command(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    tty = sys.stdout.isatty()
    async with Env.open(args.h) as env:
        rounds = 0
        while not stop.is_set():
            st, ps = env.stat(), env.pool.stat()
            text = watch_text(st, ps, env.health())
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


async def metrics_command(args: argparse.Namespace) -> int:
    async with Env.open(args.h) as env:
        text = generate(env)
    sys.stdout.write(text)
    return 0
