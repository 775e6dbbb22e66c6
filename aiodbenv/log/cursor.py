"""``LogCursor``: reading the log forward and backward (Berkeley DB's ``DB_LOGC``).

A cursor of a file log reads the log files in chunks of :data:`CHUNK` bytes in a worker
thread (one thread hop per chunk, not per record); records still in the shared buffer are
written to their file first (no fsync), so a cursor sees every record appended before the
call, from any process. A cursor of an in-memory log copies each record out of the ring under
the log mutex. File header and padding records are skipped; checkpoint records are returned
with their data as a :class:`~aiodbenv.CheckpointRecord` (a ``bytes`` subclass), user records
as plain ``bytes``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING

import anyio.to_thread

from .. import _io
from .._threads import run_owned
from ..errors import InvalidArgument, LogCorrupt
from ..region.mutex import Busy
from .files import list_log_files, log_path
from .lsn import LSN, checked_word
from .record import (
    HEADER,
    REC_CHECKPOINT,
    REC_FILE,
    REC_USER,
    CheckpointRecord,
    Record,
    parse_file_header,
    read_one,
)

if TYPE_CHECKING:
    from .log import Log

__all__ = ["CHUNK", "LogCursor"]

#: Bytes a file cursor reads per thread hop.
CHUNK = 256 * 1024

_U32 = 0xFFFFFFFF


class LogCursor:
    """A cursor over the log (``log_cursor``): ``first``, ``next``, ``last``, ``prev`` and
    ``set`` each return ``(LSN, data)``, or None past either end; ``async for lsn, data in
    cursor`` iterates forward from ``start`` (or the first record).

    Checkpoint records come back with ``data`` a :class:`~aiodbenv.CheckpointRecord`; tell
    them from user records with ``isinstance``. The end of the log is read anew at each call,
    so a cursor sees records appended after it was made. Close it with :meth:`close` (or use
    ``async with``) to release its file descriptors.

    Cancellation: every method may be cancelled; the cursor keeps its previous position (a
    read under way in a worker thread finishes and is discarded).
    """

    def __init__(self, log: Log, start: LSN | None = None) -> None:
        """Internal: use :meth:`Log.cursor`."""
        self._log = log
        self._c = log._c
        self._start = start
        self._at: tuple[int, Record] | None = None
        self._chunk: tuple[int, int, bytes] | None = None  # (file, base offset, bytes)
        self._fds: dict[int, int] = {}

    # -- public moves ---------------------------------------------------------------------------

    async def first(self) -> tuple[LSN, bytes] | None:
        """The first record of the log (the oldest still there), or None if it has none.
        Cancellation: the cursor keeps its previous position."""
        self._log._check()
        file = await self._first_file()
        return self._land(await self._forward(file, 0))

    async def next(self) -> tuple[LSN, bytes] | None:
        """The record after the current one (a new cursor: ``start``, or the first).
        Cancellation: the cursor keeps its previous position."""
        self._log._check()
        if self._at is None:
            if self._start is not None:
                return await self.set(self._start)
            return await self.first()
        file, rec = self._at
        return self._land(await self._forward(file, rec.end, after=rec.offset))

    async def last(self) -> tuple[LSN, bytes] | None:
        """The last record of the log, or None if it has none. Cancellation: the cursor keeps
        its previous position."""
        self._log._check()
        word = await self._log._locked(self._c.last_word_locked)
        file, off = word >> 32, word & _U32
        rec = await self._record_at(file, off)
        if rec is None:
            raise LogCorrupt(f"the last record of the log, {LSN(file, off)}, cannot be read")
        if rec.rtype in (REC_USER, REC_CHECKPOINT):
            return self._land((file, rec))
        return self._land(await self._backward(file, rec))

    async def prev(self) -> tuple[LSN, bytes] | None:
        """The record before the current one (a new cursor: the last). Cancellation: the
        cursor keeps its previous position."""
        self._log._check()
        if self._at is None:
            return await self.last()
        file, rec = self._at
        return self._land(await self._backward(file, rec))

    async def set(self, lsn: LSN) -> tuple[LSN, bytes] | None:
        """The record at ``lsn``; None if ``lsn`` is the end of the log or past it.
        InvalidArgument if no record starts there (or it is no longer in the log).
        Cancellation: the cursor keeps its previous position."""
        self._log._check()
        word = checked_word(lsn, "set")
        if word >= await self._log._end_word():
            return None
        file, off = lsn
        rec = await self._record_at(file, off)
        if rec is None or rec.rtype not in (REC_USER, REC_CHECKPOINT):
            raise InvalidArgument(f"no log record starts at {LSN(file, off)}")
        return self._land((file, rec))

    def __aiter__(self) -> AsyncIterator[tuple[LSN, bytes]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[LSN, bytes]]:
        while True:
            item = await self.next()
            if item is None:
                return
            yield item

    def close(self) -> None:
        """Release the cursor's file descriptors (it may still be used: they reopen)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        self._chunk = None

    async def __aenter__(self) -> LogCursor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    # -- walking ----------------------------------------------------------------------------------

    def _land(self, found: tuple[int, Record] | None) -> tuple[LSN, bytes] | None:
        if found is None:
            return None
        self._at = found
        file, rec = found
        data: bytes = rec.payload
        if rec.rtype == REC_CHECKPOINT:
            data = CheckpointRecord(rec.payload)
        return LSN(file, rec.offset), data

    async def _first_file(self) -> int:
        c = self._c
        if c.inmemory:
            r = self._log._attempt(c.mem_file_range)
            first, _ = r if not isinstance(r, Busy) else await self._log._locked(c.mem_file_range)
            return int(first)
        files = await anyio.to_thread.run_sync(list_log_files, c.directory)
        return files[0] if files else c.word("f_lsn") >> 32

    async def _forward(
        self, file: int, off: int, after: int | None = None
    ) -> tuple[int, Record] | None:
        """The first user or checkpoint record at or after ``(file, off)``; ``after`` is the
        offset of the record before it, if known (checked against the next file's header)."""
        c = self._c
        while True:
            end = await self._log._end_word()
            if (file << 32) | off >= end:
                return None
            if c.inmemory and file < c.word("first_file"):
                file, off, after = c.word("first_file"), 0, None
                continue
            rec = await self._record_at(file, off)
            if rec is None:
                if file < end >> 32:
                    nxt = await self._record_at(file + 1, 0)
                    if nxt is None or nxt.rtype != REC_FILE:
                        raise LogCorrupt(f"log file {file + 1} has no valid header record")
                    _, prev_last = parse_file_header(nxt.payload)
                    if after is not None and prev_last != after:
                        raise LogCorrupt(
                            f"log file {file} is corrupt at offset {off}: the log continues "
                            f"after {LSN(file, prev_last)}"
                        )
                    file, off, after = file + 1, nxt.end, 0
                    continue
                raise LogCorrupt(f"the log record at {LSN(file, off)} fails its checksum")
            if rec.rtype in (REC_USER, REC_CHECKPOINT):
                return file, rec
            off, after = rec.end, rec.offset

    async def _backward(self, file: int, rec: Record) -> tuple[int, Record] | None:
        """The last user or checkpoint record before ``rec`` (in ``file``)."""
        c = self._c
        while True:
            if rec.offset == 0:
                if file <= 1 or (c.inmemory and file <= c.word("first_file")):
                    return None
                _, prev_last = parse_file_header(rec.payload)
                file -= 1
                if not c.inmemory and not os.path.exists(log_path(c.directory, file)):
                    return None  # archived and removed
                got = await self._record_at(file, prev_last, backward=True)
            else:
                got = await self._record_at(file, rec.prev, backward=True)
            if got is None:
                if c.inmemory and file < c.word("first_file"):
                    return None  # the ring has reused that "file" meanwhile
                raise LogCorrupt(f"the log record before {LSN(file, rec.offset)} cannot be read")
            rec = got
            if rec.rtype in (REC_USER, REC_CHECKPOINT):
                return file, rec

    # -- reading one record ----------------------------------------------------------------------

    async def _record_at(self, file: int, off: int, backward: bool = False) -> Record | None:
        c = self._c
        log = self._log
        if c.inmemory:
            r = log._attempt(c.mem_read, file, off)
            got = r if not isinstance(r, Busy) else await log._locked(c.mem_read, file, off)
            if got is None:
                return None
            rtype, prev, payload = got
            return Record(off, rtype, prev, payload)
        word = (file << 32) | off
        if word >= c.word("w_lsn"):
            end = await log._end_word()
            if word >= end:
                return None
            await log._write_through(end - 1)
        base, data = await self._span(file, off, HEADER.size, backward)
        if off - base + HEADER.size > len(data):
            return None
        length = HEADER.unpack_from(data, off - base)[1]
        if length > c.file_size:
            return None
        if off - base + HEADER.size + length > len(data):
            base, data = await self._span(file, off, HEADER.size + length, backward)
        return read_one(data, base, file, off, base + len(data))

    async def _span(self, file: int, off: int, n: int, backward: bool) -> tuple[int, bytes]:
        """File bytes covering [off, off + n) if the file has them: ``(base, data)``."""
        chunk = self._chunk
        if chunk is not None and chunk[0] == file:
            base, data = chunk[1], chunk[2]
            if base <= off and off + n <= base + len(data):
                return base, data
        c = self._c
        w_lsn = c.word("w_lsn")
        # Bytes of the current file past what is written are not the log's (yet).
        limit = (w_lsn & _U32) if w_lsn >> 32 == file else None
        size = max(n, CHUNK)
        start = max(0, off + n - size) if backward else off
        if limit is not None:
            size = max(0, min(size, limit - start))
        fd = self._fds.get(file)
        if fd is None:
            path = log_path(c.directory, file)
            try:
                fd = await run_owned(
                    lambda: _io.open_file(path, os.O_RDONLY | os.O_CLOEXEC), undo=os.close
                )
            except FileNotFoundError:
                return off, b""  # archived and removed: no record there any more
            self._fds[file] = fd
        opened = fd
        data = await anyio.to_thread.run_sync(
            lambda: _io.pread(opened, size, start) if size else b""
        )
        for old in [f for f in self._fds if f not in (file, file - 1, file + 1)]:
            os.close(self._fds.pop(old))
        self._chunk = (file, start, data)
        return start, data
