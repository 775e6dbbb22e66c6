"""Compiled write-back: sync, trickle and checkpoint in a few worker-thread calls.

The Python write-back (:mod:`aiodbenv.mpool.bhwrite`) snapshots each batch of 64 pages on the
event loop and hops to a thread per batch; with tens of thousands of pages the hops, the
per-page Python objects and the garbage collector keep the loop busy. Here the loop only
awaits:

1. **Collect** (one worker-thread call, :func:`collect`): the C part ``_csrc/50_sync.c`` walks
   every bucket with bounded lock waits, keeps the dirty buffers of files the compiled path
   may write (no pgout, no checksum, a descriptor here: the *route* table), sorts them by file
   and page (or picks the least recently used, for trickle) in a C array, and hands every
   other dirty buffer (pinned, claimed, other files) to the Python path as a short list.
2. **Write** (:func:`write_fast`), a chunk of up to :data:`STEPPED_CHUNK_BYTES` of one file
   at a time: in a worker thread, lock each bucket, copy the page into a staging buffer and
   claim it (``WRITING``, the protocol of :mod:`aiodbenv.mpool.sync`), write each run of
   adjacent pages with one ``pwrite`` (``sync_file_range`` every :data:`SRF_BYTES` starts the
   disk early), bump the file's written generation, release the claims (written pages not
   dirtied again are clean). With a log and a file with ``lsn_offset`` the chunk is two
   calls: the claim returns the largest page LSN, the loop awaits the log's flush to it (the
   write-ahead rule), then the write.

The fsync is :func:`~aiodbenv.mpool.fsync.fsync_pending`'s (no log: see ``synchop``).

Faults: while a test uses :mod:`aiodbenv._io`'s seam -- a fault injected with
:func:`aiodbenv._io.inject`, a crash-signal plan, or a wrapper put in place of
``_io.pwritev`` -- the C code hands every write to ``_io.pwritev`` through a callback
(``aiodb_sync_write``'s hook) instead of calling ``pwrite`` itself, so the fault, WAL-order
and crash suites exercise this path with their usual semantics (errors, short writes, signals
before and after a write, the ``claimed``/``write_done`` steps). The C code's own ``pwrite``
is faulted from outside with strace (tests/test_writeback_compiled.py).

Not used (the Python path runs) in a private region (its buffers have no mutexes: a worker
thread must not touch them while the loop does), without the compiled accelerator, or with
``AIODBENV_WRITEBACK=python`` (the switch the tests use to run both paths).
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _io
from .._threads import run_to_end
from ..errors import LockTimeout
from ..region.mutex import ffi, speedups
from .bhwrite import SyncResult, _typed, _write_done_one, note_written
from .cache import BufRef, found
from .layout import FF_CHECKSUM, FF_DEAD, FF_NOFILE, FF_TEMP, FILE_ENTRY, HANDLE_STATS, MAX_FILES
from .staging import zeroed

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["CHUNK_BYTES", "ENABLED", "Chunk", "FastSet", "account", "claim_write", "collect"]
__all__ += ["STEPPED_CHUNK_BYTES", "collect_now", "routes", "table", "unmap", "usable"]
__all__ += ["write_fast"]

#: The compiled write-back is installed and not switched off.
ENABLED = speedups is not None and os.environ.get("AIODBENV_WRITEBACK", "") != "python"
#: Bytes of one file claimed, copied and written per step of the one-call write-back
#: (:mod:`~aiodbenv.mpool.synchop`, no log): bounds its staging buffer. 4 MiB, not 16: a
#: smaller buffer is faulted in once per sync and is still in the CPU's cache when ``pwrite``
#: copies it out (64 MiB extending a file: ~1,300 -> 1,650 MiB/s here; 2 and 1 MiB: slower).
CHUNK_BYTES = 4 << 20
#: The same for :func:`write_fast` (with a log, or when the one call cannot be made), also
#: the granularity of progress, cancellation and the log flush: a chunk is two calls with the
#: log's flush between (the write-ahead rule), each waking the loop, so these stay larger.
STEPPED_CHUNK_BYTES = 16 << 20
#: Pages per pwrite at most (1 MiB of 4 KiB pages).
MAX_RUN = 256
#: sync_file_range(SYNC_FILE_RANGE_WRITE) after this many bytes (0: never).
SRF_BYTES = 4 << 20

_E = 7  # words per entry: tag, pgno, bh, bucket, prio, state, cache
_TAKEN, _BUSY, _WRITTEN = 3, 4, 6  # entry states (see 50_sync.c)
_lib: Any = speedups


def usable(core: Any) -> bool:
    """Whether a pool (its core) may write back by the compiled path (see the docstring)."""
    return ENABLED and bool(core.shared)


@dataclass
class FastSet:
    """What :func:`collect` found: ``n`` entries of dirty free buffers the compiled path
    writes, sorted by file and page, in ``ent`` (a C array); ``others``, every other dirty
    buffer as ``(tag, pgno, bh, bucket, prio, busy, cache index)`` for the Python path."""

    ent: Any
    n: int
    tab: Any
    others: list[tuple[int, ...]]
    keep: list[Any] = field(default_factory=list, repr=False)  # C arrays ``tab`` points to

    def tags(self) -> list[tuple[int, int, int]]:
        """``(tag, lo, hi)``: the entries of each file, in order (a binary search per file)."""
        out = []
        lo = 0
        ent = self.ent
        while lo < self.n:
            tag = int(ent[lo * _E])
            hi = bisect_left(_Tags(ent, self.n), tag + 1, lo)
            out.append((tag, lo, hi))
            lo = hi
        return out

    def keys(self, lo: int, hi: int) -> set[tuple[int, int]]:
        """``(file slot, pgno)`` of entries lo..hi-1."""
        return {(int(self.ent[i * _E]) - 1, int(self.ent[i * _E + 1])) for i in range(lo, hi)}


class _Tags:
    """The sorted tags of a FastSet's entries, as a sequence bisect can search."""

    def __init__(self, ent: Any, n: int) -> None:
        self._ent, self._n = ent, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> int:
        return int(self._ent[i * _E])


