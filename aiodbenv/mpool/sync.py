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
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio.to_thread

from .. import _io
from .._process import is_alive
from ..errors import Incomplete, InvalidArgument, LockTimeout, NoSpace
from ..region.mutex import BUSY, ffi, owner_pid
from ..region.mutex import unlock as _unlock
from . import accel
from .checksum import seal_pages
from .layout import (
    BH,
    BH_DIRTY,
    BH_READING,
    BH_REDIRTIED,
    BH_WRITING,
    BUCKET,
    FF_CHECKSUM,
    FF_DEAD,
    FF_NOFILE,
    FF_TEMP,
    FILE_ENTRY,
    HANDLE_STATS,
    MAX_FILES,
    MAX_PGNO,
)
from .table import Cache

if TYPE_CHECKING:
    from .pool import Pool

__all__ = [
    "Collected",
    "SyncResult",
    "fsync_pending",
    "settle_claims",
    "trickle",
    "write_back",
    "write_items",
]

# The compiled accelerator's batch steps of write-back, when installed.
_c_snapshot = accel.snapshot
_c_write_done = accel.write_done
_c_collect = accel.collect
_CORRUPT = accel.CORRUPT

logger = logging.getLogger("aiodbenv")

#: Pages per worker-thread hop: 64 pages of 4 KiB keep each hop's loop work under ~50 µs.
BATCH_PAGES = 64
BATCH_BYTES = 1 << 20

Item = tuple[int, int, Cache, int, int]  # (file slot, pgno, cache, bucket, buffer offset)


@dataclass
class SyncResult:
    """What a sync or write did: pages ``written``, pages that were dirty but pinned or
    claimed by a writer that did not finish in time (``incomplete``; the pids of such writers
    in ``stalled_writers``), dirty pages of files that were closed for good and so
    ``dropped``, the number of files fsynced, and the ``pwritev`` calls and bytes it took."""

    written: int = 0
    incomplete: int = 0
    dropped: int = 0
    files_synced: int = 0
    write_calls: int = 0
    bytes_written: int = 0
    stalled_writers: set[int] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list, repr=False)
    #: ``(file, pgno)`` of pages that were pinned, being read or claimed by another writer
    #: when their batch came to write them (found free just before): the caller decides
    #: whether to look again (sync, checkpoint) or not (trickle, eviction).
    skipped: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def merge(self, part: SyncResult) -> None:
        """Add ``part``'s counts (not its errors) to this result."""
        self.written += part.written
        self.incomplete += part.incomplete
        self.dropped += part.dropped
        self.files_synced += part.files_synced
        self.write_calls += part.write_calls
        self.bytes_written += part.bytes_written
        self.stalled_writers |= part.stalled_writers


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

    items: list[Item]
    held: list[tuple[int, int]]
    prios: list[int]
    claimed: list[tuple[Item, int]]


async def collect_dirty(pool: Pool, files: set[int] | None) -> Collected:
    """Find the dirty buffers (of ``files``, or all): see :class:`Collected`.

    Walks the buckets on the loop, letting other tasks run about every millisecond, so a
    large cache does not stall the loop. A claim whose writer is dead is taken over here.
    """
    raw = await (_collect_c(pool) if _c_collect is not None else _collect_py(pool))
    # File slots and page numbers read from buffer headers: checked before they become file
    # table indexes and file offsets (and the packed sort key below).
    for i, (tag, pgno) in enumerate(zip(raw.tags, raw.pgnos)):
        if not 1 <= tag <= MAX_FILES or pgno >= MAX_PGNO:
            raw.caches[i].corrupt(f"buffer {raw.bhs[i]} holds page {pgno} of file slot {tag}")
    want = None if files is None else {f + 1 for f in files}
    writable = {tag: pool._can_write(tag) for tag in set(raw.tags)}
    held: list[tuple[int, int]] = []
    claimed: list[tuple[Item, int]] = []
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
            if alive[pid] or not take_over_claim(cache, b, bh, pid):
                item = (tag - 1, pgnos[i], cache, b, bh)
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
    items: list[Item] = []
    for start in range(0, len(order), 2048):  # in slices: the loop gets a turn between them
        items += [
            (tags[i] - 1, pgnos[i], caches[i], buckets[i], bhs[i])
            for i in order[start : start + 2048]
        ]
        await pause()
    return Collected(items, held, [prios[i] for i in order], claimed)


