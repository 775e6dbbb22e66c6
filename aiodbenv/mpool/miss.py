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

The compiled page context (``async with f.get(p)``, aiodbenv/_csrc/capi/hot.c) makes the same
call itself when its hit misses, with the checks of :func:`try_miss`, and hands what the call
gave back to the slow path as a :data:`Missed` tuple (:func:`finish_miss` goes on from it).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .. import _io
from ..region.mutex import ffi, speedups
from . import accel
from .layout import FILE_STATS, HANDLE_STATS
from .victims import dirty_met

if TYPE_CHECKING:
    from .fget import PageAccess
    from .page import Page

__all__ = ["COMPILED_MISS", "Missed", "disk_frame", "finish_miss", "miss_context", "try_miss"]

#: What a compiled miss made by the compiled page context (aiodbenv/_csrc/capi/hot.c) hands to
#: the Python slow path: aiodb_miss's result (0, or ``accel.CORRUPT``) and out[0:3] (status,
#: frame, dead bucket), read at once so that no other miss of the file overwrites them.
Missed = tuple[int, int, int, int]

#: Whether misses go through the compiled call (False: the Python path only).
COMPILED_MISS = accel.miss is not None

_c_miss = accel.miss
_CORRUPT = accel.CORRUPT
_FALLBACK = accel.MISS_FALLBACK
_FREE_FRAME = accel.MISS_FREE_FRAME
_FILL_DISK = accel.MISS_FILL_DISK
_DIRTY_MET = accel.MISS_DIRTY_MET
#: out[2] when no bucket mutex is left held for a dead holder.
_NONE = (1 << 64) - 1

#: Crash tests: ``AIODBENV_TEST_MISS_KILL=k`` makes the compiled miss SIGKILL its own process at
#: step k (1-7, see ``MISS_STEP`` in 40_miss.c) of the first miss that reaches it. Read once.
_KILL_AT = int(os.environ.get("AIODBENV_TEST_MISS_KILL", "0") or 0)
if speedups is not None and _KILL_AT:
    speedups.aiodb_miss_test_kill(_KILL_AT)

# Test hooks (fault injection, the crash-test signal plan) watch each step of the Python
# path: while one is armed, misses take that path.
_faults = _io._faults


def miss_context(f: PageAccess) -> tuple[list[Any], Any]:
    """What a handle's compiled misses on file ``f`` need, made once: one context per cache
    (``struct aiodb_miss_ctx``: the cache, the file, the handle, pointers to its counters --
    the file's misses and page-ins, the handle's clean evictions, examined-extra and longest
    chain; see ``MISS_CTR_*`` in 40_miss.c), and the four words of what a call hands back."""
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
    contexts = []
    for cache in f._caches:
        ctx = ffi.new("struct aiodb_miss_ctx *")
        ctx.w = cache.wptr
        # The arrays belong to the cache (alive as long as it is); ctr to the context list.
        ctx.mutexes = cache.c_mptrs
        ctx.nowait_w = cache.c_nowait_words
        ctx.bucket_w = cache.c_bucket_words
        ctx.nb = cache.nbuckets
        ctx.one_cache = f._ncache == 1
        ctx.fidx = f._fidx
        ctx.ps = f.page_size
        ctx.slot = f._slot
        ctx.pid = f._core.pid
        ctx.clean_first = f._core.clean_first
        ctx.ctr = ctr
        contexts.append(ctx)
    contexts.append(ctr)  # kept alive with the contexts
    return contexts, ffi.new("uint64_t[4]")


def try_miss(f: PageAccess, pgno: int) -> Page | None:
    """Try the whole miss of page ``pgno`` in one compiled call: the page pinned, or None when
    the Python path must go on (:func:`finish_miss` says from where).

    The caller has checked the handle and that the page exists in the pool's idea of the file,
    and calls this only with the accelerator in use. Synchronous: it never waits for a mutex
    (a held one sends the miss to the Python path, which backs off).
    """
    fd = f._fd
    pool = f._pool
    io = pool._io
    out = f._miss_out
    if (
        fd is None
        or f.checksum
        or _faults
        or _io._signal_plan
        or fd in io.no_nowait
        or pool._frame_queue  # others wait for frames: queue behind them, in order
        or (f.ftype and io.registry.get(f.ftype, (None, None))[0] is not None)
    ):
        out[0], out[2] = _FALLBACK, _NONE
        return None
    if f._ncache == 1:
        cache = f._cache0
        off = _c_miss(f._miss_ctx[0], 0, pgno, fd, out)
    else:
        cache, b = f._core.locate(f._fidx, pgno)
        off = _c_miss(f._miss_ctx[cache.index], b, pgno, fd, out)
    if off > 0:
        pool._got_frame()
        if pool._waiters:
            pool._notify()
        if out[0] == _DIRTY_MET:
            dirty_met(pool, cache)
        return f._page(cache, int(out[3]), off, pgno)
    if off == _CORRUPT:
        # Panics and raises; a frame the call held stays tagged with this pid (the
        # environment must be recovered anyway).
        cache.corrupt(
            f"an offset or count read during a miss of page {pgno} of {f._path!r} fails its check"
        )
    return None


def disk_frame(missed: Missed | None) -> int:
    """The frame of a compiled context's miss that linked its page, READING and pinned, and
    found it only on the disk, with nothing to repair or give back first: the common miss of a
    cold cache, which :meth:`PoolFile._pin <aiodbenv.mpool.file.PoolFile._pin>` reads at once
    (:func:`finish_miss`'s last step, without the coroutines of the general path). 0 for any
    other ``missed``."""
    if missed is None:
        return 0
    result, status, frame, dead = missed
    return frame if status == _FILL_DISK and not result and dead == _NONE else 0


async def finish_miss(
    f: PageAccess, pgno: int, mode: int, missed: Missed | None = None
) -> Page | None:
    """Go on from the step :func:`try_miss` reached when it returned None (or, with
    ``missed``, from the step a miss of the compiled page context reached): repair a bucket
    whose holder died, give back a frame it unlinked, or read and publish the page it linked.
    Returns the pinned page, or None when the Python path must do the miss.

    Cancellation: as the Python path's own steps (:meth:`PoolFrames._free_frame` always gives
    the frame back; :meth:`PoolReads._fill` drops the pin of a read it leaves to finish).
    """
    if missed is None:
        out = f._miss_out
        status, frame, dead = int(out[0]), int(out[1]), int(out[2])
    else:
        result, status, frame, dead = missed
        if result == _CORRUPT:
            cache, _ = f._core.locate(f._fidx, pgno)
            cache.corrupt(  # panics and raises, as try_miss
                f"an offset or count read during a miss of page {pgno} of {f._path!r} fails "
                "its check"
            )
    if status == _FALLBACK and dead == _NONE:
        return None
    cache, b = f._core.locate(f._fidx, pgno)
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
