"""Writing buffers out (Berkeley DB's mp_bh.c, ``__memp_bhwrite``), for eviction and sync.

:func:`write_items` writes a list of buffers in batches: each batch snapshots its pages under
their bucket mutexes on the event loop (a 4 KiB copy is ~0.5 µs) and claims them (``WRITING``,
``DIRTY`` kept), then one worker-thread hop applies pgout to the copies and writes each run of
adjacent pages with one ``pwritev``, then the claims are released and the pages written and not
dirtied again are clean. Why this is safe across processes is in :mod:`aiodbenv.mpool.sync`.
Everything it needs of the pool handle is its :class:`~aiodbenv.mpool.bh.BufferIO`.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from dataclasses import dataclass, field

from .. import _io
from .._threads import run_to_end
from ..errors import InvalidArgument, LockTimeout, NoSpace
from ..region.mutex import BUSY, attempt, ffi, owner_pid, step_waits
from . import accel
from .alloc import drop_dirty
from .bh import BufferIO
from .cache import BufRef, Cache
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
    FF_TEMP,
    FILE_ENTRY,
    HANDLE_STATS,
    quiet_latch,
)
from .wal import flush_log_for, written_lsn

__all__ = ["SyncResult", "note_written", "write_items"]

# The compiled accelerator's batch steps of write-back, when installed.
_c_snapshot = accel.snapshot
_c_write_done = accel.write_done


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
    #: With a log: the largest page LSN written (``(0, 0)`` if no page carrying one was), an
    #: :class:`aiodbenv.LSN` when :meth:`aiodbenv.Pool.sync` returns it; None without a log.
    lsn: tuple[int, int] | None = None

    def merge(self, part: SyncResult) -> None:
        """Add ``part``'s counts (not its errors) to this result."""
        if part.lsn is not None and (self.lsn is None or part.lsn > self.lsn):
            self.lsn = part.lsn
        self.written += part.written
        self.incomplete += part.incomplete
        self.dropped += part.dropped
        self.files_synced += part.files_synced
        self.write_calls += part.write_calls
        self.bytes_written += part.bytes_written
        self.stalled_writers |= part.stalled_writers


#: Pages per worker-thread hop: 64 pages of 4 KiB keep each hop's loop work under ~50 µs.
BATCH_PAGES = 64
BATCH_BYTES = 1 << 20


#: Write batches in flight at once: one being written while the loop snapshots the next.
#: More does not help: writes to one file serialize on its inode lock (ext4), measured here.
BATCHES_IN_FLIGHT = 2


