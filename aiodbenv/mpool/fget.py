"""Page access on a file (Berkeley DB's mp_fget.c and mp_fput.c): pin, unpin, the hit path.

The hit path (:meth:`PageAccess._pin_hit`) is synchronous: hash, lock one bucket, find the
buffer, count the pin, slice a memoryview. Only a miss awaits: a frame, then the read
(:mod:`~aiodbenv.mpool.frames`, :mod:`~aiodbenv.mpool.bhread`). The bucket search of a hit and
the bookkeeping of an unpin run in C when the compiled accelerator is installed
(``aiodb_pin_hit``, ``aiodb_unpin_at``: :mod:`aiodbenv.mpool.accel`) and in Python otherwise;
both do the same.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import weakref
from time import clock_gettime_ns as _clock_ns
from typing import TYPE_CHECKING

from .. import _io
from ..errors import (
    ForkedProcessError,
    InvalidArgument,
    PageNotFound,
    PermissionDenied,
)
from ..region.layout import MAX_PROCS
from ..region.mutex import BUSY, ffi
from ..region.mutex import trylock as _trylock
from . import accel
from .cache import Cache, bucket_hash
from .checksum import TRAILER
from .layout import (
    BH,
    BH_READING,
    BUCKET,
    CACHE_HEADER,
    FF_NO_MMAP,
    FILE_ENTRY,
    FILE_STATS,
    HANDLE_STATS,
    PIN_CLOCK,
    PINS_HALF,
)
from .miss import COMPILED_MISS, Missed, finish_miss, miss_context, try_miss
from .page import Page, Pins, new_pins

if TYPE_CHECKING:
    from .fopen import PoolFiles

__all__ = ["MODE_CREATE", "MODE_GET", "MODE_LAST", "MODE_NEW", "PageAccess"]

logger = logging.getLogger("aiodbenv")

#: ``Page._bh`` of a page that close unpinned (-1 is a page its holder unpinned).
RELEASED_BY_CLOSE = -2

#: Every open PoolFile of this process, so that a forked child can disarm them.
_live_files: weakref.WeakSet[PageAccess] = weakref.WeakSet()


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
_H_LATCH = BH.word.latch
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
_CORRUPT = accel.CORRUPT
_HS_LONG = HANDLE_STATS.word.hash_longest
#: Zeros for the per-slot pin counts of a frame newly linked.
_NO_PINS = memoryview(bytes(2 * MAX_PROCS)).cast("H")


class PageAccess:
    """The page access of a :class:`~aiodbenv.mpool.file.PoolFile`: its state, the hit path,
    the slow path of a pin, and unpinning."""

    def __init__(
        self,
        pool: PoolFiles,
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
        fs: int | None = None,
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
        # The handle's counters: allocated by the opener (with an async back-off for the pool
        # mutex), or here.
        self._fs = self._core.file_stats_block(fidx) if fs is None else fs
        self._hs = pool._hs
        self._w0 = self._core.meta_words
        self._entry = self._core.entry(fidx)
        self._pins: Pins = new_pins()
        # Pages pinned with get(latch=True) and the owner word of the latch each holds.
        self._latched: dict[Page, int] = {}
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
        if COMPILED_MISS:
            self._miss_ctx, self._miss_out = miss_context(self)
        self._forked = False
        _live_files.add(self)

    def _disarm(self) -> None:
        """In a forked child: every use of this handle raises ForkedProcessError, and the
        views of its pinned pages are released (reading one raises ValueError)."""
        self._forked = True
        self._hot = False  # hits go to the slow path, whose check raises
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

    def _count_examined(self, examined: int) -> None:
        w0 = self._w0
        hs = self._hs
        w0[hs + _HS_EXTRA] += examined - 1
        if examined > w0[hs + _HS_LONG]:
            w0[hs + _HS_LONG] = examined

    async def _pin_slow(self, pgno: int, mode: int, missed: Missed | None = None) -> Page:
        if missed is not None:
            # The compiled page context tried the miss (MODE_GET, a page of the file): go on
            # from what it holds first, and do not try the compiled miss again at once.
            done = await finish_miss(self, pgno, mode, missed)
            if done is not None:
                return done
        # Before anything is held: a miss served from the OS cache never awaits, so a run of
        # them must let the loop breathe now and then.
        if await self._pool._breathe():
            self._check()  # the caller (PoolFile._pin) checked before; the loop ran since
        w0 = self._w0
        e = self._entry
        if mode == MODE_NEW:
            if self.readonly:
                raise InvalidArgument("new page requested on a file opened read-only")
            pgno = await self._pool._locked(
                self._core.extend_file, self._fidx, None, self._path
            )  # the file mutex: backs off
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
        tried = missed is not None
        while True:
            if tried:
                tried = False
            elif COMPILED_MISS and mode != MODE_NEW and pgno < w0[e + FILE_ENTRY.word.pages]:
                done = try_miss(self, pgno) or await finish_miss(self, pgno, mode)
                if done is not None:
                    return done  # else nothing is held: the Python path
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
                    await pool._locked(self._core.extend_file, self._fidx, pgno, self._path)
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
                w[x + _H_LATCH] = 0
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

    #: The hit path in use: compiled when the accelerator is installed, else Python.
    _pin_hit = _pin_hit_c if accel.COMPILED else _pin_hit_py
