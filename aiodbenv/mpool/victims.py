"""Dirty victims in batches (Berkeley DB's mp_alloc.c writes one victim at a time).

A miss whose best victim is dirty would cost a worker-thread hop for that one page (300-440
µs). Instead :func:`write_lru_batch` writes up to :data:`VICTIM_BATCH` dirty pages: the
victim's and those of the buckets after it, which the victim search (moving its hand from
bucket to bucket) meets next -- in one worker-thread call of the compiled write-back
(:mod:`aiodbenv.mpool.csync`: collect in C, claim, copy, one ``pwrite`` per run of adjacent
pages, release), so the next misses find clean victims. One batch per cache is in flight at a
time: misses meeting a dirty victim meanwhile await the same batch. With a log and a file with
``lsn_offset`` the batch takes the two-step path (the write-ahead rule). Without the compiled
path (or for pages it cannot write: page transforms, checksums, no descriptor here) the caller
writes the one victim the Python way.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ..region.mutex import ffi
from . import csync
from .bhwrite import SyncResult
from .cache import Cache
from .layout import CACHE_HEADER, FILE_ENTRY, MAX_FILES

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["VICTIM_BATCH", "write_lru_batch"]

#: Dirty pages written per batch at most: one hop (~0.1-2 ms with the write) spread over this
#: many misses (64 measured 1.5x the cost per miss of 128 here; larger batches only add to
#: the wait of the miss that starts one).
VICTIM_BATCH = 128

# cache index -> the batch under way for it, per pool handle (keyed by the handle's id).
_in_flight: dict[tuple[int, int], asyncio.Task[SyncResult]] = {}


async def write_lru_batch(pool: PoolBase, cache: Cache, bucket: int) -> SyncResult:
    """Write up to :data:`VICTIM_BATCH` dirty pages of ``cache`` from bucket ``bucket`` (the
    victim's) on, or join the batch already under way for the cache; returns what the batch
    did (its error, if any, in ``errors``).

    Cancellation: the batch runs in a task of the pool and finishes (claims released,
    statistics counted); the caller only stops waiting.
    """
    key = (id(pool), cache.index)
    task = _in_flight.get(key)
    if task is None:
        task = pool._io.spawn(_batch(pool, cache, bucket))
        _in_flight[key] = task
        task.add_done_callback(lambda _t: _in_flight.pop(key, None))
    return await asyncio.shield(task)


async def _batch(pool: PoolBase, cache: Cache, hand: int) -> SyncResult:
    io = pool._io
    core = pool._core
    result = SyncResult()
    # Only files this process has a descriptor for: nothing is opened on a miss.
    route = csync.routes(pool, None, fd_only=True)
    info: dict[int, tuple[int, int]] = {}
    wal = False
    for fidx in core.file_slots():
        if route[fidx + 1] != 1:
            continue
        e = core.entry(fidx)
        fd = io.fd_for_write(fidx)
        assert fd is not None  # routes() said so
        info[fidx] = (fd, int(core.meta_words[e + FILE_ENTRY.word.page_size]))
        wal = wal or bool(io.log is not None and core.meta_words[e + FILE_ENTRY.word.lsn_offset])
    if not info:
        return result
    tab, keep = csync.table(pool)
    index = next(i for i, c in enumerate(core.caches) if c is cache)
    if wal:
        # The write-ahead rule needs the loop between claim and write: collect, then the
        # two-step chunks.
        fast = await anyio.to_thread.run_sync(
            csync.collect_now,
            pool,
            route,
            tab,
            keep,
            index,
            VICTIM_BATCH,
            limiter=io.limiter,
        )
        if fast is not None:
            await csync.write_fast(pool, fast, result)
        return result
    stage = csync._zeroed(VICTIM_BATCH * max(ps for _, ps in info.values()))
    done = await anyio.to_thread.run_sync(
        _collect_write, pool, route, tab, keep, index, hand, info, stage, limiter=io.limiter
    )
    for fidx, got in done:
        csync.account(pool, fidx, got, result)
    io.notify()  # clean frames: frame waiters may look again
    return result


def _from_hand(
    pool: PoolBase, route: Any, tab: Any, keep: list[Any], index: int, hand: int
) -> csync.FastSet | None:
    """In a worker thread: the first :data:`VICTIM_BATCH` or so dirty buffers from bucket
    ``hand`` on (wrapping around): the ones the next victim searches will meet, which start
    there too. Sorted by file and page for writing."""
    cache = pool._core.caches[index]
    cap = VICTIM_BATCH
    mem = csync._zeroed(csync._E * 8 * cap)
    keep.append(mem)
    ent = ffi.from_buffer("uint64_t[]", mem)
    nf, no, stopped = (ffi.new("uint64_t[1]") for _ in range(3))
    nb = cache.nbuckets
    # Not the most recently used tenth: the victim search skips those too, and they are the
    # pages most likely to be dirtied again (written now, they would be written twice).
    w = cache.words
    counter = int(w[cache.hdr + CACHE_HEADER.word.lru_counter])
    cut = counter - max(1, int(w[cache.hdr + CACHE_HEADER.word.buffers]) // 10)
    below = cut if cut > 0 else 0  # 0: no cut (few stamps given out yet)
    for first, last in ((hand % nb, nb), (0, hand % nb)):
        while first < last:
            rc = csync._lib.aiodb_sync_collect(
                tab, index, first, last, route, MAX_FILES + 1, below, ent, cap, nf, no, stopped
            )
            if rc == 0:
                break
            b = int(stopped[0])
            if rc == -errno.ENOBUFS:
                first = last = -1  # enough for one batch
                break
            if rc == csync._lib.AIODB_CORRUPT:
                cache.corrupt(f"bucket {b}'s chain has a bad offset, count or loop")
            if rc != -errno.EOWNERDEAD:
                return None
            cache.release_dead_holder(b)
            first = b
        if first < 0:
            break
    n = int(csync._lib.aiodb_sync_order(ent, nf[0], 0))
    return csync.FastSet(ent, n, tab, [], keep)


def _collect_write(
    pool: PoolBase,
    route: Any,
    tab: Any,
    keep: list[Any],
    index: int,
    hand: int,
    info: dict[int, tuple[int, int]],
    stage: Any,
) -> list[tuple[int, csync.Chunk]]:
    """In one worker-thread call: find the dirty pages from the hand on, claim, write and
    release them, file by file (each file's copies from the start of ``stage``)."""
    fast = _from_hand(pool, route, tab, keep, index, hand)
    if fast is None:
        return []
    view = ffi.from_buffer(stage)
    out = []
    for tag, lo, hi in fast.tags():
        fidx = tag - 1
        fd, ps = info[fidx]
        got = csync.Chunk()
        csync.claim_write(pool, fast, fidx, fd, ps, -1, lo, hi, view, got)
        out.append((fidx, got))
    return out
