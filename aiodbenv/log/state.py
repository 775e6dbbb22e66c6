"""The log region's shared state as one process sees it: the header's words, the checks made
before following them, the last checkpoint, a failed write, and the repair after a process
died holding the log mutex. :mod:`aiodbenv.log.rounds` (the writer's bookkeeping) and
:mod:`aiodbenv.log.core` (appending, the in-memory ring) build on it.

Each method takes the log mutex for a few microseconds on the calling thread (the event
loop's: robust mutexes belong to the thread that locked them) and never does I/O under it.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import zlib
from typing import Any

from ..errors import CorruptRegion, InvalidArgument
from ..region.backing import Region
from ..region.mutex import NullMutex, SharedMutex
from ..region.registry import process_start_time
from .layout import DIR_BYTES, LOG_HEADER, LOG_REGION_MAGIC, buffer_offset, header_offset
from .lsn import LSN
from .record import (
    FILE_HEADER_BYTES,
    file_header,
    scan,
)

__all__ = ["NEED", "LogState", "format_log_region", "payload_crc"]

logger = logging.getLogger("aiodbenv")

_tokens = itertools.count(1)
_W = LOG_HEADER.word
_U32 = 0xFFFFFFFF


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


class LogState:
    """One process's view of the log region: its words and checks."""

    def __init__(self, region: Region, shared: bool, panic: Any) -> None:
        self.region = region
        self.w = region.words
        self.buf = region.buf
        self.kept = False  # keep_mapped: these views outlive the region's
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
            raise CorruptRegion(
                f"the log region is corrupt (buffer {bsize}, file size {fsize}, fill {fill})"
            )

    # -- words

    def keep_mapped(self) -> None:
        """Closing while this process's log thread still works in the region (a disk slower
        than ``wait_timeout``): use views of this object's own from now on. They keep the
        region mapped when it is detached, so the late write still publishes, unlocks the
        mutex and lets the writer role go. Callers still waiting read them too, so they go
        with this object (the handle), not at a moment a thread could pick."""
        self.w, self.buf = self.w[:], self.buf[:]
        self.kept = True
        if isinstance(self.mutex, SharedMutex):
            self.mutex.rebind(self.w)

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
        """The next LSN to be written, as a packed word. Exact only under the log mutex
        (a write round changes both words under it); unlocked, a hint."""
        return self.word("f_lsn") + (self.word("tail") & _U32)

    def end_word_locked(self) -> int:
        """:meth:`end_word`, exact: read under the log mutex (bounded as every lock is)."""
        with self.mutex:
            return self.end_word()

    def last_word_locked(self) -> int:
        """:meth:`last_word`, exact: read under the log mutex (a file switch stores the two
        words it sums one after the other)."""
        with self.mutex:
            return self.last_word()

    def last_word(self) -> int:
        """The LSN of the last record appended (a file header record after a switch). Exact
        only under the log mutex; unlocked, a hint."""
        f = self.word("f_lsn") >> 32
        return (f << 32) | (self.word("tail") >> 32)

    def _slot_base(self, file: int) -> int:
        """In memory: the region offset where "file" ``file`` starts in the ring."""
        return self.b0 + ((file - 1) % self.nslots) * self.file_size

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
