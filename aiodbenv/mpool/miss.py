"""A miss in one compiled call (``aiodb_miss``, aiodbenv/_csrc/40_miss.c), and what Python does
with whatever step it hands back.

When the compiled accelerator is in use, the slow path of a pin (:meth:`PageAccess._pin_slow
<aiodbenv.mpool.fget.PageAccess._pin_slow>`) calls :func:`try_miss` first for a page the pool
does not hold: victim search, unlink, insert as READING, ``preadv2(RWF_NOWAIT)`` and publish in
one C call, through the same states as the Python path, so that the reaper cleans up after a
process killed anywhere inside it. What the call cannot do alone -- free space to allocate from,
a dirty victim, a page not in the OS page cache, a short read, a busy or dead mutex -- it hands
back at the step it reached, and :func:`finish_miss` goes on from there with the Python path's
own steps. With ``AIODBENV_MUTEX=abi`` (or no compiler) the Python path does every miss.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .. import _io
from ..region.mutex import ffi
from . import accel
from .cache import Cache
from .layout import FILE_STATS, HANDLE_STATS

if TYPE_CHECKING:
    from .fget import PageAccess
    from .page import Page

__all__ = ["COMPILED_MISS", "finish_miss", "miss_counters", "try_miss"]

#: Whether misses go through the compiled call (False: the Python path only).
COMPILED_MISS = accel.miss is not None

_c_miss = accel.miss
_CORRUPT = accel.CORRUPT
_FALLBACK = accel.MISS_FALLBACK
_FREE_FRAME = accel.MISS_FREE_FRAME
_FILL_DISK = accel.MISS_FILL_DISK
#: out[2] when no bucket mutex is left held for a dead holder.
_NONE = (1 << 64) - 1

#: Crash tests: ``AIODBENV_TEST_MISS_KILL=k`` makes the compiled miss SIGKILL its own process at
#: step k (1-7, see ``MISS_STEP`` in 40_miss.c) of the first miss that reaches it. Read once.
_KILL_AT = int(os.environ.get("AIODBENV_TEST_MISS_KILL", "0") or 0)
if COMPILED_MISS and _KILL_AT:
    from ..region.mutex import speedups

    assert speedups is not None
    speedups.aiodb_miss_test_kill(_KILL_AT)

# Test hooks (fault injection, the crash-test signal plan) watch each step of the Python
# path: while one is armed, misses take that path.
_faults = _io._faults


def miss_counters(f: PageAccess) -> tuple[Any, Any]:
    """The C arrays a handle's compiled misses use: pointers to its counters (the file's misses
    and page-ins, the handle's clean evictions, examined-extra and longest chain; see
    ``MISS_CTR_*`` in 40_miss.c) and the three words of what the call hands back."""
    w0p = f._cache0.wptr
    hs = f._hs
    ctr = ffi.new(
        "uint64_t *[5]",
        [
            w0p + f._fs + FILE_STATS.word.cache_miss,
            w0p + f._fs + FILE_STATS.word.page_in,
            w0p + hs + HANDLE_STATS.word.ro_evict,
            w0p + hs + HANDLE_STATS.word.hash_examined_extra,
            w0p + hs + HANDLE_STATS.word.hash_longest,
        ],
    )
    return ctr, ffi.new("uint64_t[3]")


def try_miss(f: PageAccess, cache: Cache, b: int, pgno: int) -> int:
    """Try the whole miss of page ``pgno`` (in bucket ``b`` of ``cache``) in one compiled call.

    Returns the published buffer's offset (> 0, pinned once by this handle), 0 when nothing is
    held (the Python path does the miss), or -1 when :func:`finish_miss` must go on from the
    step the call reached. The caller has checked the handle and that the page exists in the
    pool's idea of the file, and calls this only with the accelerator in use. Synchronous: it
    never waits for a mutex (a held one sends the miss to the Python path, which backs off).
    """
    fd = f._fd
    pool = f._pool
    io = pool._io
    if (
        fd is None
        or f.checksum
        or _faults
        or _io._signal_plan
        or fd in io.no_nowait
        or pool._frame_queue  # others wait for frames: queue behind them, in order
        or (f.ftype and io.registry.get(f.ftype, (None, None))[0] is not None)
    ):
        return 0
    out = f._miss_out
    off: int = _c_miss(
        cache.wptr,
        cache.c_mptrs,
        cache.c_nowait_words,
        cache.c_bucket_words,
        cache.nbuckets,
        b,
        f._tag,
        pgno,
        f.page_size,
        f._slot,
        f._core.pid,
        fd,
        f._miss_ctr,
        out,
    )
    if off > 0:
        pool._got_frame()
        if pool._waiters:
            pool._notify()
        return off
    if off == 0 and out[0] == _FALLBACK and out[2] == _NONE:
        return 0
    if off == _CORRUPT:
        # Panics and raises; a frame the call held stays tagged with this pid (the
        # environment must be recovered anyway).
        cache.corrupt(
            f"an offset or count read during a miss of page {pgno} of {f._path!r} fails its check"
        )
    return -1


async def finish_miss(f: PageAccess, cache: Cache, b: int, pgno: int, mode: int) -> Page | None:
    """Go on from the step :func:`try_miss` reached (it returned -1): repair a bucket whose
    holder died, give back a frame it unlinked, or read and publish the page it linked. Returns
    the pinned page, or None when the Python path must do the miss after all.

    Cancellation: as the Python path's own steps (:meth:`PoolFrames._free_frame` always gives
    the frame back; :meth:`PoolReads._fill` drops the pin of a read it leaves to finish).
    """
    out = f._miss_out
    status, frame, dead = int(out[0]), int(out[1]), int(out[2])
    pool = f._pool
    if dead != _NONE:
        cache.release_dead_holder(dead)  # repairs the bucket (or panics and raises)
    if status == _FALLBACK:
        return None
    if status == _FREE_FRAME:
        await pool._free_frame(cache, frame)
        return None
    # Linked as the page, READING and pinned by us: read it the Python way.
    pool._got_frame()
    await pool._fill(f, cache, b, frame, pgno, mode, nowait=status != _FILL_DISK)
    return f._page(cache, b, frame, pgno)
