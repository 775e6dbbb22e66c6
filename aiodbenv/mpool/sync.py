"""Write-back: sync, fsync, trickle and the writes eviction needs.

Dirty buffers are collected bucket by bucket, sorted by file and page number (as Berkeley DB
does, so the disk sees ascending offsets) and written in batches: each batch snapshots its pages
under their bucket mutexes on the event loop (a 4 KiB copy is ~0.5 µs), then one worker-thread
hop applies pgout to the copies and writes each run of adjacent pages with one ``pwritev``.
Files are fsynced once, at the end, not after each write.

A page is never lost by a writer that dies or stops, and never reported durable before its
fsync returned:

- **Claims.** While its copy is being written a buffer is flagged ``WRITING`` with the
  writer's pid in ``io_pid`` (the claim) and *keeps* ``DIRTY``. It can be read, pinned and
  dirtied again meanwhile (then ``REDIRTIED`` is set: the copy in flight is stale), but not
  evicted. The claim's release clears ``DIRTY`` only if the write succeeded and the page was
  not dirtied again; otherwise the page stays dirty. A writer that dies holding claims leaves
  its pages dirty: the next sync (or an eviction that finds no frame) sees the pid is gone and
  takes the claim over (clears ``WRITING``), and the page is written again. A live writer's
  claims are waited for by ``sync``/``fsync``/checkpoint, up to ``Pool.wait_timeout``, then
  reported (``Incomplete`` naming the pid) -- never success.
- **Durability across processes.** Every successful page write, by any process and for any
  reason (eviction, trickle, sync), bumps its file entry's ``written_gen`` before the page is
  marked clean; an fsync that returns records the generation it covered in ``synced_gen``.
  ``sync``/``fsync``/checkpoint fsync every file whose ``written_gen`` is ahead, even if this
  call wrote nothing to it, so a page made clean by someone else's trickle or eviction is
  still made durable by the next sync.
- **A failed fsync is fatal.** After a failed fsync Linux may already have dropped the dirty
  pages it could not write (and marked them clean), so a retried fsync can succeed with the
  data gone -- PostgreSQL's "fsyncgate". Nothing in the pool can tell which pages were lost,
  so the environment panics (:class:`~aiodbenv.errors.RunRecovery` with the file and errno,
  in every process) and no later call reports success.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._process import is_alive
from ..errors import Incomplete
from ..region.mutex import BUSY, attempt, ffi
from . import accel, csync, synchop
from .bhwrite import SyncResult, write_items
from .cache import BufRef, Cache, found
from .fsync import fsync_pending
from .layout import (
    BH,
    BH_DIRTY,
    BH_READING,
    BH_REDIRTIED,
    BH_WRITING,
    BUCKET,
    MAX_FILES,
    MAX_PGNO,
    quiet_latch,
)

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = [
    "Collected",
    "SyncResult",
    "collect_dirty",
    "settle_claims",
    "take_over_claim",
    "write_back",
]

# The compiled accelerator's collection of dirty buffers, when installed.
_c_collect = accel.collect
_CORRUPT = accel.CORRUPT

logger = logging.getLogger("aiodbenv")


#: Longest stretch of bookkeeping on the loop before collect_dirty lets other tasks run.
YIELD_EVERY = 0.001


@dataclass
class Collected:
    """What :func:`collect_dirty` found: ``items``, the dirty buffers this process can write
    (sorted by file and page); ``held``, the ``(file, pgno)`` of dirty ones it cannot write
    now (pinned or being read; or unwritable pages of the files asked for); ``prios``, each
    item's priority stamp (trickle writes the least recently used first); ``claimed``, dirty
    buffers a live writer (``(item, pid)``) is writing now. Claims of dead writers were taken
    over: those pages are among ``items``."""

    items: list[BufRef]
    held: list[tuple[int, int]]
    prios: list[int]
    claimed: list[tuple[BufRef, int]]


async def collect_dirty(pool: PoolBase, files: set[int] | None) -> Collected:
    """Find the dirty buffers (of ``files``, or all): see :class:`Collected`.

    Walks the buckets on the loop, letting other tasks run about every millisecond, so a
    large cache does not stall the loop. A claim whose writer is dead is taken over here.
    """
    raw = await (_collect_c(pool) if _c_collect is not None else _collect_py(pool))
    return await sift(pool, raw, files)


def raw_of(pool: PoolBase, found: list[tuple[int, ...]]) -> _Raw:
    """The buffers :func:`aiodbenv.mpool.csync.collect` left to the Python path, as
    :func:`sift` takes them: ``(tag, pgno, bh, bucket, prio, busy, cache index)`` each."""
    out = _Raw()
    caches = pool._core.caches
    for tag, pgno, bh, b, prio, busy, ci in found:
        out.tags.append(tag)
        out.pgnos.append(pgno)
        out.bhs.append(bh)
        out.buckets.append(b)
        out.prios.append(prio)
        out.busy.append(busy)
        out.caches.append(caches[ci])
    return out


async def sift(pool: PoolBase, raw: _Raw, files: set[int] | None) -> Collected:
    """Sort the dirty buffers ``raw`` (of ``files``, or all) found into :class:`Collected`:
    checks each buffer's file slot and page, takes over dead writers' claims."""
    # File slots and page numbers read from buffer headers: checked before they become file
    # table indexes and file offsets (and the packed sort key below).
    for i, (tag, pgno) in enumerate(zip(raw.tags, raw.pgnos)):
        if not 1 <= tag <= MAX_FILES or pgno >= MAX_PGNO:
            raw.caches[i].corrupt(f"buffer {raw.bhs[i]} holds page {pgno} of file slot {tag}")
    want = None if files is None else {f + 1 for f in files}
    writable = {tag: pool._can_write(tag) for tag in set(raw.tags)}
    held: list[tuple[int, int]] = []
    claimed: list[tuple[BufRef, int]] = []
    keep: list[int] = []
    tags, pgnos = raw.tags, raw.pgnos
    alive: dict[int, bool] = {pool._pid: True}
    pause = _Pause()
    for i, (tag, busy) in enumerate(zip(tags, raw.busy)):
        if not i & 2047:
            await pause()
        if want is not None and tag not in want:
            continue
        if busy == 2:  # claimed by a writer: take the claim over if the writer is dead
            cache, b, bh = raw.caches[i], raw.buckets[i], raw.bhs[i]
            pid = int(cache.words[(bh >> 3) + BH.word.io_pid])
            if pid not in alive:
                alive[pid] = is_alive(pid)
            # One try (STEP_WAIT): a bucket held elsewhere leaves the claim to settle_claims,
            # which retries with an async back-off.
            if alive[pid] or attempt(take_over_claim, cache, b, bh, pid) is not True:
                item = found(tag - 1, pgnos[i], cache, b, bh)
                claimed.append((item, pid))
                continue
            busy = 0  # taken over: the page is dirty and free to write (if not pinned)
        if not writable[tag]:
            if want is not None:
                held.append((tag - 1, pgnos[i]))
        elif busy:
            held.append((tag - 1, pgnos[i]))
        else:
            keep.append(i)
    # Sort by file, then page: one packed int per page sorts several times faster than tuples.
    keys = {((tags[i] - 1) << 40) | pgnos[i]: i for i in keep}
    await pause()
    order = [keys[k] for k in sorted(keys)]
    await pause()
    caches, buckets, bhs, prios = raw.caches, raw.buckets, raw.bhs, raw.prios
    items: list[BufRef] = []
    new = tuple.__new__  # one BufRef per dirty page: without the named tuple's argument handling
    for start in range(0, len(order), 2048):  # in slices: the loop gets a turn between them
        items += [
            new(BufRef, (tags[i] - 1, pgnos[i], caches[i], buckets[i], bhs[i], 0, False))
            for i in order[start : start + 2048]
        ]
        await pause()
    return Collected(items, held, [prios[i] for i in order], claimed)


def take_over_claim(cache: Cache, b: int, bh: int, pid: int) -> bool:
    """Release the write claim dead process ``pid`` left on buffer ``bh`` of bucket ``b``.

    The page kept ``DIRTY`` through the write, so it is simply written again; a write the dead
    process completed is harmless to repeat. False if the buffer no longer carries that claim.
    Locks first: a LockTimeout changes nothing, so callers on the event loop try it once with
    :func:`~aiodbenv.region.mutex.attempt` and come back later if the bucket is held.
    """
    w = cache.words
    x = bh >> 3
    cache.lock(b)
    try:
        if not (w[x + BH.word.flags] & BH_WRITING and w[x + BH.word.io_pid] == pid):
            return False
        w[x + BH.word.flags] &= ~(BH_WRITING | BH_REDIRTIED)
        w[x + BH.word.io_pid] = 0
        return True
    finally:
        cache.unlock(b)


async def settle_claims(
    pool: PoolBase, claimed: list[tuple[BufRef, int]], deadline: float
) -> list[tuple[BufRef, int]]:
    """Wait until no claim of ``claimed`` is still held (the writer released it, or died and
    it was taken over), or until ``deadline`` (``time.monotonic()``); returns the claims
    still held then. Polls with a back-off up to 50 ms: other processes' releases are only
    seen by looking. Cancellation: the wait stops; nothing was changed.
    """
    pending = list(claimed)
    delay = 0.0005
    while pending:
        alive: dict[int, bool] = {pool._pid: True}
        left = []
        for item, pid in pending:
            _f, _p, cache, b, bh = item[:5]
            w = cache.words
            x = bh >> 3
            if not (w[x + BH.word.flags] & BH_WRITING and w[x + BH.word.io_pid] == pid):
                continue  # released (a hint read without the lock; the re-collect checks)
            if pid not in alive:
                alive[pid] = is_alive(pid)
            if not alive[pid] and attempt(take_over_claim, cache, b, bh, pid) is True:
                continue
            left.append((item, pid))
        pending = left
        now = time.monotonic()
        if not pending or now >= deadline:
            break
        await pool._wait_change(min(delay, deadline - now))
        pool._check()
        delay = min(delay * 2, 0.05)
    return pending


class _Pause:
    """``await pause()`` lets other tasks run if about a millisecond passed since the last."""

    __slots__ = ("_deadline",)

    def __init__(self) -> None:
        self._deadline = time.monotonic() + YIELD_EVERY

    async def __call__(self) -> None:
        if time.monotonic() > self._deadline:
            await asyncio.sleep(0)
            self._deadline = time.monotonic() + YIELD_EVERY


class _Raw:
    """Dirty buffers as found, column by column (cheaper than a tuple per buffer)."""

    __slots__ = ("bhs", "buckets", "busy", "caches", "pgnos", "prios", "tags")

    def __init__(self) -> None:
        self.tags: list[int] = []
        self.pgnos: list[int] = []
        self.caches: list[Cache] = []
        self.buckets: list[int] = []
        self.bhs: list[int] = []
        self.prios: list[int] = []
        self.busy: list[int] = []


async def _collect_c(pool: PoolBase) -> _Raw:
    assert _c_collect is not None
    out = _Raw()
    cap = 4096
    stopped = ffi.new("uint64_t[1]")
    deadline = time.monotonic() + YIELD_EVERY
    for cache in pool._core.caches:
        first, nb = 0, cache.nbuckets
        while first < nb:
            tag, pgno, bh, bucket, prio = (ffi.new("uint64_t[]", cap) for _ in range(5))
            busy = ffi.new("uint8_t[]", cap)
            last = min(nb, first + 1024)  # a slice of buckets per call: the loop breathes
            n = _c_collect(
                cache.wptr,
                cache.c_mptrs,
                cache.c_nowait_words,
                cache.c_bucket_words,
                first,
                last,
                cap,
                tag,
                pgno,
                bh,
                bucket,
                prio,
                busy,
                stopped,
            )
            if n < 0:  # a lock failed: its holder died (mutex held), or worse
                held = int(stopped[0])
                if n == _CORRUPT:
                    cache.corrupt(f"bucket {held}'s chain has a bad offset or loops")
                if n == -errno.EOWNERDEAD:
                    cache.release_dead_holder(held)
                else:
                    # Held by someone else: wait for it off the loop's back (bounded retries
                    # with an async back-off; LockTimeout naming the holder at wait_timeout).
                    await pool._locked(cache.lock, held)
                    cache.unlock(held)
                continue  # again from the same bucket
            out.tags += ffi.unpack(tag, n)
            out.pgnos += ffi.unpack(pgno, n)
            out.bhs += ffi.unpack(bh, n)
            out.buckets += ffi.unpack(bucket, n)
            out.prios += ffi.unpack(prio, n)
            out.busy += ffi.unpack(busy, n)
            out.caches += [cache] * n
            if n == 0 and int(stopped[0]) == first:
                cap *= 2  # one bucket holds more dirty pages than the arrays: make room
            first = int(stopped[0])
            if time.monotonic() > deadline:
                await asyncio.sleep(0)
                deadline = time.monotonic() + YIELD_EVERY
    return out


async def _collect_py(pool: PoolBase) -> _Raw:
    out = _Raw()
    deadline = time.monotonic() + YIELD_EVERY
    for cache in pool._core.caches:
        w = cache.words
        for b, bw in enumerate(cache.bucket_words):
            if not b & 63 and time.monotonic() > deadline:
                await asyncio.sleep(0)
                deadline = time.monotonic() + YIELD_EVERY
            if not w[bw + BUCKET.word.dirty]:
                continue
            if w[bw + BUCKET.word.dirty] > cache.max_chain:
                cache.corrupt(f"bucket {b}'s dirty count {int(w[bw + BUCKET.word.dirty])}")
            if pool._attempt(cache.lock, b) is BUSY:
                await pool._locked(cache.lock, b)  # bounded, and the loop keeps running
            try:
                for off in cache.chain(b):
                    x = off >> 3
                    flags = w[x + BH.word.flags]
                    if flags & BH_DIRTY:
                        out.tags.append(int(w[x + BH.word.file]))
                        out.pgnos.append(int(w[x + BH.word.pgno]))
                        out.caches.append(cache)
                        out.buckets.append(b)
                        out.bhs.append(off)
                        out.prios.append(int(w[x + BH.word.priority]))
                        out.busy.append(
                            2
                            if flags & BH_WRITING
                            else (
                                1
                                if flags & BH_READING
                                or (w[x + BH.word.ref] and not quiet_latch(w, off))
                                else 0
                            )
                        )
            finally:
                cache.unlock(b)
    return out


async def write_back(
    pool: PoolBase, *, files: set[int] | None, fsync: bool, reason: str
) -> SyncResult:
    """Write every writable dirty page (of ``files``, or all); fsync if asked. Raises the
    first write error, else :class:`Incomplete` if pinned dirty pages were left."""
    pool._enter()
    try:
        return await _write_back(pool, files=files, fsync=fsync, reason=reason)
    finally:
        pool._leave()


async def _write_back(
    pool: PoolBase, *, files: set[int] | None, fsync: bool, reason: str
) -> SyncResult:
    deadline = time.monotonic() + pool.wait_timeout
    result = SyncResult()
    # The compiled path writes most pages in one worker-thread call (synchop: nothing needs
    # the loop in between) or a few (csync); the rest (pinned, claimed, files with page
    # transforms) and every recheck go the Python way.
    first_again: set[tuple[int, int]] = set()
    prep = synchop.prepare(pool, files)
    hop = await synchop.sync_in_one_call(pool, prep, files, fsync, result) if prep else None
    if hop is not None:
        others = None if hop.fast is None else hop.fast.others
        found = await (
            collect_dirty(pool, files)
            if others is None
            else sift(pool, raw_of(pool, others), files)
        )
        first_again, result.skipped = result.skipped, set()
    else:
        fast = await csync.collect(pool, files) if csync.usable(pool._core) else None
        found = await (
            collect_dirty(pool, files)
            if fast is None
            else sift(pool, raw_of(pool, fast.others), files)
        )
        if fast is not None:
            await csync.write_fast(pool, fast, result)
            first_again, result.skipped = result.skipped, set()
    items, held, claimed = found.items, found.held, found.claimed
    held = list(held)
    if held and pool._reap_due(0.0):
        # Dead processes' pins dropped: those pages are looked at again by the first round.
        first_again |= set(held)
        held = []
    for _round in range(RECHECK_ROUNDS):
        if result.errors:
            break
        part = await write_items(pool._io, items)
        result.merge(part)
        result.errors += part.errors
        if result.errors:
            break
        # Pages found busy when their batch came to them, and pages another writer (or
        # another task here) is writing: wait for the claims, then look at those pages again
        # and write what is still (or again) dirty. A claim held past the deadline is
        # reported, never taken for success.
        again = set(part.skipped) | first_again
        first_again = set()
        if claimed:
            stuck = await settle_claims(pool, claimed, deadline)
            result.incomplete += len(stuck)
            result.stalled_writers |= {pid for _, pid in stuck}
            stuck_keys = {(it[0], it[1]) for it, _ in stuck}
            again |= {(it[0], it[1]) for it, _ in claimed} - stuck_keys
            again -= stuck_keys
        if held and _round < len(HELD_PAUSES):
            # Pinned dirty pages: looked at again after a pause (see HELD_PAUSES).
            again |= set(held)
            held = []
            await asyncio.sleep(HELD_PAUSES[_round])
        if not again:
            break
        found = await collect_dirty(pool, {f for f, _ in again})
        items = [it for it in found.items if (it[0], it[1]) in again]
        claimed = [(it, pid) for it, pid in found.claimed if (it[0], it[1]) in again]
        held += [key for key in found.held if key in again]
    else:
        # Still busy after every round (pages claimed again and again): not written here.
        result.incomplete += len(items) + len(claimed)
    result.incomplete += len(held)
    if fsync and not result.errors and (hop is None or hop.fsync is None):
        await fsync_pending(pool, files, result)
    if result.errors:
        raise result.errors[0]
    if result.incomplete:
        stalled = (
            f"; writer process(es) {sorted(result.stalled_writers)} did not finish within "
            f"{pool.wait_timeout} s"
            if result.stalled_writers
            else ""
        )
        raise Incomplete(
            f"{reason}: {result.incomplete} dirty page(s) are pinned or being written by "
            f"another process and could not be written{stalled}; {result.written} written. "
            "Retry later.",
            result=result,
        )
    return result


#: How often a sync looks again at pages that were busy (claimed or pinned) when it came to them.
RECHECK_ROUNDS = 8
#: The pauses (seconds) after which a sync looks again at dirty pages it found pinned, before
#: it reports them Incomplete: a transaction's commit copying into a page, or one between its
#: pin and its latch, lets go within microseconds (a page pinned only by its transaction's
#: latch is written as it is: see layout.quiet_latch). A pin held longer costs the sync these
#: 15 ms, then Incomplete, as before.
HELD_PAUSES = (0.0005, 0.001, 0.002, 0.004, 0.008)
