"""Dirty victims in batches (Berkeley DB's mp_alloc.c writes one victim at a time).

A miss whose best victim is dirty would cost a worker-thread hop for that one page (300-440
µs). Instead :func:`write_lru_batch` writes up to :data:`VICTIM_BATCH` dirty pages: the
victim's and those of the buckets after it, which the victim search (moving its hand from
bucket to bucket) meets next, so the next misses find clean victims. One batch per cache is
in flight at a time: misses meeting a dirty victim meanwhile await the same batch.

A batch is ONE compiled call, ``aiodb_batch_run`` (aiodbenv/_csrc/35_batch.c): collect from
the hand, sort, and per file claim and copy under the bucket locks, ``pwrite`` each run of
adjacent pages, note the write in the file entry, release -- with the GIL released
throughout (it stops for Python only to repair a dead holder's mutex, to leave a claim whose
bucket stays locked to a task of the pool, or to panic). It is handed to the process's batch
thread synchronously, when the batch starts: a run of misses that completes without yielding
would otherwise leave the batch's task unstarted until a miss finds no clean frame. (The
stepwise calls of :mod:`aiodbenv.mpool.csync` -- about ten per batch, each waiting for the GIL
again while the loop runs misses -- remain for crash tests' step points and ``batchcall.ONE_CALL``
off.)

A miss waits for a batch only when the buckets its victim search looked at hold no clean
buffer: a dirty best is passed over for a clean one (``find_victim``, and the compiled miss),
and the search that does so starts a batch in the background (:func:`start_lru_batch`). While
misses go on evicting, a batch is followed by the next at once: where it stopped if it filled
up, else from the hand with the pages that have aged out of the recently used tenth since (the
chain ends when nobody evicts, or after two batches in a row that found little), so that a
steady run of misses over dirty pages rarely waits. With a log and a file with
``lsn_offset`` the batch takes the two-step path (the write-ahead rule). Without the compiled
path (or for pages it cannot write: page transforms, checksums, no descriptor here) the caller
writes the one victim the Python way.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import _io
from .._threads import run_to_end
from ..region.mutex import ffi
from . import batchcall, csync
from .bhwrite import SyncResult
from .cache import BufRef, Cache
from .layout import BH, BH_DIRTY, CACHE_HEADER, FILE_ENTRY, HANDLE_STATS, MAX_FILES
from .staging import zeroed

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
_chain: dict[tuple[int, int], tuple[int, float]] = {}
# The same keys -> batches in a row of a chain that found little to write.
_dry: dict[tuple[int, int], int] = {}
# The same keys: a miss waited for the batch under way (it found no clean frame).
_awaited: set[tuple[int, int]] = set()


async def write_lru_batch(
    pool: PoolBase, cache: Cache, bucket: int, victim: BufRef | None = None
) -> SyncResult:
    """Write up to :data:`VICTIM_BATCH` dirty pages of ``cache`` from bucket ``bucket`` (the
    victim's) on, or join the batch already under way for the cache; returns what the batch
    did (its error, if any, in ``errors``). With ``victim`` (in that bucket): a batch joined
    that left it dirty (started elsewhere, it may not hold it) is followed by one from its
    bucket, a few times at most (then the caller writes it alone).

    Cancellation: the batch runs in a task of the pool and finishes (claims released,
    statistics counted); the caller only stops waiting.
    """
    key = (id(pool), cache.index)
    result = SyncResult()
    for _ in range(3):
        under_way = _in_flight.get(key)
        joined = under_way is not None and not under_way.done()
        task = start_lru_batch(pool, cache, bucket)
        _awaited.add(key)  # a miss waits for it: write the next ones too
        got = await asyncio.shield(task)
        result.merge(got)
        result.errors += got.errors
        if not joined or got.errors or victim is None or not _still_dirty(victim):
            break
    return result


def _still_dirty(v: BufRef) -> bool:
    """Whether buffer ``v`` still holds its page, dirty (read without its bucket's lock: the
    caller checks again under it)."""
    w = v.cache.words
    x = v.bh >> 3
    return bool(
        w[x + BH.word.flags] & BH_DIRTY
        and w[x + BH.word.file] == v.fidx + 1
        and w[x + BH.word.pgno] == v.pgno
    )


def start_lru_batch(pool: PoolBase, cache: Cache, bucket: int) -> asyncio.Task[SyncResult]:
    """Start a batch as :func:`write_lru_batch` does, without waiting for it (a victim
    search passed a dirty best over): the batch under way for the cache, if any, or a new
    one. Its failure is logged if nobody awaits it."""
    key = (id(pool), cache.index)
    task = _in_flight.get(key)
    if task is None or task.done():
        # (A task done whose callback has not run yet -- asyncio and uvloop order the wake-up
        # of its awaiters and its callbacks differently -- is over: a new one.)
        task = pool._io.spawn(_batch(pool, cache, bucket, _submit(pool, cache, bucket)))
        _in_flight[key] = task

        def done(t: asyncio.Task[SyncResult]) -> None:
            if _in_flight.get(key) is t:
                del _in_flight[key]
            nxt = _chain.pop(key, None)
            if t.cancelled():
                return
            err = t.exception()  # retrieved here: a batch started in the background
            if err is not None:  # may have no one else to see it
                logger.warning("writing a batch of dirty victims failed: %r", err)
                return
            if nxt is not None:
                bucket, pause = nxt
                if pause:
                    asyncio.get_running_loop().call_later(pause, _go_on, pool, cache, bucket)
                else:
                    _go_on(pool, cache, bucket)

        task.add_done_callback(done)
    return task


def _go_on(pool: PoolBase, cache: Cache, bucket: int) -> None:
    """The next batch of a chain (see :func:`_batch`), unless the pool is closing."""
    if not pool._closing and not pool._closed:
        start_lru_batch(pool, cache, bucket)
    else:
        _dry.pop((id(pool), cache.index), None)


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


_Outcome = tuple[list[tuple[int, csync.Chunk]], int | None]


@dataclass
class _Started:
    """A batch whose compiled call was handed to the batch thread at once (see :func:`_submit`)."""

    fut: asyncio.Future[_Outcome]
    evicted: int
    index: int


def _files(pool: PoolBase) -> tuple[Any, dict[int, tuple[int, int]], bool]:
    """The route table of a batch, its files (slot -> descriptor, page size), and whether one
    of them has a log to flush first (the write-ahead rule)."""
    io = pool._io
    core = pool._core
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
    return route, info, wal


def _submit(pool: PoolBase, cache: Cache, hand: int) -> _Started | None:
    """On the loop, synchronously: hand a batch's one compiled call to the batch thread now,
    not when the task that awaits it first runs -- a miss that starts a batch in the
    background goes on with clean frames without yielding to the loop, and a run of such
    misses would leave the task unstarted until a miss finds no clean frame and waits. None
    when the batch takes the stepwise path (a log to flush first, crash tests' step points,
    :data:`batchcall.ONE_CALL <aiodbenv.mpool.batchcall.ONE_CALL>` off) or has nothing to write."""
    if not batchcall.ONE_CALL or _io._signal_plan:
        return None
    evicted = _evictions(pool)
    route, info, wal = _files(pool)
    if wal or not info:
        return None
    tab, keep = csync.table(pool)
    index = next(i for i, c in enumerate(pool._core.caches) if c is cache)
    stage = batchcall.stage(
        pool, index, VICTIM_BATCH, VICTIM_BATCH * max(ps for _, ps in info.values())
    )
    run = batchcall.prepare(pool, route, tab, keep, index, hand, info, stage, VICTIM_BATCH)
    fut = asyncio.get_running_loop().run_in_executor(batchcall.thread(), batchcall.run, pool, run)
    return _Started(fut, evicted, index)


async def _batch(
    pool: PoolBase, cache: Cache, hand: int, started: _Started | None = None
) -> SyncResult:
    io = pool._io
    result = SyncResult()
    if started is None:
        started = _submit(pool, cache, hand)
    if started is not None:
        evicted, index = started.evicted, started.index
        (done, stopped), cancelled = await _outcome(started.fut)
    else:
        cancelled = False
        evicted = _evictions(pool)
        route, info, wal = _files(pool)
        if not info:
            return result
        tab, keep = csync.table(pool)
        index = next(i for i, c in enumerate(pool._core.caches) if c is cache)
        if wal:
            # The write-ahead rule needs the loop between claim and write: collect, then the
            # two-step chunks.
            fast = await run_to_end(
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
        stage = batchcall.stage(
            pool, index, VICTIM_BATCH, VICTIM_BATCH * max(ps for _, ps in info.values())
        )
        done, stopped = await run_to_end(
            _collect_write, pool, route, tab, keep, index, hand, info, stage, limiter=io.limiter
        )
    for fidx, got in done:
        csync.account(pool, fidx, got, result)
    io.notify()  # clean frames: frame waiters may look again
    if cancelled:
        raise asyncio.CancelledError("a batch of dirty victims was cancelled (after its write)")
    key = (id(pool), index)
    evicting = _evictions(pool) - evicted
    dry = _dry.pop(key, 0) + 1 if result.written < _GOING_ON else 0
    if result.errors:
        pass  # no chain: a full disk must not be retried in a loop (the misses back off)
    elif stopped is not None and (key in _awaited or evicting >= VICTIM_BATCH // 4):
        # Full, and misses waited for it or used up frames meanwhile: write the next dirty
        # pages at once, while they use the clean ones this batch made.
        _chain[key] = (stopped, 0.0)
    elif BACKGROUND and (key in _awaited or evicting) and dry < 2:
        # It took every dirty page not used recently, and misses go on evicting: go on from
        # the hand, where the searches go on, with the pages that have aged since -- written
        # before the searches reach them, rather than the misses waiting for a batch each
        # time the clean frames run out. At once while misses evict briskly (the loop's
        # turn to notice the end of a batch is pause enough), else after a pause. The chain
        # ends with a batch during which nobody evicted, or with a second batch in a row
        # that found little (the dirty pages left are the recently used ones).
        w = cache.words
        hand = int(w[cache.hdr + CACHE_HEADER.word.hand]) % cache.nbuckets
        _chain[key] = (hand, 0.0 if evicting >= _GOING_ON else _PAUSE)
        if dry:
            _dry[key] = dry
    _awaited.discard(key)
    return result


async def _outcome(fut: asyncio.Future[_Outcome]) -> tuple[_Outcome, bool]:
    """Await the batch thread's call, and whether a cancellation arrived meanwhile: it is
    deferred until the call returns (as ``_threads.run_to_end`` does), so that the
    call's outcome -- claims left for the loop to release, statistics -- is accounted for."""
    cancelled = False
    while True:
        try:
            return await asyncio.shield(fut), cancelled
        except asyncio.CancelledError:
            if fut.cancelled():  # never started (the thread was shut down): nothing claimed
                raise
            cancelled = True


#: Pages written below which a batch "found little", and evictions during a batch from which
#: the next one of its chain starts at once rather than after :data:`_PAUSE` seconds (see
#: :func:`_batch`).
_GOING_ON = 16
_PAUSE = 0.001


def _from_hand(
    pool: PoolBase, route: Any, tab: Any, keep: list[Any], index: int, hand: int
) -> tuple[csync.FastSet | None, int | None]:
    """In a worker thread: the first :data:`VICTIM_BATCH` or so dirty buffers from bucket
    ``hand`` on (wrapping around): the ones the next victim searches will meet, which start
    there too. Sorted by file and page for writing; and the bucket where the batch filled up
    (None: it holds every dirty buffer it may write)."""
    cache = pool._core.caches[index]
    cap = VICTIM_BATCH
    mem = zeroed(csync._E * 8 * cap)
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
