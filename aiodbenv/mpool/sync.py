"""Write-back: sync, fsync, trickle and the writes eviction needs.

Dirty buffers are collected bucket by bucket, sorted by file and page number (as Berkeley DB
does, so the disk sees ascending offsets) and written in batches: each batch snapshots its pages
under their bucket mutexes on the event loop (a 4 KiB copy is ~0.5 µs), then one worker-thread
hop applies pgout to the copies and writes each run of adjacent pages with one ``pwritev``.
Files are fsynced once, at the end, not after each write.

While its copy is being written a buffer is flagged ``WRITING``: it can be read, pinned and
even dirtied again, but not evicted, so a failed write can put its dirty mark back and nothing
is ever marked clean that is not on disk.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio.to_thread

from .. import _io
from ..errors import Incomplete, InvalidArgument, NoSpace
from ..region.mutex import ffi, speedups
from ..region.mutex import unlock as _unlock
from .checksum import seal_pages
from .layout import (
    BH,
    BH_DIRTY,
    BH_READING,
    BH_WRITING,
    FF_CHECKSUM,
    FF_DEAD,
    FF_TEMP,
    MAX_FILES,
    MAX_PGNO,
)
from .table import (
    _F,
    _HS,
    B_DIRTY,
    H_FILE,
    H_FLAGS,
    H_IOPID,
    H_PGNO,
    H_PRIO,
    H_REF,
    H_SIZE,
    Cache,
)

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["SyncResult", "trickle", "write_back", "write_items"]

# The compiled accelerator's batch steps of write-back, when installed.
_c_snapshot = speedups.aiodb_snapshot if speedups is not None else None
_c_write_done = speedups.aiodb_write_done if speedups is not None else None
_c_collect = speedups.aiodb_collect if speedups is not None else None
_CORRUPT = speedups.AIODB_CORRUPT if speedups is not None else 0

#: Pages per worker-thread hop: 64 pages of 4 KiB keep each hop's loop work under ~50 µs.
BATCH_PAGES = 64
BATCH_BYTES = 1 << 20

Item = tuple[int, int, Cache, int, int]  # (file slot, pgno, cache, bucket, buffer offset)


@dataclass
class SyncResult:
    """What a sync or write did: pages ``written``, pages that were dirty but pinned
    (``incomplete``), dirty pages of files that were closed for good and so ``dropped``, the
    number of files fsynced, and the ``pwritev`` calls and bytes it took."""

    written: int = 0
    incomplete: int = 0
    dropped: int = 0
    files_synced: int = 0
    write_calls: int = 0
    bytes_written: int = 0
    errors: list[BaseException] = field(default_factory=list, repr=False)


#: Longest stretch of bookkeeping on the loop before collect_dirty lets other tasks run.
YIELD_EVERY = 0.001


async def collect_dirty(
    pool: Pool, files: set[int] | None
) -> tuple[list[Item], list[tuple[int, int]], list[int]]:
    """Dirty buffers this process can write (sorted by file and page), the ``(file, pgno)``
    of dirty ones it cannot write now (pinned, or under I/O; or unwritable pages of
    ``files``), and the priority stamp of each item (for trickle, which writes the least
    recently used first).

    Walks the buckets on the loop, letting other tasks run about every millisecond, so a
    large cache does not stall the loop.
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
    keep: list[int] = []
    tags, pgnos = raw.tags, raw.pgnos
    pause = _Pause()
    for i, (tag, busy) in enumerate(zip(tags, raw.busy)):
        if not i & 2047:
            await pause()
        if want is not None and tag not in want:
            continue
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
    return items, held, [prios[i] for i in order]


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
                if n == _CORRUPT:
                    cache.corrupt(f"bucket {int(stopped[0])}'s chain has a bad offset or loops")
                if n == -errno.EOWNERDEAD:
                    _recover(cache, int(stopped[0]))
                else:
                    cache.lock(int(stopped[0]))  # raises the right error
                    cache.unlock(int(stopped[0]))
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
            if not w[bw + B_DIRTY]:
                continue
            if w[bw + B_DIRTY] > cache.max_chain:
                cache.corrupt(f"bucket {b}'s dirty count {int(w[bw + B_DIRTY])}")
            cache.lock(b)
            try:
                for off in cache.chain(b):
                    x = off >> 3
                    flags = w[x + H_FLAGS]
                    if flags & BH_DIRTY:
                        out.tags.append(int(w[x + H_FILE]))
                        out.pgnos.append(int(w[x + H_PGNO]))
                        out.caches.append(cache)
                        out.buckets.append(b)
                        out.bhs.append(off)
                        out.prios.append(int(w[x + H_PRIO]))
                        out.busy.append(
                            1 if w[x + H_REF] or flags & (BH_READING | BH_WRITING) else 0
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
    items, held, _ = await collect_dirty(pool, files)
    result = await write_items(pool, items, fsync=fsync)
    result.incomplete += len(held)
    if result.errors:
        raise result.errors[0]
    if result.incomplete:
        err = Incomplete(
            f"{reason}: {result.incomplete} dirty page(s) are pinned and could not be written; "
            f"{result.written} written. Retry once they are unpinned."
        )
        err.result = result  # type: ignore[attr-defined]
        raise err
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
        dirty += sum(w[bw + B_DIRTY] for bw in cache.bucket_words)
    clean = total - dirty
    target = (total * pct + 99) // 100
    if clean >= target:
        return SyncResult()
    need = target - clean
    items, _, prios = await collect_dirty(pool, None)
    # Write the least recently used dirty pages (those eviction would take next), in file
    # order for the disk. Both sorts run on C-level keys: no Python call per page.
    picked = sorted(sorted(range(len(items)), key=prios.__getitem__)[:need])
    chosen = [items[i] for i in picked]
    result = await write_items(pool, chosen, fsync=False)
    core.w0[pool._hs + _HS["page_trickle"]] += result.written
    if result.errors:
        raise result.errors[0]
    return result


#: Write batches in flight at once: one being written while the loop snapshots the next.
#: More does not help: writes to one file serialize on its inode lock (ext4), measured here.
BATCHES_IN_FLIGHT = 2


async def write_items(
    pool: Pool, items: list[Item], *, fsync: bool, synced: dict[int, int] | None = None
) -> SyncResult:
    """Write ``items`` (sorted by file and page) in batches, then fsync their files if asked.

    Up to ``BATCHES_IN_FLIGHT`` batches are under way at once. ``synced`` collects
    ``file slot -> descriptor`` of the files written, for a caller that fsyncs once after
    several calls (see :func:`fsync_files`).

    Cancellation: batches already started finish, with their bookkeeping (they are tasks of
    the pool); the ones not started are not, and their pages stay dirty.
    """
    result = SyncResult()
    if synced is None:
        synced = {}
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
                _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            in_flight.add(pool._spawn(_batch_job(pool, batch, result, synced)))
        if in_flight:
            await asyncio.shield(asyncio.gather(*in_flight))
    except asyncio.CancelledError:
        raise  # the batches under way go on as the pool's tasks; Env.close waits for them
    if fsync and synced:
        await fsync_files(pool, synced, result)
    return result


async def _batch_job(
    pool: Pool, batch: list[Item], result: SyncResult, synced: dict[int, int]
) -> None:
    core = pool._core
    w0 = core.w0
    sizes: dict[int, int] = {}
    live: list[Item] = []
    for item in batch:
        fidx = item[0]
        if fidx not in sizes:
            e = core.entry(fidx)
            sizes[fidx] = (
                -1 if not e or w0[e + _F["flags"]] & FF_DEAD else int(w0[e + _F["page_size"]])
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
    result.incomplete += sum(1 for st in status if st == 2)
    if not taken:
        return
    # Step 2, in a worker thread: pgout on the copies, one pwritev per run of adjacent pages.
    jobs = _plan_runs(pool, taken)
    try:
        outcome = await anyio.to_thread.run_sync(_write_runs, jobs, limiter=pool._limiter)
    except Exception as thread_err:  # the thread could not even run: every write failed
        outcome = [(None, thread_err)] * len(jobs)
    failed: set[tuple[int, int]] = set()
    for job, (fd, err) in zip(jobs, outcome):
        fidx = job.fidx
        if fd is not None and job.fd is None:
            pool._adopt_fd(fidx, fd, job.temp)
        if err is not None:
            failed.update((fidx, p) for p in job.pgnos)
            result.errors.append(_typed(err, pool._core.file_name(fidx)))
            w0[pool._hs + _HS["write_failures"]] += 1
        else:
            assert fd is not None
            synced[fidx] = fd
            nbytes = sum(len(c) for c in job.copies)
            pool._count_write(fidx, len(job.pgnos), nbytes)
            result.write_calls += 1
            result.bytes_written += nbytes
    # Step 3, on the loop: clear WRITING; a failed write puts the dirty mark back.
    _write_done(
        pool, [item for item, _ in taken], [(item[0], item[1]) in failed for item, _ in taken]
    )
    result.written += len(taken) - len(failed)
    pool._notify()


def _drop_dirty(item: Item) -> int:
    _fidx, pgno, cache, b, bh = item
    w = cache.words
    x = bh >> 3
    cache.lock(b)
    try:
        flags = w[x + H_FLAGS]
        if (
            w[x + H_FILE] == item[0] + 1
            and w[x + H_PGNO] == pgno
            and flags & BH_DIRTY
            and not w[x + H_REF]
            and not flags & (BH_READING | BH_WRITING)
        ):
            w[x + H_FLAGS] = flags & ~BH_DIRTY
            cache.decrement(cache.bucket_words[b] + B_DIRTY, f"bucket {b}'s dirty count")
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
    cache.lock(b)
    try:
        flags = w[x + H_FLAGS]
        if w[x + H_FILE] != fidx + 1 or w[x + H_PGNO] != pgno or not flags & BH_DIRTY:
            return 0
        if w[x + H_REF] or flags & (BH_READING | BH_WRITING):
            return 2
        cache.decrement(cache.bucket_words[b] + B_DIRTY, f"bucket {b}'s dirty count")
        w[x + H_FLAGS] = (flags & ~BH_DIRTY) | BH_WRITING
        w[x + H_IOPID] = pool._pid
        size = int(w[x + H_SIZE])
        if size != slot or bh + BH.size + size > cache.region.size:
            cache.corrupt(f"buffer {bh} records a page of {size} bytes, not {slot}")
        dst[off : off + size] = cache.buf[bh + BH.size : bh + BH.size + size]
        return 1
    finally:
        cache.unlock(b)


def _write_done(pool: Pool, items: list[Item], failed: list[bool]) -> None:
    """Clear WRITING on the items' buffers; where failed, put the dirty mark back."""
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
                    ffi.new("uint8_t[]", [failed[i] for i in part]),
                )
                if got < n:
                    i = part[got]
                    _recover(cache, items[i][3])
                    _write_done_one(items[i], failed[i])
                    got += 1
                done += got
        return
    for item, bad in zip(items, failed):
        _write_done_one(item, bad)


def _write_done_one(item: Item, failed: bool) -> None:
    _fidx, _pgno, cache, b, bh = item
    w = cache.words
    x = bh >> 3
    cache.lock(b)
    try:
        flags = w[x + H_FLAGS] & ~BH_WRITING
        if failed and not flags & BH_DIRTY:
            flags |= BH_DIRTY
            w[cache.bucket_words[b] + B_DIRTY] += 1
        w[x + H_FLAGS] = flags
        w[x + H_IOPID] = 0
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
    fd: int | None
    path: str | None
    temp: bool
    offset: int
    pgnos: list[int]
    copies: list[memoryview]
    pgout: object
    cookie: bytes
    checksum: bool = False


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
        ftype = int(core.w0[e + _F["ftype"]])
        pgout = pool._registry.get(ftype, (None, None))[1] if ftype else None
        runs.append(
            _Run(
                fidx=fidx,
                fd=pool._fd_for_write(fidx),
                path=core.file_name(fidx),
                temp=bool(core.w0[e + _F["flags"]] & FF_TEMP),
                offset=pgno * ps,
                pgnos=[pgno],
                copies=[copy],
                pgout=pgout,
                cookie=core.file_cookie(fidx) if pgout else b"",
                checksum=bool(core.w0[e + _F["flags"]] & FF_CHECKSUM),
            )
        )
    return runs


def _write_runs(runs: list[_Run]) -> list[tuple[int | None, BaseException | None]]:
    """In a worker thread: open what must be opened, apply pgout, pwritev each run."""
    from .pool import _new_temp_fd

    out: list[tuple[int | None, BaseException | None]] = []
    opened: dict[int, int] = {}
    for run in runs:
        fd = run.fd if run.fd is not None else opened.get(run.fidx)
        try:
            if fd is None:
                if run.temp:
                    fd = _new_temp_fd()
                elif run.path is None:
                    raise OSError(errno.EBADF, "file has no path to write to")
                else:
                    fd = _io.open_file(run.path, os.O_RDWR | os.O_CLOEXEC)
                opened[run.fidx] = fd
            if run.pgout is not None:  # on the copies: the cached pages stay as they are
                for pgno, copy in zip(run.pgnos, run.copies):
                    run.pgout(pgno, copy, run.cookie)  # type: ignore[operator]
            if run.checksum:  # after pgout: the trailer covers what goes to disk
                seal_pages(run.pgnos, run.copies)
            bufs = run.copies
            total = sum(len(b) for b in bufs)
            n = _io.pwritev(fd, bufs, run.offset)
            if n != total:
                raise OSError(errno.EIO, f"short write: {n} of {total} bytes")
            out.append((fd, None))
        except BaseException as err:
            out.append((fd, err))
    return out


async def fsync_files(pool: Pool, synced: dict[int, int], result: SyncResult) -> None:
    """fsync every file of ``synced`` (one worker-thread hop); errors go into
    ``result.errors``.

    The descriptors a write used may have been closed since (the file was closed while the
    sync ran), so each is looked up again now; a file no longer open here is opened by its
    path just to fsync it (fsync flushes the file, whatever descriptor wrote it). A closed
    temporary file has no path and needs nothing: its pages were dropped with it.
    """
    targets: list[tuple[int, int | None, str | None]] = []
    for fidx in synced:
        fd = pool._fd_for_write(fidx)
        path = (
            None if fd is not None or not pool._core.entry(fidx) else (pool._core.file_name(fidx))
        )
        if fd is not None or path is not None:
            targets.append((fidx, fd, path))

    def run() -> list[tuple[int, BaseException | None]]:
        res: list[tuple[int, BaseException | None]] = []
        for fidx, fd, path in targets:
            try:
                if fd is not None:
                    _io.fsync(fd)
                else:
                    assert path is not None
                    own = _io.open_file(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        _io.fsync(own)
                    finally:
                        os.close(own)
                res.append((fidx, None))
            except OSError as err:
                res.append((fidx, err))
        return res

    job = pool._spawn(anyio.to_thread.run_sync(run, limiter=pool._limiter))
    for fidx, err in await asyncio.shield(job):
        if err is None:
            result.files_synced += 1
        else:
            result.errors.append(_typed(err, pool._core.file_name(fidx)))


def _typed(err: BaseException, name: str | None) -> BaseException:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"writing {name}: no space left on device")
    return err
