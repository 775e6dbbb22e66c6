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
from ..errors import Incomplete, NoSpace
from .layout import BH, BH_DIRTY, BH_READING, BH_WRITING, FF_DEAD, FF_TEMP
from .table import (
    _F,
    _FS,
    _HS,
    B_DIRTY,
    B_HEAD,
    H_FILE,
    H_FLAGS,
    H_IOPID,
    H_NEXT,
    H_PGNO,
    H_PRIO,
    H_REF,
    Cache,
)

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["SyncResult", "trickle", "write_back", "write_items"]

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
    core = pool._core
    found: dict[int, tuple[Item, int]] = {}
    held: list[tuple[int, int]] = []
    want = None if files is None else {f + 1 for f in files}
    writable: dict[int, bool] = {}
    deadline = time.monotonic() + YIELD_EVERY
    for cache in core.caches:
        w = cache.words
        for b, bw in enumerate(cache.bucket_words):
            if not b & 63 and time.monotonic() > deadline:
                await asyncio.sleep(0)
                deadline = time.monotonic() + YIELD_EVERY
            if not w[bw + B_DIRTY]:
                continue
            with cache.mutexes[b]:
                off = w[bw + B_HEAD]
                while off:
                    x = off >> 3
                    tag = int(w[x + H_FILE])
                    if w[x + H_FLAGS] & BH_DIRTY and (want is None or tag in want):
                        ok = writable.get(tag)
                        if ok is None:
                            ok = writable[tag] = pool._can_write(tag)
                        pgno = int(w[x + H_PGNO])
                        if not ok:
                            if want is not None:
                                held.append((tag - 1, pgno))
                        elif w[x + H_REF] or w[x + H_FLAGS] & (BH_READING | BH_WRITING):
                            held.append((tag - 1, pgno))
                        else:
                            # One int per page sorts several times faster than tuples.
                            found[((tag - 1) << 40) | pgno] = (
                                (tag - 1, pgno, cache, b, off), int(w[x + H_PRIO]))
                    off = w[x + H_NEXT]
    ordered = [found[k] for k in sorted(found)]
    return [item for item, _ in ordered], held, [prio for _, prio in ordered]


async def write_back(pool: Pool, *, files: set[int] | None, fsync: bool,
                     reason: str) -> SyncResult:
    """Write every writable dirty page (of ``files``, or all); fsync if asked. Raises the
    first write error, else :class:`Incomplete` if pinned dirty pages were left."""
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


async def write_items(
    pool: Pool, items: list[Item], *, fsync: bool, synced: dict[int, int] | None = None
) -> SyncResult:
    """Write ``items`` (sorted by file and page) in batches, then fsync their files if asked.

    ``synced`` collects ``file slot -> descriptor`` of the files written, for a caller that
    fsyncs once after several calls (see :func:`fsync_files`)."""
    result = SyncResult()
    if synced is None:
        synced = {}
    i = 0
    while i < len(items):
        batch: list[Item] = []
        size = 0
        while i < len(items) and len(batch) < BATCH_PAGES and size < BATCH_BYTES:
            batch.append(items[i])
            size += pool._core.file_field(items[i][0], "page_size")
            i += 1
        await _run_batch(pool, batch, result, synced)
    if fsync and synced:
        await fsync_files(pool, synced, result)
    return result


async def _run_batch(pool: Pool, batch: list[Item], result: SyncResult,
                     synced: dict[int, int]) -> None:
    # The batch runs as its own task so that a cancelled caller cannot leave buffers flagged
    # WRITING: the writes and their bookkeeping always finish together.
    job = asyncio.get_running_loop().create_task(_batch_job(pool, batch, result, synced))
    await asyncio.shield(job)


