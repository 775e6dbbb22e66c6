"""The seam between the log and the buffer pool: the write-ahead rule's hooks.

The pool never imports the log package; the environment, which owns both, gives the pool's
buffer I/O a :class:`~aiodbenv.mpool.bh.LogHooks` made here from its :class:`Log`. LSNs cross
the seam as ``(file, offset)`` pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .log import LSN, Log
from .log.lsn import unpack_word
from .mpool.bh import LogHooks
from .txn.reapply import finish_dead_commits

if TYPE_CHECKING:
    from .mpool.handle import PoolBase

__all__ = ["log_hooks"]


def log_hooks(log: Log, pool: PoolBase) -> LogHooks:
    """The hooks through which write-back, checkpoints and the reaper of ``pool`` use
    ``log``."""

    async def flush(file: int, offset: int) -> None:
        await log.flush(LSN(file, offset))

    async def end() -> tuple[int, int]:
        # Exact, under the log mutex: the unlocked end_lsn can pair an old word with a new one
        # while another process appends, and a checkpoint LSN past the true end (or inside a
        # record) must never be recorded.
        return unpack_word(await log._end_word())

    async def checkpoint(file: int, offset: int) -> tuple[int, int]:
        return await log.checkpoint_record(LSN(file, offset))

    async def finish(slot: int, buffers: list[Any]) -> tuple[int, int]:
        return await finish_dead_commits(pool, log, slot, buffers)

    return LogHooks(
        flush=flush,
        end=end,
        checkpoint=checkpoint,
        lsn=LSN,
        quiet=log.quiet_checkpoint,
        drop=log._c.drop_slot,
        finish=finish,
    )
