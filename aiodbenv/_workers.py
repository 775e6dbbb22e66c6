"""Background workers that keep the pool's pages clean: trickle and checkpoint.

Both run as tasks owned by the :class:`~aiodbenv.Env` that started them (DESIGN decision 7),
not by the caller's task, so an environment opened in one task and closed in another stops its
workers cleanly. Both write through the pool's write-back (sorted, coalesced ``pwritev`` runs in
worker threads, the loop free between batches).

- **Trickle** keeps at least ``percent`` of the cached pages clean. It wakes every ``interval``
  seconds, and sooner when this process has dirtied enough pages to cross its threshold; it
  never polls in a loop.
- **Checkpoint** writes every dirty page and fsyncs the files written, every ``interval``
  seconds or after ``kbytes`` were dirtied (whichever comes first), spreading the writes over
  ``completion_target`` of the interval instead of one burst (as PostgreSQL's
  ``checkpoint_completion_target``), and records the time of the last complete checkpoint in
  the region.

Across processes, one worker of each kind acts at a time: each holds a lease in the pool's
region (its pid and a deadline it renews); a lease whose holder died or lapsed is taken over.
A failed write is never swallowed: the pages stay dirty, the failure is counted in the pool's
statistics and logged, the worker backs off and retries, and :meth:`aiodbenv.Env.health`
reports it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._worker_state import (
    SharedWorkerStatus,
    last_checkpoint,
    lease_live,
    record_attempt,
    shared_status,
)
from .errors import AiodbenvError, ForkedProcessError, InvalidArgument, LockTimeout
from .mpool.layout import HANDLE_STATS, POOL_HEADER
from .mpool.trickle import checkpoint, trickle_result

if TYPE_CHECKING:
    from .mpool.pool import Pool
    from .mpool.sync import SyncResult

__all__ = [
    "CheckpointSettings",
    "CheckpointWorker",
    "Health",
    "SharedWorkerStatus",
    "TrickleSettings",
    "TrickleWorker",
    "WorkerStatus",
    "last_checkpoint",
    "run_checkpoint",
    "shared_status",
]

logger = logging.getLogger("aiodbenv")

#: Longest back-off after repeated failures, in seconds.
MAX_BACKOFF = 30.0
#: How many times a checkpoint retries pages it found pinned before calling itself incomplete.

#: ``progress(done, total)``: pages written so far by a checkpoint, and how many it will write.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class TrickleSettings:
    """A trickle worker: keep ``percent`` (1..100) of the cached pages clean, looking every
    ``interval`` seconds and whenever ``wake_pages`` pages were dirtied in this process."""

    percent: int = 20
    interval: float = 1.0
    wake_pages: int = 64

    def check(self) -> TrickleSettings:
        """Validate; returns self."""
        if type(self.percent) is not int or not 1 <= self.percent <= 100:
            raise InvalidArgument(f"trickle percent must be 1..100, not {self.percent!r}")
        if not self.interval > 0:
            raise InvalidArgument(f"trickle interval must be positive, not {self.interval!r}")
        if type(self.wake_pages) is not int or self.wake_pages < 1:
            raise InvalidArgument(f"wake_pages must be a positive int, not {self.wake_pages!r}")
        return self


@dataclass(frozen=True)
class CheckpointSettings:
    """A checkpoint worker: checkpoint every ``interval`` seconds, or once ``kbytes`` KiB of
    pages were dirtied (None: time only), spreading the writes over ``completion_target``
    (0..1) of the interval; 0 writes them as fast as possible."""

    interval: float = 60.0
    kbytes: int | None = None
    completion_target: float = 0.9

    def check(self) -> CheckpointSettings:
        """Validate; returns self."""
        if not self.interval > 0:
            raise InvalidArgument(f"checkpoint interval must be positive, not {self.interval!r}")
        if self.kbytes is not None and (type(self.kbytes) is not int or self.kbytes < 1):
            raise InvalidArgument(f"kbytes must be a positive int, not {self.kbytes!r}")
        if not 0 <= self.completion_target <= 1:
            raise InvalidArgument(
                f"completion_target must be within 0..1, not {self.completion_target!r}"
            )
        return self


@dataclass(frozen=True)
class WorkerStatus:
    """How a background worker is doing (part of :meth:`aiodbenv.Env.health`).

    ``runs`` counts the times it wrote (trickle) or completed a checkpoint; ``pages``,
    ``write_calls`` and ``bytes`` what this worker wrote; ``failures`` the failed runs,
    ``consecutive_failures`` those since the last success, ``last_error`` the latest one's
    message, ``last_success`` the wall-clock time of the latest success, ``backoff`` the seconds
    it is waiting before the next try, and ``active`` whether it holds the lease (only one
    worker of a kind acts at a time, across processes).
    """

    kind: str
    running: bool
    active: bool
    runs: int
    pages: int
    write_calls: int
    bytes: int
    failures: int
    consecutive_failures: int
    last_error: str | None
    last_success: float | None
    backoff: float

    @property
    def healthy(self) -> bool:
        """True unless its latest attempt failed (or it stopped on an error)."""
        return self.consecutive_failures == 0


@dataclass(frozen=True)
class Health:
    """What :meth:`aiodbenv.Env.health` reports: ``ok`` unless the environment is panicked or
    a worker's latest attempt failed, in this process or any other; ``last_checkpoint`` is the
    wall-clock time of the last complete checkpoint (by any process), None if there was none;
    ``workers`` has one :class:`WorkerStatus` per background worker of this handle, and
    ``shared`` one :class:`SharedWorkerStatus` per kind (trickle, checkpoint) for the whole
    environment (empty once the handle is closed or the environment panicked);
    ``panic_cause`` says who panicked the environment, when and why, if it is panicked
    (``"by process PID at TIME: REASON"``, as every process's RunRecovery says it)."""

    ok: bool
    panicked: bool
    last_checkpoint: float | None
    workers: tuple[WorkerStatus, ...]
    shared: tuple[SharedWorkerStatus, ...] = ()
    panic_cause: str | None = None


class _Worker(abc.ABC):
    kind = "worker"

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._task: asyncio.Task[None] | None = None
        self._runs = self._pages = self._calls = self._bytes = 0
        self._failures = self._in_row = 0
        self._last_error: str | None = None
        self._last_success: float | None = None
        self._backoff = 0.0
        self._active = False
        self._pid = os.getpid()
        # The lease holder: this process and this worker (two handles of one process each
        # have their own workers, and only one of them may act).
        self._owner = (self._pid << 32) | (secrets.randbits(32) or 1)

    # -- lifecycle

    def start(self) -> None:
        """Start the worker's task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(
            self._main(), name=f"aiodbenv-{self.kind}"
        )

    @property
    def running(self) -> bool:
        """True while the worker's task runs."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop the worker: cancel its task and wait for it. A write batch under way finishes
        (its bookkeeping is shielded); pages not written yet stay dirty. Idempotent."""
        self._check_process()
        task = self._task
        if task is None:
            return
        task.cancel()
        # Not `await task` under suppress(CancelledError): that also swallowed a cancellation
        # of the caller itself while it waited.
        await asyncio.wait({task})
        if not task.cancelled() and (err := task.exception()) is not None:
            raise err
        await self._release_lease()

    def status(self) -> WorkerStatus:
        """This worker's :class:`WorkerStatus`."""
        return WorkerStatus(
            kind=self.kind,
            running=self.running,
            active=self._active,
            runs=self._runs,
            pages=self._pages,
            write_calls=self._calls,
            bytes=self._bytes,
            failures=self._failures,
            consecutive_failures=self._in_row,
            last_error=self._last_error,
            last_success=self._last_success,
            backoff=self._backoff,
        )

    async def _main(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug, not an I/O failure: report it, don't die silently
            self._failures += 1
            self._in_row += 1
            self._last_error = f"worker stopped: {err!r}"
            logger.exception("aiodbenv %s worker stopped", self.kind)
            with contextlib.suppress(Exception):
                record_attempt(self._pool, self.kind, self._last_error)

    @abc.abstractmethod
    async def _loop(self) -> None:
        """The worker's body: runs until cancelled."""

    # -- shared helpers

    def _failed(self, err: BaseException) -> float:
        """Count a failed run; returns how long to back off before the next try."""
        self._failures += 1
        self._in_row += 1
        self._last_error = f"{type(err).__name__}: {err}"
        self._backoff = min(MAX_BACKOFF, 0.1 * 2 ** min(self._in_row, 12))
        core = self._pool._core
        core.meta_words[self._pool._hs + getattr(HANDLE_STATS.word, f"{self.kind}_failures")] += 1
        record_attempt(self._pool, self.kind, self._last_error)
        logger.error(
            "aiodbenv %s failed (attempt %d, retrying in %.1f s): %s",
            self.kind,
            self._in_row,
            self._backoff,
            err,
        )
        return self._backoff

    def _succeeded(self, result: SyncResult) -> None:
        self._in_row = 0
        self._backoff = 0.0
        self._last_error = None
        self._last_success = time.time()
        self._runs += 1
        self._pages += result.written
        self._calls += result.write_calls
        self._bytes += result.bytes_written
        w0 = self._pool._core.meta_words
        hs = self._pool._hs
        w0[hs + getattr(HANDLE_STATS.word, f"{self.kind}_runs")] += 1
        w0[hs + getattr(HANDLE_STATS.word, f"{self.kind}_pages")] += result.written
        w0[hs + getattr(HANDLE_STATS.word, f"{self.kind}_write_calls")] += result.write_calls
        w0[hs + getattr(HANDLE_STATS.word, f"{self.kind}_bytes")] += result.bytes_written
        record_attempt(self._pool, self.kind, None)

    def _check_process(self) -> None:
        # A forked child inherits the worker (and its lease id): releasing or renewing the
        # lease from there would act for the parent.
        if os.getpid() != self._pid:
            raise ForkedProcessError(
                f"this {self.kind} worker belongs to process {self._pid}; start one in this process"
            )

    async def _take_lease(self, seconds: float) -> bool:
        """Hold (or renew) this kind's lease for ``seconds``; False if a live process has it,
        or if the pool mutex stayed held by another process (a stopped one?) for the pool's
        ``wait_timeout``: the lease is then not ours for this round, and the next round tries
        again. The mutex is waited for with an async back-off, never blocking the loop.
        Cancellation: between attempts; nothing is held."""
        self._check_process()
        try:
            self._active = await self._pool._locked(self._lease_step, seconds)
        except LockTimeout as err:
            self._active = False
            logger.warning("aiodbenv %s worker could not renew its lease: %s", self.kind, err)
        return self._active

    def _lease_step(self, seconds: float) -> bool:
        # Under the pool mutex, taken first: a LockTimeout changes nothing and is retried.
        core = self._pool._core
        w0 = core.meta_words
        owner_w = core.pool_hdr + getattr(POOL_HEADER.word, f"{self.kind}_owner")
        until_w = core.pool_hdr + getattr(POOL_HEADER.word, f"{self.kind}_until")
        with core.mutex:
            now = time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process
            owner = int(w0[owner_w])
            if owner != self._owner and lease_live(owner, int(w0[until_w]), now):
                return False
            w0[owner_w] = self._owner
            w0[until_w] = now + int(seconds * 1e9)
        return True

    async def _release_lease(self) -> None:
        """Give the lease back if this worker holds it (bounded, without blocking the loop;
        a lease that cannot be given back lapses at its deadline)."""
        self._check_process()
        pool = self._pool
        self._active = False
        if pool._closed or pool._env_core.panicked:
            return
        try:
            await pool._locked(self._release_step, check=False)
        except LockTimeout as err:
            logger.warning("aiodbenv %s worker left its lease to lapse: %s", self.kind, err)

    def _release_step(self) -> None:
        core = self._pool._core
        owner_w = core.pool_hdr + getattr(POOL_HEADER.word, f"{self.kind}_owner")
        with core.mutex:  # first: a LockTimeout changes nothing
            if core.meta_words[owner_w] == self._owner:
                core.meta_words[owner_w] = 0


class TrickleWorker(_Worker):
    """Keeps at least ``settings.percent`` of the cached pages clean. Start it with
    :meth:`aiodbenv.Env.start_trickle` (or ``Env.open(trickle=...)``)."""

    kind = "trickle"

    def __init__(self, pool: Pool, settings: TrickleSettings) -> None:
        super().__init__(pool)
        self.settings = settings.check()

    async def _loop(self) -> None:
        s = self.settings
        pool = self._pool
        wake = pool._listen_dirty(s.wake_pages)
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), s.interval)
            wake.clear()
            if not await self._take_lease(3 * s.interval + 1):
                continue
            if 1.0 - pool.dirty_share() >= s.percent / 100:
                continue
            try:
                result = await trickle_result(pool, s.percent)
            except (OSError, AiodbenvError) as err:
                await asyncio.sleep(self._failed(err))
                continue
            self._succeeded(result)