async def _batch_job(pool: Pool, batch: list[Item], result: SyncResult,
                     synced: dict[int, int]) -> None:
    core = pool._core
    w0 = core.w0
    taken: list[tuple[Item, bytes]] = []
    for item in batch:
        fidx, pgno, cache, b, bh = item
        w = cache.words
        x = bh >> 3
        bw = cache.bucket_words[b]
        flags_of_file = w0[core.entry(fidx) + _F["flags"]] if core.entry(fidx) else FF_DEAD
        with cache.mutexes[b]:
            flags = w[x + H_FLAGS]
            if (w[x + H_FILE] != fidx + 1 or w[x + H_PGNO] != pgno or not flags & BH_DIRTY):
                continue  # evicted, reused or cleaned meanwhile
            if w[x + H_REF] or flags & (BH_READING | BH_WRITING):
                result.incomplete += 1
                continue
            w[bw + B_DIRTY] -= 1
            if flags_of_file & FF_DEAD:
                w[x + H_FLAGS] = flags & ~BH_DIRTY  # nobody wants these pages any more
                result.dropped += 1
                continue
            w[x + H_FLAGS] = (flags & ~BH_DIRTY) | BH_WRITING
            w[x + H_IOPID] = pool._pid
            start = bh + BH.size
            copy = bytes(cache.buf[start : start + w[x + 6]])  # BH.page_size
        taken.append((item, copy))
    if not taken:
        return
    jobs = _plan_runs(pool, taken)
    try:
        outcome = await anyio.to_thread.run_sync(_write_runs, jobs, limiter=pool._limiter)
    except Exception as thread_err:  # the thread could not even run: every write failed
        outcome = [(None, thread_err)] * len(jobs)
    # Bookkeeping: clear WRITING; put the dirty mark back on pages whose write failed.
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
    for (fidx, pgno, cache, b, bh), _copy in taken:
        w = cache.words
        x = bh >> 3
        bw = cache.bucket_words[b]
        with cache.mutexes[b]:
            flags = w[x + H_FLAGS] & ~BH_WRITING
            if (fidx, pgno) in failed:
                if not flags & BH_DIRTY:
                    flags |= BH_DIRTY
                    w[bw + B_DIRTY] += 1
            w[x + H_FLAGS] = flags
            w[x + H_IOPID] = 0
    result.written += len(taken) - len(failed)
    pool._notify()


@dataclass
class _Run:
    fidx: int
    fd: int | None
    path: str | None
    temp: bool
    offset: int
    pgnos: list[int]
    copies: list[bytes]
    pgout: object
    cookie: bytes


def _plan_runs(pool: Pool, taken: list[tuple[Item, bytes]]) -> list[_Run]:
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
        runs.append(_Run(
            fidx=fidx, fd=pool._fd_for_write(fidx), path=core.file_name(fidx),
            temp=bool(core.w0[e + _F["flags"]] & FF_TEMP), offset=pgno * ps, pgnos=[pgno],
            copies=[copy], pgout=pgout, cookie=core.file_cookie(fidx) if pgout else b"",
        ))
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
            bufs: list[bytes | bytearray] = list(run.copies)
            if run.pgout is not None:
                bufs = []
                for pgno, copy in zip(run.pgnos, run.copies):
                    page = bytearray(copy)
                    with memoryview(page) as mv:
                        run.pgout(pgno, mv, run.cookie)  # type: ignore[operator]
                    bufs.append(page)
            total = sum(len(b) for b in bufs)
            n = _io.pwritev(fd, bufs, run.offset)
            if n != total:
                raise OSError(errno.EIO, f"short write: {n} of {total} bytes")
            out.append((fd, None))
        except BaseException as err:
            out.append((fd, err))
    return out


async def fsync_files(pool: Pool, synced: dict[int, int], result: SyncResult) -> None:
    """fsync every descriptor in ``synced`` (one worker-thread hop); errors go into
    ``result.errors``."""
    def run() -> list[tuple[int, BaseException | None]]:
        res: list[tuple[int, BaseException | None]] = []
        for fidx, fd in synced.items():
            try:
                _io.fsync(fd)
                res.append((fidx, None))
            except OSError as err:
                res.append((fidx, err))
        return res

    job = asyncio.get_running_loop().create_task(
        anyio.to_thread.run_sync(run, limiter=pool._limiter))
    for fidx, err in await asyncio.shield(job):
        if err is None:
            result.files_synced += 1
        else:
            result.errors.append(_typed(err, pool._core.file_name(fidx)))


def _typed(err: BaseException, name: str | None) -> BaseException:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"writing {name}: no space left on device")
    return err