def routes(pool: PoolBase, files: set[int] | None, fd_only: bool = False) -> Any:
    """Per file tag: 0 not wanted, 1 the compiled path writes it, 2 the Python path (with
    ``fd_only``, a file this process has no descriptor to write through is the Python
    path's)."""
    core = pool._core
    w0 = core.meta_words
    io = pool._io
    route = ffi.new("uint8_t[]", MAX_FILES + 1)
    for fidx in core.file_slots():
        if files is not None and fidx not in files:
            continue
        e = core.entry(fidx)
        flags = int(w0[e + FILE_ENTRY.word.flags])
        ftype = int(w0[e + FILE_ENTRY.word.ftype])
        fast = (
            not flags & (FF_DEAD | FF_NOFILE | FF_TEMP | FF_CHECKSUM)
            and (not ftype or (ftype in io.registry and io.pgout(ftype) is None))
            and (
                io.fd_for_write(fidx) is not None
                or (not fd_only and core.file_name(fidx) is not None)
            )
        )
        route[fidx + 1] = 1 if fast else 2
    return route


def table(pool: PoolBase) -> tuple[Any, list[Any]]:
    """The C table of the pool's caches (5 pointers each), and what must outlive it."""
    caches = pool._core.caches
    tab = ffi.new("void *[]", 5 * len(caches))
    for i, c in enumerate(caches):
        tab[5 * i : 5 * i + 5] = [
            c.wptr,
            ffi.cast("void *", c.region.base),
            c.c_mptrs,
            c.c_nowait_words,
            c.c_bucket_words,
        ]
    return tab, [tab]


async def collect(pool: PoolBase, files: set[int] | None, limit: int = 0) -> FastSet | None:
    """Collect the dirty buffers (of ``files``, or all) in one worker-thread call; with
    ``limit``, only that many least recently used ones go to the compiled path. None if a
    bucket stayed locked past the bound or more dirty buffers turned up than there are
    frames (the caller then takes the Python path, which waits asynchronously).

    Cancellation: the walk finishes in its thread (it changes nothing); the result is
    dropped.
    """
    route = routes(pool, files)
    tab, keep = table(pool)
    return await run_to_end(
        collect_now, pool, route, tab, keep, None, limit, limiter=pool._io.limiter
    )