def take_over_claim(cache: Cache, b: int, bh: int, pid: int) -> bool:
    """Release the write claim dead process ``pid`` left on buffer ``bh`` of bucket ``b``.

    The page kept ``DIRTY`` through the write, so it is simply written again; a write the dead
    process completed is harmless to repeat. False if the buffer no longer carries that claim.
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
    pool: Pool, claimed: list[tuple[Item, int]], deadline: float
) -> list[tuple[Item, int]]:
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
            _f, _p, cache, b, bh = item
            w = cache.words
            x = bh >> 3
            if not (w[x + BH.word.flags] & BH_WRITING and w[x + BH.word.io_pid] == pid):
                continue  # released (a hint read without the lock; the re-collect checks)
            if pid not in alive:
                alive[pid] = is_alive(pid)
            if not alive[pid] and take_over_claim(cache, b, bh, pid):
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


async def _collect_c(pool: Pool) -> _Raw:
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
                    _recover(cache, held)
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


async def _collect_py(pool: Pool) -> _Raw:
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
                            else (1 if w[x + BH.word.ref] or flags & BH_READING else 0)
                        )
            finally:
                cache.unlock(b)
    return out


async def write_back(pool: Pool, *, files: set[int] | None, fsync: bool, reason: str) -> SyncResult:
    """Write every writable dirty page (of ``files``, or all); fsync if asked. Raises the
    first write error, else :class:`Incomplete` if pinned dirty pages were left."""
    pool._enter()
    try:
        return await _write_back(pool, files=files, fsync=fsync, reason=reason)
    finally:
        pool._leave()


async def _write_back(
    pool: Pool, *, files: set[int] | None, fsync: bool, reason: str
) -> SyncResult:
    deadline = time.monotonic() + pool.wait_timeout
    result = SyncResult()
    found = await collect_dirty(pool, files)
    if found.held and pool._reap_due(0.0):
        found = await collect_dirty(pool, files)  # dead processes' pins dropped: look again
    items, held, claimed = found.items, found.held, found.claimed
    held = list(held)
    for _round in range(RECHECK_ROUNDS):
        part = await write_items(pool, items, fsync=False)
        result.merge(part)
        result.errors += part.errors
        if result.errors:
            break
        # Pages found busy when their batch came to them, and pages another writer (or
        # another task here) is writing: wait for the claims, then look at those pages again
        # and write what is still (or again) dirty. A claim held past the deadline is
        # reported, never taken for success.
        again = set(part.skipped)
        if claimed:
            stuck = await settle_claims(pool, claimed, deadline)
            result.incomplete += len(stuck)
            result.stalled_writers |= {pid for _, pid in stuck}
            stuck_keys = {(it[0], it[1]) for it, _ in stuck}
            again |= {(it[0], it[1]) for it, _ in claimed} - stuck_keys
            again -= stuck_keys
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
    if fsync and not result.errors:
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


async def trickle(pool: Pool, pct: int) -> int:
    """Write the fewest dirty pages that leave ``pct``% of the cached pages clean; returns
    how many were written."""
    return (await trickle_result(pool, pct)).written


async def trickle_result(pool: Pool, pct: int) -> SyncResult:
    """:func:`trickle`, returning the whole :class:`SyncResult`."""
    pool._enter()
    try:
        return await _trickle(pool, pct)
    finally:
        pool._leave()


async def _trickle(pool: Pool, pct: int) -> SyncResult:
    core = pool._core
    total = dirty = 0
    for cache in core.caches:
        total += cache.buffers()
        w = cache.words
        dirty += sum(w[bw + BUCKET.word.dirty] for bw in cache.bucket_words)
    clean = total - dirty
    target = (total * pct + 99) // 100
    if clean >= target:
        return SyncResult()
    need = target - clean
    found = await collect_dirty(pool, None)
    items, prios = found.items, found.prios
    # Write the least recently used dirty pages (those eviction would take next), in file
    # order for the disk. Both sorts run on C-level keys: no Python call per page.
    picked = sorted(sorted(range(len(items)), key=prios.__getitem__)[:need])
    chosen = [items[i] for i in picked]
    result = await write_items(pool, chosen, fsync=False)
    core.w0[pool._hs + HANDLE_STATS.word.page_trickle] += result.written
    if result.errors:
        raise result.errors[0]
    return result


#: How often a sync looks again at pages that were busy (claimed or pinned) when it came to them.
RECHECK_ROUNDS = 8

#: Write batches in flight at once: one being written while the loop snapshots the next.
#: More does not help: writes to one file serialize on its inode lock (ext4), measured here.
BATCHES_IN_FLIGHT = 2


async def write_items(pool: Pool, items: list[Item], *, fsync: bool) -> SyncResult:
    """Write ``items`` (sorted by file and page) in batches, then, if asked, fsync every file
    with pages written but not yet fsynced (:func:`fsync_pending`).

    Up to ``BATCHES_IN_FLIGHT`` batches are under way at once. Every batch is awaited and its
    failure, whatever it is, lands in ``result.errors``.

    Cancellation: batches already started finish, with their bookkeeping (they are tasks of
    the pool, which logs a failure nobody awaited); the ones not started are not, and their
    pages stay dirty.
    """
    result = SyncResult()
    pages: dict[int, int] = {}
    in_flight: set[asyncio.Task[None]] = set()
    try:
        i = 0
        while i < len(items):
            if pool._closing:
                raise InvalidArgument("the environment is closing: write-back stopped")
            batch: list[Item] = []
            size = 0
            while i < len(items) and len(batch) < BATCH_PAGES and size < BATCH_BYTES:
                fidx = items[i][0]
                ps = pages.get(fidx)
                if ps is None:
                    ps = pages[fidx] = pool._core.file_field(fidx, "page_size")
                batch.append(items[i])
                size += ps
                i += 1
            if len(in_flight) >= BATCHES_IN_FLIGHT:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                _reap(done, result)
            in_flight.add(pool._spawn(_batch_job(pool, batch, result)))
        if in_flight:
            await asyncio.shield(asyncio.wait(in_flight))
            _reap(in_flight, result)
    except asyncio.CancelledError:
        # The batches under way go on as the pool's tasks (Env.close waits for them); their
        # failures are logged, since nobody is left to receive them.
        for task in in_flight:
            pool._orphan(task, "a write batch")
        raise
    if fsync and not result.errors:
        await fsync_pending(pool, {it[0] for it in items}, result)
    return result


def _reap(done: set[asyncio.Task[None]], result: SyncResult) -> None:
    """Collect the failures of finished batch tasks into ``result`` (each is retrieved)."""
    for task in done:
        if task.cancelled():
            result.errors.append(asyncio.CancelledError("a write batch was cancelled"))
        elif (err := task.exception()) is not None:
            result.errors.append(err)


async def _batch_job(pool: Pool, batch: list[Item], result: SyncResult) -> None:
    core = pool._core
    w0 = core.w0
    sizes: dict[int, int] = {}
    live: list[Item] = []
    for item in batch:
        fidx = item[0]
        if fidx not in sizes:
            e = core.entry(fidx)
            sizes[fidx] = (
                -1
                if not e or w0[e + FILE_ENTRY.word.flags] & FF_DEAD
                else int(w0[e + FILE_ENTRY.word.page_size])
            )
        if sizes[fidx] < 0:
            result.dropped += _drop_dirty(item)  # closed for good: nobody wants the page
        else:
            live.append(item)
    if not live:
        return
    # Step 1, on the loop: copy each page under its bucket mutex and flag it WRITING.
    offsets = []
    total = 0
    for item in live:
        offsets.append(total)
        total += sizes[item[0]]
    snapshot = bytearray(total)
    status = _snapshot(pool, live, snapshot, offsets)
    taken = [
        (item, memoryview(snapshot)[off : off + sizes[item[0]]])
        for item, off, st in zip(live, offsets, status)
        if st == 1
    ]
    result.skipped.update((item[0], item[1]) for item, st in zip(live, status) if st == 2)
    if not taken:
        return
    # From here on this process holds claims: whatever happens (an error, a cancellation),
    # the finally releases them, and a page is cleaned only if its write was confirmed.
    done: set[tuple[int, int]] = set()
    try:
        _io.step("claimed")
        # Step 2, in a worker thread: pgout on the copies, one pwritev per run of pages.
        jobs = _plan_runs(pool, taken)
        for job in jobs:
            if job.fd is None:
                try:
                    job.fd = await pool._write_fd(job.fidx, job.temp)
                except OSError as open_err:
                    job.error = open_err
        try:
            outcome = await anyio.to_thread.run_sync(_write_runs, jobs, limiter=pool._limiter)
        except Exception as thread_err:  # the thread could not even run: every write failed
            outcome = [thread_err] * len(jobs)
        ok_files: set[int] = set()
        for job, err in zip(jobs, outcome):
            fidx = job.fidx
            if err is not None:
                result.errors.append(_typed(err, pool._core.file_name(fidx)))
                w0[pool._hs + HANDLE_STATS.word.write_failures] += 1
            else:
                ok_files.add(fidx)
                done.update((fidx, p) for p in job.pgnos)
                nbytes = sum(len(c) for c in job.copies)
                pool._count_write(fidx, len(job.pgnos), nbytes)
                result.write_calls += 1
                result.bytes_written += nbytes
        # The writes are in the OS, not yet durable: say so in the file entries *before* any
        # page is marked clean, so that every later sync (in any process) fsyncs these files.
        for fidx in ok_files:
            note_written(pool, fidx)
    finally:
        # Step 3, on the loop: release the claims; written pages not dirtied again are clean.
        _write_done(
            pool,
            [item for item, _ in taken],
            [(item[0], item[1]) not in done for item, _ in taken],
        )
        result.written += len(done)
        pool._notify()
    _io.step("write_done")


def note_written(pool: Pool, fidx: int) -> None:
    """A write of file slot ``fidx`` succeeded: bump its written generation (see the module
    docstring). Under the file mutex: two processes' bumps must not collapse into one."""
    core = pool._core
    e = core.entry(fidx)
    if not e:
        return
    with core.file_mutex(fidx):
        core.w0[e + FILE_ENTRY.word.written_gen] += 1


