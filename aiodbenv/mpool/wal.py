"""The write-ahead rule in write-back (Berkeley DB's ``__memp_pgwrite`` log check).

Before a batch of page copies reaches its files, the environment's log is made durable up to
the largest LSN those pages carry: one flush per batch, through the narrow
:class:`~aiodbenv.mpool.bh.LogHooks` the environment set on the pool's
:class:`~aiodbenv.mpool.bh.BufferIO` (the pool never imports the log package). A page's LSN is
the 8 bytes at its file's ``lsn_offset``: file then offset, each a little-endian u32.

Two kinds of page need no flush, as in Berkeley DB: one carrying ``LSN(0, 0)`` ("not
logged"; Berkeley DB panics on it when no log byte is on disk yet, aiodbenv skips it), and
every page of a file opened without ``lsn_offset`` (the pool cannot know where its LSN is: such
a file's pages are written without regard to the log).
"""

from __future__ import annotations

import struct

from .bh import BufferIO
from .cache import BufRef
from .layout import FILE_ENTRY

__all__ = ["flush_log_for", "page_lsns", "written_lsn"]

_LSN = struct.Struct("<II")

#: ``(file slot, pgno) -> (log file, offset)`` of the pages of a batch that carry an LSN.
PageLsns = dict[tuple[int, int], tuple[int, int]]


def page_lsns(io: BufferIO, taken: list[tuple[BufRef, memoryview]]) -> PageLsns:
    """The LSNs of the pages of ``taken`` whose file has an ``lsn_offset``, read from the
    copies about to be written (so the LSN checked is the one written)."""
    core = io.core
    w0 = core.meta_words
    offsets: dict[int, int] = {}
    out: PageLsns = {}
    for item, copy in taken:
        fidx = item[0]
        off = offsets.get(fidx)
        if off is None:
            e = core.entry(fidx)
            off = offsets[fidx] = int(w0[e + FILE_ENTRY.word.lsn_offset]) - 1 if e else -1
        # Checked against the copy's size: the offset was read from shared memory.
        if 0 <= off <= len(copy) - _LSN.size:
            out[(fidx, item[1])] = _LSN.unpack_from(copy, off)
    return out


async def flush_log_for(io: BufferIO, taken: list[tuple[BufRef, memoryview]]) -> PageLsns:
    """Make the log durable up to the largest page LSN of ``taken`` (none if every page is
    unlogged); returns the pages' LSNs. Raises what the log's flush raises (``RunRecovery``
    after a failed log write or fsync, ``InvalidArgument`` for an LSN past the log's end):
    the caller then writes none of ``taken``.

    Cancellation: only from the write batch's task, which is shielded by its callers; a
    flush under way finishes in the log's own task."""
    assert io.log is not None
    lsns = page_lsns(io, taken)
    top = max(lsns.values(), default=(0, 0))
    if top != (0, 0):
        await io.log.flush(*top)
    return lsns


def written_lsn(lsns: PageLsns | None, done: set[tuple[int, int]]) -> tuple[int, int]:
    """The largest LSN among the pages of ``done`` (written), ``(0, 0)`` if none had one."""
    if not lsns:
        return (0, 0)
    return max((lsns[k] for k in done if k in lsns), default=(0, 0))
