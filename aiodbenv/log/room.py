"""Room in a file log's buffer for a commit record, waited for *before* the commit flags its
pages as committing.

A commit flags its latches committing (:data:`aiodbenv.txn.latch.LATCH_COMMITTING`) before
its record is appended: a process that dies between the append and the copy of its images
into the buffers must not have its latches simply released. A process found dead with such a
flag may have a record in the log that is not in the buffers, so the reaper panics the
environment. When the append itself had to wait for the writer (the buffer full, or a new
log file to start), that window lasted as long as a write to the disk, and a worker killed at
a random moment was found inside it often: 15-45% of kills of a process committing
continuously panicked the environment with the default 32000-byte buffer. The commit now
waits here first, while its latches are still plain, and its append then finds room at once
(unless other processes filled the buffer in between).

The words are read without the log mutex: a torn read only makes the answer a hint, and the
append decides under the mutex (it waits then, as before).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .layout import LOG_HEADER
from .record import HEADER

if TYPE_CHECKING:
    from .log import Log

__all__ = ["has_room", "wait_room"]

_W = LOG_HEADER.word
_U32 = 0xFFFFFFFF


def has_room(log: Log, payload: int) -> bool:
    """True if a record of ``payload`` bytes would be appended at once (a hint); also for an
    in-memory log (its commit space is reserved) and for a record larger than the buffer
    (written directly by the writer: nothing to wait for here)."""
    c = log._c
    total = HEADER.size + payload
    if c.inmemory or total > c.bsize:
        return True
    w, h = c.w, c.h
    fill = int(w[h + _W.tail]) & _U32
    off = (int(w[h + _W.f_lsn]) & _U32) + fill
    return fill + total <= c.bsize and off + total <= int(w[h + _W.cur_file_size])


async def wait_room(log: Log, payload: int) -> None:
    """Wait until :func:`has_room` (the writer writes the buffer out, or starts the next log
    file), as an append that found no room does. Raises what that wait raises (LockTimeout if
    the writer makes no progress for ``wait_timeout``, RunRecovery); nothing is appended.
    Cancellation: only the wait is abandoned."""
    total = HEADER.size + payload
    while not has_room(log, payload):
        c = log._c
        if (int(c.w[c.h + _W.tail]) & _U32) + total > c.bsize:
            log._want.space = True
        else:
            log._want.switch = max(log._want.switch, total)
        await log._wait_progress()
        log._check()
