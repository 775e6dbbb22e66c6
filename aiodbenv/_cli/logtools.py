"""The log commands: ``printlog`` (``db_printlog``: every record with its LSN, type and
length, checkpoint records decoded) and ``archive`` (``db_archive``: the log files no longer
needed, and ``--remove`` to delete them)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from .._env import Env
from ..log import LSN, CheckpointRecord

__all__ = ["archive_command", "parse_lsn", "printlog_command", "record_line"]

#: Bytes of a user record shown (in hex) by ``printlog``; ``-v`` shows all of them.
PREVIEW = 32


def parse_lsn(text: str) -> LSN:
    """``FILE/OFFSET`` (as an :class:`~aiodbenv.LSN` prints) as an LSN; for ``-b``/``-e``."""
    try:
        file, offset = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an LSN (FILE/OFFSET): {text!r}") from None
    if not (0 <= file < 1 << 32 and 0 <= offset < 1 << 32):
        raise argparse.ArgumentTypeError(f"LSN out of range: {text}")
    return LSN(file, offset)


def record_line(lsn: LSN, data: bytes, *, full: bool = False) -> str:
    """One record as ``printlog`` shows it: ``[file][offset] type len N`` and its contents."""
    head = f"[{lsn.file}][{lsn.offset}]"
    if isinstance(data, CheckpointRecord):
        when = datetime.datetime.fromtimestamp(data.time, datetime.UTC)
        return (
            f"{head} checkpoint len {len(data)} ckp_lsn [{data.ckp_lsn.file}]"
            f"[{data.ckp_lsn.offset}] last_ckp [{data.last_ckp.file}][{data.last_ckp.offset}]"
            f" time {when.isoformat(timespec='seconds')}"
        )
    shown = data if full else data[:PREVIEW]
    more = "" if len(shown) == len(data) else " ..."
    return f"{head} record len {len(data)} data {shown.hex()}{more}"


async def printlog_command(args: argparse.Namespace) -> int:
    async with Env.open(args.h) as env:
        log = env.log
        async with log.cursor(args.b) as cursor:
            async for lsn, data in cursor:
                if args.e is not None and lsn > args.e:
                    break
                sys.stdout.write(record_line(lsn, data, full=args.v) + "\n")
    return 0


async def archive_command(args: argparse.Namespace) -> int:
    async with Env.open(args.h) as env:
        paths = await env.log.archive(remove=args.remove)
    for path in paths:
        print(path if args.a else os.path.basename(path))
    return 0