def collect_now(
    pool: PoolBase, route: Any, tab: Any, keep: list[Any], only: int | None, limit: int
) -> FastSet | None:
    """In a worker thread: :func:`collect`'s walk (of cache number ``only``, or all), given
    the route table (:func:`routes`) and cache table (:func:`table`)."""
    caches = pool._core.caches
    walk = list(enumerate(caches)) if only is None else [(only, caches[only])]
    cap = sum(c.buffers() for _, c in walk) + 1024
    # Mapped, not ffi.new'd: zeroing megabytes under the GIL would stall the loop; the
    # kernel's zero pages come in as the C code (GIL released) first touches them.
    mem = zeroed(_E * 8 * cap)
    keep.append(mem)
    ent = ffi.from_buffer("uint64_t[]", mem)
    nf, no, stopped = (ffi.new("uint64_t[1]") for _ in range(3))
    for ci, cache in walk:
        first = 0
        while True:
            rc = _lib.aiodb_sync_collect(
                tab, ci, first, cache.nbuckets, route, MAX_FILES + 1, 0, ent, cap, nf, no, stopped
            )
            if rc == 0:
                break
            b = int(stopped[0])
            if rc == _lib.AIODB_CORRUPT:
                cache.corrupt(f"bucket {b}'s chain has a bad offset, count or loop")
            if rc != -errno.EOWNERDEAD:
                return None  # held past the bound, or no room: the Python path
            cache.release_dead_holder(b)  # this thread holds it: repair, then again
            first = b
    n = int(_lib.aiodb_sync_order(ent, nf[0], limit))
    others = [tuple(ffi.unpack(ent + (cap - 1 - k) * _E, _E)) for k in range(int(no[0]))]
    return FastSet(ent, n, tab, others, keep)


@dataclass
class Chunk:
    """What one chunk's worker-thread calls did."""

    written: int = 0
    calls: int = 0
    nbytes: int = 0
    lsn: int = 0
    skipped: list[tuple[int, int]] = field(default_factory=list)
    #: Claims whose bucket stayed locked at release: ``(buffer, failed)``, released later.
    unreleased: list[tuple[BufRef, bool]] = field(default_factory=list)
    error: BaseException | None = None


async def write_fast(
    pool: PoolBase,
    fast: FastSet,
    result: SyncResult,
    progress: Callable[[int], Awaitable[None]] | None = None,
    chunk_bytes: int = 0,
) -> None:
    """Write ``fast``'s entries chunk by chunk (see the module docstring), adding to
    ``result`` (pages found busy go to ``result.skipped``; the first error to
    ``result.errors``, and then the rest is not written). ``progress(done)`` is awaited after
    each chunk with the entries done so far (checkpoint's pacing); ``chunk_bytes`` (0:
    :data:`STEPPED_CHUNK_BYTES`) the size of a chunk.

    Cancellation: the chunk under way finishes in a task of the pool (its claims released,
    a failure logged); the chunks not started are not written and their pages stay dirty.
    """
    stages: list[mmap.mmap] = []
    await _write_fast(pool, fast, result, progress, chunk_bytes, stages)
    # Unmapping megabytes of touched pages is milliseconds of kernel time: not on the loop.
    # (Not after a cancellation or a failure: a chunk may still use them; the GC frees them.)
    await run_to_end(unmap, stages, fast, limiter=pool._io.limiter)


def unmap(stages: list[mmap.mmap], fast: FastSet) -> None:
    """In a worker thread: unmap the staging buffers and ``fast``'s entries (unusable after)."""
    if fast.ent is not None:
        ffi.release(fast.ent)
        fast.ent = None
        fast.n = 0
    for m in [*stages, *(k for k in fast.keep if isinstance(k, mmap.mmap))]:
        try:
            m.close()
        except BufferError:  # still exported somewhere: the GC unmaps it later
            pass


