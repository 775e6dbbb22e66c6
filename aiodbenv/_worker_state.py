"""The background workers' shared record in the pool header, for every process to read.

Which process holds each kind's lease, how the latest attempts of each kind fared (failures in
a row, the pid and message of the latest failure, the times of the latest success and
failure), and the time of the last complete checkpoint: written under the pool mutex by
:mod:`aiodbenv._workers`, read by :meth:`aiodbenv.Env.health` in any process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._process import is_alive
from .errors import LockTimeout
from .mpool.layout import POOL_HEADER, WORKER_ERROR_WORDS
from .region.layout import WORD
from .region.mutex import step_waits

if TYPE_CHECKING:
    from .mpool.pool import Pool

__all__ = ["SharedWorkerStatus", "last_checkpoint", "lease_live", "record_attempt", "shared_status"]


@dataclass(frozen=True)
class SharedWorkerStatus:
    """How the environment's background worker of one kind fares, whichever process runs it
    (read from the region, so every process sees the same; part of
    :meth:`aiodbenv.Env.health`).

    ``holder_pid`` is the process holding the kind's lease now (None if no live process
    does); ``consecutive_failures`` counts the failed attempts since the last success of a
    worker of this kind in any process, ``last_error`` is the latest failure's message (cut to
    about 250 bytes), ``failed_pid`` the process it happened in, ``last_failure`` and
    ``last_success`` wall-clock times (None: never). A failure stays reported until a worker
    of the kind succeeds, even if the failing process has exited: its pages may still be
    unwritten.
    """

    kind: str
    holder_pid: int | None
    consecutive_failures: int
    last_error: str | None
    failed_pid: int | None
    last_failure: float | None
    last_success: float | None

    @property
    def healthy(self) -> bool:
        """True unless the latest attempt of this kind, in any process, failed."""
        return self.consecutive_failures == 0


def last_checkpoint(pool: Pool) -> float | None:
    """Wall-clock time of the last complete checkpoint recorded in the region, or None."""
    core = pool._core
    ns = int(core.meta_words[core.pool_hdr + POOL_HEADER.word.last_checkpoint_ns])
    return ns / 1e9 if ns else None


_ERROR_BYTES = (WORKER_ERROR_WORDS - 1) * WORD


def shared_status(pool: Pool, kind: str) -> SharedWorkerStatus:
    """The region's record of how the worker of ``kind`` fares, in whichever process.

    Read under the pool mutex, which the writers hold, so that it is read whole; if another
    process holds that mutex for more than ``STEP_WAIT`` (a stopped process), it is read
    without it rather than blocking the caller's event loop (a report, never acted upon)."""
    try:
        with step_waits(), pool._core.mutex:
            return _read_status(pool, kind)
    except LockTimeout:
        return _read_status(pool, kind)


def _read_status(pool: Pool, kind: str) -> SharedWorkerStatus:
    core = pool._core
    w0 = core.meta_words
    p = core.pool_hdr
    # The caller holds the pool mutex, or chose to read without it.
    owner = int(w0[p + getattr(POOL_HEADER.word, f"{kind}_owner")])
    until = int(w0[p + getattr(POOL_HEADER.word, f"{kind}_until")])
    in_row = int(w0[p + getattr(POOL_HEADER.word, f"{kind}_in_row")])
    failed_pid = int(w0[p + getattr(POOL_HEADER.word, f"{kind}_failed_pid")])
    success_ns = int(w0[p + getattr(POOL_HEADER.word, f"{kind}_success_ns")])
    failure_ns = int(w0[p + getattr(POOL_HEADER.word, f"{kind}_failure_ns")])
    e = p + getattr(POOL_HEADER.word, f"{kind}_error")
    # A length read from shared memory is checked before it is used.
    length = min(int(w0[e]), _ERROR_BYTES)
    start = (e + 1) * WORD
    raw = bytes(core.meta_region.buf[start : start + length])
    holder = owner >> 32
    alive = lease_live(owner, until, time.monotonic_ns())
    return SharedWorkerStatus(
        kind=kind,
        holder_pid=holder if alive else None,
        consecutive_failures=in_row,
        last_error=raw.decode("utf-8", "replace") if failure_ns else None,
        failed_pid=failed_pid or None,
        last_failure=failure_ns / 1e9 if failure_ns else None,
        last_success=success_ns / 1e9 if success_ns else None,
    )


def record_attempt(pool: Pool, kind: str, error: str | None) -> None:
    """Record an attempt of ``kind`` in the region: a success (``error`` None) or a failure.

    On the event loop: the pool mutex is tried for ``STEP_WAIT``; if another process holds it
    (a stopped one?), the record is written by a task of the pool that retries with an async
    back-off (and logs a LockTimeout after ``wait_timeout``), never blocking the loop."""
    if pool._closed or pool._env_core.panicked:
        return
    pool._settle(_record, pool, kind, error, time.time_ns(), os.getpid())


def _record(pool: Pool, kind: str, error: str | None, now: int, pid: int) -> None:
    # Under the pool mutex, taken first: a LockTimeout changes nothing and is retried.
    core = pool._core
    w0 = core.meta_words
    p = core.pool_hdr
    with core.mutex:
        if error is None:
            w0[p + getattr(POOL_HEADER.word, f"{kind}_in_row")] = 0
            w0[p + getattr(POOL_HEADER.word, f"{kind}_success_ns")] = now
            return
        data = error.encode("utf-8", "replace")[:_ERROR_BYTES]
        e = p + getattr(POOL_HEADER.word, f"{kind}_error")
        start = (e + 1) * WORD
        core.meta_region.buf[start : start + len(data)] = data
        w0[e] = len(data)
        w0[p + getattr(POOL_HEADER.word, f"{kind}_in_row")] += 1
        w0[p + getattr(POOL_HEADER.word, f"{kind}_failed_pid")] = pid
        w0[p + getattr(POOL_HEADER.word, f"{kind}_failure_ns")] = now


def lease_live(owner: int, until: int, now: int) -> bool:
    """A worker lease word ``owner`` (pid in the high half) expiring at ``until`` (ns of
    CLOCK_MONOTONIC) is held at ``now``: set, not expired, and its process still alive."""
    return bool(owner) and now < until and is_alive(owner >> 32)
