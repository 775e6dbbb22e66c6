"""``Log``: appending, flushing with group commit, checkpoint records, archive, statistics.

The async shell over :class:`~aiodbenv.log.core.LogCore`. Appending is a short critical
section on the event loop (a copy into the shared buffer). Everything that touches a log file
is done by one *writer* at a time across all processes (its pid is in the region): in this
process that is a task of the :class:`Log` (never the caller's task, so cancelling a caller
cannot leave the role held), which writes the buffer and fsyncs in a worker thread without the
log mutex held, serving every flush call that arrived meanwhile with the same write and fsync
(group commit). Callers in this process wait on a future the task resolves; a process that
is not the writer polls the region's flushed LSN with a bounded back-off (through its own task),
and takes the role over if the writer died.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread

from .. import _io
from ..errors import InvalidArgument, LockTimeout, RunRecovery
from ..region.backing import Region
from ..region.mutex import BUSY, STEP_WAIT, Busy, _wait_bound
from .core import NEED, LogCore
from .files import create_log_file, list_log_files, log_path
from .layout import LOG_HEADER
from .lsn import LSN, pack_word, unpack_word
from .record import (
    FILE_HEADER_BYTES,
    HEADER,
    REC_CHECKPOINT,
    REC_PAD,
    REC_USER,
    checkpoint_payload,
    encode,
)
from .stat import LogStat, read_stat

__all__ = ["DurableListener", "Log"]

logger = logging.getLogger("aiodbenv")

T = TypeVar("T")

#: ``fn(start, end, data)``: the bytes of the log from ``start`` up to ``end`` became durable.
DurableListener = Callable[[LSN, LSN, bytes], object]

_POLL_MIN = 0.0001
_POLL_MAX = 0.002


@dataclass
class _Direct:
    """A record larger than the buffer, waiting for the writer to put it in its file."""

    rtype: int
    payload: bytes
    pcrc: int
    done: asyncio.Future[int]
    started: bool = False


@dataclass
class _Demand:
    """What this process's callers wait for (packed LSN words; -1: nothing)."""

    sync: int = -1  # s_lsn must pass it
    write: int = -1  # w_lsn must pass it
    space: bool = False  # the buffer must be written out
    switch: int = 0  # a record of this many bytes needs the next file
    direct: list[_Direct] = field(default_factory=list)


