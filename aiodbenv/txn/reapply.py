"""Finishing, from the log, the commit of a process that died inside it.

A commit flags its latches committing (:data:`~aiodbenv.txn.latch.LATCH_COMMITTING`), appends
its record, copies its images into the buffers and releases the latches. A process killed in
between leaves buffers latched and flagged by its registry slot: its record may be in the log
with some (or none) of its pages copied, or not in the log at all. The reaper keeps those
buffers pinned and latched and, instead of panicking the environment, hands them here:

- Where to look. Nobody else can commit a page while the dead process holds its latch, and it
  took the latch after every earlier commit of the page was copied in and stamped: a record
  naming such a page that is newer than the page's LSN is the dead process's. The log is read
  from the *smallest* of those LSNs (not the largest: several commits of the dead process may
  have been under way, and a record larger than the log buffer can be in the log before a
  later, smaller one whose page was already copied), or, if one of its pages was never
  logged, from the last checkpoint's ``ckp_lsn`` (no checkpoint completes while a committing
  page is dirty and pinned), or from the first record still kept if that one was archived
  (or, in memory, overwritten: no commit record can be among those), to its end.
- What to apply. Each transaction record found there that names one of those pages (its file's
  id and page number) is applied to it as recovery does, only if the page's LSN is older than
  the record: a full image, or byte ranges (the new bytes, so a page copied halfway is simply
  overwritten). The page gets the record's LSN and stays dirty. A page the dead commit had
  already copied carries its LSN, and is left alone; if its record is not in the log, no page
  is changed and the transaction is aborted.
- Then its latches are released and its pins dropped, by the reaper's caller
  (:func:`aiodbenv.mpool.reaper.finish_dead`).

Running it twice gives the same bytes, so a reaper that dies half-way leaves the slot for the
next one to do again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidArgument
from ..log.lsn import LSN
from ..log.record import FILE_HEADER_BYTES
from ..mpool.layout import BH, BH_DIRTY, BH_REDIRTIED, BH_WRITING, BUCKET, FILE_ENTRY
from . import batch as _batch
from .latch import committing_by

if TYPE_CHECKING:
    from ..log.log import Log
    from ..mpool.cache import Cache
    from ..mpool.handle import PoolBase

__all__ = ["DeadBuffer", "finish_dead_commits"]


@dataclass
class DeadBuffer:
    """A buffer a dead slot left latched and flagged committing: its cache, bucket and
    offset; filled in under the bucket mutex: its file id, page number, where its LSN is."""

    cache: Cache
    b: int
    off: int
    fileid: bytes = b""
    pgno: int = -1
    lsn_at: int = -1  # byte offset of the page LSN in the cache's buffer
    size: int = 0  # data bytes of the page


def _describe(pool: PoolBase, d: DeadBuffer, slot: int) -> LSN | None:
    """Under the bucket mutex: fill ``d`` in; the page's LSN, or None if the buffer is no
    longer the dead slot's (nothing to do for it)."""
    cache, core = d.cache, pool._core
    cache.lock(d.b)
    try:
        w, x = cache.words, d.off >> 3
        if not committing_by(w, x, slot):
            return None
        fidx = int(w[x + BH.word.file]) - 1
        lsn_offset = int(core.meta_words[core.entry(fidx) + FILE_ENTRY.word.lsn_offset]) - 1
        d.size = int(w[x + BH.word.page_size])
        if lsn_offset < 0 or lsn_offset + 8 > d.size:
            return None  # cannot be: a transaction's file has an lsn_offset
        d.fileid, d.pgno = core.fileid(fidx), int(w[x + BH.word.pgno])
        d.lsn_at = d.off + BH.size + lsn_offset
        return LSN.unpack(cache.buf, d.lsn_at)
    finally:
        cache.unlock(d.b)


def _apply(d: DeadBuffer, slot: int, lsn: LSN, page: _batch.BatchPage) -> bool:
    """Under the bucket mutex: apply ``page`` of the record at ``lsn`` to ``d`` if the page is
    older than it (and still the dead slot's); True if applied."""
    cache = d.cache
    cache.lock(d.b)
    try:
        w, x, buf = cache.words, d.off >> 3, cache.buf
        if not committing_by(w, x, slot) or LSN.unpack(buf, d.lsn_at) >= lsn:
            return False
        data = d.off + BH.size
        if page.full is not None:
            if len(page.full) > d.size:
                return False
            buf[data : data + len(page.full)] = page.full
        for at, new in page.frags:
            if at + len(new) <= d.size:
                buf[data + at : data + at + len(new)] = new
        buf[d.lsn_at : d.lsn_at + 8] = lsn.pack()
        flags = int(w[x + BH.word.flags])
        if not flags & BH_DIRTY:
            w[cache.bucket_words[d.b] + BUCKET.word.dirty] += 1
        w[x + BH.word.flags] = flags | BH_DIRTY | (BH_REDIRTIED if flags & BH_WRITING else 0)
        return True
    finally:
        cache.unlock(d.b)


async def finish_dead_commits(
    pool: PoolBase, log: Log, slot: int, bufs: list[tuple[Cache, int, int]]
) -> tuple[int, int]:
    """Apply, from ``log``, the commits dead registry ``slot`` left unfinished on buffers
    ``bufs`` ``(cache, bucket, offset)`` (see the module docstring); returns (records
    found, pages applied). Latches and pins are left as they are. Raises what reading the log
    raises (the caller panics the environment then). Cancellation: between pages; what was
    applied stays, and running it again is harmless."""
    dead: dict[tuple[bytes, int], DeadBuffer] = {}
    start: LSN | None = None
    for cache, b, off in bufs:
        d = DeadBuffer(cache, b, off)
        lsn = await pool._locked(_describe, pool, d, slot, check=False)
        if lsn is not None:
            dead[(d.fileid, d.pgno)] = d
            start = lsn if start is None else min(start, lsn)
    if start is None:
        return 0, 0
    if start == LSN(0, 0):
        ckp = int(log._c.word("ckp_lsn"))
        start = LSN(ckp >> 32, ckp & 0xFFFFFFFF) if ckp else LSN(0, 0)
    found = applied = 0
    async with log.cursor(start=await _first_record(log, start)) as cur:
        async for lsn, data in cur:
            if not isinstance(data, bytes) or not _batch.is_batch(data):
                continue
            files, pages = _batch.decode(data)
            mine = [
                (dead[key], p) for p in pages if (key := (files[p.file].fileid, p.pgno)) in dead
            ]
            if not mine:
                continue
            found += 1
            for d, p in mine:
                if await pool._locked(_apply, d, slot, lsn, p, check=False):
                    applied += 1
    return found, applied


async def _first_record(log: Log, lsn: LSN) -> LSN | None:
    """``lsn`` if a record starts there; None (the first record kept) if ``lsn`` is LSN(0,
    0) or before the first record kept; else the first record of the next file (a
    checkpoint's ``ckp_lsn`` is where the next record was to go, and it may have gone to the
    next file)."""
    if lsn == LSN(0, 0):
        return None
    async with log.cursor() as cur:
        try:
            await cur.set(lsn)
            return lsn
        except InvalidArgument:
            first = await cur.first()
            if first is None or lsn < first[0]:
                return None  # archived, or overwritten in the ring: from the first record kept
            nxt = LSN(lsn.file + 1, FILE_HEADER_BYTES)
            return nxt if nxt < log.end_lsn else None
