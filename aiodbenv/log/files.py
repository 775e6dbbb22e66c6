"""Log files on disk: names, listing, creating (preallocated), and finding the end of the log.

All system calls go through :mod:`aiodbenv._io` (the fault-injection seam); every function
here blocks and runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from .. import _io
from .record import (
    FILE_HEADER_BYTES,
    REC_CHECKPOINT,
    REC_FILE,
    file_header,
    parse_file_header,
    read_one,
    scan,
)

__all__ = ["LogEnd", "create_log_file", "file_name", "find_end", "list_log_files", "log_path"]

logger = logging.getLogger("aiodbenv")

_NAME = re.compile(r"^log\.(\d{10})$")


def file_name(n: int) -> str:
    """The name of log file ``n``: ``log.0000000001`` for 1 (Berkeley DB's ``LFNAME``)."""
    return f"log.{n:010d}"


def log_path(directory: str, n: int) -> str:
    """The path of log file ``n`` in ``directory``."""
    return os.path.join(directory, file_name(n))


def list_log_files(directory: str) -> list[int]:
    """The numbers of the log files in ``directory``, ascending."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m and int(m.group(1)) > 0)


def fsync_dir(directory: str) -> None:
    """Make a new file's directory entry durable."""
    fd = _io.open_file(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _io.fsync(fd)
    finally:
        os.close(fd)


def create_log_file(directory: str, n: int, size: int, mode: int, header: bytes | None) -> int:
    """Create log file ``n`` (or reuse an empty one), preallocate ``size`` bytes so later
    fdatasyncs need no size change, and write ``header`` at offset 0 if given (then fdatasync).
    The directory entry is made durable. Returns the open descriptor."""
    fd = _io.open_file(log_path(directory, n), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        _io.fallocate(fd, 0, size)
        if header is not None:
            if _io.pwritev(fd, [header], 0) != len(header):
                raise OSError(5, f"short write of the header of {file_name(n)}")
            _io.fdatasync(fd)
        fsync_dir(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(directory: str, n: int) -> bytes:
    """The whole of log file ``n``."""
    fd = _io.open_file(log_path(directory, n), os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        pos = 0
        while pos < size:
            chunk = _io.pread(fd, min(size - pos, 8 << 20), pos)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass
class LogEnd:
    """What opening found: the last file, where its data ends, its last record, its size, the
    bytes of a torn or corrupt tail cut off, and the newest checkpoint (record LSN, ckp_lsn
    as packed words, 0 if none)."""

    file: int
    end: int
    last_off: int
    file_size: int
    dropped: int
    ckp_rec: int
    ckp_lsn: int


def _scan_file(data: bytes, n: int) -> tuple[int, int, int, list[tuple[int, int]]] | None:
    """(end, last record offset, file size, checkpoints [(offset, ckp_lsn word)]) of a file's
    data, or None if it has no valid header record."""
    head = read_one(data, 0, n, 0, len(data))
    if head is None or head.rtype != REC_FILE:
        return None
    try:
        size, _ = parse_file_header(head.payload)
    except ValueError:
        return None
    end, last = head.end, 0
    ckps: list[tuple[int, int]] = []
    for rec in scan(data, n, FILE_HEADER_BYTES, prev=0, limit=size):
        end, last = rec.end, rec.offset
        if rec.rtype == REC_CHECKPOINT and len(rec.payload) >= 8:
            ckps.append((rec.offset, int.from_bytes(rec.payload[:8], "little")))
    return end, last, size, ckps


def find_end(directory: str, file_size: int, mode: int) -> LogEnd:
    """Find the end of the log in ``directory`` by checksum, cutting off a torn or corrupt tail
    (zeroed on disk and fdatasynced, logged at WARNING with the bytes dropped); create
    ``log.0000000001`` if there is no log. Blocks: run it in a worker thread."""
    numbers = list_log_files(directory)
    if not numbers:
        fd = create_log_file(directory, 1, file_size, mode, file_header(1, file_size, 0))
        os.close(fd)
        return LogEnd(1, FILE_HEADER_BYTES, 0, file_size, 0, 0, 0)
    n = numbers[-1]
    data = read_file(directory, n)
    found = _scan_file(data, n)
    if found is None:
        # Created but its header never reached the disk (a crash right after a switch):
        # start it again after the previous file's last record.
        prev_last = 0
        if n - 1 in numbers:
            before = _scan_file(read_file(directory, n - 1), n - 1)
            prev_last = before[1] if before is not None else 0
        dropped = len(data.rstrip(b"\0"))
        if dropped:
            logger.warning(
                "log file %s has no valid header: %d byte(s) dropped, file started again",
                log_path(directory, n),
                dropped,
            )
        fd = _io.open_file(log_path(directory, n), os.O_RDWR | os.O_CLOEXEC)
        try:
            if dropped:
                _zero(fd, 0, dropped)
        finally:
            os.close(fd)
        fd = create_log_file(directory, n, file_size, mode, file_header(n, file_size, prev_last))
        os.close(fd)
        ckps: list[tuple[int, int]] = []
        end, last, size = FILE_HEADER_BYTES, 0, file_size
    else:
        end, last, size, ckps = found
        dropped = max(0, len(data.rstrip(b"\0")) - end)
        if dropped:
            logger.warning(
                "log file %s: torn or corrupt tail after %d/%d cut off, %d byte(s) dropped",
                log_path(directory, n),
                n,
                end,
                dropped,
            )
            fd = _io.open_file(log_path(directory, n), os.O_RDWR | os.O_CLOEXEC)
            try:
                _zero(fd, end, dropped)
            finally:
                os.close(fd)
    ckp_rec = ckp_lsn = 0
    if ckps:
        ckp_rec, ckp_lsn = (n << 32) | ckps[-1][0], ckps[-1][1]
    else:
        for m in reversed([x for x in numbers if x < n]):
            earlier = _scan_file(read_file(directory, m), m)
            if earlier is not None and earlier[3]:
                ckp_rec, ckp_lsn = (m << 32) | earlier[3][-1][0], earlier[3][-1][1]
                break
    return LogEnd(n, end, last, size, dropped, ckp_rec, ckp_lsn)


def _zero(fd: int, offset: int, length: int) -> None:
    """Overwrite ``length`` bytes at ``offset`` with zeros and fdatasync: a cut-off tail must
    not come back as records once new ones are appended before it."""
    zeros = bytes(min(length, 1 << 20))
    pos = offset
    while pos < offset + length:
        n = min(len(zeros), offset + length - pos)
        if _io.pwritev(fd, [zeros[:n]], pos) != n:
            raise OSError(5, "short write zeroing a torn log tail")
        pos += n
    _io.fdatasync(fd)
