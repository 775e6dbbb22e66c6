"""A commit's log record: the changed byte ranges (or full images) of every page, in one record.

A committed transaction is exactly one log record (one ``log.put``), so the log's record
checksum is the commit record: a batch whose record is intact is committed entirely, one whose
record is torn or missing is not there at all. Its LSN is the commit LSN stamped on the pages.

Layout (little-endian)::

    magic  b"\\0aiodbenv-txn1"      (16 bytes; log records of users must not begin with it)
    u32 nfiles, u32 npages
    nfiles x  fileid[20] u32 page_size u32 data_size i32 lsn_offset u16 path_len path(utf-8)
    npages x  u16 file  u64 pgno  u8 kind  then
              kind FULL: data_size bytes;  kind FRAGS: u32 n, n x (u32 off, u32 len, bytes)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ..region.mutex import ffi, speedups

__all__ = [
    "FRAGS",
    "FRAG_CHUNK",
    "FULL",
    "HEADER_SIZE",
    "MAGIC",
    "BatchFile",
    "BatchPage",
    "decode",
    "diff",
    "diff_py",
    "encode",
    "is_batch",
    "worst_size",
]

MAGIC = b"\0aiodbenv-txn1\0\0"
FRAGS = 0
FULL = 1

#: Pages are compared in chunks of this many bytes: a fragment covers whole chunks (a few
#: bytes more than the change, for a compare that runs at memcmp speed in Python).
FRAG_CHUNK = 64

#: The compiled diff (None: the Python twin runs), used for pages of up to _MAX_C bytes.
_c_diff: Any = getattr(speedups, "aiodb_txn_diff", None) if speedups is not None else None
_ffi = ffi
_MAX_C = 1 << 20

_HEAD = struct.Struct("<16sII")
#: Bytes of a batch record before its files and pages.
HEADER_SIZE = _HEAD.size
_FILE = struct.Struct("<20sIIiH")
_PAGE = struct.Struct("<HQB")
_U32 = struct.Struct("<I")
_FRAG = struct.Struct("<II")


@dataclass(frozen=True)
class BatchFile:
    """A file a batch changes: its id, sizes, where its page LSN is, and its path."""

    fileid: bytes
    page_size: int
    data_size: int
    lsn_offset: int
    path: str


@dataclass
class BatchPage:
    """One page of a batch: ``file`` indexes the batch's files; ``full`` is a whole image, else
    ``frags`` are ``(offset, bytes)`` ranges."""

    file: int
    pgno: int
    full: bytes | None = None
    frags: list[tuple[int, bytes]] = field(default_factory=list)


def diff(old: memoryview | bytes, new: memoryview | bytes) -> list[tuple[int, int]]:
    """The ``(start, end)`` ranges where ``new`` differs from ``old`` (same length), in whole
    :data:`FRAG_CHUNK` chunks (the last may be shorter), adjacent ones merged: compiled
    (``aiodb_txn_diff``) when the accelerator is in use, else :func:`diff_py`."""
    n = len(old)
    if _c_diff is None or n > _MAX_C:
        return diff_py(old, new)
    # Ranges alternate with unchanged chunks: at most one per two chunks, plus one.
    most = n // (2 * FRAG_CHUNK) + 1
    out = _ffi.new("uint32_t[]", 2 * most)
    k = _c_diff(_ffi.from_buffer(old), _ffi.from_buffer(new), n, FRAG_CHUNK, out, most)
    if k < 0:  # pragma: no cover - cannot happen: `most` is the most there can be
        return diff_py(old, new)
    return [(out[2 * i], out[2 * i + 1]) for i in range(k)]


def diff_py(old: memoryview | bytes, new: memoryview | bytes) -> list[tuple[int, int]]:
    """:func:`diff` in Python (the compiled one's twin). Halves are compared recursively, so
    an unchanged stretch costs one memcmp however long it is (a small change to a 4 KiB page:
    about a dozen compares)."""
    out: list[tuple[int, int]] = []

    def walk(lo: int, hi: int) -> None:
        if old[lo:hi] == new[lo:hi]:
            return
        if hi - lo <= FRAG_CHUNK:
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
            return
        # Split on a chunk boundary, so fragments always cover whole chunks.
        mid = lo + ((hi - lo) // 2 + FRAG_CHUNK - 1) // FRAG_CHUNK * FRAG_CHUNK
        walk(lo, mid)
        walk(mid, hi)

    walk(0, len(old))
    return out


def worst_size(data_size: int, path: str) -> int:
    """The most bytes one page of ``data_size`` bytes (of a file named ``path``) can add to a
    batch: its file entry and a full image."""
    return _FILE.size + len(path.encode("utf-8", "surrogateescape")) + _PAGE.size + data_size


def encode(files: list[BatchFile], pages: list[BatchPage]) -> bytes:
    """The log record of a batch."""
    parts = [_HEAD.pack(MAGIC, len(files), len(pages))]
    for f in files:
        raw = f.path.encode("utf-8", "surrogateescape")
        parts.append(_FILE.pack(f.fileid, f.page_size, f.data_size, f.lsn_offset, len(raw)))
        parts.append(raw)
    for p in pages:
        if p.full is not None:
            parts.append(_PAGE.pack(p.file, p.pgno, FULL))
            parts.append(p.full)
        else:
            parts.append(_PAGE.pack(p.file, p.pgno, FRAGS))
            parts.append(_U32.pack(len(p.frags)))
            for off, data in p.frags:
                parts.append(_FRAG.pack(off, len(data)))
                parts.append(data)
    return b"".join(parts)


def is_batch(data: bytes) -> bool:
    """True if a log record is a transaction's batch."""
    return data[:16] == MAGIC


def decode(data: bytes) -> tuple[list[BatchFile], list[BatchPage]]:
    """The files and pages of a batch record; ValueError if it is malformed (every length is
    checked against the record before it is followed)."""
    mv = memoryview(data)
    if len(mv) < _HEAD.size:
        raise ValueError("batch record shorter than its header")
    magic, nfiles, npages = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ValueError("not a transaction batch")
    pos = _HEAD.size
    files: list[BatchFile] = []

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(mv):
            raise ValueError("batch record ends inside a field")
        out = bytes(mv[pos : pos + n])
        pos += n
        return out

    for _ in range(nfiles):
        fileid, ps, ds, lsn_off, plen = _FILE.unpack(take(_FILE.size))
        if not 0 < ds <= ps or not 0 <= lsn_off <= ds - 8:
            raise ValueError("batch file entry out of range")
        path = take(plen).decode("utf-8", "surrogateescape")
        files.append(BatchFile(fileid, ps, ds, lsn_off, path))
    pages: list[BatchPage] = []
    for _ in range(npages):
        fi, pgno, kind = _PAGE.unpack(take(_PAGE.size))
        if fi >= nfiles:
            raise ValueError("batch page names no file")
        ds = files[fi].data_size
        if kind == FULL:
            pages.append(BatchPage(fi, pgno, full=take(ds)))
        elif kind == FRAGS:
            (n,) = _U32.unpack(take(4))
            frags = []
            for _ in range(n):
                off, ln = _FRAG.unpack(take(_FRAG.size))
                if off + ln > ds:
                    raise ValueError("batch fragment past the page")
                frags.append((off, take(ln)))
            pages.append(BatchPage(fi, pgno, frags=frags))
        else:
            raise ValueError(f"batch page of unknown kind {kind}")
    if pos != len(mv):
        raise ValueError("batch record has trailing bytes")
    return files, pages
