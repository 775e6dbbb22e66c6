"""The bytes of a log record, and finding the end of a log by checksum.

A record is a 16-byte header and its payload::

    prev   u32  offset of the previous record in the same file (0 for a file's first record)
    len    u32  payload bytes
    cksum  u32  CRC-32 of (file, offset, prev, len, type) and the payload
    type   u8   REC_FILE (file header), REC_USER, REC_CHECKPOINT or REC_PAD; 3 bytes reserved

all little-endian. The checksum covers where the record is (its file number and offset), so a
record left over from an older file (a reused slot of the in-memory ring, a block written by an
earlier incarnation) or read at the wrong offset never validates, and a run of zeros (a
preallocated, never written part of a file) is never a record: type 0 does not exist.

Every file starts with a REC_FILE record at offset 0 whose payload names the format (magic,
version), the file's size and the offset of the last record of the previous file, which lets
a cursor walk backward across files. Records never span files.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from .lsn import LSN

__all__ = [
    "FILE_HEADER_BYTES",
    "HEADER",
    "LOG_MAGIC",
    "LOG_VERSION",
    "REC_CHECKPOINT",
    "REC_FILE",
    "REC_PAD",
    "REC_USER",
    "CheckpointRecord",
    "Record",
    "checksum",
    "encode",
    "file_header",
    "parse_checkpoint",
    "parse_file_header",
    "scan",
]

HEADER = struct.Struct("<IIIB3x")
_SUM = struct.Struct("<IIIIB")
_FILE_PAYLOAD = struct.Struct("<IIII")
_CKP_PAYLOAD = struct.Struct("<QQQ")

#: "aiol" in little-endian ASCII: the first word of every log file's header record payload.
LOG_MAGIC = int.from_bytes(b"aiol", "little")
LOG_VERSION = 1

REC_FILE = 1
REC_USER = 2
REC_CHECKPOINT = 3
REC_PAD = 4
_TYPES = frozenset({REC_FILE, REC_USER, REC_CHECKPOINT, REC_PAD})

#: The file header record: where the first ordinary record of every file starts.
FILE_HEADER_BYTES = HEADER.size + _FILE_PAYLOAD.size


def checksum(file: int, offset: int, prev: int, length: int, rtype: int, payload_crc: int) -> int:
    """The record checksum, given the CRC-32 of the payload (computed outside any lock)."""
    return zlib.crc32(_SUM.pack(file, offset, prev, length, rtype), payload_crc)


def encode(file: int, offset: int, prev: int, rtype: int, payload: bytes) -> bytes:
    """A whole record (header and payload) for ``payload`` at ``(file, offset)``."""
    crc = checksum(file, offset, prev, len(payload), rtype, zlib.crc32(payload))
    return HEADER.pack(prev, len(payload), crc, rtype) + payload


def file_header(file: int, file_size: int, prev_last: int) -> bytes:
    """The REC_FILE record that starts log file ``file``."""
    payload = _FILE_PAYLOAD.pack(LOG_MAGIC, LOG_VERSION, file_size, prev_last)
    return encode(file, 0, 0, REC_FILE, payload)


def parse_file_header(payload: bytes) -> tuple[int, int]:
    """``(file_size, last record offset of the previous file)`` of a REC_FILE payload;
    raises ValueError for another format or version."""
    if len(payload) != _FILE_PAYLOAD.size:
        raise ValueError("log file header has the wrong size")
    magic, version, size, prev_last = _FILE_PAYLOAD.unpack(payload)
    if magic != LOG_MAGIC or version != LOG_VERSION:
        raise ValueError(f"not an aiodbenv log file (magic {magic:#x}, version {version})")
    return size, prev_last


class CheckpointRecord(bytes):
    """The payload of a checkpoint record, as a log cursor returns it.

    It is ``bytes`` (the record's 24-byte payload), so code that only wants ``(lsn, data)``
    keeps working; ``isinstance(data, CheckpointRecord)`` tells it from a user record, whose
    data is plain ``bytes``. ``ckp_lsn`` is where recovery would start, ``last_ckp`` the LSN
    of the previous checkpoint record (``LSN(0, 0)`` for the first) and ``time`` when it was
    taken (seconds since the epoch).
    """

    ckp_lsn: LSN
    last_ckp: LSN
    time: float

    def __new__(cls, payload: bytes) -> CheckpointRecord:
        """Parse a checkpoint payload (ValueError if it is not one)."""
        if len(payload) != _CKP_PAYLOAD.size:
            raise ValueError("a checkpoint record payload is 24 bytes")
        self = super().__new__(cls, payload)
        ckp, last, ns = _CKP_PAYLOAD.unpack(payload)
        self.ckp_lsn = LSN(ckp >> 32, ckp & 0xFFFFFFFF)
        self.last_ckp = LSN(last >> 32, last & 0xFFFFFFFF)
        self.time = ns / 1e9
        return self

    def __repr__(self) -> str:
        return f"CheckpointRecord(ckp_lsn={self.ckp_lsn}, last_ckp={self.last_ckp})"


def checkpoint_payload(ckp_word: int, last_word: int, time_ns: int) -> bytes:
    """The payload of a checkpoint record (LSNs as packed words)."""
    return _CKP_PAYLOAD.pack(ckp_word, last_word, time_ns)


def parse_checkpoint(payload: bytes) -> CheckpointRecord:
    """A checkpoint record's payload, parsed."""
    return CheckpointRecord(payload)


@dataclass(frozen=True)
class Record:
    """One record found by :func:`scan`: its offset in its file, type, prev and payload."""

    offset: int
    rtype: int
    prev: int
    payload: bytes

    @property
    def end(self) -> int:
        """The offset one past the record."""
        return self.offset + HEADER.size + len(self.payload)


def read_one(
    data: bytes | memoryview, base: int, file: int, offset: int, limit: int
) -> Record | None:
    """The record at file offset ``offset`` if ``data`` (file bytes from offset ``base``)
    holds a valid one ending at or before ``limit``; else None."""
    rel = offset - base
    if rel < 0 or rel + HEADER.size > len(data) or offset + HEADER.size > limit:
        return None
    prev, length, crc, rtype = HEADER.unpack_from(data, rel)
    if rtype not in _TYPES:
        return None
    end = rel + HEADER.size + length
    if end > len(data) or offset + HEADER.size + length > limit:
        return None
    payload = bytes(data[rel + HEADER.size : end])
    if checksum(file, offset, prev, length, rtype, zlib.crc32(payload)) != crc:
        return None
    return Record(offset, rtype, prev, payload)


def scan(
    data: bytes | memoryview,
    file: int,
    start: int,
    *,
    base: int = 0,
    prev: int | None = None,
    limit: int | None = None,
) -> Iterator[Record]:
    """The valid records of ``file`` from offset ``start`` on, in order, stopping at the first
    that fails its header, checksum or back link. ``data`` holds the file's bytes from offset
    ``base``; ``prev`` is the offset of the record before ``start`` (None: not checked for
    the first one); ``limit`` is an offset no record may pass."""
    end_limit = base + len(data) if limit is None else min(limit, base + len(data))
    offset = start
    while True:
        rec = read_one(data, base, file, offset, end_limit)
        if rec is None or (prev is not None and rec.prev != prev):
            return
        yield rec
        prev = rec.offset
        offset = rec.end
