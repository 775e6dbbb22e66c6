"""The log region's synchronous critical sections: appending, the writer role, the state a
write round reads and publishes, switching files, the in-memory ring.

Each method takes the log mutex for a few microseconds on the calling thread (the event
loop's: robust mutexes belong to the thread that locked them) and never does I/O under it.
The async shell (:mod:`aiodbenv.log.log`) calls them with bounded lock waits.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import struct
import zlib
from typing import Any

from ..errors import InvalidArgument, LogBufferFull
from ..region.backing import Region
from ..region.mutex import STEP_WAIT, NullMutex, SharedMutex
from ..region.mutex import trylock as _trylock
from ..region.mutex import unlock as _unlock
from ..region.registry import process_start_time
from .layout import DIR_BYTES, LOG_HEADER, LOG_REGION_MAGIC, buffer_offset, header_offset
from .lsn import LSN, unpack_word
from .record import (
    FILE_HEADER_BYTES,
    HEADER,
    REC_FILE,
    checksum,
    file_header,
    scan,
)

__all__ = ["NEED", "LogCore", "format_log_region"]

logger = logging.getLogger("aiodbenv")

_tokens = itertools.count(1)
_W = LOG_HEADER.word
_U32 = 0xFFFFFFFF
_F_LSN, _TAIL, _CUR_SIZE = _W.f_lsn, _W.tail, _W.cur_file_size
_ST_RECORDS, _ST_BYTES = _W.st_records, _W.st_bytes
_S_LSN, _W_LSN = _W.s_lsn, _W.w_lsn
_HDR_SIZE = HEADER.size
_HDR_PACK = HEADER.pack
_SUM_PACK = struct.Struct("<IIIIB").pack
_crc32 = zlib.crc32


class NEED(enum.Enum):
    """Why an append could not be made in place (file log)."""

    SPACE = 1  # the buffer is full: write it out first
    SWITCH = 2  # the record does not fit in the current file: start the next one
    DIRECT = 3  # the record is larger than the buffer: write it straight to the file


def format_log_region(
    region: Region,
    *,
    inmemory: bool,
    bsize: int,
    file_size: int,
    directory: str,
    mode: int,
    shared: bool,
    end: Any = None,
) -> None:
    """Lay out a new log region (creator, before the environment's magic). ``end`` is the
    :class:`~aiodbenv.log.files.LogEnd` found on disk for a file log."""
    w = region.words
    h = header_offset() // 8
    for i in range(LOG_HEADER.size // 8):
        w[h + i] = 0
    raw = directory.encode("utf-8", "surrogateescape")
    if len(raw) > DIR_BYTES:
        raise InvalidArgument(f"log directory path is longer than {DIR_BYTES} bytes")
    start = header_offset() + LOG_HEADER.size
    region.buf[start : start + len(raw)] = raw
    w[h + _W.dir_len] = len(raw)
    w[h + _W.inmemory] = int(inmemory)
    w[h + _W.bsize] = bsize
    w[h + _W.file_size] = file_size
    w[h + _W.mode] = mode
    w[h + _W.st_min_commits] = 0
    if shared:
        SharedMutex(
            region.base, w, header_offset() + LOG_HEADER.offset("mutex"), "log"
        ).initialize()
    if inmemory:
        rec = file_header(1, file_size, 0)
        b = buffer_offset()
        region.buf[b : b + len(rec)] = rec
        w[h + _W.f_lsn] = 1 << 32
        w[h + _W.tail] = len(rec)  # last record at 0, fill past the header record
        w[h + _W.w_lsn] = w[h + _W.s_lsn] = (1 << 32) | len(rec)
        w[h + _W.file_ready] = 1
        w[h + _W.first_file] = 1
        w[h + _W.cur_file_size] = file_size
    else:
        assert end is not None
        here = (end.file << 32) | end.end
        w[h + _W.f_lsn] = here
        w[h + _W.tail] = end.last_off << 32
        w[h + _W.w_lsn] = w[h + _W.s_lsn] = here
        w[h + _W.file_ready] = end.file
        w[h + _W.first_file] = 1
        w[h + _W.cur_file_size] = end.file_size
        w[h + _W.ckp_rec] = end.ckp_rec
        w[h + _W.ckp_lsn] = end.ckp_lsn
        w[h + _W.last_write_end] = here
    w[h + _W.magic] = LOG_REGION_MAGIC


class LogCore:
    """One process's view of the log region."""

    def __init__(self, region: Region, shared: bool, panic: Any) -> None:
        self.region = region
        self.w = region.words
        self.buf = region.buf
        self.h = header_offset() // 8
        if self.w[self.h + _W.magic] != LOG_REGION_MAGIC:
            raise InvalidArgument("the log region is not formatted")
        self.mutex: SharedMutex | NullMutex
        if shared:
            self.mutex = SharedMutex(
                region.base,
                region.words,
                header_offset() + LOG_HEADER.offset("mutex"),
                "log",
                repair=self.repair,
                panic=panic,
            )
        else:
            self.mutex = NullMutex("log")
        self._check_header(region)
        self.inmemory = bool(self.word("inmemory"))
        self.bsize = self.word("bsize")
        self.file_size = self.word("file_size")
        self.mode = self.word("mode")
        n = self.word("dir_len")
        start = header_offset() + LOG_HEADER.size
        self.directory = bytes(self.buf[start : start + n]).decode("utf-8", "surrogateescape")
        self.b0 = buffer_offset()
        #: In memory: how many "files" the ring holds (each in a slot of file_size bytes).
        self.nslots = max(1, self.bsize // self.file_size) if self.inmemory else 0
        self._ptr = self.mutex.ptr
        self._nowait = self.mutex.nowait_index
        self.pid = os.getpid()
        self.start_time = process_start_time(self.pid)
        #: Tells this handle's writer from another handle's in the same process.
        self.token = next(_tokens)

    def _check_header(self, region: Region) -> None:
        """Range-check what the offsets and sizes of the header say before following them."""
        bsize, fsize, n = self.word("bsize"), self.word("file_size"), self.word("dir_len")
        cur = self.word("cur_file_size")
        fill = self.word("tail") & _U32
        if (
            not 0 < bsize <= region.size - buffer_offset()
            or not FILE_HEADER_BYTES < fsize < 1 << 32
            or not FILE_HEADER_BYTES < cur < 1 << 32
            or n > DIR_BYTES
            or fill > max(bsize, fsize)
        ):
            from ..errors import CorruptRegion

            raise CorruptRegion(
                f"the log region is corrupt (buffer {bsize}, file size {fsize}, fill {fill})"
            )

    # -- words

    def word(self, name: str) -> int:
        """A header word (read without the mutex: a whole word is never torn)."""
        return int(self.w[self.h + getattr(_W, name)])

    def set(self, name: str, value: int) -> None:
        """Store a header word (callers hold the mutex)."""
        self.w[self.h + getattr(_W, name)] = value

    def add(self, name: str, n: int = 1) -> None:
        """Add to a statistics word (callers hold the mutex)."""
        i = self.h + getattr(_W, name)
        self.w[i] = self.w[i] + n

    def end_word(self) -> int:
        """The next LSN to be written, as a packed word."""
        return self.word("f_lsn") + (self.word("tail") & _U32)

    def last_word(self) -> int:
        """The LSN of the last record appended (a file header record after a switch)."""
        f = self.word("f_lsn") >> 32
        return (f << 32) | (self.word("tail") >> 32)

    def _slot_base(self, file: int) -> int:
        """In memory: the region offset where "file" ``file`` starts in the ring."""
        return self.b0 + ((file - 1) % self.nslots) * self.file_size

    # -- appending

    def append(self, rtype: int, payload: bytes, pcrc: int) -> int | NEED:
        """Append a record; its LSN as a packed word, or why it must wait (file log). In
        memory, starts the next "file" of the ring when needed; raises LogBufferFull if that
        would overwrite a "file" a checkpoint still needs. A held mutex is waited for
        :data:`~aiodbenv.region.mutex.STEP_WAIT` at most (then LockTimeout, nothing done).

        The hot path of every put: word indices are precomputed and the mutex is locked
        inline (as the pool's pin does), which halves its cost."""
        w, h = self.w, self.h
        total = _HDR_SIZE + len(payload)
        ptr = self._ptr
        if ptr is not None:
            rc = _trylock(ptr)
            if rc:
                self.mutex.acquire_contended(rc, STEP_WAIT)
            else:
                w[self._nowait] += 1
        try:
            f_lsn = w[h + _F_LSN]
            tail = w[h + _TAIL]
            fill = tail & _U32
            off = (f_lsn & _U32) + fill
            if off + total > w[h + _CUR_SIZE]:
                if not self.inmemory:
                    return NEED.SWITCH
                self._ring_switch()
                f_lsn = w[h + _F_LSN]
                tail = w[h + _TAIL]
                fill = tail & _U32
                off = fill
            if self.inmemory:
                at = self._slot_base(f_lsn >> 32) + off
            else:
                if total > self.bsize:
                    return NEED.DIRECT
                if fill + total > self.bsize:
                    return NEED.SPACE
                at = self.b0 + fill
            file = f_lsn >> 32
            prev = tail >> 32
            n = len(payload)
            crc = _crc32(_SUM_PACK(file, off, prev, n, rtype), pcrc)
            buf = self.buf
            buf[at : at + _HDR_SIZE] = _HDR_PACK(prev, n, crc, rtype)
            buf[at + _HDR_SIZE : at + total] = payload
            w[h + _TAIL] = (off << 32) | (fill + total)  # the commit point
            w[h + _ST_RECORDS] += 1
            w[h + _ST_BYTES] += total
            return int((file << 32) | off)
        finally:
            if ptr is not None:
                _unlock(ptr)

    def _ring_switch(self) -> None:
        """In memory, under the mutex: start the next "file" in the ring."""
        f_lsn = self.word("f_lsn")
        cur = f_lsn >> 32
        new = cur + 1
        gone = new - self.nslots  # the "file" whose slot the new one takes
        if gone >= 1:
            needed = self.word("ckp_lsn") >> 32
            if needed and gone >= needed:
                raise LogBufferFull(
                    f"in-memory log buffer is full: starting log file {new} would overwrite "
                    f"file {gone}, which the last checkpoint (ckp_lsn "
                    f"{unpack_word(self.word('ckp_lsn'))}) still needs; checkpoint, or use a "
                    "larger log_buffer_size"
                )
        prev_last = self.word("tail") >> 32
        rec = file_header(new, self.file_size, prev_last)
        at = self._slot_base(new)
        self.buf[at : at + len(rec)] = rec
        if gone >= 1:
            self.set("first_file", gone + 1)
        self.set("prev_file_end", (f_lsn & _U32) + (self.word("tail") & _U32))
        self.set("f_lsn", new << 32)
        self.set("tail", len(rec))
        self.set("cur_file_size", self.file_size)
        self.add("st_switches")
        self.add("st_records")
        self.add("st_bytes", len(rec))

    # -- in-memory flush and reads

    def mem_flush(self) -> tuple[int, int]:
        """In memory: mark everything appended durable; the range newly marked. Locks inline
        like :meth:`append` (it follows every ``put(flush=True)``)."""
        w, h = self.w, self.h
        ptr = self._ptr
        if ptr is not None:
            rc = _trylock(ptr)
            if rc:
                self.mutex.acquire_contended(rc, STEP_WAIT)
            else:
                w[self._nowait] += 1
        try:
            upto = w[h + _F_LSN] + (w[h + _TAIL] & _U32)
            old = w[h + _S_LSN]
            if upto > old:
                w[h + _S_LSN] = upto
                w[h + _W_LSN] = upto
            return old, max(old, upto)
        finally:
            if ptr is not None:
                _unlock(ptr)

    def mem_read(self, file: int, offset: int) -> tuple[int, int, bytes] | None:
        """In memory: ``(type, prev, payload)`` of the record at ``(file, offset)``, None if
        there is none there (or it has been overwritten)."""
        with self.mutex:
            cur = self.word("f_lsn") >> 32
            if not self.word("first_file") <= file <= cur:
                return None
            limit = (self.word("tail") & _U32) if file == cur else self.file_size
            base = self._slot_base(file)
            data = self.buf[base : base + self.file_size]
            from .record import read_one

            rec = read_one(data, 0, file, offset, limit)
            if rec is None:
                return None
            return rec.rtype, rec.prev, rec.payload

    def mem_file_range(self) -> tuple[int, int]:
        """In memory: (oldest, newest) "file" in the ring."""
        with self.mutex:
            return self.word("first_file"), self.word("f_lsn") >> 32

    # -- commits and the writer role (file log)

    def register_commit(self) -> None:
        """Count a flush call waiting for the next flush (commits per flush)."""
        with self.mutex:
            self.add("pending_commits")

    def role_holder(self) -> tuple[int, int]:
        """(pid, start time) of the process writing the files now, (0, 0) if none."""
        return self.word("flusher_pid"), self.word("flusher_start")

    def _holder(self) -> tuple[int, int, int]:
        return self.word("flusher_pid"), self.word("flusher_start"), self.word("flusher_token")

    def holder_alive(self, pid: int, start: int) -> bool:
        """Is the writer ``(pid, start)`` still running? (A recycled pid is not it.)"""
        if pid == self.pid:
            return True
        now = process_start_time(pid)
        return now != 0 and (start == 0 or now == start)

    def take_role(self, dead: tuple[int, int] | None = None) -> bool:
        """Become the writer if nobody is, or if the writer was ``dead`` (checked outside).
        Another handle of this process holding it is not this handle: it is waited for."""
        with self.mutex:
            holder = self._holder()
            if holder[0] and holder[:2] != dead:
                return holder == (self.pid, self.start_time, self.token)
            self.set("flusher_start", self.start_time)
            self.set("flusher_token", self.token)
            self.set("flusher_pid", self.pid)
            return True

    def release_role(self) -> None:
        """Stop being the writer."""
        with self.mutex:
            if self._holder() == (self.pid, self.start_time, self.token):
                self.set("flusher_pid", 0)
                self.set("flusher_start", 0)
                self.set("flusher_token", 0)

    def begin_write(self, fill_write: bool) -> tuple[int, int, int, int, int]:
        """A write round starts (writer only): ``(file, file offset, buffer start, buffer end,
        commits)``: write buffer bytes [start, end) at that offset of that file."""
        with self.mutex:
            f_lsn = self.word("f_lsn")
            w_lsn = self.word("w_lsn")
            fill = self.word("tail") & _U32
            start = w_lsn - f_lsn if w_lsn >= f_lsn else 0
            if fill > self.bsize or start > fill:
                from ..errors import CorruptRegion

                raise CorruptRegion(f"the log region is corrupt (fill {fill}, written {start})")
            commits = self.word("pending_commits")
            self.set("pending_commits", 0)
            if fill_write and fill > start:
                self.add("st_fill_writes")
            return f_lsn >> 32, (f_lsn & _U32) + start, start, fill, commits

    def end_write(self, file: int, start: int, written_to: int, synced: bool, commits: int) -> None:
        """A write round finished (writer only): buffer bytes before ``written_to`` are in the
        file (and durable if ``synced``); move what was appended meanwhile to the front."""
        with self.mutex:
            f_lsn = self.word("f_lsn")
            tail = self.word("tail")
            fill = tail & _U32
            nbytes = written_to - start
            if nbytes > 0:
                self.add("st_writes")
                self.add("st_file_bytes", nbytes)
                begin = (file << 32) | ((f_lsn & _U32) + start)
                if begin == self.word("last_write_end") and begin & 4095:
                    self.add("st_block_rewrites")
                self.set("last_write_end", begin + nbytes)
            end = f_lsn + written_to
            self.set("w_lsn", max(self.word("w_lsn"), end))
            if synced:
                self.add("st_fsyncs")
                if end > self.word("s_lsn"):
                    self.set("s_lsn", end)
                if commits:
                    self.add("st_flushes")
                    if commits > self.word("st_max_commits"):
                        self.set("st_max_commits", commits)
                    low = self.word("st_min_commits")
                    if low == 0 or commits < low:
                        self.set("st_min_commits", commits)
            if written_to:
                rest = fill - written_to
                if rest:
                    b = self.b0
                    self.buf[b : b + rest] = bytes(self.buf[b + written_to : b + fill])
                self.set("f_lsn", end)
                self.set("tail", (tail & ~_U32) | rest)

    def switch_buffer(self, need: int) -> bool:
        """Start the next log file in the buffer (writer only) if a record of ``need`` bytes
        still does not fit in the current one and the buffer is wholly written; True if done
        or no longer needed, False if the buffer must be written first."""
        with self.mutex:
            f_lsn = self.word("f_lsn")
            tail = self.word("tail")
            fill = tail & _U32
            end = (f_lsn & _U32) + fill
            if end + need <= self.word("cur_file_size"):
                return True
            if self.word("w_lsn") < f_lsn + fill:
                return False
            new = (f_lsn >> 32) + 1
            rec = file_header(new, self.file_size, tail >> 32)
            b = self.b0
            self.buf[b : b + len(rec)] = rec
            self.set("prev_file_end", end)
            self.set("f_lsn", new << 32)
            self.set("tail", len(rec))
            self.set("cur_file_size", self.file_size)
            self.add("st_switches")
            self.add("st_records")
            self.add("st_bytes", len(rec))
            return True

    def file_switched(self, file: int, old_synced: bool) -> None:
        """Log file ``file`` now exists (preallocated), and the one before it is durable."""
        with self.mutex:
            if old_synced:
                self.add("st_fsyncs")
                old = ((file - 1) << 32) | self.word("prev_file_end")
                if old > self.word("s_lsn"):
                    self.set("s_lsn", old)
            self.set("file_ready", max(self.word("file_ready"), file))
            here = file << 32
            if self.word("w_lsn") < here:
                self.set("w_lsn", here)

    def reserve_direct(self, rtype: int, payload_len: int, pcrc: int) -> tuple[int, bytes] | NEED:
        """Make room for a record larger than the buffer, written straight to the file by the
        writer: its LSN word and header bytes, or NEED.SWITCH / NEED.SPACE (write the buffer
        out first)."""
        total = HEADER.size + payload_len
        with self.mutex:
            f_lsn = self.word("f_lsn")
            tail = self.word("tail")
            fill = tail & _U32
            off = (f_lsn & _U32) + fill
            if off + total > self.word("cur_file_size"):
                return NEED.SWITCH
            if self.word("w_lsn") < f_lsn + fill:
                return NEED.SPACE
            file = f_lsn >> 32
            prev = tail >> 32
            crc = checksum(file, off, prev, payload_len, rtype, pcrc)
            # The buffer now starts after the record; w_lsn stays before it until written.
            self.set("hole_prev", prev)
            self.set("f_lsn", (file << 32) | (off + total))
            self.set("tail", off << 32)
            self.add("st_records")
            self.add("st_bytes", total)
            return (file << 32) | off, HEADER.pack(prev, payload_len, crc, rtype)

    def direct_written(self, lsn: int, total: int) -> None:
        """The record reserved at ``lsn`` is in its file."""
        with self.mutex:
            self.add("st_writes")
            self.add("st_file_bytes", total)
            if lsn == self.word("last_write_end") and lsn & 4095:
                self.add("st_block_rewrites")
            self.set("last_write_end", lsn + total)
            if self.word("w_lsn") < lsn + total:
                self.set("w_lsn", lsn + total)

    def hole(self) -> tuple[int, int] | None:
        """A range before the buffer that was reserved but never written (a writer died in a
        direct write): ``(LSN word, bytes)``, or None."""
        w_lsn, f_lsn = self.word("w_lsn"), self.word("f_lsn")
        if w_lsn < f_lsn and w_lsn >> 32 == f_lsn >> 32:
            return w_lsn, f_lsn - w_lsn
        return None

    def set_checkpoint(self, rec: int, ckp: int) -> None:
        """Record the checkpoint record at ``rec`` (carrying ``ckp``) as the last one."""
        with self.mutex:
            self.add("st_checkpoints")
            if rec > self.word("ckp_rec"):
                self.set("ckp_rec", rec)
                self.set("ckp_lsn", ckp)

    def fail(self, file: int, code: int) -> None:
        """Remember the first failed write or fsync (read unlocked by every process)."""
        if not self.word("failed_errno"):
            self.set("failed_file", file)
            self.set("failed_errno", code or 5)

    # -- repair after a dead holder

    def repair(self) -> None:
        """A process died holding the log mutex: find the buffer's (or current ring file's)
        real end by checksum, so a half-made append is dropped and a finished one kept."""
        f_lsn = self.word("f_lsn")
        tail = self.word("tail")
        file, base_off = f_lsn >> 32, f_lsn & _U32
        if self.inmemory:
            data = self.buf[self._slot_base(file) : self._slot_base(file) + self.file_size]
            start, dbase, prev = 0, 0, None
        else:
            data = self.buf[self.b0 : self.b0 + self.bsize]
            start, dbase, prev = base_off, base_off, None
        last, end = tail >> 32, start
        for rec in scan(data, file, start, base=dbase, prev=prev):
            last, end = rec.offset, rec.end
        if self.inmemory and end == 0:
            end, last = FILE_HEADER_BYTES, 0
        self.set("tail", (last << 32) | (end - base_off))
        logger.warning("a process died holding the log mutex; the log ends at %s", LSN(file, end))


def payload_crc(payload: bytes) -> int:
    """CRC-32 of a payload, computed before the mutex is taken."""
    return zlib.crc32(payload)


_ = REC_FILE