def _drop_dirty(item: Item) -> int:
    _fidx, pgno, cache, b, bh = item
    w = cache.words
    x = bh >> 3
    cache.lock(b)
    try:
        flags = w[x + BH.word.flags]
        if (
            w[x + BH.word.file] == item[0] + 1
            and w[x + BH.word.pgno] == pgno
            and flags & BH_DIRTY
            and not w[x + BH.word.ref]
            and not flags & (BH_READING | BH_WRITING)
        ):
            w[x + BH.word.flags] = flags & ~BH_DIRTY
            cache.decrement(cache.bucket_words[b] + BUCKET.word.dirty, f"bucket {b}'s dirty count")
            return 1
        return 0
    finally:
        cache.unlock(b)


def _snapshot(pool: Pool, items: list[Item], dst: bytearray, offsets: list[int]) -> list[int]:
    """Copy each item's page into ``dst`` at its offset and flag it WRITING; per item 1
    (taken), 2 (pinned or busy: not now) or 0 (evicted, reused or cleaned meanwhile)."""
    status = [0] * len(items)
    # Each copy's slot size: the buffer's recorded page size must match it (checked under
    # the bucket lock), or a corrupt size would copy past the slot.
    slots = [end - start for start, end in zip(offsets, offsets[1:] + [len(dst)])]
    if _c_snapshot is not None:
        for cache, idx in _by_cache(items):
            done = 0
            while done < len(idx):
                part = idx[done:]
                n = len(part)
                st = ffi.new("int64_t[]", [slots[i] for i in part])  # in: slot sizes
                got = _c_snapshot(
                    cache.wptr,
                    cache.region.base,
                    cache.c_mptrs,
                    cache.c_nowait_words,
                    cache.c_bucket_words,
                    n,
                    ffi.new("uint64_t[]", [items[i][3] for i in part]),
                    ffi.new("uint64_t[]", [items[i][4] for i in part]),
                    ffi.new("uint64_t[]", [items[i][0] + 1 for i in part]),
                    ffi.new("uint64_t[]", [items[i][1] for i in part]),
                    ffi.from_buffer(dst),
                    ffi.new("uint64_t[]", [offsets[i] for i in part]),
                    pool._pid,
                    st,
                )
                for k in range(got):
                    status[part[k]] = int(st[k])
                if got < n:  # that bucket's lock failed: handle it the Python way
                    i = part[got]
                    if st[got] == -errno.EOWNERDEAD:
                        _recover(cache, items[i][3])
                    status[i] = _snapshot_one(pool, items[i], dst, offsets[i], slots[i])
                    got += 1
                done += got
        return status
    for i, item in enumerate(items):
        status[i] = _snapshot_one(pool, item, dst, offsets[i], slots[i])
    return status


