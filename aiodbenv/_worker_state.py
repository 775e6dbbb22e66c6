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
from .mpool.layout import POOL_HEADER, WORKER_ERROR_WORDS
from .region.layout import WORD

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
    """The region's record of how the worker of ``kind`` fares, in whichever process."""
    core = pool._core
    w0 = core.meta_words
    p = core.pool_hdr
    with core.mutex:  # the record is written as a whole under this mutex: read it whole
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
    """Record an attempt of ``kind`` in the region: a success (``error`` None) or a failure."""
    core = pool._core
    if pool._closed or pool._env_core.panicked:
        return
    w0 = core.meta_words
    p = core.pool_hdr
    now = time.time_ns()
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
        w0[p + getattr(POOL_HEADER.word, f"{kind}_failed_pid")] = os.getpid()
        w0[p + getattr(POOL_HEADER.word, f"{kind}_failure_ns")] = now


def lease_live(owner: int, until: int, now: int) -> bool:
    """A worker lease word ``owner`` (pid in the high half) expiring at ``until`` (ns of
    CLOCK_MONOTONIC) is held at ``now``: set, not expired, and its process still alive."""
    return bool(owner) and now < until and is_alive(owner >> 32)
