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
from collections.abc import Coroutine
from typing import Any, cast

import anyio.to_thread

from .. import _io, _tasks
from ..errors import CorruptRegion, InvalidArgument, LockTimeout
from ..region.mutex import unlock as _unlock
from .accel import CORRUPT as _CORRUPT
from .accel import HALF as _HALF
from .accel import OWNER_DEAD as _OWNER_DEAD
from .accel import PYTHON as _PYTHON
from .core import NEED
from .cursor import LogCursor
from .files import list_log_files, log_path
from .flushing import LogFlushing
from .lsn import LSN, checked_word, pack_word, unpack_word
from .orphan import ClosedFds, close_when_idle, keep_running
from .record import (
    FILE_HEADER_BYTES,
    HEADER,
    REC_CHECKPOINT,
    REC_USER,
    checkpoint_payload,
)
from .redo import redo_start
from .rounddata import _SETTLE_POLL, CRound
from .stat import LogStat, read_stat
from .writer import Direct, DurableListener

__all__ = ["DurableListener", "Log"]

logger = logging.getLogger("aiodbenv")

# An LSN made without NamedTuple's Python-level __new__ (put returns one per record).
_new_lsn = tuple.__new__


class Log(LogFlushing):
    """The log of an environment (``env.log``): ``put``, ``flush``, cursors, checkpoint
    records, ``archive`` and ``stat``, shared by every process that has the environment open.

    A file log keeps ``log.0000000001``, ... in the log directory; an in-memory log keeps a
    ring of log "files" in the region and creates no file. Use it from the process (and event
    loop) that opened the environment.
    """

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
        """The next record's LSN, read without the log mutex: a hint while others append."""
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
        fast = self._fast  # None without the accelerator, once closed, in a forked child
        if fast is not None and not (flush or write_nosync) and not self._panic_w[self._panic_i]:
            # One compiled call (accel.FastPut.put): an LSN, an int (past half, or not done), None.
            word = fast.put(data)
            if type(word) is LSN:
                return word
            if word is None:
                return await self._put(data, flush, write_nosync)
            if word < 0:
                word = await self._put_slow(cast(bytes, data), word)  # bytes: checked in C
            elif word & _HALF:
                word ^= _HALF
                if self._task is None or self._inflight is not None:
                    self._write_behind(word)
            return _new_lsn(LSN, (word >> 32, word & 0xFFFFFFFF))
        return await self._put(data, flush, write_nosync)

    async def _put(
        self, data: bytes | bytearray | memoryview, flush: bool, write_nosync: bool
    ) -> LSN:
        """:meth:`put` in full: checks, the append (compiled or not), the flush or write."""
        if self._closed or self._panic_w[self._panic_i] or os.getpid() != self._pid:
            self._check()
        if flush and write_nosync:
            raise InvalidArgument("flush and write_nosync exclude each other")
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidArgument(f"a log record is bytes, not {type(data).__name__}")
            data = bytes(data)
        fast = self._fast
        if fast is not None:
            word = fast.fn(fast.args, REC_USER, data, len(data))
            if word < 0:
                word = await self._put_slow(data, word)
            elif word & _HALF:
                word ^= _HALF
                if self._task is None or self._inflight is not None:
                    self._write_behind(word)
        else:
            word = await self._put_py(data)
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
        return _new_lsn(LSN, (word >> 32, word & 0xFFFFFFFF))

    async def _put_py(self, data: bytes) -> int:
        """The Python append of :meth:`put` (without the accelerator): its LSN word."""
        # The common case without a coroutine call: room in the buffer, mutex free.
        if len(data) > self._max_payload:
            await self._append(REC_USER, data)  # raises InvalidArgument
        try:
            word: int | NEED = self._c.append(REC_USER, data, zlib.crc32(data))
        except LockTimeout:
            word = NEED.SPACE
        if type(word) is not int:
            return await self._append(REC_USER, data)
        if self._task is None and self._c.w[self._tail_i] & 0xFFFFFFFF > self._half:
            self._write_behind(word)
        return word

    async def _put_slow(self, data: bytes, code: int) -> int:
        """The compiled append handed ``code`` back: do the append the Python way."""
        if code == _PYTHON and self._room_now() and self._fast is not None:
            # The buffer was full, and a write behind had finished its I/O: it is written
            # out now, without suspending; try again.
            fast = self._fast
            code = fast.fn(fast.args, REC_USER, data, len(data))
            if code >= 0:
                if code & _HALF:
                    code ^= _HALF
                    self._write_behind(code)
                return int(code)
        if code == _OWNER_DEAD:
            # It left the mutex held for us: repair (or panic) as any locker would.
            self._c.mutex.acquire_contended(errno.EOWNERDEAD)
            if self._c._ptr is not None:
                _unlock(self._c._ptr)
        elif code == _CORRUPT:
            reason = "the log region is corrupt (a header word failed its bounds check)"
            self._env.panic(reason)
            raise CorruptRegion(reason)
        return await self._append(REC_USER, data)

    # -- commit space (in memory; no-ops for a file log) ----------------------------------------

    async def _reserve(self, nbytes: int) -> None:
        """Reserve ``nbytes`` of the in-memory ring for a commit record (see
        :mod:`aiodbenv.log.reserve`); LogBufferFull, nothing reserved, if it cannot be kept.
        One short critical section; a busy mutex is waited for as :meth:`_locked` does.
        Cancellation: nothing reserved."""
        if self._c.inmemory:
            self._check()
            await self._locked(self._c.reserve, nbytes)

    async def _release(self, nbytes: int) -> None:
        """Give back ``nbytes`` reserved by :meth:`_reserve` (an aborted transaction).
        Cancellation: the bytes stay reserved until this handle closes or its process is reaped."""
        if self._c.inmemory and not self._closed:
            await self._locked(self._c.release, nbytes)

    async def _put_reserved(self, data: bytes, nbytes: int, write_nosync: bool) -> LSN:
        """:meth:`put` of a commit record that reserved ``nbytes``: in memory it is never
        refused for space, and the reservation is released with the append (atomically:
        one critical section). Cancellation: as :meth:`put`."""
        if not self._c.inmemory:
            return await self.put(data, write_nosync=write_nosync)
        self._check()
        word = await self._append(REC_USER, data, nbytes)
        if write_nosync:
            await self._write_through(word)
        return _new_lsn(LSN, (word >> 32, word & 0xFFFFFFFF))

    async def _append(self, rtype: int, payload: bytes, release: int = 0) -> int:
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
                r = c.append(rtype, payload, pcrc, release)
            except LockTimeout:
                r = await self._locked(c.append, rtype, payload, pcrc, release)
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
        item = Direct(rtype, payload, pcrc, asyncio.get_running_loop().create_future())
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
            word = checked_word(lsn, "flush")
            if word < c.word("s_lsn"):
                return
        self._check()
        end = await self._end_word()
        if lsn is None:
            word = end - 1
        elif word > end:
            raise InvalidArgument(
                f"LSN {LSN(*lsn)} is past the end of the log ({LSN(*unpack_word(end))})"
            )
        elif word == end:
            word = end - 1
        await self._flush_word(word)

    # -- checkpoints and archive --------------------------------------------------------------

    async def checkpoint_record(self, ckp_lsn: LSN) -> LSN:
        """Append a checkpoint record (``ckp_lsn``, the previous checkpoint record's LSN, the
        time), flush it, and record it in the region as the last checkpoint; returns the
        record's LSN. ``ckp_lsn`` is where recovery would start: files wholly before its file
        can be archived, and an in-memory ring keeps every "file" from it on. Cursors return
        the record's data as a :class:`~aiodbenv.CheckpointRecord`. In memory, a ``ckp_lsn``
        leaving too little ring for reserved commit space raises LogBufferFull (docs/log.md).

        Cancellation: before the record is appended, nothing happens; after, the record is
        in the log and is recorded as the last checkpoint only once a later checkpoint or
        reopen finds it (a cancelled checkpoint is not relied upon).
        """
        self._check()
        ckp = pack_word(ckp_lsn)
        if ckp > await self._end_word():
            raise InvalidArgument(f"ckp_lsn {LSN(*ckp_lsn)} is past the end of the log")
        payload = checkpoint_payload(ckp, self._c.word("ckp_rec"), time.time_ns())
        word = await self._append(REC_CHECKPOINT, payload)
        await self._flush_word(word)
        await self._locked(self._c.set_checkpoint, word, ckp)
        return unpack_word(word)

    def quiet_checkpoint(self) -> LSN | None:
        """The ``ckp_lsn`` of the last checkpoint record if no record was appended after it
        (Berkeley DB's test for skipping a checkpoint without ``DB_FORCE``), else None. A new
        log file started after it counts as something appended (its header record)."""
        c = self._c
        rec = c.word("ckp_rec")
        if not rec or c.last_word() != rec:
            return None
        return unpack_word(c.word("ckp_lsn"))

    async def archive(self, *, remove: bool = False) -> list[str]:
        """The log files no longer needed (``log_archive``): those wholly before the file
        where recovery would start, the ``ckp_lsn`` of the checkpoint *before* the last one
        (see docs/durable.md), as absolute paths, oldest first; none before a second
        checkpoint, and none for an in-memory log. ``remove=True`` deletes them.

        Cancellation: a removal under way in its worker thread finishes."""
        self._check()
        if self._c.inmemory or not self._c.word("ckp_lsn"):
            return []
        start, _ = await redo_start(self)
        if start is None:
            return []
        upto = start.file
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
        self._fast = None  # its addresses die with the mapping; later puts raise via _check
        if not self._closed:
            try:
                # Transactions of this handle left open end with it: their commit space too.
                await self._locked(self._c.drop_slot, self._c.rsv_slot)
            except Exception:
                pass  # a held or broken mutex: the reaper drops them once the slot is dead
        try:
            if flush and not self._closed and not self._env.panicked and not self._c.inmemory:
                await self.flush()
        finally:
            # Each wait is bounded, and never cancels what it waits for (a sub-task of
            # wait_for would be cancelled with every other task by a shutdown, and end the
            # closing here, with the files open and the round thread running).
            await _bounded(self._settle_behind(), self.wait_timeout)
            # The writer's thread may still run rounds for other processes after its round
            # was published: its jobs run in order, so this one ends after them, and the
            # files are not closed under it.
            await _bounded(self._in_thread(int), self.wait_timeout)
            # From here no writer task may start (waiters left get InvalidArgument); wait for
            # the one that runs, under one deadline.
            self._barred = True
            deadline = time.monotonic() + self.wait_timeout
            while (task := self._task) is not None and not task.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.wait({task}, timeout=left)
            await self._round_thread_idle()
            self._closed = True
            # A write of the I/O thread that outlived the waits (a disk slower than
            # wait_timeout) keeps the descriptors: closed under it, their numbers could go to
            # a file opened meanwhile, and the write's bytes with them.
            last = self._thread.bar()
            r, task = self._inflight, self._task
            if last is not None or (task and not task.done()) or (r and not r.finished):
                # The late work publishes, unlocks and lets the role go in views of its own.
                self._c.keep_mapped()
                self._panic_w = self._panic_w[:]
            self._forget_behind()
            fds, self._fds = list(self._fds.values()), ClosedFds()
            close_when_idle(last, fds, self._c.buf, self.wait_timeout)

    async def _round_thread_idle(self) -> None:
        """Closing: wait (on the loop, up to ``wait_timeout``) until the handle's round thread
        runs no round. A round handed to it for a flush, or for other processes' flushes
        served meanwhile, locks the log mutex and writes from the log region: unmapped under
        it, the process crashes. One still running after the wait keeps the region mapped
        and the files open until it ends (:mod:`aiodbenv.log.orphan`)."""
        job = self._bjob
        if job is None or not job.thread:
            return
        deadline = time.monotonic() + self.wait_timeout
        while job.busy():
            if time.monotonic() > deadline:
                r = self._inflight
                if isinstance(r, CRound) and not r.io_done():
                    return  # its write behind: _forget_behind keeps the region for it
                fds = list(self._fds.values())
                self._fds.clear()
                keep_running(job, job.done_future(), self._c.buf[0:1], fds, self.wait_timeout)
                return
            await asyncio.sleep(_SETTLE_POLL)

    # -- reading (for cursors) ------------------------------------------------------------------

    def cursor(self, start: LSN | None = None) -> LogCursor:
        """A :class:`~aiodbenv.LogCursor` over the log, positioned before ``start`` (or before
        the first record): ``async for lsn, data in log.cursor()``."""
        self._check()
        return LogCursor(self, start)


async def _bounded(coro: Coroutine[Any, Any, object], timeout: float) -> None:
    """Run ``coro`` as a task nothing may cancel (:mod:`aiodbenv._tasks`) and wait for it up
    to ``timeout`` seconds; a failure or a task still running then is left to itself."""
    task = _tasks.start(coro)
    task.add_done_callback(_tasks.retrieve)
    await asyncio.wait({task}, timeout=timeout)