class Log:
    """The log of an environment (``env.log``): ``put``, ``flush``, cursors, checkpoint
    records, ``archive`` and ``stat``, shared by every process that has the environment open.

    A file log keeps ``log.0000000001``, ... in the log directory; an in-memory log keeps a
    ring of log "files" in the region and creates no file. Use it from the process (and event
    loop) that opened the environment.
    """

    def __init__(self, core: Any, region: Region, *, shared: bool) -> None:
        """Internal: the environment makes its log when it opens."""
        self._env = core
        self._c = LogCore(region, shared, core.panic)
        self._pid = os.getpid()
        #: Longest a caller waits for a stopped or stuck writer of another process before
        #: LockTimeout (seconds).
        self.wait_timeout = 30.0
        self._panic_w, self._panic_i = core.panic_word()
        self._max_payload = self._c.file_size - FILE_HEADER_BYTES - HEADER.size
        self._tail_i = self._c.h + LOG_HEADER.word.tail
        # In memory there is nothing to write: never "half full".
        self._half = 1 << 62 if self._c.inmemory else self._c.bsize // 2
        self._listeners: list[DurableListener] = []
        self._task: asyncio.Task[None] | None = None
        self._progress: asyncio.Future[None] | None = None
        self._want = _Demand()
        self._fds: dict[int, int] = {}
        self._closed = False
        self._closing = False  # stop serving other processes' flushes

    # -- what it is -------------------------------------------------------------------------

    @property
    def inmemory(self) -> bool:
        """True for an in-memory log (a ring in the region, no files)."""
        return self._c.inmemory

    @property
    def directory(self) -> str:
        """The directory of the log files (the environment home unless ``log_dir``)."""
        return self._c.directory

    @property
    def buffer_size(self) -> int:
        """Bytes of the shared log buffer (the ring, in memory)."""
        return self._c.bsize

    @property
    def file_size(self) -> int:
        """The size of new log files (of the ring's "files", in memory)."""
        return self._c.file_size

    @property
    def end_lsn(self) -> LSN:
        """The LSN the next record will get (read from the region)."""
        return unpack_word(self._c.end_word())

    @property
    def flushed_lsn(self) -> LSN:
        """Everything before this LSN is durable (in memory: marked durable by a flush)."""
        return unpack_word(self._c.word("s_lsn"))

    @property
    def written_lsn(self) -> LSN:
        """Everything before this LSN has been written to the log files (maybe not fsynced)."""
        return unpack_word(self._c.word("w_lsn"))

    @property
    def last_checkpoint(self) -> tuple[LSN, LSN] | None:
        """``(LSN of the last checkpoint record, the ckp_lsn it carries)``, or None if the log
        holds no checkpoint."""
        rec = self._c.word("ckp_rec")
        if not rec:
            return None
        return unpack_word(rec), unpack_word(self._c.word("ckp_lsn"))

    def stat(self) -> LogStat:
        """The log's statistics (``db_stat -l``), exact across processes."""
        self._check()
        return read_stat(self._c)

    def __repr__(self) -> str:
        where = "in memory" if self.inmemory else self.directory
        return f"<aiodbenv.Log {where} end={self.end_lsn}>"

    # -- the replication seam -----------------------------------------------------------------

    def add_durable_listener(self, fn: DurableListener) -> None:
        """Call ``fn(start, end, data)`` for every range of the log that becomes durable
        through this process: ``data`` is the log's bytes from ``start`` up to ``end`` (whole
        records, file header records included; a range never spans files). Each process sees
        the ranges its own writer made durable (in memory: its own flush calls), so a shipper
        runs in the process(es) that flush. ``fn`` runs on the event loop and must not block;
        an exception it raises is logged and ignored."""
        self._listeners.append(fn)

    def remove_durable_listener(self, fn: DurableListener) -> None:
        """Stop calling ``fn``."""
        self._listeners.remove(fn)

    def _durable(self, start: int, end: int, data: bytes) -> None:
        for fn in list(self._listeners):
            try:
                fn(unpack_word(start), unpack_word(end), data)
            except Exception:
                logger.exception("a durable-log listener failed")

    # -- checks ---------------------------------------------------------------------------------

    def _check(self) -> None:
        if os.getpid() != self._pid:
            from ..errors import ForkedProcessError

            raise ForkedProcessError(
                f"this log belongs to process {self._pid}; open the environment again in "
                f"process {os.getpid()}"
            )
        if self._closed:
            raise InvalidArgument("the environment is closed")
        if self._env.panicked:
            self._raise_panic()

    def _raise_panic(self) -> None:
        code = self._c.word("failed_errno")
        if code:
            name = log_path(self._c.directory, self._c.word("failed_file"))
            raise RunRecovery(
                f"PANIC: environment {self._env.home} is panicked: a write or fsync of log file "
                f"{name} failed with errno {code} ({errno.errorcode.get(code, '?')}); records "
                "written to it may be lost. Run recovery (close every handle, remove the "
                "environment and open it again)"
            )
        self._env.check_panic()

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
        deadline = time.monotonic() + self.wait_timeout
        delay = 0.0005
        while True:
            token = _wait_bound.set(STEP_WAIT)
            try:
                return fn(*args)
            except LockTimeout as err:
                last = err
            finally:
                _wait_bound.reset(token)
            now = time.monotonic()
            if now >= deadline:
                who = f"process {last.pid}" if last.pid else "another process"
                final = LockTimeout(
                    f"mutex log is held by {who} and was not released within "
                    f"{self.wait_timeout:g} s (is that process stopped or stuck?)"
                )
                final.pid, final.mutex = last.pid, "log"
                raise final from last
            await asyncio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.005)

    # -- appending ------------------------------------------------------------------------------

    async def put(
        self,
        data: bytes | bytearray | memoryview,
        *,
        flush: bool = False,
        write_nosync: bool = False,
    ) -> LSN:
        """Append a record (``log_put``); returns its LSN.

        When this returns the record is in the shared log buffer (visible to every process's
        cursors). ``flush=True`` (``DB_FLUSH``) also writes and fsyncs the log through it;
        ``write_nosync=True`` (``DB_LOG_WRNOSYNC``) writes it to the file without an fsync
        (it survives a crash of the process, not of the machine). The two exclude each other
        (InvalidArgument). A record larger than a log file is refused (InvalidArgument).
        In memory, raises :class:`~aiodbenv.errors.LogBufferFull` if the ring is full of
        records the last checkpoint needs.

        Cancellation: before the record is appended (waiting for buffer space or a new log
        file), nothing is appended; after, the record stays in the log and only the wait for
        its flush is abandoned (the writer finishes its round in the background). A record
        larger than the buffer that the writer has begun to write is appended all the same.
        """
        if self._closed or self._panic_w[self._panic_i] or os.getpid() != self._pid:
            self._check()
        if flush and write_nosync:
            raise InvalidArgument("flush and write_nosync exclude each other")
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidArgument(f"a log record is bytes, not {type(data).__name__}")
            data = bytes(data)
        # The common case without a coroutine call: room in the buffer, mutex free.
        if len(data) > self._max_payload:
            await self._append(REC_USER, data)  # raises InvalidArgument
        try:
            word: int | NEED = self._c.append(REC_USER, data, zlib.crc32(data))
        except LockTimeout:
            word = NEED.SPACE
        if type(word) is not int:
            word = await self._append(REC_USER, data)
        elif self._task is None and self._c.w[self._tail_i] & 0xFFFFFFFF > self._half:
            # The buffer is half full: have it written in the background now, so that
            # appends rarely find it full and have to wait for a write.
            self._want.write = max(self._want.write, word)
            self._kick()
        if flush:
            if self._c.inmemory and not self._listeners:
                try:
                    self._c.mem_flush()
                except LockTimeout:
                    await self._flush_word(word)
            else:
                await self._flush_word(word)
        elif write_nosync:
            await self._write_through(word)
        return LSN(word >> 32, word & 0xFFFFFFFF)

    async def _append(self, rtype: int, payload: bytes) -> int:
        c = self._c
        total = HEADER.size + len(payload)
        if FILE_HEADER_BYTES + total > c.file_size:
            raise InvalidArgument(
                f"record of {len(payload)} bytes is larger than the maximum log file size "
                f"({c.file_size} bytes, {FILE_HEADER_BYTES + HEADER.size} of them headers)"
            )
        pcrc = zlib.crc32(payload)
        while True:
            try:
                r = c.append(rtype, payload, pcrc)
            except LockTimeout:
                r = await self._locked(c.append, rtype, payload, pcrc)
            if isinstance(r, int):
                return r
            if r is NEED.DIRECT:
                return await self._append_direct(rtype, payload, pcrc)
            if r is NEED.SPACE:
                self._want.space = True
            else:
                self._want.switch = max(self._want.switch, total)
            await self._wait_progress()
            self._check()

    async def _append_direct(self, rtype: int, payload: bytes, pcrc: int) -> int:
        item = _Direct(rtype, payload, pcrc, asyncio.get_running_loop().create_future())
        self._want.direct.append(item)
        self._kick()
        try:
            return await asyncio.shield(item.done)
        except asyncio.CancelledError:
            if not item.started and item in self._want.direct:
                self._want.direct.remove(item)
            raise

    # -- flushing -------------------------------------------------------------------------------

    async def flush(self, lsn: LSN | None = None) -> None:
        """Make the log durable up to and including the record at ``lsn`` (``log_flush``);
        without ``lsn``, everything appended so far.

        Returns at once, without a thread hop, when that is already so (``lsn`` before
        :attr:`flushed_lsn`, or ``LSN(0, 0)``, "not logged"). Otherwise one writer writes the
        buffer and fsyncs, serving every flush that arrived meanwhile, in this process or
        another (group commit). An ``lsn`` past :attr:`end_lsn` is an InvalidArgument.
        A failed write or fsync panics the environment (RunRecovery, in every process).
        Raises LockTimeout if another process's writer makes no progress for
        ``wait_timeout`` seconds (stopped or stuck).

        Cancellation: only the wait is abandoned; a write or fsync under way finishes in the
        background and nothing (waiter, mutex, writer role) is left behind.
        """
        c = self._c
        if lsn is not None:
            word = pack_word(lsn)
            if word < c.word("s_lsn"):
                return
        self._check()
        end = c.end_word()
        if lsn is None:
            word = end - 1
        elif word > end:
            raise InvalidArgument(
                f"LSN {LSN(*lsn)} is past the end of the log ({LSN(*unpack_word(end))})"
            )
        elif word == end:
            word = end - 1
        await self._flush_word(word)

    async def _flush_word(self, word: int) -> None:
        """Make everything up to the record at ``word`` durable."""
        c = self._c
        if word < c.word("s_lsn"):
            return
        if c.inmemory:
            try:
                old, new = c.mem_flush()
            except LockTimeout:
                old, new = await self._locked(c.mem_flush)
            if self._listeners and new > old:
                for start, end, data in self._mem_ranges(old, new):
                    self._durable(start, end, data)
            return
        if self._attempt(c.register_commit) is BUSY:
            await self._locked(c.register_commit)
        self._want.sync = max(self._want.sync, word)
        while c.word("s_lsn") <= word:
            await self._wait_progress()
            self._check()

    async def _write_through(self, word: int) -> None:
        """Make sure the record at ``word`` is written to its file (no fsync)."""
        c = self._c
        if c.inmemory:
            return
        self._want.write = max(self._want.write, word)
        while c.word("w_lsn") <= word:
            await self._wait_progress()
            self._check()

    def _mem_ranges(self, old: int, new: int) -> list[tuple[int, int, bytes]]:
        """In memory: the ring's bytes of [old, new), split per "file"."""
        c = self._c
        out: list[tuple[int, int, bytes]] = []
        first, _ = c.mem_file_range()
        f = max(old >> 32, first)
        while f <= new >> 32:
            start = old if f == old >> 32 else f << 32
            if f == new >> 32:
                stop = new
            else:
                stop = (f << 32) | (c.word("prev_file_end") if f + 1 == new >> 32 else c.file_size)
            base = c._slot_base(f)
            lo, hi = start & 0xFFFFFFFF, stop & 0xFFFFFFFF
            if hi > lo:
                out.append((start, stop, bytes(c.buf[base + lo : base + hi])))
            f += 1
        return out

    # -- the writer task ------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._writer())

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
            while self._has_demand():
                self._check()
                holder = c.role_holder()
                took = False
                if not holder[0] or not c.holder_alive(*holder):
                    dead = holder if holder[0] else None
                    if dead is not None:
                        logger.warning(
                            "log writer process %d died; process %d takes over", holder[0], c.pid
                        )
                    r = self._attempt(c.take_role, dead)
                    took = r is True
                if took:
                    try:
                        await self._serve()
                    finally:
                        await self._locked(c.release_role)
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
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
        except BaseException as err:
            self._task = None
            for item in self._want.direct:
                if not item.done.done():
                    item.done.set_exception(err)
                    item.done.exception()
            self._want = _Demand()
            self._wake(err)
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
            if not (sync or want.space or want.write >= c.word("w_lsn")):
                return
            fill, want.space = want.space, False
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

    async def _io(self, fn: Callable[[], T], file: int) -> T:
        """Run file I/O in a worker thread; a failure panics the environment."""
        try:
            return await anyio.to_thread.run_sync(fn)
        except OSError as err:
            self._failed(file, err)
            raise AssertionError("unreachable") from err

    def _failed(self, file: int, err: OSError) -> None:
        c = self._c
        c.fail(file, err.errno or errno.EIO)
        reason = f"write or fsync of log file {log_path(c.directory, file)} failed: {err}"
        self._env.panic(reason)
        raise RunRecovery(
            f"PANIC: {reason}; records written to it may be lost. Run recovery (close every "
            "handle, remove the environment and open it again)"
        ) from err

    async def _round(self, sync: bool, fill: bool) -> None:
        """Write the buffer out (and fsync if ``sync``): one write round."""
        c = self._c
        old_s = c.word("s_lsn")
        file, foff, start, end, commits = await self._locked(c.begin_write, fill)
        fd = await self._fd(file)
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

        data = await self._io(work, file)
        await self._locked(c.end_write, file, start, end, sync, commits)
        if listeners and data:
            self._durable(
                (file << 32) | durable_from, (file << 32) | (durable_from + len(data)), data
            )

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
        if data:
            self._durable((old << 32) | durable_from, (old << 32) | old_end, data)

    async def _write_direct(self, item: _Direct) -> int:
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

        await self._io(work, file)
        await self._locked(c.direct_written, word, total)
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

    # -- checkpoints and archive --------------------------------------------------------------

    async def checkpoint_record(self, ckp_lsn: LSN) -> LSN:
        """Append a checkpoint record (``ckp_lsn``, the previous checkpoint record's LSN, the
        time), flush it, and record it in the region as the last checkpoint; returns the
        record's LSN. ``ckp_lsn`` is where recovery would start: files wholly before its file
        can be archived, and an in-memory ring keeps every "file" from it on. Cursors return
        the record's data as a :class:`~aiodbenv.CheckpointRecord`.

        Cancellation: before the record is appended, nothing happens; after, the record is
        in the log and is recorded as the last checkpoint only once a later checkpoint or
        reopen finds it (a cancelled checkpoint is not relied upon).
        """
        self._check()
        ckp = pack_word(ckp_lsn)
        if ckp > self._c.end_word():
            raise InvalidArgument(f"ckp_lsn {LSN(*ckp_lsn)} is past the end of the log")
        payload = checkpoint_payload(ckp, self._c.word("ckp_rec"), time.time_ns())
        word = await self._append(REC_CHECKPOINT, payload)
        await self._flush_word(word)
        await self._locked(self._c.set_checkpoint, word, ckp)
        return unpack_word(word)

    async def archive(self, *, remove: bool = False) -> list[str]:
        """The log files no longer needed (``log_archive``): those wholly before the file of
        the last checkpoint's ``ckp_lsn``, as absolute paths, oldest first; none without a
        checkpoint, and none for an in-memory log. ``remove=True`` deletes them.

        Cancellation: a removal under way in its worker thread finishes."""
        self._check()
        ckp = self._c.word("ckp_lsn")
        if self._c.inmemory or not ckp:
            return []
        upto = ckp >> 32
        directory = self._c.directory

        def work() -> list[str]:
            paths = [log_path(directory, n) for n in list_log_files(directory) if n < upto]
            if remove:
                for p in paths:
                    _io.unlink(p)
            return paths

        return await anyio.to_thread.run_sync(work)

    # -- closing --------------------------------------------------------------------------------

    async def _close(self, *, flush: bool) -> None:
        """Flush what is buffered (unless not ``flush`` or panicked), let the writer task
        finish, close the files."""
        self._closing = True
        try:
            if flush and not self._closed and not self._env.panicked and not self._c.inmemory:
                await self.flush()
        finally:
            task = self._task
            if task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(task), self.wait_timeout)
                except Exception:
                    pass
            self._closed = True
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()

    # -- reading (for cursors) ------------------------------------------------------------------

    def cursor(self, start: LSN | None = None) -> Any:
        """A :class:`~aiodbenv.LogCursor` over the log, positioned before ``start`` (or before
        the first record): ``async for lsn, data in log.cursor()``."""
        from .cursor import LogCursor

        self._check()
        return LogCursor(self, start)