def _snapshot_one(pool: Pool, item: Item, dst: bytearray, off: int, slot: int) -> int:
    fidx, pgno, cache, b, bh = item
    w = cache.words
    x = cache.check_bh(bh)
    try:
        cache.lock(b)
    except LockTimeout:
        return 2  # its bucket stayed held (a stopped process?): busy, reported incomplete
    try:
        flags = w[x + BH.word.flags]
        if w[x + BH.word.file] != fidx + 1 or w[x + BH.word.pgno] != pgno or not flags & BH_DIRTY:
            return 0
        if w[x + BH.word.ref] or flags & (BH_READING | BH_WRITING):
            return 2
        # The claim: DIRTY stays set until the write is confirmed (see _write_done_one).
        w[x + BH.word.flags] = (flags & ~BH_REDIRTIED) | BH_WRITING
        w[x + BH.word.io_pid] = pool._pid
        size = int(w[x + BH.word.page_size])
        if size != slot or bh + BH.size + size > cache.region.size:
            cache.corrupt(f"buffer {bh} records a page of {size} bytes, not {slot}")
        dst[off : off + size] = cache.buf[bh + BH.size : bh + BH.size + size]
        return 1
    finally:
        cache.unlock(b)


def _write_done(pool: Pool, items: list[Item], failed: list[bool]) -> None:
    """Release this process's claims on the items' buffers: a page whose write succeeded and
    that was not dirtied again meanwhile is clean; every other stays dirty."""
    if _c_write_done is not None:
        for cache, idx in _by_cache(items):
            done = 0
            while done < len(idx):
                part = idx[done:]
                n = len(part)
                got = _c_write_done(
                    cache.wptr,
                    cache.c_mptrs,
                    cache.c_nowait_words,
                    cache.c_bucket_words,
                    n,
                    ffi.new("uint64_t[]", [items[i][3] for i in part]),
                    ffi.new("uint64_t[]", [items[i][4] for i in part]),
                    ffi.new("uint64_t[]", [items[i][0] + 1 for i in part]),
                    ffi.new("uint64_t[]", [items[i][1] for i in part]),
                    pool._pid,
                    ffi.new("uint8_t[]", [failed[i] for i in part]),
                )
                if got < n:
                    # The lock failed: either its holder died (the mutex is then ours: repair
                    # it) or it stayed held past the bounded wait (the step then finishes in
                    # a task of the pool, retrying without blocking the loop).
                    i = part[got]
                    if owner_pid(cache.mptrs[items[i][3]]) == threading.get_native_id():
                        _recover(cache, items[i][3])
                    pool._settle(_write_done_one, pool, items[i], failed[i])
                    got += 1
                done += got
        return
    for item, bad in zip(items, failed):
        pool._settle(_write_done_one, pool, item, bad)


