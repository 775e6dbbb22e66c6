"""The glue of the compiled hot path (:mod:`aiodbenv.mpool.hot`): hands :mod:`aiodbenv._hot`
the cffi functions it calls, gives each eligible file its compiled ``get``, and holds the
Python slow paths the compiled context calls back into.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import types
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any

from .. import _io
from ..region.mutex import ffi, speedups
from . import accel
from .cache import HASH_FILE, HASH_MASK, HASH_PGNO, Cache
from .fput import view_exported
from .handle import POLL_MIN
from .hot import module as _module
from .layout import BH, BUCKET, FILE_ENTRY, MAX_PGNO
from .miss import COMPILED_MISS, Missed
from .page import PAGE_CLEAN, PAGE_DIRTY, Page
from .victims import dirty_met

if TYPE_CHECKING:
    from .fget import PageAccess
    from .file import PoolFile

__all__ = ["FINISHED", "attach", "configure", "detach"]

_MODE_GET = 0  # fget.MODE_GET (fget imports this module)


#: ``r`` of :func:`_after_unpin` from the compiled unpin when ``memoryview.release`` raised
#: BufferError (hot.c's UNPIN_EXPORTED).
UNPIN_EXPORTED = 3


def configure(page_type: type[Page], max_pgno: int) -> None:
    """Hand the compiled module the cffi functions it calls, the constants and the Page class
    it makes."""
    if _module is None:
        return

    def addr(name: str) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(speedups, name)))

    _module.configure(
        addr("aiodb_pin_one_cache"),
        addr("aiodb_pin_hit"),
        addr("aiodb_unpin_at"),
        accel.CORRUPT,
        BH.size,
        max_pgno,
        PAGE_DIRTY,
        PAGE_CLEAN,
        BUCKET.word.head,
        HASH_PGNO,
        HASH_FILE,
        HASH_MASK,
        page_type,
    )
    if COMPILED_MISS:
        _module.configure_miss(addr("aiodb_miss"), accel.MISS_DIRTY_MET, POLL_MIN, _schedule_turn)


def _schedule_turn() -> None:
    # A run of compiled misses spent its budget: they yield until this mark has run, at the
    # end of the loop's ready queue (see miss_breathe in hot.c).
    asyncio.get_running_loop().call_soon(_loop_turned)


_loop_turned: Any = _module.loop_turned if _module is not None else None


def _addr(p: Any) -> int:
    return int(ffi.cast("uintptr_t", p))


def _cache_ref(cache: Cache) -> tuple[Any, ...]:
    # What the compiled pin and unpin take of one cache (see hot.c's cache_ref).
    return (
        cache,
        cache.buf,
        _addr(cache.wptr),
        _addr(cache.c_mptrs),
        _addr(cache.c_nowait_words),
        _addr(cache.c_bucket_words),
        cache.nbuckets,
        cache.hdr,
        cache.region.size,
    )


def attach(f: PoolFile) -> None:
    """Give ``f`` the compiled ``get`` if it can use it (not a memory-mapped file)."""
    if _module is None or f._map is not None:
        return
    pool = f._pool
    panic_w, panic_i = f._panic_w, f._panic_i
    panic_addr = _addr(ffi.from_buffer(panic_w)) + panic_w.itemsize * panic_i
    hf = _module.HotFile(
        f,
        f._pins,
        pool._frame_queue,
        pool._note_dirty,
        pool._frame_released,
        types.MethodType(type(f).get, f),
        functools.partial(_enter_slow, f),
        functools.partial(_await_slow, f),
        functools.partial(_exit_slow, f),
        functools.partial(_after_unpin, f),
        functools.partial(_fail, f),
        tuple(_cache_ref(c) for c in f._caches),
        f._fidx,
        f._slot,
        f.page_size,
        _addr(f._hit_ptr),
        _addr(f._extra_ptr),
        _addr(f._longest_ptr),
        panic_addr,
        f._data_size,
        f.readonly,
    )
    f._hotc = hf
    f.get = hf.get  # type: ignore[method-assign]
    if _miss_in_c(f):
        # The compiled context's miss: aiodb_miss called from C, no Python on a miss served
        # from the OS page cache. What it must look at that changes stays Python's own state
        # (the armed faults, the descriptors that refuse RWF_NOWAIT, the pool's flags).
        ctxs, out = f._miss_ctx, f._miss_out
        hf.set_miss(
            tuple(_addr(ctxs[i]) for i in range(len(f._caches))),
            _addr(out),
            _addr(f._cache0.wptr + f._entry + FILE_ENTRY.word.pages),
            f._fd,
            vars(pool),  # read as a dict in C: _closing, _waiters, _frame_poll_delay
            _io._faults,
            pool._io.no_nowait,
            pool._notify,
            functools.partial(dirty_met, pool),
        )


def _miss_in_c(f: PoolFile) -> bool:
    """Whether the compiled context may do ``f``'s misses itself (when the Python slow path
    would call the compiled miss: fget.COMPILED_MISS): what miss.try_miss refuses
    for good (no descriptor yet -- a temporary file --, checksums, a page type that may get
    pgin/pgout hooks, the crash tests' signal plan) goes to the Python slow path always."""
    return (
        getattr(f, "_miss_ctx", None) is not None  # fget.COMPILED_MISS when f was made
        and f._fd is not None
        and not f.checksum
        and not f.ftype
        and not _io._signal_plan
    )


def detach(f: PoolFile) -> None:
    """Take the compiled ``get`` away from ``f``: from now on its pins go the Python way (the
    tests run the same checks on both paths). Pages already pinned stay valid."""
    hf = f._hotc
    if hf is not None:
        hf.disable()
        f._hotc = None
        f.__dict__.pop("get", None)


async def _enter_slow(
    f: PageAccess, ctx: Any, pgno: int, missed: Missed | None = None, later: Any = None
) -> Page:
    # __aenter__ after the compiled hit found nothing it could pin, and the compiled miss
    # (if it ran) handed back ``missed`` (see miss.finish_miss). ``later`` (the context): a
    # run of compiled misses spent its budget: let the loop run, then enter again (nothing
    # is held meanwhile, so a cancellation here leaves nothing behind).
    if later is not None:
        await asyncio.sleep(0)
        return await later.__aenter__()  # type: ignore[no-any-return]
    page: Page = await f._pin(pgno, _MODE_GET, missed)  # type: ignore[attr-defined]
    ctx._page = page
    return page


def _await_slow(
    f: PageAccess, pgno: int, missed: Missed | None = None, later: Any = None
) -> Generator[Any, None, Page]:
    # ``await f.get(p)`` after the compiled hit (and miss) found nothing it could pin; with
    # ``later`` (the context): yield first, then await it again (see _enter_slow).
    if later is not None:
        return _again(later).__await__()
    coro = f._pin(pgno, _MODE_GET, missed)  # type: ignore[attr-defined]
    return coro.__await__()  # type: ignore[no-any-return]


async def _again(ctx: Any) -> Page:
    await asyncio.sleep(0)
    return await ctx  # type: ignore[no-any-return]


async def _exit_slow(f: PageAccess, page: Page) -> None:
    # __aexit__ of a page the compiled unpin does not take: PinContext.__aexit__'s body.
    pending = f._unpin(page, page._flags)  # type: ignore[attr-defined]
    if pending is not None:
        await asyncio.shield(pending)


def _after_unpin(
    f: PageAccess, cache: Cache, pgno: int, b: int, bh: int, flags: int, r: int
) -> Awaitable[None]:
    """The compiled unpin could not finish (``r``: contended, a dead holder, an over-unpin, or
    ``UNPIN_EXPORTED``: a buffer of the page's view is still held, and the pin is released the
    Python way): the rest of ``PageRelease._unpin``, now. Returns what ``__aexit__`` awaits."""
    if r == UNPIN_EXPORTED:
        view_exported(pgno)
    if r == 2:
        f._pool._panic_unpinned(pgno)
    if r == -errno.EOWNERDEAD:
        cache.release_dead_holder(b)
    pending = f._release_py(pgno, cache, b, bh, flags)  # type: ignore[attr-defined]
    return FINISHED if pending is None else _finish(pending)


class _Finished:
    """An awaitable that is already done: what :func:`_after_unpin` returns when the Python
    release finished at once (no coroutine, and ``await`` does not yield to the loop)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator

    def __repr__(self) -> str:
        return "<aiodbenv unpin finished>"


#: The one :class:`_Finished` (callers test for it by identity).
FINISHED = _Finished()


async def _finish(pending: asyncio.Task[None] | None) -> None:
    if pending is not None:  # the bucket mutex is held elsewhere: see PoolFile.unpin
        await asyncio.shield(pending)


def _fail(f: PageAccess, cache: Cache, off: int, b: int) -> None:
    # The compiled hit met a dead mutex holder (repair, then the slow path) or corruption.
    if off == -errno.EOWNERDEAD:
        cache.release_dead_holder(b)
    elif off == accel.CORRUPT:
        cache.corrupt(f"bucket {b}'s chain has a bad offset or loops")
    else:
        cache.corrupt(f"a buffer of bucket {b} ends past the region")


configure(Page, MAX_PGNO)
