"""The write rounds a log writer hands to a thread: :class:`Round` (the Python work, in the
writer's executor thread) and :class:`CRound` (one compiled call, :mod:`aiodbenv.log.accel`),
as the code that waits for them sees them (:mod:`aiodbenv.log.threadrounds`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field

from .accel import JOB_DONE, JOB_FAILED, JOB_QUEUED, JOB_RUNNING, JOB_STUCK, BehindJob
from .wakesock import resolve

__all__ = ["CRound", "Demand", "Direct", "Round"]

#: How often a round its thread could not publish is tried again by the loop (seconds).
_SETTLE_POLL = 0.002


@dataclass
class Direct:
    """A record larger than the buffer, waiting for the writer to put it in its file."""

    rtype: int
    payload: bytes
    pcrc: int
    done: asyncio.Future[int]
    started: bool = False


@dataclass
class Demand:
    """What a log handle's callers wait for (packed LSN words; -1: nothing)."""

    sync: int = -1  # s_lsn must pass it
    write: int = -1  # w_lsn must pass it
    space: bool = False  # the buffer must be written out
    switch: int = 0  # a record of this many bytes needs the next file
    direct: list[Direct] = field(default_factory=list)

    def need(self, sync: bool, word: int) -> None:
        """A caller waits for the record at ``word`` to be durable (``sync``) or written."""
        if sync:
            self.sync = max(self.sync, word)
        else:
            self.write = max(self.write, word)


@dataclass
class Round:
    """A write round whose I/O was handed to the writer's thread."""

    file: int
    start: int  # buffer bytes [start, end) are being written
    end: int
    sync: bool
    commits: int
    listeners: bool
    durable_from: int
    cf: concurrent.futures.Future[bytes] = field(init=False)  # the thread's
    done: asyncio.Future[bytes] = field(init=False)  # the same, for the loop
    finished: bool = False  # its end_write is done (set by the thread for a write behind)
    stuck: bool = False  # its thread wrote it but could not publish it (the mutex stayed held)

    def io_done(self) -> bool:
        """Its thread is done with it (written, or failed)."""
        return self.cf.done()

    def failure(self) -> int:
        """The errno of a write the loop must report (never: its thread reports it)."""
        return 0

    async def wait(self) -> None:
        """Until its thread is done with it (its failure is recorded there, not raised).
        Cancellation: the thread goes on."""
        try:
            await asyncio.shield(self.done)
        except Exception:
            pass


class CRound:
    """A write behind run by one compiled call in the writer's thread
    (:class:`~aiodbenv.log.accel.BehindJob`): the same attributes as :class:`Round` for the
    code that waits for one."""

    listeners = False
    durable_from = 0

    def __init__(
        self, job: BehindJob, file: int, start: int, end: int, commits: int, sync: bool
    ) -> None:
        self.job = job
        job.current_round = self
        self.file, self.start, self.end, self.commits = file, start, end, commits
        self.sync = sync
        self._finished = False
        self.cf: concurrent.futures.Future[None] | None = None
        #: Futures the loop resolves when the thread says it is done (through the eventfd).
        self.waiters: list[asyncio.Future[None]] = []

    def _superseded(self) -> bool:
        """The job array describes a newer round: this one was finished before that began
        (the state read from the array would be the newer round's, not this one's)."""
        return self.job.current_round is not self

    @property
    def finished(self) -> bool:
        """Published (by the thread, or by the loop after it was stuck or failed). A stale
        reference (a waiter that resumed after the next round began) reads it as finished:
        publishing it again would apply the newer round's range twice."""
        return self._finished or self._superseded() or self.job.state() == JOB_DONE

    @finished.setter
    def finished(self, value: bool) -> None:
        self._finished = value

    @property
    def stuck(self) -> bool:
        """Its thread is done but left the round for the loop to publish (or report)."""
        return (
            not self._finished
            and not self._superseded()
            and self.job.state() in (JOB_STUCK, JOB_FAILED)
        )

    def io_done(self) -> bool:
        """Its thread is done with it."""
        return self._superseded() or self.job.state() not in (JOB_QUEUED, JOB_RUNNING)

    def failure(self) -> int:
        """The errno of its failed write, 0 if it did not fail."""
        if self._superseded():
            return 0
        return self.job.error() if self.job.state() == JOB_FAILED else 0

    async def wait(self) -> None:
        """Until its thread is done with it: woken through the handle's eventfd, re-checked
        every few milliseconds all the same (bounded, if a wake-up were ever lost, or there
        is no eventfd). Cancellation: the thread goes on."""
        loop = asyncio.get_running_loop()
        while not self.io_done():
            fut = loop.create_future()
            self.waiters.append(fut)
            # The future itself is awaited, with a timer that resolves it: asyncio.wait_for
            # would cost a turn of the loop more per wake-up (its callback resolves a second
            # future), on the path of every lone flush.
            timer = loop.call_later(_SETTLE_POLL * 5, resolve, fut)
            try:
                await fut
            finally:
                timer.cancel()
                if fut in self.waiters:
                    self.waiters.remove(fut)
