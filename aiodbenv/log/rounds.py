"""The writer's bookkeeping in the log region: the writer role (one process at a time writes
the log files), the start and end of a write round, switching to the next file, records
written straight to their file, and flush calls waiting (group commit).

Each method is one short critical section under the log mutex; the I/O between them is done
by :mod:`aiodbenv.log.writer` in worker threads without the mutex.
"""

from __future__ import annotations

import logging
import time

from ..errors import CorruptRegion
from ..region.registry import process_start_time
from .layout import LOG_HEADER
from .record import (
    HEADER,
    checksum,
    file_header,
)
from .state import NEED, LogState

__all__ = ["LogRounds"]

logger = logging.getLogger("aiodbenv")

_W = LOG_HEADER.word
_U32 = 0xFFFFFFFF

#: How long a writer found alive is taken to be alive without looking again (seconds). Each
#: look reads /proc/PID/stat (30-70 us); a process whose flush waits for another's round
#: asked at every wake-up, once per record under group commit. A writer that dies is still
#: noticed within this time (plus the waiter's futex timeout).
_ALIVE_TTL = 0.02


class LogRounds(LogState):
    """The log region's state, with the writer's critical sections."""

    def register_commit(self) -> None:
        """Count a flush call waiting for the next flush (commits per flush)."""
        with self.mutex:
            self.add("pending_commits")

    def register_write(self, word: int) -> None:
        """A write-through call waits for the record at ``word`` to be written (by whichever
        process writes next: write-only requests are batched across processes too)."""
        with self.mutex:
            if word > self.word("want_write"):
                self.set("want_write", word)

    def write_wanted(self) -> bool:
        """Is a write-through call of some process waiting for a write (read unlocked)?"""
        return self.word("want_write") >= self.word("w_lsn")

    def role_holder(self) -> tuple[int, int]:
        """(pid, start time) of the process writing the files now, (0, 0) if none."""
        return self.word("flusher_pid"), self.word("flusher_start")

    def _holder(self) -> tuple[int, int, int]:
        return self.word("flusher_pid"), self.word("flusher_start"), self.word("flusher_token")

    _alive_seen: dict[int, tuple[int, float]] | None = None  # pid: (start, when) found alive

    def holder_alive(self, pid: int, start: int) -> bool:
        """Is the writer ``(pid, start)`` still running? (A recycled pid is not it.) A writer
        found alive less than ``_ALIVE_TTL`` ago is taken to be still alive (the role moves
        between the processes flushing: each is remembered)."""
        if pid == self.pid:
            return True
        now = time.monotonic()
        seen = self._alive_seen
        if seen is None:
            seen = self._alive_seen = {}
        hit = seen.get(pid)
        if hit is not None and hit[0] == start and now - hit[1] < _ALIVE_TTL:
            return True
        began = process_start_time(pid)
        alive = began != 0 and (start == 0 or began == start)
        if alive:
            if len(seen) > 64:
                seen.clear()
            seen[pid] = (start, now)
        else:
            seen.pop(pid, None)
        return alive

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
                self.add("flush_seq")

    def begin_write(self, fill_write: bool) -> tuple[int, int, int, int, int]:
        """A write round starts (writer only): ``(file, file offset, buffer start, buffer end,
        commits)``: write buffer bytes [start, end) at that offset of that file."""
        with self.mutex:
            f_lsn = self.word("f_lsn")
            w_lsn = self.word("w_lsn")
            fill = self.word("tail") & _U32
            start = w_lsn - f_lsn if w_lsn >= f_lsn else 0
            if fill > self.bsize or start > fill:
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
            self.add("flush_seq")
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
            self.add("flush_seq")
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
            self.add("flush_seq")
            if self.word("w_lsn") < lsn + total:
                self.set("w_lsn", lsn + total)

    def hole(self) -> tuple[int, int] | None:
        """A range before the buffer that was reserved but never written (a writer died in a
        direct write): ``(LSN word, bytes)``, or None."""
        w_lsn, f_lsn = self.word("w_lsn"), self.word("f_lsn")
        if w_lsn < f_lsn and w_lsn >> 32 == f_lsn >> 32:
            return w_lsn, f_lsn - w_lsn
        return None
