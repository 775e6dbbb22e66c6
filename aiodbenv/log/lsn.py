"""Log sequence numbers: where a record lives in the log (Berkeley DB's ``DB_LSN``).

An :class:`LSN` is ``(file, offset)``: the number of the log file (``log.0000000001`` is file 1)
and the byte offset of the record in it. LSNs order like ``log_compare``: by file, then offset,
which is what a ``NamedTuple`` of two ints does already. In the region and in hot comparisons an
LSN is one 64-bit word, ``file << 32 | offset`` (:func:`pack_word`): one word can be read and
written by another process without tearing, and comparing two words compares the LSNs.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import InvalidArgument

__all__ = ["LSN", "ZERO_LSN", "checked_word", "pack_word", "unpack_word"]

_U32 = 0xFFFFFFFF
_ON_PAGE = struct.Struct("<II")


class LSN(NamedTuple):
    """A log sequence number: log file ``file`` (1-based), byte ``offset`` in it.

    Ordered like Berkeley DB's ``log_compare`` (file, then offset). ``LSN(0, 0)`` means "not
    logged": a page carrying it needs no log flush before it is written.
    """

    file: int
    offset: int

    def pack(self) -> bytes:
        """The 8 bytes kept on a page: ``file`` then ``offset``, each a little-endian u32."""
        return _ON_PAGE.pack(self.file, self.offset)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> LSN:
        """The LSN stored as 8 bytes at ``offset`` of ``buf`` (the inverse of :meth:`pack`)."""
        file, off = _ON_PAGE.unpack_from(buf, offset)
        return cls(file, off)

    def __str__(self) -> str:
        return f"{self.file}/{self.offset}"


#: "Not logged" (Berkeley DB's ZERO_LSN).
ZERO_LSN = LSN(0, 0)


def checked_word(lsn: object, what: str) -> int:
    """:func:`pack_word` of an LSN a caller gave ``what`` (a method's name): anything but a
    pair of u32 ints is InvalidArgument ("1/2" failed as a bare TypeError, LSN(-1, 0) packed
    to a word before every real LSN)."""
    if not (
        isinstance(lsn, tuple)
        and len(lsn) == 2
        and all(type(x) is int and 0 <= x <= _U32 for x in lsn)
    ):
        raise InvalidArgument(f"{what}: lsn must be an aiodbenv.LSN, not {lsn!r}")
    return pack_word(lsn)


def pack_word(lsn: LSN | tuple[int, int]) -> int:
    """``lsn`` as one 64-bit word, ``file << 32 | offset`` (ordered like the LSN)."""
    return (lsn[0] << 32) | lsn[1]


def unpack_word(word: int) -> LSN:
    """The LSN of a word made by :func:`pack_word`."""
    return LSN(word >> 32, word & _U32)
