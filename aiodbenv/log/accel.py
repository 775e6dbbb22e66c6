"""The compiled log append (aiodbenv/_csrc/60_log.c), configured per log handle.

:func:`fast_put` returns a :class:`FastPut` for a log handle when the compiled accelerator is
in use, else None (``AIODBENV_MUTEX=abi``, or no compiler at install time): then every put
runs :meth:`~aiodbenv.log.core.LogCore.append`, its complete Python twin. The compiled call
does only the common append (room in the buffer, the mutex free); everything else (buffer full,
the next file, an in-memory log with commit space reserved (:mod:`aiodbenv.log.reserve`), a
record larger than the buffer, a held mutex, a dead holder) is handed back and done by the
Python path, so both paths share one implementation of the rare cases.
"""

from __future__ import annotations

import errno
from typing import Any

from ..region.mutex import ffi, speedups
from .layout import LOG_HEADER

__all__ = ["COMPILED", "HALF", "PYTHON", "FastPut", "crc32", "fast_put"]

#: True when puts go through the compiled append.
COMPILED = speedups is not None and hasattr(speedups, "aiodb_log_put")
#: Result bit of the compiled append: the buffer is now more than half full.
HALF = (1 << 62) if not COMPILED else int(speedups.AIODB_LOG_HALF)
#: Result of the compiled append: nothing done, take the Python path.
PYTHON = -2000 if not COMPILED else int(speedups.AIODB_LOG_PYTHON)
#: Result of the compiled append: a header word failed its bounds check.
CORRUPT = -1000000 if not COMPILED else int(speedups.AIODB_CORRUPT)
#: Result of the compiled append: the mutex's holder died; it is held, nothing was done.
OWNER_DEAD = -errno.EOWNERDEAD

_W = LOG_HEADER.word


class FastPut:
    """The compiled append's arguments for one log handle:
    ``fn(args, rtype, data, len(data))`` appends."""

    __slots__ = ("args", "fn", "keep")

    def __init__(self, core: Any) -> None:
        h = core.h
        half = core.bsize // 2 if not core.inmemory else 1 << 62
        ptr = core.mutex.ptr
        values = [
            int(ffi.cast("uintptr_t", core.region.base)),
            int(ffi.cast("uintptr_t", ptr)) if ptr is not None else 0,
            core.b0,
            core.bsize,
            int(core.inmemory),
            core.nslots,
            core.file_size,
            half,
            core.mutex.nowait_index,
            h + _W.f_lsn,
            h + _W.tail,
            h + _W.cur_file_size,
            h + _W.st_records,
            h + _W.st_bytes,
            h + _W.rsv_total,
        ]
        # The addresses stay valid while the region is mapped: the handle drops this object
        # (its puts go the Python way) when it closes, before the region is unmapped.
        self.keep = (core.region, ptr)
        self.args = ffi.new("uint64_t[]", values)
        self.fn = speedups.aiodb_log_put


def fast_put(core: Any) -> FastPut | None:
    """The compiled append for ``core`` (a :class:`~aiodbenv.log.core.LogCore`), or None."""
    return FastPut(core) if COMPILED else None


def crc32(data: bytes) -> int:
    """The compiled CRC-32 of ``data`` (for tests: it must equal ``zlib.crc32``)."""
    if not COMPILED:
        raise RuntimeError("the compiled accelerator is not in use")
    return int(speedups.aiodb_log_crc32(data, len(data)))
