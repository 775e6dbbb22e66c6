"""Appending to the log, and the in-memory log's ring of "files".

:class:`LogCore` is what the async shell (:mod:`aiodbenv.log.log`) uses: the region's state
(:mod:`aiodbenv.log.state`), the writer's critical sections (:mod:`aiodbenv.log.rounds`), and
here the hot path of every put and the ring. Each method locks the log mutex for a few
microseconds on the event loop and does no I/O.
"""

from __future__ import annotations

import logging
import struct
import zlib

from ..errors import LogBufferFull
from ..region.mutex import STEP_WAIT
from ..region.mutex import trylock as _trylock
from ..region.mutex import unlock as _unlock
from .layout import LOG_HEADER
from .lsn import unpack_word
from .record import (
    HEADER,
    REC_CHECKPOINT,
    file_header,
    parse_file_header,
    read_one,
)
from .reserve import LogReserve
from .rounds import LogRounds
from .state import NEED

__all__ = ["NEED", "LogCore"]

logger = logging.getLogger("aiodbenv")

_W = LOG_HEADER.word
_U32 = 0xFFFFFFFF
_F_LSN, _TAIL, _CUR_SIZE = _W.f_lsn, _W.tail, _W.cur_file_size
_ST_RECORDS, _ST_BYTES = _W.st_records, _W.st_bytes
_S_LSN, _W_LSN = _W.s_lsn, _W.w_lsn
_RSV_TOTAL = _W.rsv_total
_HDR_SIZE = HEADER.size
_HDR_PACK = HEADER.pack
_SUM_PACK = struct.Struct("<IIIIB").pack
_crc32 = zlib.crc32


class LogCore(LogRounds, LogReserve):
    """One process's view of the log region (what :class:`~aiodbenv.Log` works on)."""

    def append(self, rtype: int, payload: bytes, pcrc: int, release: int = 0) -> int | NEED:
        """Append a record; its LSN as a packed word, or why it must wait (file log). In
        memory, starts the next "file" of the ring when needed; raises LogBufferFull if that
        would overwrite a "file" a checkpoint still needs, or (while transactions hold
        reservations, :mod:`aiodbenv.log.reserve`) eat into their reserved space. ``release``:
        the commit record of a transaction that reserved that many bytes in this handle's
        slot: never refused for them, and they are released with the append (in memory). A
        held mutex is waited for :data:`~aiodbenv.region.mutex.STEP_WAIT` at most (then
        LockTimeout, nothing done).

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
            if self.inmemory and w[h + _RSV_TOTAL] and not release:
                # A checkpoint record's payload starts with its ckp_lsn word.
                ckp = int.from_bytes(payload[:8], "little") if rtype == REC_CHECKPOINT else None
                self.check_put_locked(total, ckp)
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
            if release and self.inmemory:
                self.release_locked(self.rsv_slot, release)
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
            rec = read_one(data, 0, file, offset, limit)
            if rec is None:
                return None
            return rec.rtype, rec.prev, rec.payload

    def mem_ranges(self, old: int, new: int) -> list[tuple[int, int, bytes]]:
        """In memory: the ring's bytes from LSN word ``old`` up to ``new``, split per "file"
        (the end of a full "file" is found from the next one's header)."""
        out: list[tuple[int, int, bytes]] = []
        with self.mutex:
            f = max(old >> 32, self.word("first_file"))
            while f <= new >> 32:
                lo = old & _U32 if f == old >> 32 else 0
                hi = new & _U32 if f == new >> 32 else self._mem_file_end(f)
                base = self._slot_base(f)
                if hi > lo:
                    out.append(
                        ((f << 32) | lo, (f << 32) | hi, bytes(self.buf[base + lo : base + hi]))
                    )
                f += 1
        return out

    def _mem_file_end(self, f: int) -> int:
        """In memory, under the mutex: where the data of full "file" ``f`` ends."""
        nxt = self._slot_base(f + 1)
        head = read_one(self.buf[nxt : nxt + self.file_size], 0, f + 1, 0, self.file_size)
        if head is None:
            return 0
        _, last = parse_file_header(head.payload)
        base = self._slot_base(f)
        rec = read_one(self.buf[base : base + self.file_size], 0, f, last, self.file_size)
        return rec.end if rec is not None else 0

    def mem_file_range(self) -> tuple[int, int]:
        """In memory: (oldest, newest) "file" in the ring."""
        with self.mutex:
            return self.word("first_file"), self.word("f_lsn") >> 32
