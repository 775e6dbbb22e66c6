"""Dirty victims in batches (Berkeley DB's mp_alloc.c writes one victim at a time).

A miss whose best victim is dirty would cost a worker-thread hop for that one page (300-440
µs). Instead :func:`write_lru_batch` writes up to :data:`VICTIM_BATCH` dirty pages: the
victim's and those of the buckets after it, which the victim search (moving its hand from
bucket to bucket) meets next -- in one worker-thread call of the compiled write-back
(:mod:`aiodbenv.mpool.csync`: collect in C, claim, copy, one ``pwrite`` per run of adjacent
pages, release), so the next misses find clean victims. One batch per cache is in flight at a
time: misses meeting a dirty victim meanwhile await the same batch.

A miss waits for a batch only when the buckets its victim search looked at hold no clean
buffer: a dirty best is passed over for a clean one (``find_victim``, and the compiled miss),
and the search that does so starts a batch in the background (:func:`start_lru_batch`). A
batch that filled up while misses waited for it or went on evicting starts the next one where
it stopped (the writes stay ahead of the evictions as long as the misses keep meeting dirty
pages), so that a steady run of misses over dirty pages rarely waits. With a log and a file with
``lsn_offset`` the batch takes the two-step path (the write-ahead rule). Without the compiled
path (or for pages it cannot write: page transforms, checksums, no descriptor here) the caller
writes the one victim the Python way.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ..region.mutex import ffi
from . import csync
from .bhwrite import SyncResult
from .cache import Cache
from .layout import CACHE_HEADER, FILE_ENTRY, HANDLE_STATS, MAX_FILES

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["VICTIM_BATCH", "dirty_met", "start_lru_batch", "write_lru_batch"]

logger = logging.getLogger("aiodbenv")

#: Dirty pages written per batch at most. Misses go on with clean frames while a batch is
#: written, so a larger batch costs the miss that starts one little; and each batch's thread
#: hop waits for the GIL several times, up to the switch interval (5 ms) each while the loop
#: runs misses: 512 halved the amortised cost of a dirty victim against 128 here.
VICTIM_BATCH = 512

# cache index -> the batch under way for it, per pool handle (keyed by the handle's id).
_in_flight: dict[tuple[int, int], asyncio.Task[SyncResult]] = {}
# The same keys -> the bucket where the next batch starts when the one under way ends.
_chain: dict[tuple[int, int], int] = {}
# The same keys: a miss waited for the batch under way (it found no clean frame).
_awaited: set[tuple[int, int]] = set()


async def write_lru_batch(pool: PoolBase, cache: Cache, bucket: int) -> SyncResult:
    """Write up to :data:`VICTIM_BATCH` dirty pages of ``cache`` from bucket ``bucket`` (the
    victim's) on, or join the batch already under way for the cache; returns what the batch
    did (its error, if any, in ``errors``).

    Cancellation: the batch runs in a task of the pool and finishes (claims released,
    statistics counted); the caller only stops waiting.
    """
    task = start_lru_batch(pool, cache, bucket)
    _awaited.add((id(pool), cache.index))  # a miss waits for it: write the next ones too
    return await asyncio.shield(task)


def start_lru_batch(pool: PoolBase, cache: Cache, bucket: int) -> asyncio.Task[SyncResult]:
    """Start a batch as :func:`write_lru_batch` does, without waiting for it (a victim
    search passed a dirty best over): the batch under way for the cache, if any, or a new
    one. Its failure is logged if nobody awaits it."""
    key = (id(pool), cache.index)
    task = _in_flight.get(key)
    if task is None:
        task = pool._io.spawn(_batch(pool, cache, bucket))
        _in_flight[key] = task

        def done(t: asyncio.Task[SyncResult]) -> None:
            _in_flight.pop(key, None)
            nxt = _chain.pop(key, None)
            if t.cancelled():
                return
            err = t.exception()  # retrieved here: a batch started in the background
            if err is not None:  # may have no one else to see it
                logger.warning("writing a batch of dirty victims failed: %r", err)
                return
            if nxt is not None and not pool._closing and not pool._closed:
                start_lru_batch(pool, cache, nxt)

        task.add_done_callback(done)
    return task


#: Start batches in the background when a search passes a dirty best over (the tests that
#: compare the compiled and Python paths pin by pin turn this off: when a background batch
#: ends is the worker thread's timing).
BACKGROUND = True


def dirty_met(pool: PoolBase, cache: Cache) -> None:
    """A victim search in ``cache`` passed a dirty best over for a clean buffer: start a
    batch from the cache's hand (where the next searches look) if none is under way."""
    if BACKGROUND and csync.usable(pool._core):
        nb = cache.nbuckets
        start_lru_batch(pool, cache, int(cache.words[cache.hdr + CACHE_HEADER.word.hand]) % nb)


def _evictions(pool: PoolBase) -> int:
    w0 = pool._core.meta_words
    return int(
        w0[pool._hs + HANDLE_STATS.word.ro_evict] + w0[pool._hs + HANDLE_STATS.word.rw_evict]
    )


async def _batch(pool: PoolBase, cache: Cache, hand: int) -> SyncResult:
    io = pool._io
    core = pool._core
    result = SyncResult()
    evicted = _evictions(pool)
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
    done, stopped = await anyio.to_thread.run_sync(
        _collect_write, pool, route, tab, keep, index, hand, info, stage, limiter=io.limiter
    )
    for fidx, got in done:
        csync.account(pool, fidx, got, result)
    io.notify()  # clean frames: frame waiters may look again
    key = (id(pool), index)
    if stopped is not None and (key in _awaited or _evictions(pool) - evicted >= VICTIM_BATCH // 4):
        # Full, and misses waited for it or used up frames meanwhile: write the next dirty
        # pages at once, while they use the clean ones this batch made.
        _chain[key] = stopped
    _awaited.discard(key)
    return result


def _from_hand(
    pool: PoolBase, route: Any, tab: Any, keep: list[Any], index: int, hand: int
) -> tuple[csync.FastSet | None, int | None]:
    """In a worker thread: the first :data:`VICTIM_BATCH` or so dirty buffers from bucket
    ``hand`` on (wrapping around): the ones the next victim searches will meet, which start
    there too. Sorted by file and page for writing; and the bucket where the batch filled up
    (None: it holds every dirty buffer it may write)."""
    cache = pool._core.caches[index]
    cap = VICTIM_BATCH
    mem = csync._zeroed(csync._E * 8 * cap)
    keep.append(mem)
    ent = ffi.from_buffer("uint64_t[]", mem)
    nf, no, stopped = (ffi.new("uint64_t[1]") for _ in range(3))
    nb = cache.nbuckets
    full: int | None = None
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
                full = b
                first = last = -1  # enough for one batch
                break
            if rc == csync._lib.AIODB_CORRUPT:
                cache.corrupt(f"bucket {b}'s chain has a bad offset, count or loop")
            if rc != -errno.EOWNERDEAD:
                return None, None
            cache.release_dead_holder(b)
            first = b
        if first < 0:
            break
    n = int(csync._lib.aiodb_sync_order(ent, nf[0], 0))
    return csync.FastSet(ent, n, tab, [], keep), full


def _collect_write(
    pool: PoolBase,
    route: Any,
    tab: Any,
    keep: list[Any],
    index: int,
    hand: int,
    info: dict[int, tuple[int, int]],
    stage: Any,
) -> tuple[list[tuple[int, csync.Chunk]], int | None]:
    """In one worker-thread call: find the dirty pages from the hand on, claim, write and
    release them, file by file (each file's copies from the start of ``stage``); and where
    the batch filled up (see :func:`_from_hand`)."""
    fast, full = _from_hand(pool, route, tab, keep, index, hand)
    if fast is None:
        return [], None
    view = ffi.from_buffer(stage)
    out = []
    for tag, lo, hi in fast.tags():
        fidx = tag - 1
        fd, ps = info[fidx]
        got = csync.Chunk()
        csync.claim_write(pool, fast, fidx, fd, ps, -1, lo, hi, view, got)
        out.append((fidx, got))
    return out, full
