"""``PoolFile``: a file opened into the pool (memp_fopen), and page access on it.

The hit path (:meth:`PoolFile._pin_hit`) is synchronous: hash, lock one bucket, find the
buffer, count the pin, slice a memoryview. Only a miss awaits: a frame, then the read. The
bucket search of a hit and the bookkeeping of an unpin run in C when the compiled accelerator
is installed (``aiodb_pin_hit``, ``aiodb_unpin_at``: :mod:`aiodbenv.mpool.accel`) and in Python
otherwise; both do the same.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import warnings
import weakref
from time import clock_gettime_ns as _clock_ns
from typing import TYPE_CHECKING

from .. import _io
from ..errors import (
    ForkedProcessError,
    InvalidArgument,
    LockTimeout,
    NoSpace,
    PageNotFound,
    PermissionDenied,
)
from ..region.layout import MAX_PROCS
from ..region.mutex import BUSY, STEP_WAIT, ffi
from ..region.mutex import trylock as _trylock
from . import accel
from .cache import Cache, bucket_hash
from .checksum import TRAILER
from .layout import (
    BH,
    BH_DIRTY,
    BH_READING,
    BH_REDIRTIED,
    BH_WRITING,
    BUCKET,
    CACHE_HEADER,
    FF_NO_MMAP,
    FILE_ENTRY,
    FILE_STATS,
    HANDLE_STATS,
    MAX_PGNO,
    PIN_CLOCK,
    PINS_HALF,
)
from .page import PAGE_CLEAN, PAGE_DIRTY, PAGE_DISCARD, Page, PinContext

if TYPE_CHECKING:
    from .pool import Pool
    from .stat import FileStat
    from .sync import SyncResult

__all__ = ["PoolFile"]

logger = logging.getLogger("aiodbenv")

#: ``Page._bh`` of a page that close unpinned (-1 is a page its holder unpinned).
RELEASED_BY_CLOSE = -2

#: Every open PoolFile of this process, so that a forked child can disarm them.
_live_files: weakref.WeakSet[PoolFile] = weakref.WeakSet()


def _disarm_in_child() -> None:
    # A forked child inherits the parent's handles and the shared mapping: an inherited pin
    # could be dropped (the parent's own unpin then panics everyone), a page changed. The
    # hit path already tests ``_hot`` first, so turning it off costs the parent nothing.
    for f in list(_live_files):
        f._disarm()


os.register_at_fork(after_in_child=_disarm_in_child)

MODE_GET, MODE_CREATE, MODE_NEW, MODE_LAST = 0, 1, 2, 3
_BH_DATA = BH.size
# The hit and unpin paths' word indexes, bound once from the layout (a global is one lookup).
H_NEXT, H_FILE, H_PGNO, H_REF = BH.word.next, BH.word.file, BH.word.pgno, BH.word.ref
H_FLAGS, H_PRIO, H_SIZE, H_IOPID = (
    BH.word.flags,
    BH.word.priority,
    BH.word.page_size,
    BH.word.io_pid,
)
H_PINAT, H_PINS = BH.word.pinned_at, BH.word.pins
B_HEAD, B_DIRTY, B_COUNT = BUCKET.word.head, BUCKET.word.dirty, BUCKET.word.count
C_LRU, C_BUFFERS = CACHE_HEADER.word.lru_counter, CACHE_HEADER.word.buffers
_COARSE = PIN_CLOCK

_FS_HIT = FILE_STATS.word.cache_hit
_FS_MISS = FILE_STATS.word.cache_miss
_FS_MAP = FILE_STATS.word.map
_HS_EXTRA = HANDLE_STATS.word.hash_examined_extra

# The compiled accelerator, when installed, does the bucket work of hits and unpins.
_c_pin_hit = accel.pin_hit
_c_pin_one = accel.pin_one_cache
_c_unpin = accel.unpin_at
_CORRUPT = accel.CORRUPT
_HS_LONG = HANDLE_STATS.word.hash_longest
#: Whether a crash-test plan (AIODBENV_TEST_SIGNAL, read once at import) may act at a step: the
#: Python unpin, a hot path without the accelerator, then skips even the call.
_CRASH_STEPS = bool(_io._signal_plan)
_NO_PINS = memoryview(bytes(2 * MAX_PROCS)).cast("H")


class PoolFile:
    """A file open in the pool. Made by :meth:`aiodbenv.Pool.open_file`.

    Pages are pinned with :meth:`get` (``async with f.get(7) as page``), :meth:`new`,
    :meth:`last` or :meth:`pin`, and unpinned at the end of the ``async with`` block or by
    :meth:`unpin`. A page may be pinned many times, by many coroutines and processes; a pinned
    page is never evicted or moved.
    """

    def __init__(
        self,
        pool: Pool,
        fidx: int,
        *,
        fd: int | None,
        path: str | None,
        page_size: int,
        readonly: bool,
        temp: bool,
        nofile: bool,
        ftype: int,
        cookie: bytes,
        mapped: mmap.mmap | None,
        checksum: bool = False,
    ) -> None:
        self._pool = pool
        self._core = pool._core
        self._fidx = fidx
        self._tag = fidx + 1
        self._fd = fd
        self._path = path
        self.page_size = page_size
        self.readonly = readonly
        self.temp = temp
        self.nofile = nofile
        self.ftype = ftype
        self.cookie = cookie
        #: Pages carry a checksum trailer (``open_file(checksum=True)``).
        self.checksum = checksum
        # What ``page.data`` spans: the page without the checksum trailer, if any.
        self._data_size = page_size - TRAILER if checksum else page_size
        self._map = mapped
        self._map_view = memoryview(mapped) if mapped is not None else None
        self._map_pages = len(mapped) // page_size if mapped is not None else 0
        self._fs = self._core.file_stats_block(fidx)
        self._hs = pool._hs
        self._w0 = self._core.meta_words
        self._entry = self._core.entry(fidx)
        self._pins: set[Page] = set()
        self._closed = False
        # What the hot path needs, one attribute lookup away.
        self._caches = self._core.caches
        self._cache0 = self._caches[0]
        self._ncache = self._core.ncache
        self._hot = mapped is None  # False once closed, or for a mapped file
        self._slot = pool._slot  # this handle's registry slot: where its pins are counted
        self._pslot = PINS_HALF + self._slot  # + bh // 2: its count in a buffer, as a half
        self._panic_w = pool._panic_words
        self._panic_i = pool._panic_index
        self._fs_hit = self._fs + _FS_HIT
        self._examined = ffi.new("uint64_t[1]")
        self._bucket_out = ffi.new("uint64_t[1]")
        w0p = self._cache0.wptr  # region 0: where the statistics blocks live
        self._hit_ptr = w0p + self._fs_hit
        self._extra_ptr = w0p + self._hs + _HS_EXTRA
        self._longest_ptr = w0p + self._hs + _HS_LONG
        self._choose_hit_path()
        self._forked = False
        _live_files.add(self)

    # -- facts --------------------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        """The file's path, or None for a temporary file."""
        return self._path

    @property
    def pages(self) -> int:
        """Pages the pool knows of (the last page number + 1), counting pages not yet written."""
        return int(self._w0[self._entry + FILE_ENTRY.word.pages])

    @property
    def fileid(self) -> bytes:
        """The 20-byte id that makes every open of this file share one set of pages."""
        return self._core.fileid(self._fidx)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def mapped(self) -> bool:
        """True if pages are served from a read-only memory map of the file (``st_map``)."""
        return self._map is not None

    def _disarm(self) -> None:
        """In a forked child: every use of this handle raises ForkedProcessError, and the
        views of its pinned pages are released (reading one raises ValueError)."""
        self._forked = True
        self._hot = False  # hits go to the slow path, whose check raises
        self._unpin = self._refuse_forked  # type: ignore[method-assign,assignment]
        for page in self._pins:
            try:
                page.data.release()
            except BufferError:
                pass  # the caller holds a view of it: cannot be taken back

    def _refuse_forked(self, *_args: object) -> None:
        raise ForkedProcessError(
            f"file {self._path!r} was opened by the parent of this forked process: open the "
            "environment again in this process"
        )

    def _check(self) -> None:
        if self._forked:
            self._refuse_forked()
        if self._closed:
            raise InvalidArgument(f"file {self._path!r} is closed")
        self._pool._check()

    def _check_open(self) -> None:
        """After an await inside a pin: the file (or the pool) may have closed meanwhile."""
        if self._closed:
            raise InvalidArgument(f"file {self._path!r} was closed while the pin waited")

    # -- pinning ------------------------------------------------------------------------------

    def get(self, pgno: int, *, create: bool = False) -> PinContext:
        """Pin page ``pgno`` (memp_fget); with ``create``, make it if it does not exist
        (``DB_MPOOL_CREATE``: zero-filled, pgin applied, dirty).

        Use as ``async with f.get(pgno) as page`` or ``page = await f.get(pgno)``. Raises
        :class:`~aiodbenv.errors.PageNotFound` for a page past the end without ``create``,
        :class:`~aiodbenv.errors.NoSpace` past ``max_pages``,
        :class:`~aiodbenv.errors.CacheFull` when no frame frees up in time.

        Cancellation: a pin cancelled while its page is being read leaves no pin held; the read
        finishes in the background so that other waiters get the page.
        """
        if type(pgno) is not int or not 0 <= pgno < MAX_PGNO:
            raise InvalidArgument(f"page number must be an int in 0..2**40-1, not {pgno!r}")
        return PinContext(self, pgno, MODE_CREATE if create else MODE_GET)

    def new(self) -> PinContext:
        """Pin a new page at the end of the file (``DB_MPOOL_NEW``): zero-filled, dirty, pgin
        not applied; ``page.pgno`` is its number. No two callers get the same page."""
        return PinContext(self, -1, MODE_NEW)

    def last(self) -> PinContext:
        """Pin the last page of the file (``DB_MPOOL_LAST``)."""
        return PinContext(self, -1, MODE_LAST)

    async def pin(
        self,
        pgno: int | None = None,
        *,
        create: bool = False,
        new: bool = False,
        last: bool = False,
    ) -> Page:
        """The explicit form of :meth:`get`, :meth:`new` and :meth:`last`: returns the pinned
        page; unpin it with :meth:`unpin`. ``create``, ``new`` and ``last`` exclude each other
        (``InvalidArgument``)."""
        if create + new + last > 1:
            raise InvalidArgument("create, new and last exclude each other")
        if new or last:
            if pgno is not None:
                raise InvalidArgument("new and last choose the page number themselves")
            return await self._pin(-1, MODE_NEW if new else MODE_LAST)
        if type(pgno) is not int or not 0 <= pgno < MAX_PGNO:
            raise InvalidArgument(f"page number must be an int in 0..2**40-1, not {pgno!r}")
        return await self._pin(pgno, MODE_CREATE if create else MODE_GET)

    def _pin_hit_py(self, pgno: int) -> Page | None:
        """Pin ``pgno`` if it is cached and readable; None sends the caller to the slow path.

        The bucket mutex is taken inline (trylock, count a no-wait, unlock) rather than through
        ``with``: this is the hottest path in the library. :meth:`_pin_hit_c` is the same in C.
        """
        if not self._hot or self._panic_w[self._panic_i]:
            return None
        h = bucket_hash(self._fidx, pgno)
        ncache = self._ncache
        cache = self._caches[h % ncache] if ncache > 1 else self._cache0
        b = (h // ncache) % cache.nbuckets
        w = cache.words
        tag = self._tag
        examined = 1
        p = cache.mptrs[b]
        if p:
            rc = _trylock(p)
            if rc:
                if rc == errno.EBUSY:
                    return None  # contended: the slow path waits, without blocking the loop
                cache.mutexes[b].acquire_contended(rc)
            else:
                w[cache.nowait_words[b]] += 1
        try:
            off = w[cache.bucket_words[b] + B_HEAD]
            while off:
                # Every offset read from the region is checked before it is followed
                # (Cache.bh_ok, inlined: this is the hit path).
                if off & 7 or off < cache.bh_lo or off > cache.bh_hi:
                    return None  # the slow path's walk reports it
                x = off >> 3
                if w[x + H_PGNO] == pgno and w[x + H_FILE] == tag:
                    p = (off >> 1) + self._pslot
                    halves = cache.halves
                    mine = halves[p]
                    if w[x + H_FLAGS] & BH_READING or mine == 0xFFFF:
                        return None
                    if off + _BH_DATA + self.page_size > cache.region.size:
                        return None
                    ref = w[x + H_REF]
                    if not ref:  # the first pin: when it began (the oldest pin's age)
                        w[x + H_PINAT] = _clock_ns(_COARSE)
                    w[x + H_REF] = ref + 1
                    halves[p] = mine + 1
                    break
                off = w[x + H_NEXT]
                examined += 1
                if examined > cache.max_chain:
                    return None
            else:
                return None
        finally:
            cache.unlock(b)
        w0 = self._w0
        w0[self._fs_hit] += 1
        if examined > 1:
            self._count_examined(examined)
        start = off + _BH_DATA
        page = Page(self, pgno, cache.buf[start : start + self._data_size], cache, b, off)
        self._pins.add(page)
        return page

    def _pin_hit_c(self, pgno: int) -> Page | None:
        """:meth:`_pin_hit_py` with the bucket search done by the compiled accelerator."""
        if not self._hot or self._panic_w[self._panic_i]:
            return None
        h = bucket_hash(self._fidx, pgno)
        ncache = self._ncache
        cache = self._caches[h % ncache] if ncache > 1 else self._cache0
        b = (h // ncache) % cache.nbuckets
        ex = self._examined
        off = _c_pin_hit(
            cache.wptr,
            cache.mptrs[b],
            cache.nowait_words[b],
            cache.bucket_words[b] + B_HEAD,
            pgno,
            self._tag,
            ex,
            self._slot,
        )
        if off <= 0:
            if off == -errno.EOWNERDEAD:
                cache.release_dead_holder(b)
            elif off == _CORRUPT:
                cache.corrupt(f"bucket {b}'s chain has a bad offset or loops")
            return None  # not cached, being read, or contended: the slow path sorts it out
        self._w0[self._fs_hit] += 1
        if ex[0] > 1:
            self._count_examined(ex[0])
        start = off + _BH_DATA
        page = Page(self, pgno, cache.buf[start : start + self._data_size], cache, b, off)
        self._pins.add(page)
        return page

    def _pin_hit_one(self, pgno: int) -> Page | None:
        """:meth:`_pin_hit_c` for a pool of one cache: hashing, search, pin and statistics
        all in one compiled call."""
        if not self._hot or self._panic_w[self._panic_i]:
            return None
        cache = self._cache0
        out = self._bucket_out
        off = _c_pin_one(
            cache.wptr,
            cache.c_mptrs,
            cache.c_nowait_words,
            cache.c_bucket_words,
            cache.nbuckets,
            self._fidx,
            pgno,
            self._hit_ptr,
            self._extra_ptr,
            self._longest_ptr,
            out,
            self._slot,
        )
        if off <= 0:
            if off == -errno.EOWNERDEAD:
                cache.release_dead_holder(int(out[0]))
            elif off == _CORRUPT:
                cache.corrupt(f"bucket {int(out[0])}'s chain has a bad offset or loops")
            return None
        start = off + _BH_DATA
        page = Page(self, pgno, cache.buf[start : start + self._data_size], cache, int(out[0]), off)
        self._pins.add(page)
        return page

    def _choose_hit_path(self) -> None:
        if not accel.COMPILED:
            self._pin_hit = self._pin_hit_py  # type: ignore[method-assign]
        elif self._ncache == 1:
            self._pin_hit = self._pin_hit_one  # type: ignore[method-assign]
        else:
            self._pin_hit = self._pin_hit_c  # type: ignore[method-assign]

    #: The hit path in use: compiled when the accelerator is installed, else Python.
    _pin_hit = _pin_hit_c if accel.COMPILED else _pin_hit_py

    def _count_examined(self, examined: int) -> None:
        w0 = self._w0
        hs = self._hs
        w0[hs + _HS_EXTRA] += examined - 1
        if examined > w0[hs + _HS_LONG]:
            w0[hs + _HS_LONG] = examined

    async def _pin(self, pgno: int, mode: int) -> Page:
        self._check()
        pool = self._pool
        pool._enter()
        try:
            page = await self._pin_slow(pgno, mode)
        finally:
            pool._leave()
        if self._closed or pool._closing:
            # The file or the environment began closing while this pin waited: a page handed
            # out now would be unpinned under the caller at once. Give it back instead.
            self._unpin(page, 0)
            what = "file" if self._closed else "environment"
            raise InvalidArgument(f"the {what} was closed while the pin waited")
        return page

    async def _pin_slow(self, pgno: int, mode: int) -> Page:
        # Before anything is held: a miss served from the OS cache never awaits, so a run of
        # them must let the loop breathe now and then.
        await self._pool._breathe()
        self._check()
        w0 = self._w0
        e = self._entry
        if mode == MODE_NEW:
            if self.readonly:
                raise InvalidArgument("new page requested on a file opened read-only")
            pgno = self._extend(None)
        elif mode == MODE_LAST:
            pgno = int(w0[e + FILE_ENTRY.word.pages]) - 1
            if pgno < 0:
                raise PageNotFound(f"file {self._path!r} has no pages")
        if self._map is not None and pgno < self._map_pages:
            if not w0[e + FILE_ENTRY.word.flags] & FF_NO_MMAP:
                w0[self._fs + _FS_MAP] += 1
                start = pgno * self.page_size
                view = self._map_view[start : start + self.page_size]  # type: ignore[index]
                page = Page(self, pgno, view, None, -1, 0)
                self._pins.add(page)
                return page
        pool = self._pool
        while True:
            cache, b = self._core.locate(self._fidx, pgno)
            found = pool._attempt(self._lookup_pin, cache, b, pgno)
            if found is BUSY:
                found = await pool._locked(self._lookup_pin, cache, b, pgno)
            if found:
                bh = found
                if cache.words[(bh >> 3) + H_FLAGS] & BH_READING:
                    ok = await self._pool._await_read(cache, b, bh, self)
                    if not ok:
                        continue  # the read failed and the buffer went away: try again
                w0[self._fs_hit] += 1
                return self._page(cache, b, bh, pgno)
            if pgno >= w0[e + FILE_ENTRY.word.pages] or mode == MODE_NEW:
                if mode == MODE_GET:
                    raise PageNotFound(
                        f"page {pgno} of {self._path!r} does not exist "
                        f"(the file has {int(w0[e + FILE_ENTRY.word.pages])} pages); "
                        "use create=True"
                    )
                if self.readonly:
                    raise PermissionDenied(f"cannot create page {pgno} in read-only file")
                if mode == MODE_CREATE:
                    await pool._locked(self._extend, pgno)
            frame = await pool._get_frame(cache, self.page_size)
            # The frame is ours alone until it is linked: every way out gives it back.
            try:
                self._check_open()  # closed while we waited for the frame?
                inserted = pool._attempt(self._insert, cache, b, frame, pgno)
                if inserted is BUSY:
                    inserted = await pool._locked(self._insert, cache, b, frame, pgno)
            except BaseException:
                await pool._free_frame(cache, frame)
                raise
            if not inserted:
                await pool._free_frame(cache, frame)
                continue  # someone else brought the page in meanwhile: pin theirs
            w0[self._fs + _FS_MISS] += 1
            await self._pool._fill(self, cache, b, frame, pgno, mode)
            return self._page(cache, b, frame, pgno)

    def _page(self, cache: Cache, b: int, bh: int, pgno: int) -> Page:
        start = bh + _BH_DATA
        if start + self.page_size > cache.region.size:
            # The environment is panicked: the pin just taken no longer matters.
            cache.corrupt(f"buffer {bh} of {self.page_size}-byte page {pgno} ends past the region")
        page = Page(self, pgno, cache.buf[start : start + self._data_size], cache, b, bh)
        self._pins.add(page)
        return page

    def _lookup_pin(self, cache: Cache, b: int, pgno: int) -> int:
        """Find and pin the buffer of ``pgno`` (even one being read); 0 if not cached."""
        w = cache.words
        tag = self._tag
        examined = 1
        found = 0
        with cache.mutexes[b]:
            for off in cache.chain(b):
                x = off >> 3
                if w[x + H_PGNO] == pgno and w[x + H_FILE] == tag:
                    p = (off >> 1) + PINS_HALF + self._slot
                    if cache.halves[p] == 0xFFFF:
                        raise InvalidArgument(
                            f"page {pgno} is pinned 65535 times by this handle: the most one "
                            "handle may hold at once"
                        )
                    _io.step("pin.lookup")
                    ref = w[x + H_REF]
                    if not ref:
                        w[x + H_PINAT] = _clock_ns(_COARSE)
                    w[x + H_REF] = ref + 1
                    _io.step("pin.counted")
                    cache.halves[p] += 1
                    found = off
                    break
                examined += 1
        if examined > 1:
            self._count_examined(examined)
        return found

    def _insert(self, cache: Cache, b: int, frame: int, pgno: int) -> bool:
        """Link ``frame`` as page ``pgno`` (being read, pinned once) unless someone beat us
        (False: the frame is still the caller's to give back)."""
        w = cache.words
        bw = cache.bucket_words[b]
        tag = self._tag
        x = frame >> 3
        with cache.mutexes[b]:
            for off in cache.chain(b):
                y = off >> 3
                if w[y + H_PGNO] == pgno and w[y + H_FILE] == tag:
                    break
            else:
                p = (frame >> 1) + PINS_HALF
                cache.halves[p : p + MAX_PROCS] = _NO_PINS  # a recycled frame keeps old counts
                cache.halves[p + self._slot] = 1
                w[x + H_FILE] = tag
                w[x + H_PGNO] = pgno
                w[x + H_REF] = 1
                w[x + H_PINAT] = _clock_ns(_COARSE)
                w[x + H_FLAGS] = BH_READING
                w[x + H_PRIO] = 0
                w[x + H_SIZE] = self.page_size
                w[x + H_IOPID] = self._core.pid
                w[x + H_NEXT] = w[bw + B_HEAD]
                w[bw + B_HEAD] = frame  # one store publishes the complete header
                w[bw + B_COUNT] += 1
                self._core.settle_buffer(cache, frame)
                _io.step("pin.inserted")
                return True
        return False

    def _extend(self, pgno: int | None) -> int:
        """Grow the pool's idea of the file: to ``pgno + 1`` pages, or by one page for NEW
        (returning the new page's number). Enforces ``max_pages`` with NoSpace."""
        core = self._core
        w0 = self._w0
        e = self._entry
        with core.file_mutex(self._fidx):
            pages = int(w0[e + FILE_ENTRY.word.pages])
            target = pages if pgno is None else pgno
            limit = int(w0[e + FILE_ENTRY.word.max_pages])
            if limit and target >= limit:
                raise NoSpace(f"file {self._path!r} is limited to {limit} pages")
            if target >= pages:
                w0[e + FILE_ENTRY.word.pages] = target + 1
        return target

    # -- unpinning ----------------------------------------------------------------------------

    async def unpin(
        self, page: Page, *, dirty: bool = False, clean: bool = False, discard: bool = False
    ) -> None:
        """Unpin ``page`` (memp_fput). ``dirty``: it was changed and must be written before
        its buffer is reused; ``clean``: forget earlier changes; ``discard``: evict it first.
        Flags set with :meth:`Page.mark_dirty` and friends also apply.

        Raises :class:`~aiodbenv.errors.InvalidArgument` for ``clean`` with ``dirty`` or a page
        that is not pinned (more unpins than pins, or one that closing its file or environment
        unpinned already), :class:`~aiodbenv.errors.PermissionDenied` for ``dirty`` on a
        read-only file. Never awaits I/O. It awaits only when the page's bucket mutex is held
        by another process for more than a few milliseconds: the release then backs off and
        retries without blocking the event loop, and raises
        :class:`~aiodbenv.errors.LockTimeout` naming the holder after ``pool.wait_timeout``
        seconds (the pin then stays counted in the region). Cancellation: the page is unpinned
        for the caller at once either way; a release still waiting for the mutex finishes in
        the background.
        """
        flags = page._flags
        if dirty and clean:
            flags = PAGE_DIRTY | PAGE_CLEAN  # refused by _unpin's check
        elif dirty:
            flags = (flags & ~PAGE_CLEAN) | PAGE_DIRTY
        elif clean:
            flags = (flags & ~PAGE_DIRTY) | PAGE_CLEAN
        if discard:
            flags |= PAGE_DISCARD
        pending = self._unpin(page, flags)
        if pending is not None:
            await asyncio.shield(pending)

    def set(
        self, page: Page, *, dirty: bool = False, clean: bool = False, discard: bool = False
    ) -> None:
        """Set a pinned page's flags without unpinning it (memp_fset): ``dirty`` and ``clean``
        apply at once, ``discard`` when the page is unpinned. At least one flag is required.

        Synchronous: if another process holds the page's bucket mutex, this waits for it at
        most ``aiodbenv.region.mutex.SYNC_WAIT`` (1 s), blocking the thread, then raises
        :class:`~aiodbenv.errors.LockTimeout` naming the holder, with nothing changed."""
        if self._forked:
            self._refuse_forked()
        if not (dirty or clean or discard):
            raise InvalidArgument("set needs at least one of dirty, clean, discard")
        self._check_flags(page, (PAGE_DIRTY if dirty else 0) | (PAGE_CLEAN if clean else 0))
        cache = page._cache
        if (dirty or clean) and cache is not None:
            w = cache.words
            with cache.mutexes[page._bucket]:  # first: a LockTimeout leaves nothing changed
                self._apply_dirty(
                    w,
                    page._bh >> 3,
                    cache.bucket_words[page._bucket],
                    PAGE_DIRTY if dirty else PAGE_CLEAN,
                )
        if dirty:
            self._pool._note_dirty(self.page_size)
        if discard:
            page._flags |= PAGE_DISCARD

    def _check_flags(self, page: Page, flags: int) -> None:
        """Raise the error a bad unpin or set deserves (called only when something is off)."""
        if page._file is not self:
            raise InvalidArgument(f"page {page.pgno} belongs to another file handle")
        if page._bh == RELEASED_BY_CLOSE:
            raise InvalidArgument(
                f"page {page.pgno} of {self._path or '(temporary file)'} was already unpinned "
                "when its file (or environment) was closed"
            )
        if page._bh < 0:
            raise InvalidArgument(f"page {page.pgno} is not pinned: more unpins than pins")
        if flags & PAGE_DIRTY and flags & PAGE_CLEAN:
            raise InvalidArgument("clean and dirty exclude each other")
        if flags & PAGE_DIRTY and self.readonly:
            raise PermissionDenied(f"dirty flag set for page {page.pgno} of a read-only file")

    @staticmethod
    def _apply_dirty(w: memoryview, x: int, bw: int, flags: int) -> None:
        bh_flags = w[x + H_FLAGS]
        if flags & PAGE_DIRTY:
            # Dirtied while a copy is being written: that copy is stale, and its write must
            # not clean the page (the Python form of aiodb_unpin_at).
            new = bh_flags | BH_DIRTY | (BH_REDIRTIED if bh_flags & BH_WRITING else 0)
            if not bh_flags & BH_DIRTY:
                w[bw + B_DIRTY] += 1
            if new != bh_flags:
                w[x + H_FLAGS] = new
        elif flags & PAGE_CLEAN and bh_flags & BH_DIRTY:
            w[x + H_FLAGS] = bh_flags & ~(BH_DIRTY | BH_REDIRTIED)
            # Wraps at 0 as the compiled twin does; write-back's walk reports the count.
            w[bw + B_DIRTY] = (w[bw + B_DIRTY] - 1) & 0xFFFFFFFFFFFFFFFF

    def _unpin(self, page: Page, flags: int) -> asyncio.Task[None] | None:
        """Drop the pin of ``page``. Returns None when done, or, if the bucket's mutex was
        held past a few milliseconds, the pool task that finishes the release (await it to
        see it through; see :meth:`_release_py`)."""
        bh = page._bh
        if (
            page._file is not self
            or bh < 0
            or (flags & PAGE_DIRTY and (flags & PAGE_CLEAN or self.readonly))
        ):
            self._check_flags(page, flags)
        if flags & PAGE_DIRTY:
            self._pool._note_dirty(self.page_size)
        page._bh = -1
        self._pins.discard(page)
        page.data.release()
        cache = page._cache
        if cache is None:  # a mapped page: nothing in the cache to release
            return None
        b = page._bucket
        if _c_unpin is not None:
            r = _c_unpin(
                cache.wptr,
                cache.c_mptrs,
                cache.c_nowait_words,
                cache.c_bucket_words,
                b,
                bh >> 3,
                cache.hdr,
                flags,
                self._slot,
            )
            if r == 1:
                self._pool._frame_released()
                return None
            if r == 0:
                return None
            if r == 2:
                self._pool._panic_unpinned(page.pgno)
            if r == -errno.EOWNERDEAD:
                cache.release_dead_holder(b)
            # contended (or repaired): do it the Python way, which waits for the mutex
        return self._release_py(page.pgno, cache, b, bh, flags)

    def _release_py(
        self, pgno: int, cache: Cache, b: int, bh: int, flags: int
    ) -> asyncio.Task[None] | None:
        """Drop one pin of buffer ``bh`` with PAGE_* ``flags`` (the Python form of the
        compiled ``aiodb_unpin_at``). The bucket mutex is waited for a few milliseconds at most:
        if its holder keeps it (stopped?), the release is finished by a task of the pool that
        backs off and retries up to ``wait_timeout``, returned for the caller to await."""
        try:
            self._release_locked(pgno, cache, b, bh, flags, STEP_WAIT)
        except LockTimeout:
            return self._pool._later(self._release_locked, pgno, cache, b, bh, flags, None)
        return None

    def _release_locked(
        self, pgno: int, cache: Cache, b: int, bh: int, flags: int, wait: float | None
    ) -> None:
        w = cache.words
        x = bh >> 3
        p = cache.mptrs[b]
        if p:
            rc = _trylock(p)
            if rc:
                cache.mutexes[b].acquire_contended(rc, wait)
            else:
                w[cache.nowait_words[b]] += 1
        try:
            if flags & (PAGE_DIRTY | PAGE_CLEAN):
                self._apply_dirty(w, x, cache.bucket_words[b], flags)
            ref = w[x + H_REF]
            p = (bh >> 1) + self._pslot
            halves = cache.halves
            mine = halves[p]
            if ref and mine:
                ref -= 1
                w[x + H_REF] = ref
                if _CRASH_STEPS:
                    _io.step("unpin.counted")
                halves[p] = mine - 1
                if not ref:
                    hdr = cache.hdr
                    counter = w[hdr + C_LRU] + 1
                    w[hdr + C_LRU] = counter
                    if flags & PAGE_DISCARD:
                        w[x + H_PRIO] = 0
                    elif w[x + H_FLAGS] & BH_DIRTY:
                        # Dirty buffers go a little later than clean ones (a tenth of the
                        # cache later), so eviction prefers pages that need no write.
                        w[x + H_PRIO] = counter + w[hdr + C_BUFFERS] // 10 + 1
                    else:
                        w[x + H_PRIO] = counter
                    released = True
                else:
                    released = False
            else:
                released = None  # the shared pin count is already 0: someone over-unpinned
        finally:
            cache.unlock(b)
        if released is None:
            self._pool._panic_unpinned(pgno)
        elif released:
            self._pool._frame_released()

    # -- write-back and closing ---------------------------------------------------------------

    async def sync(self) -> SyncResult:
        """Write every dirty page of this file and fsync it if it has page writes no fsync
        has covered yet, by any process (memp_fsync).

        Raises :class:`~aiodbenv.errors.Incomplete` if pinned dirty pages could not be written,
        or another process's write of some did not finish within the pool's ``wait_timeout``
        (retry later); a failed write leaves its page dirty and raises; a failed fsync panics
        the environment (:class:`~aiodbenv.errors.RunRecovery`). Cancellation: pages already
        handed to a write finish it; the rest stay dirty.
        """
        self._check()
        from .sync import write_back

        return await write_back(self._pool, files={self._fidx}, fsync=True, reason="fsync")

    async def close(self) -> None:
        """Close the file (memp_fclose). No implied sync: dirty pages stay in the cache and are
        written by eviction, sync or trickle from any process, except those of a temporary file,
        which are dropped (with its backing file). Pages still pinned through this handle are
        unpinned first. Closing twice is harmless. In a forked child: ForkedProcessError."""
        if self._forked:
            self._refuse_forked()
        if self._closed:
            return
        if self._pins:
            self._warn_pinned()
        pending = []
        for page in list(self._pins):
            task = self._unpin(page, page._flags)
            page._bh = RELEASED_BY_CLOSE
            if task is not None:
                pending.append(task)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)  # failures are logged
        self._closed = True
        self._hot = False
        await self._pool._close_file(self)

    def _warn_pinned(self) -> None:
        """Closing with pages still pinned is a leak in the caller (a pin never released):
        say which pages, in the log and as a ResourceWarning."""
        pgnos = sorted({p.pgno for p in self._pins})
        shown = ", ".join(map(str, pgnos[:20])) + (", ..." if len(pgnos) > 20 else "")
        text = (
            f"closing {self._path or '(temporary file)'} with {len(self._pins)} pin(s) still "
            f"held on page(s) {shown}; they are unpinned now (with the flags set on them)"
        )
        logger.warning("aiodbenv: %s", text)
        warnings.warn(text, ResourceWarning, stacklevel=3)

    def stat(self) -> FileStat:
        """This file's statistics (its DB_MPOOL_FSTAT), summed over every process."""
        from .stat import file_stat

        self._check()
        return file_stat(self._core, self._fidx)

    async def __aenter__(self) -> PoolFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<PoolFile {self._path!r} page_size={self.page_size}>"
