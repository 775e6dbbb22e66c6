"""The log writer's own rounds in its worker thread: writes behind, lone flushes, and the
rounds run back to back for other processes' calls, without the event loop.

A put that passes half the buffer, or a flush or write-through with no writer anywhere, takes
the writer role at once and hands a round to the writer's thread, which writes (and fsyncs),
publishes the new end (``end_write``), serves the flush and write-through calls any process
registered meanwhile, and lets the role go. Nothing waits for an event loop to run: a put
that does not suspend never lets a task run, and a caller may keep its loop busy for long,
while other processes wait for the role. :class:`ThreadRounds` is a part of
:class:`~aiodbenv.log.writer.LogWriter`, which provides the attributes it declares.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _io
from ..errors import LockTimeout
from ..region import panic
from ..region.mutex import BUSY, Busy
from .accel import BehindJob
from .core import LogCore
from .files import log_path
from .orphan import WriterThread, keep_running, on_loop, release_later
from .rounddata import _SETTLE_POLL, CRound, Round
from .wakesock import unregister

logger = logging.getLogger("aiodbenv")

__all__ = ["MORE_ROUNDS", "CRound", "Round", "ThreadRounds", "seam_untouched"]

_PWRITEV = _io.pwritev
_FDATASYNC = _io.fdatasync


def seam_untouched() -> bool:
    """No fault, crash point or patched call is set on the I/O seam: a log round may run as
    one compiled call (the seam's plans need the Python steps)."""
    return not (
        _io._faults
        or _io._signal_plan
        or _io.pwritev is not _PWRITEV
        or _io.fdatasync is not _FDATASYNC
    )


#: Rounds a writer's thread runs back to back for other processes' flush calls, at most,
#: before it lets the role go (and the writer task or another process takes it).
MORE_ROUNDS = 64


class ThreadRounds:
    """The writer's thread rounds (a part of :class:`~aiodbenv.log.writer.LogWriter`)."""

    # Provided by LogWriter.
    _c: LogCore
    _env: Any
    _inflight: Round | CRound | None
    _bjob: BehindJob | None
    _evfd: int  # the compiled write behinds' eventfd (-1: not made yet, or none)
    _task: asyncio.Task[None] | None
    _closing: bool
    _closed: bool
    _fds: dict[int, int]
    _listeners: list[Any]
    _thread: WriterThread
    _panic_w: Any
    _panic_i: int
    _want: Any
    _wsock: Any  # the handle's WakeSocket, or None
    wait_timeout: float

    if TYPE_CHECKING:  # supplied by LogWriter: declared for the type checker only

        def _kick(self) -> None:
            """Start the writer task if it is not running."""

        @staticmethod
        def _attempt(fn: Callable[..., Any], *args: Any) -> Any:
            """``fn(*args)`` under a short bounded lock wait, or BUSY."""

        def _check(self) -> None:
            """The fork, closed and panic checks."""

        def _wake_others(self) -> None:
            """Wake other processes' waiters."""

    def _write_behind(self, word: int) -> None:
        """The buffer is half full (a put appended the record at ``word``): have it written
        now, so that appends rarely find it full. Does not suspend. When this process can
        take the writer role at once, the write is a round of its own (:meth:`_behind`): the
        writer's thread writes, publishes and lets the role go, with no need of the event
        loop (a put that does not suspend never lets a task run, and a caller may keep the
        loop busy for long: the role must not stay held meanwhile). Else the writer task, or
        another process's writer, writes it."""
        r = self._inflight
        if r is not None:
            # One write behind at a time. Called by every put past half while one is under
            # way, so only a flag is read until its thread is done.
            if not r.finished and not (r.stuck and self._finish_now(r)):
                return
            self._inflight = None
        if self._task is None and not self._closing:
            c = self._c
            if not c.word("flusher_pid") and self._attempt(c.take_role, None) is True:
                if self._behind():
                    return
                self._attempt(c.release_role)
        self._want.write = max(self._want.write, word)
        self._kick()

    def _behind(self) -> bool:
        """Holding the role with no round under way: start a write behind as
        :attr:`_inflight`; False if it could not start (the role is still held)."""
        r = self._attempt(self._round_start, False, False, True, True)
        self._inflight = r if isinstance(r, (Round, CRound)) else None
        return self._inflight is not None

    async def _direct_round(self, sync: bool) -> None:
        """A flush or write-through call with no writer anywhere: run one round of its own
        (:meth:`_behind`'s kind: the thread writes, fsyncs if ``sync``, publishes and lets
        the role go, waking other processes' waiters at once) and wait for it, instead of
        starting the writer task and handing the role back on the loop. Does nothing if that
        cannot start at once; the caller then goes the usual way. Raises RunRecovery if the
        write or fsync failed. Cancellation: the round finishes in the thread."""
        c = self._c
        if (
            self._task is not None
            or self._inflight is not None
            or self._closing
            or (sync and self._listeners)  # listeners get their bytes on the loop
            or c.word("flusher_pid")
            # The file not open here yet (a handle that joined): the round could not start,
            # and taking the role only to let it go at once would show other processes a
            # writer that is not writing (and wake them for nothing).
            or (c.word("f_lsn") >> 32) not in self._fds
            or self._attempt(c.take_role, None) is not True
        ):
            return
        r = self._attempt(self._round_start, sync, False, True, True)
        if not isinstance(r, (Round, CRound)):
            self._attempt(c.release_role)  # if Busy: this handle takes it back later
            return
        self._inflight = r
        if isinstance(r, CRound):
            # One compiled call in the writer's thread; its eventfd wakes the loop. A
            # failed write or fsync is reported by _finish_now (the environment panics).
            await self._settle_behind()
            self._check()
            return
        try:
            await asyncio.shield(r.done)
        except OSError:
            self._check()  # the thread panicked the environment: RunRecovery
            raise
        finally:
            if self._inflight is r and r.finished:
                self._inflight = None
        if self._inflight is r:
            await self._settle_behind()

    async def _handed_round(self, sync: bool) -> bool:
        """Holding the role: run this round as a write behind (the compiled round when there
        is one), which also serves the flush calls other processes registered meanwhile and
        lets the role go in the writer's thread, as a lone flush does; wait for it. False if
        it could not start (durable-log listeners, the mutex stayed held, the file not open
        here yet): the caller runs a round of its own. Under group commit the role moves
        between processes all the time, and each such round in Python cost its process two
        more hops to a thread and back. Raises RunRecovery if the write or fsync failed."""
        if self._bjob is None or (sync and self._listeners):
            return False
        r = self._attempt(self._round_start, sync, False, True, True)
        if not isinstance(r, (Round, CRound)):
            return False
        self._inflight = r
        await self._settle_behind()
        self._check()
        return True

    def _job_fd(self) -> int:
        """The eventfd the compiled write behind's thread signals when done, read by the event
        loop (:meth:`_job_ready`); made on first use. -1 if the loop cannot watch it (the
        waits then poll)."""
        if self._evfd < 0:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                asyncio.get_running_loop().add_reader(fd, self._job_ready)
            except (NotImplementedError, RuntimeError):
                os.close(fd)
                return -1
            self._evfd = fd
        return self._evfd

    def _job_ready(self) -> None:
        """On the loop: the compiled write behind's thread is done. Wake its waiters, and
        publish it here if the thread could not (a busy mutex, a write failure), so the
        writer role is not left held until the next put or flush."""
        try:
            os.eventfd_read(self._evfd)
        except OSError:
            pass  # read already (EAGAIN), or closed
        r = self._inflight
        if isinstance(r, CRound) and r.io_done():
            if r.stuck and not self._finish_now(r):
                self._publish_later(r)
            for fut in r.waiters:
                if not fut.done():
                    fut.set_result(None)
            r.waiters.clear()

    def _close_job_fd(self, keep: bool) -> None:
        """Stop watching the eventfd; close it unless a thread may still write to it."""
        fd, self._evfd = self._evfd, -1
        if fd < 0:
            return
        try:
            asyncio.get_running_loop().remove_reader(fd)
        except (NotImplementedError, RuntimeError):
            pass
        if not keep:
            os.close(fd)

    def _forget_behind(self) -> None:
        """Closing: stop watching the eventfd, end the round thread, clear this handle's
        wake-up registration and close its socket. A compiled write behind still running (a disk
        slower than ``wait_timeout``) keeps its file, the eventfd and the log region mapped
        until its thread is done (:mod:`aiodbenv.log.orphan`)."""
        r, loop = self._inflight, asyncio.get_running_loop()
        if isinstance(r, CRound) and not r.io_done():
            fds = [self._fds.pop(r.file)] if r.file in self._fds else []
            fds += [self._evfd] if self._evfd >= 0 else []
            # In the executor's thread, its future; in the round thread, one it resolves.
            cf = r.cf if r.cf is not None else r.job.done_future()
            ws, self._wsock = self._wsock, None
            if ws is not None:  # its thread sends wake-ups by it: kept open for it
                ws.stop_reading()
                fds.append(ws.sock.detach())
            keep_running(r, cf, self._c.buf[0:1], fds, self.wait_timeout)
            # Published by its thread, or (the mutex stayed held) on the loop once it ends.
            cf.add_done_callback(lambda _f: on_loop(loop, self._publish_later, r))
            self._close_job_fd(keep=True)
        else:
            self._close_job_fd(keep=False)
        unregister(self._c.w, self._c.h, self._c.rsv_slot, name=True)
        if self._bjob is not None:
            self._bjob.quit()
        ws, self._wsock = self._wsock, None
        if ws is not None:
            ws.close()

    def _finish_now(self, r: Round | CRound) -> bool:
        """A write behind's I/O is done but its thread could not publish it (the mutex stayed
        held): publish it and let the role go, if the mutex is free now. True if done."""
        if r.finished or not r.io_done():
            return r.finished
        if r.finished:  # its thread published it between the two reads
            return True
        c = self._c
        file, start, end, sync, commits = (
            r.job.current()
            if isinstance(r, CRound)
            else (r.file, r.start, r.end, r.sync, r.commits)
        )
        err = r.failure()
        if err:
            # The compiled thread's write or fsync failed: panic here, as the Python thread
            # does (the thread recorded it in the region already).
            self._thread_failed(file, sync, OSError(err, os.strerror(err)))
            r.finished = True
            self._attempt(c.release_role)
            self._wake_others()
            return True
        if isinstance(self._attempt(c.end_write, file, start, end, sync, commits), Busy):
            return False
        r.finished = True
        if self._attempt(c.release_role) is BUSY and self._closed:  # no later round to take
            release_later(self)  # it back: let it go once the mutex is free
        self._wake_others()
        return True

    def _publish_later(self, r: Round | CRound) -> None:
        """On the loop: publish round ``r``, which its thread wrote but could not publish (the
        mutex stayed held), and let the role go, trying again every few milliseconds until it
        is done or the handle closes. Its caller may have been cancelled meanwhile, and nobody
        else would look at it before this process's next log call, with the writer role held
        all that time."""
        closed = self._closed and not self._c.kept  # kept: the late round still publishes
        if closed or self._inflight is not r or r.finished or not r.io_done():
            return
        if self._finish_now(r):
            if self._inflight is r:
                self._inflight = None
            return
        asyncio.get_running_loop().call_later(_SETTLE_POLL, self._publish_later, r)

    async def _settle_behind(self) -> None:
        """Wait for the write behind under way, if any, and see it published."""
        r = self._inflight
        while r is not None:
            await r.wait()  # a failure is recorded by its thread, or by _finish_now
            if not r.finished and not self._finish_now(r):
                await asyncio.sleep(_SETTLE_POLL)
                continue
            if self._inflight is r:
                self._inflight = None
            r = self._inflight

    def _room_now(self) -> bool:
        """A put found the buffer full: True if a write behind has made room since (finishing
        it here if its thread could not), so the append may be tried again at once."""
        r = self._inflight
        if r is None or not (r.finished or self._finish_now(r)):
            return False
        self._inflight = None
        return True

    def _round_start(
        self, sync: bool, fill: bool, behind: bool = False, compiled: bool = False
    ) -> Round | CRound | None:
        """The first half of a round, without suspending (writer only): take what the buffer
        holds and hand its write (and fsync) to the writer's thread. None if the file is not
        open in this process yet (nothing done). Raises LockTimeout (nothing done) if the
        mutex stayed held. ``behind``: a write behind, which the thread also publishes
        (``end_write``) and ends by letting the writer role go. ``compiled``: such a write
        behind (never with ``sync``), run by the compiled thread when there is one
        (:class:`CRound`)."""
        c = self._c
        if c.word("failed_errno"):
            self._check()  # a write or fsync failed: no round may follow it (RunRecovery)
        file = c.word("f_lsn") >> 32
        fd = self._fds.get(file)
        if fd is None:
            return None
        old_s = c.word("s_lsn")
        file, foff, start, end, commits = c.begin_write(fill)
        job = self._bjob
        if compiled and job is not None and not (sync and self._listeners) and seam_untouched():
            # One compiled call in the writer's thread does it all; the seam's faults and
            # crash points (and a patched pwritev or fdatasync) need the Python work below,
            # and so do durable-log listeners (they get the bytes on the loop).
            cr = CRound(job, file, start, end, commits, sync)
            # Further rounds in the thread would make bytes durable that durable-log
            # listeners never get (they get them on the loop): none while there are any.
            more = 0 if self._closing or self._listeners else MORE_ROUNDS
            cr.cf = job.start(
                self._thread, fd, file, foff, start, end, commits, self._job_fd(), sync, more
            )
            return cr
        view = c.buf[c.b0 + start : c.b0 + end]
        listeners = bool(self._listeners) and sync
        durable_from = max(old_s, file << 32) & 0xFFFFFFFF

        def work() -> bytes:
            if len(view):
                n = _io.pwritev(fd, [view], foff)
                if n != len(view):
                    raise OSError(errno.EIO, f"short write to the log ({n} of {len(view)} bytes)")
            if sync:
                _io.fdatasync(fd)
                _io.step("log_fsynced")
            if listeners:
                upto = foff + len(view)
                return (
                    _io.pread(fd, upto - durable_from, durable_from) if upto > durable_from else b""
                )
            return b""

        # Submitted now, not when the writer task next runs: a put that starts a write
        # behind does not suspend, so the task may not run before the buffer is full.
        r = Round(file, start, end, sync, commits, listeners, durable_from)
        if behind:
            r.cf = self._thread.submit(self._behind_work, work, r)
        else:
            r.cf = self._thread.submit(work)
        r.done = asyncio.wrap_future(r.cf)
        if behind:  # published by its thread, unless the mutex stayed held: then here
            r.done.add_done_callback(lambda _: self._publish_later(r))
        return r

    def _behind_work(self, work: Callable[[], bytes], r: Round) -> bytes:
        """A write behind (or a direct round), in the writer's thread: write (and fsync),
        publish, then, for a flush, keep serving the flush calls other processes registered
        meanwhile with further rounds here (group commit without waiting for any event loop),
        and let the role go. The log mutex is waited for (bounded) in this thread; if it
        stays held, publishing is left to the loop (:meth:`_finish_now`) with the role still
        held. A failed write or fsync panics the environment here."""
        c = self._c
        try:
            work()
        except OSError as err:
            try:
                self._thread_failed(r.file, r.sync, err)
            finally:
                r.finished = True
                self._release_quietly()
            raise
        try:
            c.end_write(r.file, r.start, r.end, r.sync, r.commits)
        except LockTimeout:
            r.stuck = True  # written, not published: the loop does it (_finish_now)
            return b""
        r.finished = True
        self._wake_others()
        try:
            for _ in range(MORE_ROUNDS):
                more = self._more_requests()
                if more is None or not self._thread_round(more):
                    break
        except OSError:
            self._release_quietly()
            raise
        self._release_quietly()
        return b""

    def _more_requests(self) -> bool | None:
        """In the writer's thread, holding the role: have flush calls (True: a round with an
        fsync) or write-through calls (False: without) of any process been registered since
        the last round, that another round here can serve (no file to start, no gap)? None:
        no."""
        c = self._c
        file = c.word("f_lsn") >> 32
        if (
            self._closing
            or self._listeners  # they get durable bytes on the loop, never from here
            or self._panic_w[self._panic_i]
            or c.word("file_ready") < file
            or c.hole() is not None
            or file not in self._fds
        ):
            return None
        if c.word("pending_commits") > 0 and c.end_word() > c.word("s_lsn"):
            return True
        return False if c.write_wanted() else None

    def _thread_round(self, sync: bool) -> bool:
        """One more write (and fsync if ``sync``) round in the writer's thread, holding the
        role. False if
        the mutex stayed held (nothing done, or written but not published: the next round
        writes the same bytes to the same place again)."""
        c = self._c
        try:
            file, foff, start, end, commits = c.begin_write(False)
        except LockTimeout:
            return False
        fd = self._fds.get(file)
        if fd is None:
            return False
        view = c.buf[c.b0 + start : c.b0 + end]
        try:
            if len(view):
                n = _io.pwritev(fd, [view], foff)
                if n != len(view):
                    raise OSError(errno.EIO, f"short write to the log ({n} of {len(view)} bytes)")
            if sync:
                _io.fdatasync(fd)
                _io.step("log_fsynced")
        except OSError as err:
            self._thread_failed(file, sync, err)
            raise
        try:
            c.end_write(file, start, end, sync, commits)
        except LockTimeout:
            return False
        self._wake_others()
        return True

    def _thread_failed(self, file: int, sync: bool, err: OSError) -> None:
        c = self._c
        c.fail(file, err.errno or errno.EIO)
        what = "write or fsync" if sync else "write"
        self._panic(f"{what} of log file {log_path(c.directory, file)} failed: {err}")

    def _panic(self, reason: str) -> None:
        """Panic the environment; after the close, through the view kept for late work."""
        if not self._closed:
            self._env.panic(reason)
            return
        logger.error("PANIC: %s (after its log handle closed)", reason)
        if self._c.kept:  # the environment's own views are gone: the one kept with the log's
            panic.record(self._panic_w, os.getpid(), reason)

    def _release_quietly(self) -> None:
        """Let the writer role go, from the writer's thread: the mutex is waited for up to
        ``wait_timeout`` (a holder stopped that long makes every caller fail anyway)."""
        c = self._c
        deadline = time.monotonic() + self.wait_timeout
        while True:
            try:
                c.release_role()
                break
            except LockTimeout:
                if time.monotonic() > deadline:
                    return  # still held by this handle: its next round takes it back
        self._wake_others()