def _write_done_one(pool: Pool, item: Item, failed: bool) -> None:
    fidx, pgno, cache, b, bh = item
    w = cache.words
    x = bh >> 3
    cache.lock(b)
    try:
        flags = w[x + BH.word.flags]
        if not (
            flags & BH_WRITING
            and w[x + BH.word.io_pid] == pool._pid
            and w[x + BH.word.file] == fidx + 1
            and w[x + BH.word.pgno] == pgno
        ):
            return  # not our claim any more (taken over): leave it alone
        if not failed and flags & BH_DIRTY and not flags & BH_REDIRTIED:
            flags &= ~BH_DIRTY
            cache.decrement(cache.bucket_words[b] + BUCKET.word.dirty, f"bucket {b}'s dirty count")
        w[x + BH.word.flags] = flags & ~(BH_WRITING | BH_REDIRTIED)
        w[x + BH.word.io_pid] = 0
    finally:
        cache.unlock(b)


def _recover(cache: Cache, b: int) -> None:
    """The compiled lock found the holder dead (mutex held): repair the Python way, let go."""
    mx = cache.mutexes[b]
    mx.acquire_contended(errno.EOWNERDEAD)
    if mx.ptr is not None:
        _unlock(mx.ptr)


def _by_cache(items: list[Item]) -> list[tuple[Cache, list[int]]]:
    groups: dict[int, tuple[Cache, list[int]]] = {}
    for i, item in enumerate(items):
        cache = item[2]
        groups.setdefault(id(cache), (cache, []))[1].append(i)
    return list(groups.values())