async def write_items(io: BufferIO, items: list[BufRef]) -> SyncResult:
    """Write ``items`` (sorted by file and page) in batches (no fsync: that is the caller's,
    :func:`aiodbenv.mpool.fsync.fsync_pending`).

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
            if io.closing():
                raise InvalidArgument("the environment is closing: write-back stopped")
            batch: list[BufRef] = []
            size = 0
            while i < len(items) and len(batch) < BATCH_PAGES and size < BATCH_BYTES:
                fidx = items[i][0]
                ps = pages.get(fidx)
                if ps is None:
                    ps = pages[fidx] = io.core.file_field(fidx, "page_size")
                batch.append(items[i])
                size += ps
                i += 1
            if len(in_flight) >= BATCHES_IN_FLIGHT:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                _reap(done, result)
            in_flight.add(io.spawn(_batch_job(io, batch, result)))
        if in_flight:
            await asyncio.wait(in_flight)  # never cancels them; no sub-task
            _reap(in_flight, result)
    except asyncio.CancelledError:
        # The batches under way go on as the pool's tasks (Env.close waits for them); their
        # failures are logged, since nobody is left to receive them.
        for task in in_flight:
            io.orphan(task, "a write batch")
        raise
    return result


def _reap(done: set[asyncio.Task[None]], result: SyncResult) -> None:
    """Collect the failures of finished batch tasks into ``result`` (each is retrieved)."""
    for task in done:
        if task.cancelled():
            result.errors.append(asyncio.CancelledError("a write batch was cancelled"))
        elif (err := task.exception()) is not None:
            result.errors.append(err)


async def _batch_job(io: BufferIO, batch: list[BufRef], result: SyncResult) -> None:
    core = io.core
    w0 = core.meta_words
    sizes: dict[int, int] = {}
    live: list[BufRef] = []
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
            # Closed for good: nobody wants the page (a held bucket: async back-off).
            got = attempt(drop_dirty, item)
            result.dropped += await io.locked(drop_dirty, item) if got is BUSY else got
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
    status = _snapshot(io, live, snapshot, offsets)
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
    noted: set[int] = set()  # files whose written generation was bumped for these writes
    lsns = None
    try:
        _io.step("claimed")
        # The write-ahead rule: the log is durable up to the batch's largest page LSN
        # before any copy reaches its file. A failed flush raises here: nothing was written,
        # and the finally leaves every page dirty.
        lsns = await flush_log_for(io, taken) if io.log is not None else None
        # Step 2, in a worker thread: pgout on the copies, one pwritev per run of pages.
        jobs = _plan_runs(io, taken)
        for job in jobs:
            if job.fd is None:
                try:
                    job.fd = await io.write_fd(job.fidx, job.temp)
                except OSError as open_err:
                    job.error = open_err
        try:
            outcome = await run_to_end(_write_runs, jobs, limiter=io.limiter)
        except Exception as thread_err:  # the thread could not even run: every write failed
            outcome = [thread_err] * len(jobs)
        ok_files: set[int] = set()
        for job, err in zip(jobs, outcome):
            fidx = job.fidx
            if err is not None:
                result.errors.append(_typed(err, io.core.file_name(fidx)))
                w0[io.hs + HANDLE_STATS.word.write_failures] += 1
            else:
                ok_files.add(fidx)
                done.update((fidx, p) for p in job.pgnos)
                nbytes = sum(len(c) for c in job.copies)
                io.count_write(fidx, len(job.pgnos), nbytes)
                result.write_calls += 1
                result.bytes_written += nbytes
        # The writes are in the OS, not yet durable: say so in the file entries *before* any
        # page is marked clean, so that every later sync (in any process) fsyncs these files.
        # The file mutex with an async back-off; a file not bumped (LockTimeout) keeps its
        # pages dirty below: written, but no sync would know to fsync them.
        for fidx in sorted(ok_files):
            if attempt(note_written, io, fidx) is BUSY:
                await io.locked(note_written, io, fidx)
            noted.add(fidx)
    finally:
        # Step 3, on the loop: release the claims; written pages not dirtied again are clean.
        done = {(fidx, p) for fidx, p in done if fidx in noted}
        _write_done(
            io,
            [item for item, _ in taken],
            [(item[0], item[1]) not in done for item, _ in taken],
        )
        result.written += len(done)
        if io.log is not None:  # the largest page LSN written, for sync(lsn)
            top = written_lsn(lsns, done)
            result.lsn = top if result.lsn is None else max(result.lsn, top)
        io.notify()
    _io.step("write_done")


def note_written(io: BufferIO, fidx: int) -> None:
    """A write of file slot ``fidx`` succeeded: bump its written generation (see the module
    docstring). Under the file mutex: two processes' bumps must not collapse into one."""
    core = io.core
    e = core.entry(fidx)
    if not e:
        return
    with core.file_mutex(fidx):  # first: a LockTimeout changes nothing, and it is retried
        core.meta_words[e + FILE_ENTRY.word.written_gen] += 1


def _snapshot(io: BufferIO, items: list[BufRef], dst: bytearray, offsets: list[int]) -> list[int]:
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
                    io.pid,
                    st,
                    0,  # only try each lock: a held bucket comes back at once (see below)
                )
                for k in range(got):
                    status[part[k]] = int(st[k])
                if got < n:  # that bucket's lock failed: handle it the Python way
                    i = part[got]
                    if st[got] == -errno.EOWNERDEAD:
                        cache.release_dead_holder(items[i][3])
                    with step_waits():  # a held bucket waits STEP_WAIT, then is "busy"
                        status[i] = _snapshot_one(io, items[i], dst, offsets[i], slots[i])
                    got += 1
                done += got
        return status
    with step_waits():
        for i, item in enumerate(items):
            status[i] = _snapshot_one(io, item, dst, offsets[i], slots[i])
    return status


