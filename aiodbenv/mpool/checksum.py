"""Page checksums (Berkeley DB's ``DB_CHKSUM``), for files opened with ``checksum=True``.

Where the checksum lives: in the last :data:`TRAILER` (8) bytes of every page of such a file.
The pool hands out ``page_size - 8`` bytes as ``page.data``; the trailer is the pool's, set on
the copy that write-back writes (after pgout) and checked when the page is read back (before
pgin). It holds the CRC-32 of the page's other bytes, seeded with the page number (so a page
written at the wrong offset fails too), in its low four bytes, and a marker in the high four.

A page that is all zeros is accepted: a page never written (a hole, or past a file extension
the pool made) reads as zeros, and has no trailer. Any other page whose trailer does not match
raises :class:`~aiodbenv.errors.PageCorrupt` naming the file and page.

zlib's CRC-32 runs at several GB/s, so the cost is one pass over each page read from or
written to disk; hits in the cache pay nothing.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

__all__ = ["TRAILER", "seal", "seal_pages", "verify"]

#: Bytes reserved at the end of each page of a checksummed file.
TRAILER = 8
#: The trailer's high half: marks a page sealed by aiodbenv ("CK" plus a version byte).
_MARK = 0x00014B43


def _sum(pgno: int, body: memoryview) -> int:
    return zlib.crc32(body, zlib.crc32(pgno.to_bytes(8, "little")))


def seal(pgno: int, page: memoryview) -> None:
    """Write the trailer of ``page`` (the whole page, trailer included), in place."""
    body = page[:-TRAILER]
    page[-TRAILER:] = ((_MARK << 32) | _sum(pgno, body)).to_bytes(TRAILER, "little")


def seal_pages(pgnos: Sequence[int], pages: Sequence[memoryview]) -> None:
    """:func:`seal` each page of a run about to be written."""
    for pgno, page in zip(pgnos, pages):
        seal(pgno, page)


def verify(pgno: int, page: memoryview) -> bool:
    """True if ``page`` (whole, as read) carries the right trailer for ``pgno``, or is all
    zeros (never written)."""
    stored = int.from_bytes(page[-TRAILER:], "little")
    if stored == 0:
        return page.tobytes().count(0) == len(page)
    return stored == (_MARK << 32) | _sum(pgno, page[:-TRAILER])