@dataclass
class _Run:
    fidx: int
    fd: int | None  # the pool's descriptor (never opened or closed by the write itself)
    temp: bool
    offset: int
    pgnos: list[int]
    copies: list[memoryview]
    pgout: object
    cookie: bytes
    checksum: bool = False
    error: BaseException | None = None  # no descriptor could be had


def _plan_runs(pool: Pool, taken: list[tuple[Item, memoryview]]) -> list[_Run]:
    core = pool._core
    runs: list[_Run] = []
    for (fidx, pgno, _c, _b, _bh), copy in taken:
        ps = len(copy)
        last = runs[-1] if runs else None
        if last is not None and last.fidx == fidx and last.pgnos[-1] + 1 == pgno:
            last.pgnos.append(pgno)
            last.copies.append(copy)
            continue
        e = core.entry(fidx)
        ftype = int(core.w0[e + FILE_ENTRY.word.ftype])
        pgout = pool._registry.get(ftype, (None, None))[1] if ftype else None
        runs.append(
            _Run(
                fidx=fidx,
                fd=pool._fd_for_write(fidx),
                temp=bool(core.w0[e + FILE_ENTRY.word.flags] & FF_TEMP),
                offset=pgno * ps,
                pgnos=[pgno],
                copies=[copy],
                pgout=pgout,
                cookie=core.file_cookie(fidx) if pgout else b"",
                checksum=bool(core.w0[e + FILE_ENTRY.word.flags] & FF_CHECKSUM),
            )
        )
    return runs


def _write_runs(runs: list[_Run]) -> list[BaseException | None]:
    """In a worker thread: apply pgout, write each run whole; per run, its error or None."""
    out: list[BaseException | None] = []
    for run in runs:
        try:
            if run.error is not None:
                raise run.error
            assert run.fd is not None
            if run.pgout is not None:  # on the copies: the cached pages stay as they are
                for pgno, copy in zip(run.pgnos, run.copies):
                    run.pgout(pgno, copy, run.cookie)  # type: ignore[operator]
            if run.checksum:  # after pgout: the trailer covers what goes to disk
                seal_pages(run.pgnos, run.copies)
            _pwrite_all(run.fd, run.copies, run.offset)
            out.append(None)
        except BaseException as err:
            out.append(err)
    return out


