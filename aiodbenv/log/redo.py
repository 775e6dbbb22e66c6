"""Where recovery's replay starts, which is also what ``log.archive()`` must keep: the
``ckp_lsn`` of the checkpoint *before* the last one.

A commit made while a checkpoint runs chooses its full page images by the checkpoint record
before it, so a page it changes may be written (and torn by a power loss) after the new
checkpoint with its last whole image before that checkpoint's ``ckp_lsn``; one checkpoint
further back, the image is always there (docs/durable.md). With fewer than two checkpoints,
replay starts at the first record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidArgument, LogCorrupt
from .lsn import LSN
from .record import CheckpointRecord

if TYPE_CHECKING:
    from .log import Log

__all__ = ["redo_start"]


async def redo_start(log: Log) -> tuple[LSN | None, LSN | None]:
    """``(start, missing)``: the LSN replay starts at (None: the first record of the log), and
    the previous checkpoint record's LSN if it should be in the log but is not (archived by
    hand, or by an older aiodbenv): replay then starts at the last checkpoint's ``ckp_lsn``.
    Cancellation: nothing is changed."""
    ckp = log.last_checkpoint
    if ckp is None:
        return None, None
    rec, last_ckp_lsn = ckp
    async with log.cursor() as cur:
        try:
            got = await cur.set(rec)
        except (InvalidArgument, LogCorrupt):
            got = None
        if got is None or not isinstance(got[1], CheckpointRecord):
            return last_ckp_lsn, None
        prev = got[1].last_ckp
        if prev == LSN(0, 0):
            return None, None
        try:
            got = await cur.set(prev)
        except (InvalidArgument, LogCorrupt):
            got = None
        if got is None or not isinstance(got[1], CheckpointRecord):
            return last_ckp_lsn, prev
        return got[1].ckp_lsn, None