def _snapshot_one(io: BufferIO, item: BufRef, dst: bytearray, off: int, slot: int) -> int:
    fidx, pgno, cache, b, bh = item[:5]
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
        # Pinned: only if a transaction holds its latch outside a commit (layout.quiet_latch).
        latched = quiet_latch(w, bh) if w[x + BH.word.ref] else -1
        if flags & (BH_READING | BH_WRITING) or not latched:
            return 2
        pid = w[x + BH.word.io_pid]  # the claim: DIRTY stays set until the write is confirmed
        w[x + BH.word.flags] = (flags & ~BH_REDIRTIED) | BH_WRITING
        w[x + BH.word.io_pid] = io.pid
        size = int(w[x + BH.word.page_size])
        if size != slot or bh + BH.size + size > cache.region.size:
            cache.corrupt(f"buffer {bh} records a page of {size} bytes, not {slot}")
        dst[off : off + size] = cache.buf[bh + BH.size : bh + BH.size + size]
        if latched > 0 and w[x + BH.word.latch] != latched:
            # A commit began (or ended) during the copy, which may hold part of it: not taken
            # (the flags are as they were: changing them needs this mutex).
            w[x + BH.word.flags] = flags
            w[x + BH.word.io_pid] = pid
            return 2
        return 1
    finally:
        cache.unlock(b)


def _write_done(io: BufferIO, items: list[BufRef], failed: list[bool]) -> None:
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
                    io.pid,
                    ffi.new("uint8_t[]", [failed[i] for i in part]),
                    0,  # only try each lock: a held bucket comes back at once (see below)
                )
                if got < n:
                    # The lock failed: either its holder died (the mutex is then ours: repair
                    # it) or it is held (the step then waits STEP_WAIT at most, and if need
                    # be finishes in a task of the pool, retrying without blocking the loop).
                    i = part[got]
                    if owner_pid(cache.mptrs[items[i][3]]) == threading.get_native_id():
                        cache.release_dead_holder(items[i][3])
                    io.settle(_write_done_one, io, items[i], failed[i])
                    got += 1
                done += got
        return
    for item, bad in zip(items, failed):
        io.settle(_write_done_one, io, item, bad)


def _write_done_one(io: BufferIO, item: BufRef, failed: bool) -> None:
    fidx, pgno, cache, b, bh = item[:5]
    w = cache.words
    x = bh >> 3
    cache.lock(b)
    try:
        flags = w[x + BH.word.flags]
        if not (
            flags & BH_WRITING
            and w[x + BH.word.io_pid] == io.pid
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


def _by_cache(items: list[BufRef]) -> list[tuple[Cache, list[int]]]:
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


def _plan_runs(io: BufferIO, taken: list[tuple[BufRef, memoryview]]) -> list[_Run]:
    core = io.core
    runs: list[_Run] = []
    for item, copy in taken:
        fidx, pgno = item.fidx, item.pgno
        ps = len(copy)
        last = runs[-1] if runs else None
        if last is not None and last.fidx == fidx and last.pgnos[-1] + 1 == pgno:
            last.pgnos.append(pgno)
            last.copies.append(copy)
            continue
        e = core.entry(fidx)
        ftype = int(core.meta_words[e + FILE_ENTRY.word.ftype])
        pgout = io.registry.get(ftype, (None, None))[1] if ftype else None
        runs.append(
            _Run(
                fidx=fidx,
                fd=io.fd_for_write(fidx),
                temp=bool(core.meta_words[e + FILE_ENTRY.word.flags] & FF_TEMP),
                offset=pgno * ps,
                pgnos=[pgno],
                copies=[copy],
                pgout=pgout,
                cookie=core.file_cookie(fidx) if pgout else b"",
                checksum=bool(core.meta_words[e + FILE_ENTRY.word.flags] & FF_CHECKSUM),
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


def _typed(err: BaseException, name: str | None) -> BaseException:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        typed = NoSpace(f"writing {name}: {what}; the pages stay dirty")
        typed.__cause__ = err
        return typed
    return err
