"""The short way of a flush (or write-through) call of a file log with the compiled round
thread: :func:`start` registers the call and, when no process holds the writer role, takes
it and starts the round in one compiled call (``aiodb_log_direct``,
aiodbenv/_csrc/65_logflush.c); when another process holds it, :func:`wait_other` waits on the
handle's wake-up socket (:mod:`aiodbenv.log.wakesock`) for that process's round, in the
caller's task.

The long way (:class:`~aiodbenv.log.log.Log`'s ``_flush_word`` and ``_write_through``:
``register_commit`` or ``register_write``, ``take_role``, ``begin_write`` and
``BehindJob.start``, each a critical section of its own, then the writer task) stays the twin:
it runs under the ABI binding, with the I/O seam's faults or crash points, with durable-log
listeners, for a handle's first round (which starts the round thread), and whenever the
short way declines. The writer task is what notices a dead or stopped writer, starts a new
file and takes the role over: the short wait gives up to it at the first sign of any of that.

Measured (2-vCPU VM, one process, ``put(flush=True)`` per record): the loop thread's CPU per
record went from 67-73 us to 43-49 us with :func:`start`; with 4 processes committing
``sync``, each commit that waited for another process's round went through the writer task:
a task made per commit and four turns of the loop, where :func:`wait_other` takes two.
"""

from __future__ import annotations

import errno
from typing import Any

from ..region.mutex import speedups, unlock
from .accel import OWNER_DEAD
from .rounddata import CRound
from .threadrounds import MORE_ROUNDS, seam_untouched
from .wakesock import sock_wait

__all__ = ["NOT_DONE", "REGISTERED", "STARTED", "start", "wait_other"]

#: What :func:`start` did: nothing (go the long way); registered the call only (another
#: process writes: :func:`wait_other`); registered it and started a round of its own (the
#: writer's ``_inflight``: await ``_settle_behind``).
NOT_DONE, REGISTERED, STARTED = 0, 1, 2

_DIRECT = getattr(speedups, "aiodb_log_direct", None)

#: How long one wait for another process's round lasts before the state is looked at again
#: (seconds); a wait that ends without progress gives up to the writer task.
_WAIT = 0.005


def start(w: Any, sync: bool, word: int) -> int:
    """Register a flush (``sync``) or write-through call of the log writer ``w``
    (:class:`~aiodbenv.log.writer.LogWriter`) for the record at ``word``, and start a round
    for it if no process is writing: one compiled call, no suspension. Returns
    :data:`NOT_DONE` (nothing done), :data:`REGISTERED` or :data:`STARTED`."""
    job = w._bjob
    if (
        job is None
        or _DIRECT is None
        or not job.thread
        or w._task is not None
        or w._inflight is not None
        or w._closing
        or w._listeners
        or not seam_untouched()
    ):
        return NOT_DONE
    c = w._c
    file = c.word("f_lsn") >> 32
    fd = w._fds.get(file)
    evfd = w._job_fd() if fd is not None else -1
    if evfd < 0:
        return NOT_DONE
    rc = _DIRECT(job.fast.args, job.j, sync, word, file, fd, evfd, MORE_ROUNDS)
    if rc == 1:
        file, begin, end, _, commits = job.current()
        w._inflight = CRound(job, file, begin, end, commits, sync)
        return STARTED
    if rc == 0:
        return REGISTERED
    if rc == OWNER_DEAD:  # left held for us: repair (or panic) as any locker would
        c.mutex.acquire_contended(errno.EOWNERDEAD)
        if c._ptr is not None:
            unlock(c._ptr)
    return NOT_DONE


async def wait_other(w: Any, sync: bool, word: int, seq: int) -> None:
    """After :func:`start` said :data:`REGISTERED`: wait on ``w``'s wake-up socket until the
    record at ``word`` is durable (``sync``) or written, as long as another live process
    holds the writer role and each wait sees progress. ``seq`` is the ``flush_seq`` read
    before the call was registered. Returns when the record is there, or when the long way
    must take over (no socket, the writer task running, the role let go, no progress within a
    wait): the caller then checks and goes on the long way. Cancellation: the registration of
    the wait is cleared; the call's registration stays, as the long way's does."""
    c, ws = w._c, w._wsock
    if ws is None or not w._sock_wait:
        return
    mark = "s_lsn" if sync else "w_lsn"
    want = w._want
    want.need(sync, word)
    while c.word(mark) <= word and w._task is None:
        holder = c.role_holder()
        if not holder[0] or not c.holder_alive(*holder):
            return
        await sock_wait(c, want, ws, seq, _WAIT)
        now = c.word("flush_seq")
        if now == seq:
            return  # no round published within the wait: the writer task looks into it
        seq = now
        w._check()