def _pwrite_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    """pwritev ``bufs`` at ``offset``, continuing after short writes: a short write is not
    an error by itself (a full disk then answers the next call with ENOSPC)."""
    left = [b for b in bufs if len(b)]
    while left:
        n = _io.pwritev(fd, left, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short write: nothing written at offset {offset}")
        offset += n
        while n and left:
            if n >= len(left[0]):
                n -= len(left[0])
                left.pop(0)
            else:
                left[0] = left[0][n:]
                n = 0


async def fsync_pending(pool: Pool, files: set[int] | None, result: SyncResult) -> None:
    """fsync every file (of ``files``, or all) with page writes not yet covered by an fsync,
    whoever wrote them (one worker-thread hop), and record what each fsync covered.

    A file is fsynced through this process's descriptor if it has one, else through one
    opened by its path just for this (fsync flushes the file, whatever descriptor wrote it).
    Temporary and nofile files are never made durable. A failed fsync panics the environment
    and raises :class:`~aiodbenv.errors.RunRecovery` (see the module docstring).

    Cancellation: the fsyncs under way finish as a task of the pool, recording what they
    covered (or panicking); the caller gets CancelledError.
    """
    core = pool._core
    w0 = core.w0
    targets: list[tuple[int, int | None, str | None, int]] = []
    # The slot may be freed and reused by another file while the fsync runs: what it covered
    # is recorded only if the slot still holds the same file.
    ids: dict[int, bytes] = {}
    for fidx in range(MAX_FILES) if files is None else sorted(files):
        e = core.entry(fidx)
        if not e or w0[e + FILE_ENTRY.word.flags] & (FF_DEAD | FF_NOFILE | FF_TEMP):
            continue
        gen = int(w0[e + FILE_ENTRY.word.written_gen])
        if gen <= w0[e + FILE_ENTRY.word.synced_gen]:
            continue
        fd = pool._fd_for_write(fidx)
        path = None if fd is not None else core.file_name(fidx)
        if fd is not None or path is not None:
            targets.append((fidx, fd, path, gen))
            ids[fidx] = core.fileid(fidx)
    if not targets:
        return
    _io.step("fsync_begin")

    # Per target: None (fsynced), ("open", err): it could not be opened (an ordinary error:
    # nothing was lost yet), ("fsync", err): the fsync failed (fatal).
    Outcome = tuple[str, OSError] | None

    def run() -> list[Outcome]:
        res: list[Outcome] = []
        for _fidx, fd, path, _gen in targets:
            if fd is None:
                assert path is not None
                try:
                    own = _io.open_file(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as err:
                    res.append(("open", err))
                    continue
            try:
                _io.fsync(own if fd is None else fd)
                res.append(None)
            except OSError as err:
                res.append(("fsync", err))
            finally:
                if fd is None:
                    os.close(own)
        return res

    async def job() -> list[Outcome]:
        # Records (or panics) inside the pool's task, so a cancelled caller changes nothing.
        res = await anyio.to_thread.run_sync(run, limiter=pool._limiter)
        for i, ((fidx, _fd, path, gen), out) in enumerate(zip(targets, res)):
            e = core.entry(fidx)
            if (
                out is not None
                and out[0] == "open"
                and isinstance(out[1], FileNotFoundError)
                and e
                and not w0[e + FILE_ENTRY.word.refcnt]
            ):
                # Closed everywhere and then removed: nothing is left to make durable, and
                # the next sync must not fail on it again.
                logger.warning("%s was removed before its last writes were fsynced", path)
                res[i] = out = None
            if out is None:
                if e and core.fileid(fidx) == ids[fidx]:
                    with core.file_mutex(fidx):
                        if w0[e + FILE_ENTRY.word.synced_gen] < gen:
                            w0[e + FILE_ENTRY.word.synced_gen] = gen
            elif out[0] == "fsync":
                pool._fsync_failed(path or core.file_name(fidx) or f"file slot {fidx}", out[1])
        return res

    task = pool._spawn(job())
    try:
        outcomes = await asyncio.shield(task)
    except asyncio.CancelledError:
        pool._orphan(task, "an fsync")
        raise
    for out in outcomes:
        if out is None:
            result.files_synced += 1
        else:
            result.errors.append(out[1])
    _io.step("fsync_end")


def _typed(err: BaseException, name: str | None) -> BaseException:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        typed = NoSpace(f"writing {name}: {what}; the pages stay dirty")
        typed.__cause__ = err
        return typed
    return err