async def _write_fast(
    pool: PoolBase,
    fast: FastSet,
    result: SyncResult,
    progress: Callable[[int], Awaitable[None]] | None,
    chunk_bytes: int,
    stages: list[mmap.mmap],
) -> None:
    io = pool._io
    core = pool._core
    stage = zeroed(0)
    stages.append(stage)
    for tag, lo, hi in fast.tags():
        fidx = tag - 1
        e = core.entry(fidx)
        if not e:  # closed meanwhile: the Python rounds look at them again
            result.skipped |= fast.keys(lo, hi)
            continue
        try:
            fd = await io.write_fd(fidx, False)  # this process's, or one opened to write
        except OSError as open_err:
            result.errors.append(open_err)
            return
        ps = int(core.meta_words[e + FILE_ENTRY.word.page_size])
        lsn_off = int(core.meta_words[e + FILE_ENTRY.word.lsn_offset]) - 1 if io.log else -1
        step = max(1, (chunk_bytes or STEPPED_CHUNK_BYTES) // max(ps, 1))
        if len(stage) < min(hi - lo, step) * ps:
            stage = zeroed(min(hi - lo, step) * ps)
            stages.append(stage)
        for start in range(lo, hi, step):
            end = min(hi, start + step)
            task = io.spawn(_chunk(pool, fast, fidx, fd, ps, lsn_off, start, end, stage))
            try:
                got = await asyncio.shield(task)
            except asyncio.CancelledError:
                io.orphan(task, "a write-back chunk")
                raise
            if not account(pool, fidx, got, result):
                return
            if progress is not None:
                await progress(end)


def account(pool: PoolBase, fidx: int, got: Chunk, result: SyncResult) -> bool:
    """On the loop: add a chunk's outcome to ``result`` and the statistics, hand claims left
    unreleased to retrying tasks; False if it failed (its error is in ``result.errors``)."""
    io = pool._io
    core = pool._core
    if got.written:
        io.count_write(fidx, got.written, got.nbytes, got.calls)
    for item, failed in got.unreleased:  # buckets that stayed held: retried in tasks
        io.settle(_write_done_one, io, item, failed)
    result.written += got.written
    result.write_calls += got.calls
    result.bytes_written += got.nbytes
    result.skipped.update(got.skipped)
    if io.log is not None:
        top = (got.lsn >> 32, got.lsn & 0xFFFFFFFF) if got.written else (0, 0)
        result.lsn = top if result.lsn is None else max(result.lsn, top)
    if got.error is not None:
        core.meta_words[io.hs + HANDLE_STATS.word.write_failures] += 1
        result.errors.append(_typed(got.error, core.file_name(fidx)))
        return False
    return True


async def _chunk(
    pool: PoolBase,
    fast: FastSet,
    fidx: int,
    fd: int,
    ps: int,
    lsn_off: int,
    lo: int,
    hi: int,
    stage: mmap.mmap,
) -> Chunk:
    """One chunk: claim (+ the log flush) + write + release; the claims are released
    whatever happens."""
    io = pool._io
    out = Chunk()
    view = ffi.from_buffer(stage)
    if lsn_off < 0:
        await run_to_end(claim_write, pool, fast, fidx, fd, ps, -1, lo, hi, view, out)
        return out
    await run_to_end(_claim, pool, fast, ps, lsn_off, lo, hi, view, out)
    try:
        if out.lsn and io.log is not None:
            await io.log.flush(out.lsn >> 32, out.lsn & 0xFFFFFFFF)
    except BaseException as err:
        # Nothing reaches the file before the log: every claim is released, pages dirty.
        await run_to_end(_release, pool, fast, lo, hi, False, out)
        out.error = err
        return out
    await run_to_end(claim_write, pool, fast, fidx, fd, ps, -2, lo, hi, view, out)
    return out


def _claim(
    pool: PoolBase, fast: FastSet, ps: int, lsn_off: int, lo: int, hi: int, stage: Any, out: Chunk
) -> None:
    """In a worker thread: claim and copy entries lo..hi-1 (see aiodb_sync_claim)."""
    lsn = ffi.new("uint64_t[1]")
    at = ffi.new("uint64_t[1]")
    i = lo
    while True:
        rc = _lib.aiodb_sync_claim(
            fast.tab, fast.ent, i, hi, ps, stage + (i - lo) * ps, pool._pid, lsn_off, lsn, at
        )
        if rc == 0:
            break
        k = int(at[0])
        cache = pool._core.caches[int(fast.ent[k * _E + 6])]
        if rc == _lib.AIODB_CORRUPT:
            # The claims made so far are released first (pages dirty), then the panic.
            _release(pool, fast, lo, k, False)
            cache.corrupt(f"buffer {int(fast.ent[k * _E + 2])} has a bad offset or page size")
        cache.release_dead_holder(int(fast.ent[k * _E + 3]))  # -EOWNERDEAD: held here
        i = k
    out.lsn = int(lsn[0])
    _io.step("claimed")


def claim_write(
    pool: PoolBase,
    fast: FastSet,
    fidx: int,
    fd: int,
    ps: int,
    lsn_off: int,
    lo: int,
    hi: int,
    stage: Any,
    out: Chunk,
) -> None:
    """In a worker thread: claim (unless ``lsn_off`` is -2: done already), write, note the
    write in the file entry, release. Any failure leaves the pages not confirmed dirty."""
    ok = False
    try:
        if lsn_off != -2:
            _claim(pool, fast, ps, lsn_off, lo, hi, stage, out)
        counts = ffi.new("uint64_t[3]")
        rc = _lib.aiodb_sync_write(
            fast.ent, lo, hi, ps, stage, fd, MAX_RUN, SRF_BYTES, _hook(), counts
        )
        out.written, out.calls, out.nbytes = (int(c) for c in counts)
        if rc:
            out.error = OSError(-rc, f"{os.strerror(-rc)} (a compiled write-back pwrite)")
        if out.written:
            # Before any page is marked clean: every later sync (any process) must know the
            # file has writes to fsync. A file mutex that stays held: nothing is clean.
            try:
                note_written(pool._io, fidx)
            except LockTimeout as err:
                out.error = out.error or err
                out.written = 0
                return
        ok = True
    finally:
        _release(pool, fast, lo, hi, ok, out)
        if not ok:
            out.written = 0
        out.skipped = _pick(fast, lo, hi, _BUSY)
        _io.step("write_done")


def _release(
    pool: PoolBase, fast: FastSet, lo: int, hi: int, ok: bool, out: Chunk | None = None
) -> None:
    """In a worker thread: release this process's claims of entries lo..hi-1; a claim whose
    bucket stays held goes to ``out.unreleased`` (released later by the loop's tasks)."""
    at = ffi.new("uint64_t[1]")
    cleaned = ffi.new("uint64_t[1]")
    i = lo
    while i < hi:
        rc = _lib.aiodb_sync_release(fast.tab, fast.ent, i, hi, pool._pid, ok, at, cleaned)
        if rc == 0:
            return
        k = int(at[0])
        cache = pool._core.caches[int(fast.ent[k * _E + 6])]
        b = int(fast.ent[k * _E + 3])
        if rc == _lib.AIODB_CORRUPT:
            cache.corrupt(f"bucket {b}'s dirty count would go below zero")
        if rc == -errno.EOWNERDEAD:
            cache.release_dead_holder(b)
            continue  # again from k: the claim is still ours
        # Held past the bound (a stopped process?): released later, by a task that retries
        # without blocking anyone; meanwhile the claim keeps the page dirty.
        e = fast.ent
        item = found(int(e[k * _E]) - 1, int(e[k * _E + 1]), cache, b, int(e[k * _E + 2]))
        failed = not (ok and int(e[k * _E + 5]) == _WRITTEN)
        if out is not None:
            out.unreleased.append((item, failed))
        e[k * _E + 5] = _BUSY
        i = k + 1


def _pick(fast: FastSet, lo: int, hi: int, state: int) -> list[tuple[int, int]]:
    n = int(_lib.aiodb_sync_pick(fast.ent, lo, hi, state, ffi.NULL, 0))
    if not n:
        return []
    dst = ffi.new("uint64_t[]", 2 * n)
    _lib.aiodb_sync_pick(fast.ent, lo, hi, state, dst, n)
    flat = ffi.unpack(dst, 2 * n)
    return [(flat[2 * i] - 1, flat[2 * i + 1]) for i in range(n)]


def _seam_py(fd: int, buf: Any, nbytes: int, offset: int) -> int:
    """The C writes' seam: one write through :func:`aiodbenv._io.pwritev` (its faults, short
    writes, signal points and whatever a test attached); bytes written or -errno."""
    try:
        return _io.pwritev(fd, [ffi.buffer(buf, nbytes)], offset)
    except OSError as err:
        return -(err.errno or errno.EIO)
    except BaseException:  # pragma: no cover - nothing may unwind through C
        return -errno.EIO


# A C function pointer to _seam_py (made once: cffi keeps a callback alive while referenced).
_seam: Any = ffi.callback("int64_t(int, const char *, uint64_t, uint64_t)", _seam_py)
_pwritev = _io.pwritev


def _hook() -> Any:
    """The seam to hand the C writes while a test uses :mod:`aiodbenv._io`'s (faults, crash
    signals, a recording wrapper of ``pwritev``); else NULL: plain pwrite, no GIL."""
    active = _io._faults or _io._signal_plan or _io.pwritev is not _pwritev
    return _seam if active else ffi.NULL