class CheckpointWorker(_Worker):
    """Checkpoints the pool periodically. Start it with :meth:`aiodbenv.Env.start_checkpoint`
    (or ``Env.open(checkpoint=...)``), or run ``python -m aiodbenv checkpoint`` as a separate
    process."""

    kind = "checkpoint"

    def __init__(
        self, pool: Pool, settings: CheckpointSettings, progress: ProgressCallback | None = None
    ) -> None:
        super().__init__(pool)
        self.settings = settings.check()
        self._progress = progress

    def _dirtied(self) -> int:
        return self._pool._core.global_stats()["dirtied_bytes"]

    async def _loop(self) -> None:
        s = self.settings
        pool = self._pool
        wake = pool._listen_dirty(max(1, (s.kbytes or 1 << 30) * 1024 // pool.page_size))
        # Other processes' dirtying is only seen by looking: a tenth of the interval, at most
        # a second, and only when a kbytes trigger was asked for.
        poll = min(s.interval / 10, 1.0) if s.kbytes else s.interval
        started = time.monotonic()
        mark = self._dirtied()
        while True:
            due = started + s.interval
            while time.monotonic() < due:
                if s.kbytes and self._dirtied() - mark >= s.kbytes * 1024:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(poll, max(0.0, due - time.monotonic())))
                wake.clear()
            started = time.monotonic()
            if not await self._take_lease(2 * s.interval + 60):
                continue
            mark = self._dirtied()
            try:
                result = await run_checkpoint(
                    pool, spread=s.interval * s.completion_target, progress=self._progress
                )
            except (OSError, AiodbenvError) as err:
                await asyncio.sleep(self._failed(err))
                started = time.monotonic() - s.interval  # retry as soon as the back-off ends
                continue
            self._succeeded(result)


async def run_checkpoint(
    pool: Pool,
    *,
    spread: float = 0.0,
    progress: ProgressCallback | None = None,
    force: bool = False,
) -> SyncResult:
    """One checkpoint: write every page that is dirty now and fsync every file with page
    writes no fsync has covered yet (by any process), spreading the batches over ``spread``
    seconds (0: as fast as possible). Pages found pinned are retried a few times, pages
    another process is writing are waited for up to the pool's ``wait_timeout``; if some stay
    so, :class:`~aiodbenv.errors.Incomplete` is raised and nothing is recorded. A failed fsync
    panics the environment (:class:`~aiodbenv.errors.RunRecovery`); nothing is recorded. A
    complete checkpoint's time goes into the region (see :meth:`aiodbenv.Env.health`).

    With a log (Berkeley DB's ``txn_checkpoint`` order): the checkpoint LSN is the end of the
    log when the checkpoint starts; the pages are written (each batch flushing the log first,
    the write-ahead rule), then a checkpoint record carrying that LSN is appended and flushed,
    and the LSN is recorded in the pool header (``last_checkpoint_lsn``) beside the time. The
    result's ``lsn`` is the checkpoint LSN. Without ``force``, when nothing was logged since
    the last checkpoint record, no record is appended (Berkeley DB's ``txn_checkpoint``
    without ``DB_FORCE`` skips such a checkpoint): the pages are still written (a file
    without ``lsn_offset`` changes without log records), and the result's ``lsn`` is the last
    checkpoint's.

    Idempotent, and safe to cancel at any await: written pages are clean, the rest stay dirty;
    cancelled before its record is appended, a checkpoint leaves no record and records nothing.
    ``progress(done, total)`` is called after each batch when given.
    """
    hooks = pool._io.log
    pool._enter()
    try:
        ckp = await hooks.end() if hooks is not None else None
        quiet = hooks.quiet() if hooks is not None and not force else None
        result = await checkpoint(pool, spread, progress)
        if hooks is not None and ckp is not None:
            if quiet is not None and hooks.quiet() == quiet:
                ckp = quiet  # nothing logged since the last checkpoint, before or during
            else:
                await hooks.checkpoint(*ckp)
            result.lsn = hooks.lsn(*ckp)
    finally:
        pool._leave()
    core = pool._core
    if ckp is not None:
        core.meta_words[core.pool_hdr + POOL_HEADER.word.last_checkpoint_lsn] = (
            ckp[0] << 32 | ckp[1]
        )
    core.meta_words[core.pool_hdr + POOL_HEADER.word.last_checkpoint_ns] = time.time_ns()
    record_attempt(pool, "checkpoint", None)  # any complete checkpoint ends a run of failures
    return result
