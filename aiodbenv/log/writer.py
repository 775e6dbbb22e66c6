"""The log's writer: one process at a time writes the log files and fsyncs them.

In the process that holds the writer role (its pid, start time and a per-handle token are in
the log region), the writing is a task of the :class:`~aiodbenv.Log`, never a caller's, so a
cancelled caller cannot leave the role held. Each round locks the log mutex only to snapshot
what to write and to publish what was written; the ``pwritev`` and ``fdatasync`` run in a
worker thread without it, so appends go on meanwhile, and every flush that arrived during a
round is served by the next (group commit). Callers of this process wait on a future the task
resolves; another process's callers are served by their own process's task, which sleeps on a
futex the writer wakes (:mod:`aiodbenv.log.wake`) and takes the role over when it is free or
its holder died. A failed write or fsync panics the environment.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .. import _io, _tasks
from .._attrs import Seconds
from ..errors import ForkedProcessError, InvalidArgument, LockTimeout, RunRecovery
from ..region import panic
from ..region.backing import Region
from ..region.mutex import BUSY, STEP_WAIT, Busy, _wait_bound, backoff_locked
from .accel import behind_job, fast_put
from .core import NEED, LogCore
from .files import create_log_file, log_path
from .layout import LOG_HEADER, header_offset
from .lsn import LSN, unpack_word
from .orphan import WriterThread, closed_error, release_later
from .record import FILE_HEADER_BYTES, HEADER, REC_PAD, encode
from .rounddata import Demand, Direct
from .threadrounds import CRound, Round, ThreadRounds
from .wake import Futex, futex_available
from .wakesock import make_socket, sock_wait, wake_waiters, wakesock_available

__all__ = ["Direct", "DurableListener", "LogWriter"]

logger = logging.getLogger("aiodbenv")

T = TypeVar("T")

#: ``fn(start, end, data)``: the bytes of the log from ``start`` up to ``end`` became durable.
DurableListener = Callable[[LSN, LSN, bytes], object]

_POLL_MIN, _POLL_MAX = 0.0001, 0.002
#: Longest one futex wait (seconds): the wait is re-checked (and a stall noticed) this often.
_FUTEX_WAIT = 0.005


#: Every log handle of this process, so that a forked child can turn their compiled puts off.
_live_writers: weakref.WeakSet[LogWriter] = weakref.WeakSet()


def _disarm_in_child() -> None:
    # A forked child's puts take the Python path (ForkedProcessError), not the parent's handle.
    for lw in list(_live_writers):
        lw._fast = None
        lw._bjob = None


os.register_at_fork(after_in_child=_disarm_in_child)


class LogWriter(ThreadRounds):
    """The writer task of a :class:`~aiodbenv.Log` and the state it shares with it."""

    #: Seconds a caller waits for a stopped or stuck writer of another process (LockTimeout).
    wait_timeout = Seconds()

    def __init__(self, core: Any, region: Region, *, shared: bool) -> None:
        """Internal: the environment makes its log when it opens."""
        self._env = core
        self._c = LogCore(region, shared, core.panic)
        # Reservations of this handle's transactions are counted in its registry slot.
        self._c.rsv_slot = core.registry.slot if core.registry is not None else 0
        # The compiled append (None: every put runs the Python one, which checks the handle is
        # open and of this process; close and a fork turn it off) and write behind (None: the
        # writer's Python thread does them).
        self._fast = fast_put(self._c)
        self._bjob = behind_job(self._c, self._fast)
        self._evfd = -1
        _live_writers.add(self)
        self._pid = os.getpid()
        self.wait_timeout = 30.0
        self._panic_w, self._panic_i = core.panic_word()
        self._max_payload = self._c.file_size - FILE_HEADER_BYTES - HEADER.size
        self._tail_i = self._c.h + LOG_HEADER.word.tail
        # In memory there is nothing to write: never "half full".
        self._half = 1 << 62 if self._c.inmemory else self._c.bsize // 2
        self._listeners: list[DurableListener] = []
        self._task: asyncio.Task[None] | None = None
        #: A write behind under way, started by a put (finished by the task or a later put).
        self._inflight: Round | CRound | None = None
        self._progress: asyncio.Future[None] | None = None
        self._want = Demand()
        self._fds: dict[int, int] = {}
        # The writer task's blocking calls (pwrite, fdatasync, futex waits) go to one thread of
        # its own: the task makes one at a time, and a dedicated thread is a cheaper hop than
        # anyio's shared pool (measured ~230 against ~340 us on a loaded 2-core machine), which
        # is paid once per round and once per wake-up of another process's waiter.
        self._thread = WriterThread()
        self._closed = False
        self._closing = False  # stop serving other processes' flushes
        self._barred = False  # closing: no new writer task may start (it would outlive it)
        # Other processes' flush waiters sleep on a futex the writer wakes (else they poll).
        self._futex: Futex | None = None
        if shared and futex_available():
            off = header_offset() + LOG_HEADER.offset("flush_seq")
            self._futex = Futex(region.base, off)
        # ... or on a datagram socket their loop reads (aiodbenv.log.wakesock), by default.
        self._wsock = make_socket(shared)  # sends in every mode; waits if _sock_wait
        self._sock_wait = self._wsock is not None and wakesock_available()
        if self._bjob is not None:
            self._bjob.set_socket(self._wsock.fileno() if self._wsock is not None else -1)

    def _durable(self, start: int, end: int, data: bytes) -> None:
        for fn in list(self._listeners):
            try:
                fn(unpack_word(start), unpack_word(end), data)
            except Exception:
                logger.exception("a durable-log listener failed")

    # -- checks ---------------------------------------------------------------------------------

    def _check(self) -> None:
        if os.getpid() != self._pid:
            raise ForkedProcessError(
                f"this log belongs to process {self._pid}; open the environment again in "
                f"process {os.getpid()}"
            )
        if self._closed:
            raise InvalidArgument("the environment is closed")
        if self._env.panicked or self._c.word("failed_errno"):
            self._raise_panic()

    def _raise_panic(self) -> None:
        code = self._c.word("failed_errno")
        if not code:
            self._env.check_panic()
            return
        name = log_path(self._c.directory, self._c.word("failed_file"))
        failed = f"a write or fsync of log file {name} failed with errno {code} "
        failed += f"({errno.errorcode.get(code, '?')})"
        if not self._env.panicked:
            # A writer's thread recorded it, and its process died (or has not looked yet)
            # before panicking: no other process may write on and call the log durable, since
            # the failed range may be lost (Linux may have dropped it).
            self._panic(f"{failed} in the log writer's process")
        raise RunRecovery(
            f"PANIC: environment {self._env.home} is panicked: {failed}; records written to it "
            f"may be lost{panic.note(self._env.panic_cause())}; {RunRecovery.ADVICE}"
        )

    # -- bounded lock waits ---------------------------------------------------------------------

    @staticmethod
    def _attempt(fn: Callable[..., T], *args: Any) -> T | Busy:
        token = _wait_bound.set(STEP_WAIT)
        try:
            return fn(*args)
        except LockTimeout:
            return BUSY
        finally:
            _wait_bound.reset(token)

    async def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` under the log mutex with bounded waits: each attempt waits a few
        milliseconds, then backs off on the loop, up to ``wait_timeout``; then LockTimeout
        naming the holder. Cancellation: between attempts; nothing is held."""
        r = self._attempt(fn, *args)
        if not isinstance(r, Busy):
            return r
        return await backoff_locked(fn, args, self.wait_timeout, name="log")

    async def _end_word(self) -> int:
        """The end of the log (the next LSN, packed), read under the log mutex: it is the sum
        of two region words that a write round changes together under it, so an unlocked read
        can pair an old one with a new one and see an end too small or too large."""
        return await self._locked(self._c.end_word_locked)

    def _wake_others(self) -> None:
        """Wake other processes' flush waiters (by socket, and the futex's)."""
        job = self._bjob
        if job is not None:
            job.wake(True)  # the futex too
            return
        if self._futex is not None:
            self._futex.wake()
        if self._wsock is not None:
            wake_waiters(self._c.w, self._c.h, self._wsock.sock, True)

    def _fail_waiters(self, err: BaseException) -> None:
        """No writer will serve what is asked: every waiter gets ``err``, the demand goes."""
        for item in self._want.direct:
            if not item.done.done():
                item.done.set_exception(err)
                item.done.exception()
        self._want = Demand()
        self._wake(err)

    def _kick(self) -> None:
        if self._task is None and self._barred:
            # The close waited for the last writer: a new one would outlive the region.
            self._fail_waiters(InvalidArgument("the environment is closed"))
            return
        if self._task is None:
            # Never cancelled: it must not let the writer role go while its thread writes.
            self._task = _tasks.start(self._writer())

    async def _wait_progress(self) -> None:
        """Wait until the writer task reports progress (or fails)."""
        if self._progress is None:
            self._progress = asyncio.get_running_loop().create_future()
        fut = self._progress
        self._kick()
        await asyncio.shield(fut)

    def _wake(self, err: BaseException | None = None) -> None:
        fut, self._progress = self._progress, None
        if fut is not None and not fut.done():
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)
                fut.exception()  # retrieved: waiters that left must not warn

    def _has_demand(self) -> bool:
        c, want = self._c, self._want
        return bool(
            want.direct
            or want.switch
            or want.space
            or want.sync >= c.word("s_lsn")
            or want.write >= c.word("w_lsn")
        )

    async def _writer(self) -> None:
        c = self._c
        delay = _POLL_MIN
        seen: tuple[int, ...] | None = None
        since = time.monotonic()
        try:
            while True:
                seq = c.word("flush_seq")  # before looking: a bump after it ends the wait
                if self._inflight is not None:
                    # A write behind holds this handle's role: let it end first.
                    await self._settle_behind()
                    self._want.space = False  # it made room: appends retry
                    self._wake()
                    continue
                if not self._has_demand():
                    break
                self._check()
                holder = c.role_holder()
                took = False
                if not holder[0] or not c.holder_alive(*holder):
                    dead = holder if holder[0] else None
                    r = self._attempt(c.take_role, dead)
                    took = r is True
                    # Said once the role was taken from it: the unlocked read of the holder
                    # can pair one writer's pid with the next one's start time.
                    if took and dead is not None:
                        logger.warning(
                            "log writer process %d died; process %d takes over", holder[0], c.pid
                        )
                if took:
                    try:
                        await self._serve()
                    finally:
                        await self._locked(c.release_role)
                        self._wake_others()
                        self._wake()
                    delay, seen, since = _POLL_MIN, None, time.monotonic()
                    continue
                # Another process writes: its round may serve us; wait for it, bounded.
                state = (c.word("w_lsn"), c.word("s_lsn"), c.word("f_lsn"), *holder)
                if state != seen:
                    if seen is not None:
                        self._want.space = False
                        self._want.switch = 0
                        self._wake()
                    seen, since = state, time.monotonic()
                elif time.monotonic() - since > self.wait_timeout:
                    err = LockTimeout(
                        f"the log writer, process {holder[0]}, made no progress for "
                        f"{self.wait_timeout:g} s (is it stopped or stuck?)"
                    )
                    err.pid, err.mutex = holder[0], "log writer"
                    raise err
                if self._sock_wait and holder[0]:
                    await sock_wait(c, self._want, self._wsock, seq, _FUTEX_WAIT)
                elif self._futex is not None and holder[0]:
                    await self._in_thread(self._futex.wait, seq, _FUTEX_WAIT)
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _POLL_MAX)
        except BaseException as err:
            self._task = None
            self._fail_waiters(closed_error(err) if self._closed else err)
            if self._closed and self._c.kept:  # the role may be left: no later round takes it
                release_later(self)
            if not isinstance(err, Exception):
                raise
            return
        self._task = None
        self._wake()

    async def _serve(self) -> None:
        """Holding the writer role: do what this process's callers wait for."""
        c, want = self._c, self._want
        while True:
            self._check()
            if c.word("file_ready") < c.word("f_lsn") >> 32:
                await self._finish_switch()
            hole = c.hole()
            if hole is not None:
                await self._fill_hole(*hole)
            if want.direct:
                item = want.direct.pop(0)
                item.started = True
                try:
                    word = await self._write_direct(item)
                except BaseException as err:
                    if not item.done.done():
                        item.done.set_exception(err)
                        item.done.exception()
                    raise
                if not item.done.done():
                    item.done.set_result(word)
                continue
            if want.switch:
                need, want.switch = want.switch, 0
                await self._switch(need)
                self._wake()
                continue
            s_lsn = c.word("s_lsn")
            # Flush calls of other processes waiting (counted in the region) are served too,
            # while this process holds the role: handing it over would cost them a poll
            # interval each time, and back-to-back fsyncs are what group commit is.
            sync = want.sync >= s_lsn or (
                not self._closing and c.word("pending_commits") > 0 and c.end_word() > s_lsn
            )
            write = want.write >= c.word("w_lsn") or (not self._closing and c.write_wanted())
            if not (sync or want.space or write):
                return
            fill, want.space = want.space, False
            if not fill and await self._handed_round(sync):
                return  # the round's thread let the role go
            await self._round(sync, fill)
            self._wake()

    async def _fd(self, file: int) -> int:
        fd = self._fds.get(file)
        if fd is None:
            path = log_path(self._c.directory, file)
            fd = await self._io(lambda: _io.open_file(path, os.O_RDWR | os.O_CLOEXEC), file)
            self._fds[file] = fd
            for old in [f for f in self._fds if f < file - 1]:
                os.close(self._fds.pop(old))
        return fd

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the writer's thread. Cancellation: the call finishes there."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _io(self, fn: Callable[[], T], file: int) -> T:
        """Run file I/O in a worker thread; a failure panics the environment."""
        try:
            return await self._in_thread(fn)
        except OSError as err:
            self._failed(file, err)
            raise AssertionError("unreachable") from err

    def _failed(self, file: int, err: OSError) -> None:
        c = self._c
        c.fail(file, err.errno or errno.EIO)
        reason = f"write or fsync of log file {log_path(c.directory, file)} failed: {err}"
        self._panic(reason)
        raise RunRecovery(
            f"PANIC: {reason}; records written to it may be lost; {RunRecovery.ADVICE}"
        ) from err

    async def _round(self, sync: bool, fill: bool) -> None:
        """Write the buffer out (and fsync if ``sync``): one write round."""
        r = self._attempt(self._round_start, sync, fill)
        while isinstance(r, Busy) or r is None:
            # The mutex stayed held, or the file is not open yet: the slower way.
            await self._fd(self._c.word("f_lsn") >> 32)
            r = await self._locked(self._round_start, sync, fill)
        assert isinstance(r, Round)  # not a write behind: never the compiled thread's
        await self._round_finish(r)

    async def _round_finish(self, r: Round) -> None:
        """The second half of a round: wait for its I/O, publish what was written."""
        try:
            data = await asyncio.shield(r.done)
        except OSError as err:
            self._failed(r.file, err)
            raise AssertionError("unreachable") from err
        r.finished = True
        c = self._c
        await self._locked(c.end_write, r.file, r.start, r.end, r.sync, r.commits)
        self._wake_others()
        if r.listeners and data:
            df = r.durable_from
            self._durable((r.file << 32) | df, (r.file << 32) | (df + len(data)), data)

    async def _switch(self, need: int) -> None:
        """Start the next log file so a record of ``need`` bytes fits (writer only)."""
        c = self._c
        while not await self._locked(c.switch_buffer, need):
            await self._round(False, False)
        if c.word("file_ready") < c.word("f_lsn") >> 32:
            await self._finish_switch()

    async def _finish_switch(self) -> None:
        """The buffer moved to a new file: fsync the old one, create the new (writer only)."""
        c = self._c
        new = c.word("f_lsn") >> 32
        old = new - 1
        old_end = c.word("prev_file_end")
        s_lsn = c.word("s_lsn")
        need_sync = s_lsn < ((old << 32) | old_end)
        old_fd = await self._fd(old) if need_sync else -1
        listeners = bool(self._listeners) and need_sync
        durable_from = max(s_lsn, old << 32) & 0xFFFFFFFF
        directory, size, mode = c.directory, c.file_size, c.mode

        def work() -> tuple[int, bytes]:
            data = b""
            if need_sync:
                _io.fdatasync(old_fd)
                if listeners and old_end > durable_from:
                    data = _io.pread(old_fd, old_end - durable_from, durable_from)
            return create_log_file(directory, new, size, mode, None), data

        fd, data = await self._io(work, old if need_sync else new)
        self._fds[new] = fd
        await self._locked(c.file_switched, new, need_sync)
        self._wake_others()
        if data:
            self._durable((old << 32) | durable_from, (old << 32) | old_end, data)

    async def _write_direct(self, item: Direct) -> int:
        """Write a record larger than the buffer straight to its file (writer only)."""
        c = self._c
        total = HEADER.size + len(item.payload)
        while True:
            r = await self._locked(c.reserve_direct, item.rtype, len(item.payload), item.pcrc)
            if r is NEED.SWITCH:
                await self._switch(total)
            elif r is NEED.SPACE:
                await self._round(False, True)
            else:
                assert not isinstance(r, NEED)
                break
        word, header = r
        file, off = word >> 32, word & 0xFFFFFFFF
        fd = await self._fd(file)
        payload = item.payload

        def work() -> None:
            n = _io.pwritev(fd, [header, payload], off)
            if n != total:
                raise OSError(errno.EIO, f"short write to the log ({n} of {total} bytes)")

        await self._io(work, file)  # a failed write panics
        try:
            await self._locked(c.direct_written, word, total)
        except LockTimeout as err:  # written, not published: no caller may hear "not appended"
            self._panic(f"a log record written to its file could not be published ({err!r})")
            raise RunRecovery(f"PANIC: {err}; {RunRecovery.ADVICE}") from err
        self._wake_others()
        return word

    async def _fill_hole(self, word: int, n: int) -> None:
        """A writer died writing a record straight to the file: fill its place with a padding
        record (cursors skip it) so the log stays a chain of valid records."""
        c = self._c
        file, off = word >> 32, word & 0xFFFFFFFF
        rec = encode(file, off, c.word("hole_prev"), REC_PAD, bytes(n - HEADER.size))
        fd = await self._fd(file)

        def work() -> None:
            if _io.pwritev(fd, [rec], off) != len(rec):
                raise OSError(errno.EIO, "short write to the log")

        logger.warning(
            "log: %d bytes at %s left unwritten by a dead writer padded", n, LSN(file, off)
        )
        await self._io(work, file)
        await self._locked(c.direct_written, word, n)
        self._wake_others()
