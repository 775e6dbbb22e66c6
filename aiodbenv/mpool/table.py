"""The pool's synchronous core: hash buckets, buffer headers, the file table, replacement.

Everything here runs on the event-loop thread in short critical sections and never awaits;
:mod:`aiodbenv.mpool.file` and :mod:`aiodbenv.mpool.sync` wrap it with the I/O. All state is
in the mpool regions, so every process sees the same buffers, pins and files.

Lock order: the pool mutex (file index, handle list), then a file's mutex, then one bucket
mutex, then a region's allocator mutex. Never two bucket mutexes at once; never one across an
``await``.

Replacement follows Berkeley DB's priority stamps: every unpin bumps the cache's counter and a
buffer whose last pin goes is stamped with it (a discarded buffer with 0, a dirty one a little
later so clean ones go first). A victim is the lowest stamp among the unpinned buffers of a few
buckets, skipping the most recently used tenth; looking at several buckets approximates LRU
closely without any shared list to lock on every unpin.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from .._config import (
    DEFAULT_MMAP_SIZE,
    DEFAULT_PAGE_SIZE,
    MAX_NCACHE,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    Settings,
)
from ..errors import CacheFull, CorruptRegion, InvalidArgument
from ..region.alloc import Allocator
from ..region.backing import Region
from ..region.layout import ALLOC_CHUNK, MAX_PROCS, MUTEX_SLOT, REGION_HEADER, WORD
from ..region.mutex import NullMutex, SharedMutex, ffi
from ..region.mutex import trylock as _trylock
from ..region.mutex import unlock as _unlock
from .layout import (
    BH,
    BH_DIRTY,
    BH_READING,
    BH_WRITING,
    BUCKET,
    CACHE_HEADER,
    CACHE_HEADER_AT,
    FF_CHECKSUM,
    FF_DEAD,
    FF_NOFILE,
    FF_TEMP,
    FILE_ENTRY,
    FILE_STATS,
    FSTAT_FIELDS,
    GSTAT_FIELDS,
    HANDLE_STATS,
    MAX_FILES,
    MAX_PGNO,
    PINS_HALF,
    POOL_HEADER,
    POOL_HEADER_AT,
)

__all__ = ["Cache", "PoolCore", "Victim", "format_pool", "new_fileid", "pool_region_sizes"]

#: Metadata room reserved in cache 0 for file entries, names, cookies and statistics blocks.
_META_RESERVE = 48 * 1024
#: Allocator overhead per buffer: its chunk header, plus rounding.
_CHUNK_OVERHEAD = ALLOC_CHUNK.size + 16
#: A buffer's allocator-chunk tag word, in words before the buffer: the pid of a process that
#: holds the buffer outside any bucket (just allocated, or unlinked as a victim), else 0.
_TAG_FROM_BH = (ALLOC_CHUNK.size - ALLOC_CHUNK.offset("tag")) // WORD
#: Buckets the victim search compares before it settles for the best it has seen.
SEARCH_BUCKETS = 4
#: No count or statistic in a region reaches this; one that does is corrupt (and adding one
#: to 2**64 - 1 would fail in Python, wrap in C).
COUNTER_LIMIT = 1 << 62
_MUTEX_COUNTERS = [getattr(MUTEX_SLOT.word, f) for f in ("waits", "nowaits", "owner_died")]
_REGION_COUNTERS = [
    getattr(REGION_HEADER.word, f) for f in ("bytes_used", "allocs", "frees", "failures")
] + [REGION_HEADER.word.alloc_mutex + i for i in _MUTEX_COUNTERS]


def check_counters(words: memoryview, indexes: Sequence[int], limit: int, what: str) -> None:
    """Raise :class:`CorruptRegion` if a count at one of the word ``indexes`` reaches
    ``limit`` (checked when a region is attached)."""
    for i in indexes:
        if words[i] >= limit:
            raise CorruptRegion(f"{what}: count {int(words[i])} at word {i} is out of range")


def _nbuckets(pages: int) -> int:
    # Berkeley DB sizes the table for chains of about 2.5 pages; at least a handful of buckets.
    n = max(17, int(pages / 2.5))
    return n | 1


def pool_region_sizes(settings: Settings) -> list[int]:
    """Sizes of the ``ncache`` mpool regions for ``settings`` (before rounding)."""
    cache_size = settings.cache_size or 256 * 1024
    ncache = settings.ncache
    page_size = settings.page_size or DEFAULT_PAGE_SIZE
    sizes = []
    for i in range(ncache):
        share = cache_size // ncache
        pages = max(1, share // page_size)
        size = (
            CACHE_HEADER.size
            + _nbuckets(pages) * BUCKET.size
            + share
            + pages * (BH.size + _CHUNK_OVERHEAD)
            + 4096
        )
        if i == 0:
            size += POOL_HEADER.size + _META_RESERVE
        sizes.append(size)
    return sizes


def format_pool(regions: Sequence[Region], settings: Settings, shared: bool) -> None:
    """Lay out a new pool in its regions (the creator, before the environment's magic)."""
    ncache = len(regions)
    cache_size = settings.cache_size or 256 * 1024
    page_size = settings.page_size or DEFAULT_PAGE_SIZE
    for index, region in enumerate(regions):
        w = region.words
        c = CACHE_HEADER_AT // WORD
        share = cache_size // ncache
        nb = _nbuckets(max(1, share // page_size))
        start = CACHE_HEADER_AT + CACHE_HEADER.size + (POOL_HEADER.size if index == 0 else 0)
        w[c + CACHE_HEADER.word.cache_index] = index
        w[c + CACHE_HEADER.word.nbuckets] = nb
        w[c + CACHE_HEADER.word.buckets_off] = start
        w[c + CACHE_HEADER.word.page_bytes] = share
        arena = start + nb * BUCKET.size
        Allocator.format(w, arena, region.size)
        if shared:
            for b in range(nb):
                SharedMutex(
                    region.base, w, start + b * BUCKET.size + BUCKET.offset("mutex"), "bucket"
                ).initialize()
    r0 = regions[0]
    w = r0.words
    p = POOL_HEADER_AT // WORD
    w[p + POOL_HEADER.word.ncache] = ncache
    w[p + POOL_HEADER.word.cache_size] = cache_size
    w[p + POOL_HEADER.word.page_size] = page_size
    w[p + POOL_HEADER.word.mmap_size] = (
        settings.mmap_size if settings.mmap_size is not None else DEFAULT_MMAP_SIZE
    )
    w[p + POOL_HEADER.word.nommap] = int(settings.nommap)
    if shared:
        SharedMutex(r0.base, w, POOL_HEADER_AT + POOL_HEADER.offset("mutex"), "pool").initialize()
    retired = Allocator(r0.buf, w, "mpool region").alloc(HANDLE_STATS.size)
    w[p + POOL_HEADER.word.retired] = retired


class Cache:
    """One mpool region: its buckets, their mutexes, its allocator."""

    __slots__ = (
        "_panic",
        "alloc_mutex",
        "allocator",
        "bh_hi",
        "bh_lo",
        "bucket_words",
        "buf",
        "c_bucket_words",
        "c_mptrs",
        "c_nowait_words",
        "halves",
        "hdr",
        "index",
        "max_chain",
        "mptrs",
        "mutexes",
        "nbuckets",
        "nowait_words",
        "region",
        "words",
        "wptr",
    )

    def __init__(self, region: Region, shared: bool, panic: Callable[[str], None] | None) -> None:
        self.region = region
        self.words = w = region.words
        self.buf = region.buf
        self.halves = region.halves
        self.hdr = CACHE_HEADER_AT // WORD
        self._panic = panic
        self.index = int(w[self.hdr + CACHE_HEADER.word.cache_index])
        self.nbuckets = nb = int(w[self.hdr + CACHE_HEADER.word.nbuckets])
        start = int(w[self.hdr + CACHE_HEADER.word.buckets_off])
        # Checked before anything is built from them: a corrupt count or offset would make
        # millions of objects or point outside the region.
        if (
            not 1 <= nb <= region.size // BUCKET.size
            or start % WORD
            or start < CACHE_HEADER_AT + CACHE_HEADER.size
            or start + nb * BUCKET.size > region.size
            or self.index >= MAX_NCACHE
        ):
            raise CorruptRegion(
                f"mpool region {region.region_id}: corrupt cache header "
                f"(index {self.index}, {nb} buckets at {start}, region of {region.size} bytes)"
            )
        #: Bounds of a buffer header's offset: after the buckets, wholly inside the region.
        self.bh_lo = start + nb * BUCKET.size
        self.bh_hi = region.size - BH.size
        #: No chain is longer than the region has room for buffers: a longer one loops.
        self.max_chain = region.size // BH.size + 1
        what = f"mpool region {region.region_id}"
        check_counters(w, _REGION_COUNTERS, COUNTER_LIMIT, what)
        check_counters(
            w,
            [self.hdr + getattr(CACHE_HEADER.word, f) for f in ("lru_counter", "page_bytes_used")],
            COUNTER_LIMIT,
            what,
        )
        check_counters(w, [self.hdr + CACHE_HEADER.word.buffers], self.max_chain, what)
        first = start // WORD
        step = BUCKET.size // WORD
        mutex_w = BUCKET.word.mutex
        check_counters(
            w,
            [first + b * step + mutex_w + i for b in range(nb) for i in _MUTEX_COUNTERS],
            COUNTER_LIMIT,
            what,
        )
        check_counters(
            w,
            [
                first + b * step + f
                for b in range(nb)
                for f in (BUCKET.word.count, BUCKET.word.dirty)
            ],
            self.max_chain,
            what,
        )
        #: word index of each bucket's first word
        self.bucket_words = [(start + b * BUCKET.size) // WORD for b in range(nb)]
        self.allocator = Allocator(region.buf, w, f"mpool region {region.region_id}")
        # Bucket mutexes as plain pointers and word indexes (a hot path locks them inline);
        # the SharedMutex objects are made only when a slow path needs one. One Python object
        # per bucket would add tens of thousands of objects for the garbage collector to walk,
        # and its full collections would stall the event loop.
        mutex_off = BUCKET.offset("mutex")
        if shared:
            self.mptrs = [region.base + start + b * BUCKET.size + mutex_off for b in range(nb)]
        else:
            self.mptrs = [ffi.NULL] * nb
        self.nowait_words = [
            (start + b * BUCKET.size + mutex_off + MUTEX_SLOT.offset("nowaits")) // WORD
            for b in range(nb)
        ]
        self.mutexes = _BucketMutexes(self, region, start, shared, panic)
        self.wptr = ffi.cast("uint64_t *", region.base)
        # The same, as C arrays, for the compiled write-back helpers.
        self.c_mptrs = ffi.new("void *[]", self.mptrs)
        self.c_nowait_words = ffi.new("uint64_t[]", self.nowait_words)
        self.c_bucket_words = ffi.new("uint64_t[]", self.bucket_words)
        if shared:
            self.alloc_mutex: SharedMutex | NullMutex = SharedMutex(
                region.base,
                w,
                REGION_HEADER.offset("alloc_mutex"),
                f"mpool region {region.region_id} allocator",
                repair=self.allocator.repair,
                panic=panic,
            )
        else:
            self.alloc_mutex = NullMutex("allocator")

    def bucket_mutex_stats(self) -> tuple[int, int]:
        """``(waits, nowaits)`` summed over this cache's bucket mutexes, read from the region
        without making their objects."""
        w = self.words
        d_wait = MUTEX_SLOT.word.waits - MUTEX_SLOT.word.nowaits
        waits = nowaits = 0
        for i in self.nowait_words:
            nowaits += w[i]
            waits += w[i + d_wait]
        return int(waits), int(nowaits)

    def corrupt(self, what: str) -> NoReturn:
        """Panic the environment and raise :class:`CorruptRegion`: an offset or count read
        from this cache failed its check (a running environment cannot go on with it)."""
        msg = f"mpool region {self.region.region_id} is corrupt: {what}"
        if self._panic is not None:
            self._panic(msg)
        raise CorruptRegion(f"PANIC: {msg}; run recovery")

    def bh_ok(self, off: int) -> bool:
        """Is byte offset ``off`` (read from the region) an aligned buffer header wholly
        inside the arena? (The hit paths inline this test.)"""
        return not (off & 7 or off < self.bh_lo or off > self.bh_hi)

    def check_bh(self, off: int) -> int:
        """The word index of the buffer header at byte ``off``, read from the region; panics
        with :class:`CorruptRegion` unless :meth:`bh_ok`."""
        if not self.bh_ok(off):
            self.corrupt(f"buffer offset {off}")
        return off >> 3

    def chain(self, b: int) -> list[int]:
        """The buffer offsets in bucket ``b``'s chain, each checked, the walk bounded (the
        caller holds the bucket mutex)."""
        w = self.words
        out: list[int] = []
        off = int(w[self.bucket_words[b] + BUCKET.word.head])
        while off:
            if len(out) >= self.max_chain:
                self.corrupt(f"bucket {b}'s chain loops")
            out.append(off)
            off = int(w[self.check_bh(off) + BH.word.next])
        return out

    def decrement(self, i: int, what: str) -> None:
        """Count one fewer at word ``i`` of this cache; a count already at 0 is corrupt."""
        if not self.words[i]:
            self.corrupt(f"{what} would go below zero")
        self.words[i] -= 1

    def bucket_owner_died(self) -> int:
        """Times a locker of one of this cache's bucket mutexes found its holder dead."""
        w = self.words
        d = MUTEX_SLOT.word.owner_died - MUTEX_SLOT.word.nowaits
        return int(sum(w[i + d] for i in self.nowait_words))

    def repair_bucket(self, b: int) -> None:
        """Recount a bucket after its mutex holder died: chain length, dirty count (buffers
        flagged DIRTY) and each buffer's pins (the sum of its per-slot counts).

        The chain itself is only changed by single-word stores (a buffer is linked with one
        store of ``head`` or ``next`` after it is complete), so it is always walkable.
        """
        w = self.words
        bw = self.bucket_words[b]
        chain = self.chain(b)
        count = len(chain)
        dirty = sum(1 for off in chain if w[(off >> 3) + BH.word.flags] & BH_DIRTY)
        halves = self.halves
        for off in chain:
            # A holder killed between changing ref and its slot's count: ref is their sum.
            p = off // 2 + PINS_HALF
            w[(off >> 3) + BH.word.ref] = sum(halves[p : p + MAX_PROCS])
        w[bw + BUCKET.word.count] = count
        w[bw + BUCKET.word.dirty] = dirty

    def lock(self, b: int) -> None:
        """Lock bucket ``b`` inline (trylock, count a no-wait; waiting, repairing or
        panicking through its mutex object only when that fails). The wait is bounded (see
        :mod:`aiodbenv.region.mutex`): :class:`~aiodbenv.errors.LockTimeout` if it runs out,
        with the mutex not held. Pair with :meth:`unlock`."""
        p = self.mptrs[b]
        if p:
            rc = _trylock(p)
            if rc:
                self.mutexes[b].acquire_contended(rc)
            else:
                self.words[self.nowait_words[b]] += 1

    def unlock(self, b: int) -> None:
        """Unlock bucket ``b`` (nothing to do in a private region)."""
        p = self.mptrs[b]
        if p:
            _unlock(p)

    def unlink(self, b: int, bh: int) -> bool:
        """Take buffer ``bh`` out of bucket ``b``'s chain (caller holds the bucket mutex);
        False if it was not in it."""
        w = self.words
        bw = self.bucket_words[b]
        chain = self.chain(b)
        if bh not in chain:
            return False
        i = chain.index(bh)
        prev = chain[i - 1] if i else 0
        nxt = w[(bh >> 3) + BH.word.next]
        if prev:
            w[(prev >> 3) + BH.word.next] = nxt
        else:
            w[bw + BUCKET.word.head] = nxt
        self.decrement(bw + BUCKET.word.count, f"bucket {b}'s count")
        return True

    def buffers(self) -> int:
        """Buffers in this cache."""
        return int(self.words[self.hdr + CACHE_HEADER.word.buffers])


class _BucketMutexes:
    """``cache.mutexes[b]``: the mutex object of bucket ``b``, made on first use."""

    __slots__ = ("_cache", "_made", "_null", "_panic", "_region", "_shared", "_start")

    def __init__(
        self,
        cache: Cache,
        region: Region,
        start: int,
        shared: bool,
        panic: Callable[[str], None] | None,
    ) -> None:
        self._cache = cache
        self._region = region
        self._start = start
        self._shared = shared
        self._panic = panic
        self._made: dict[int, SharedMutex] = {}
        self._null = NullMutex("bucket")

    def __getitem__(self, b: int) -> SharedMutex | NullMutex:
        if not self._shared:
            return self._null
        m = self._made.get(b)
        if m is None:
            if not 0 <= b < len(self._cache.mptrs):
                raise IndexError(b)
            cache = self._cache
            m = self._made[b] = SharedMutex(
                self._region.base,
                cache.words,
                self._start + b * BUCKET.size + BUCKET.offset("mutex"),
                f"bucket {b}",
                repair=lambda: cache.repair_bucket(b),
                panic=self._panic,
            )
        return m

    def __len__(self) -> int:
        return len(self._cache.mptrs)

    def __iter__(self) -> Iterator[SharedMutex | NullMutex]:
        return (self[b] for b in range(len(self)))


@dataclass
class Victim:
    """A buffer chosen for eviction, found with its bucket mutex released again."""

    cache: Cache
    bucket: int
    bh: int
    file: int  # index + 1
    pgno: int
    page_size: int
    dirty: bool


class PoolCore:
    """The synchronous bookkeeping of one handle's view of the pool."""

    def __init__(
        self,
        regions: Sequence[Region],
        shared: bool,
        panic: Callable[[str], None] | None,
    ) -> None:
        self.caches = [Cache(r, shared, panic) for r in regions]
        self._panic = panic
        self.ncache = len(self.caches)
        r0 = regions[0]
        self.r0 = r0
        self.w0 = r0.words
        self.p = POOL_HEADER_AT // WORD
        self.shared = shared
        self.pid = os.getpid()
        if shared:
            self.mutex: SharedMutex | NullMutex = SharedMutex(
                r0.base,
                r0.words,
                POOL_HEADER_AT + POOL_HEADER.offset("mutex"),
                "pool",
                repair=self._repair_pool,
                panic=panic,
            )
        else:
            self.mutex = NullMutex("pool")
        #: every bucket of every cache, in global order: (cache, bucket index)
        self.total_buckets = sum(c.nbuckets for c in self.caches)
        self._check_header()

    def _check_header(self) -> None:
        """Range-check the pool header and the file table before anything follows them."""
        w, p = self.w0, self.p
        ncache = int(w[p + POOL_HEADER.word.ncache])
        page_size = int(w[p + POOL_HEADER.word.page_size])
        if ncache != self.ncache or [c.index for c in self.caches] != list(range(ncache)):
            raise CorruptRegion(
                f"mpool header says {ncache} caches; the environment has {self.ncache}"
            )
        if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
            raise CorruptRegion(f"mpool header: page size {page_size}")
        for cache in self.caches:
            share = int(cache.words[cache.hdr + CACHE_HEADER.word.page_bytes])
            if not 0 < share <= cache.region.size:
                raise CorruptRegion(
                    f"mpool region {cache.region.region_id}: {share} bytes of pages in a "
                    f"region of {cache.region.size}"
                )
        retired = self.meta_check(int(w[p + POOL_HEADER.word.retired]), HANDLE_STATS.size)
        mutex = (POOL_HEADER_AT + POOL_HEADER.offset("mutex")) // WORD
        counters = [mutex + i for i in _MUTEX_COUNTERS]
        counters += [
            p + POOL_HEADER.word.retired_files + getattr(FILE_STATS.word, f) for f in FSTAT_FIELDS
        ]
        for hs in [retired] + [
            o >> 3
            for o in self._meta_chain(
                w[p + POOL_HEADER.word.handles_head], HANDLE_STATS.word.next, HANDLE_STATS.size
            )
        ]:
            counters += [hs + getattr(HANDLE_STATS.word, f) for f in GSTAT_FIELDS]
        for i in range(MAX_FILES):
            off = int(w[p + POOL_HEADER.word.files + i])
            if not off:
                continue
            e = self.meta_check(off, FILE_ENTRY.size)
            mutex = e + FILE_ENTRY.word.mutex
            counters += [mutex + k for k in _MUTEX_COUNTERS]
            counters += [e + getattr(FILE_ENTRY.word, f) for f in ("refcnt", "rw_opens", "buffers")]
            counters += [
                e + FILE_ENTRY.word.retired + getattr(FILE_STATS.word, f) for f in FSTAT_FIELDS
            ]
            for fs in self._meta_chain(
                w[e + FILE_ENTRY.word.stats_head], FILE_STATS.word.next, FILE_STATS.size
            ):
                counters += [(fs >> 3) + getattr(FILE_STATS.word, f) for f in FSTAT_FIELDS]
            if (
                w[e + FILE_ENTRY.word.pages] > MAX_PGNO
                or w[e + FILE_ENTRY.word.max_pages] > MAX_PGNO
            ):
                raise CorruptRegion(f"file slot {i}: {int(w[e + FILE_ENTRY.word.pages])} pages")
            named = not w[e + FILE_ENTRY.word.flags] & (FF_TEMP | FF_NOFILE)
            if (named and not w[e + FILE_ENTRY.word.name_off]) or w[
                e + FILE_ENTRY.word.name_len
            ] > 1 << 16:
                raise CorruptRegion(f"file slot {i}: a file with no name or a corrupt one")
            for f in ("name", "cookie"):
                if w[e + getattr(FILE_ENTRY.word, f"{f}_off")]:
                    self.meta_check(
                        int(w[e + getattr(FILE_ENTRY.word, f"{f}_off")]),
                        int(w[e + getattr(FILE_ENTRY.word, f"{f}_len")]),
                    )
            if (
                w[e + FILE_ENTRY.word.page_size] > MAX_PAGE_SIZE
                or w[e + FILE_ENTRY.word.page_size] < MIN_PAGE_SIZE
            ):
                raise CorruptRegion(
                    f"file slot {i}: page size {int(w[e + FILE_ENTRY.word.page_size])}"
                )
        check_counters(w, counters, COUNTER_LIMIT, "mpool region 0")

    def meta_check(self, off: int, size: int) -> int:
        """Word index of a ``size``-byte structure at byte ``off`` of region 0, read from the
        region; :class:`CorruptRegion` (and a panic) unless it is aligned and inside."""
        if off & 7 or off < POOL_HEADER_AT + POOL_HEADER.size or off + size > self.r0.size:
            self.caches[0].corrupt(f"structure offset {off}")
        return off >> 3

    def _meta_chain(self, head: int, next_field: int, size: int) -> list[int]:
        """The offsets of a list in region 0 (statistics blocks), checked and bounded."""
        w = self.w0
        out: list[int] = []
        limit = self.r0.size // size + 1
        cur = int(head)
        while cur:
            if len(out) >= limit:
                self.caches[0].corrupt("a statistics list loops")
            out.append(cur)
            cur = int(w[self.meta_check(cur, size) + next_field])
        return out

    def owner_died(self) -> int:
        """Times a locker of one of the pool's own mutexes (the pool's, the files', the
        buckets') found its holder dead. The caches' allocator mutexes are the environment's
        and counted there."""
        if not self.shared:
            return 0
        total = self.mutex.stats()[2]
        for i in self.file_slots():
            total += self.file_mutex(i).stats()[2]
        return total + sum(c.bucket_owner_died() for c in self.caches)

    @staticmethod
    def _repair_pool() -> None:
        # File slots and list heads are single-word stores made after the structure they point
        # to is complete; refcounts may be one off for the dead process, which is harmless.
        return None

    # -- configuration

    def header(self, field: str) -> int:
        """A field of the pool header."""
        return int(self.w0[self.p + getattr(POOL_HEADER.word, field)])

    # -- hashing

    def locate(self, fidx: int, pgno: int) -> tuple[Cache, int]:
        """The cache and bucket of page ``pgno`` of file slot ``fidx``."""
        h = (pgno * 0x9E3779B1 + fidx * 509) & 0xFFFFFFFFFFFF
        cache = self.caches[h % self.ncache] if self.ncache > 1 else self.caches[0]
        return cache, (h // self.ncache) % cache.nbuckets

    # -- region-0 allocation (metadata)

    def meta_alloc(self, nbytes: int) -> int:
        c0 = self.caches[0]
        with c0.alloc_mutex:
            return c0.allocator.alloc(nbytes)

    def meta_free(self, off: int) -> None:
        c0 = self.caches[0]
        with c0.alloc_mutex:
            c0.allocator.free(off)

    def meta_bytes(self, off: int, length: int) -> bytes:
        return bytes(self.r0.buf[off : off + length])

    def meta_store(self, data: bytes) -> int:
        if not data:
            return 0
        off = self.meta_alloc(len(data))
        self.r0.buf[off : off + len(data)] = data
        return off

    # -- handle statistics

    def attach_handle(self) -> int:
        """Allocate and link this handle's statistics block; returns its word index."""
        off = self.meta_alloc(HANDLE_STATS.size)
        w = self.w0
        w[(off >> 3) + HANDLE_STATS.word.pid] = self.pid
        with self.mutex:
            w[(off >> 3) + HANDLE_STATS.word.next] = w[self.p + POOL_HEADER.word.handles_head]
            w[self.p + POOL_HEADER.word.handles_head] = off
        return off >> 3

    def detach_handle(self, hs: int) -> None:
        """Fold this handle's counters into the retired block, unlink and free it."""
        w = self.w0
        off = hs << 3
        retired = self.meta_check(w[self.p + POOL_HEADER.word.retired], HANDLE_STATS.size)
        with self.mutex:
            for f in GSTAT_FIELDS:
                if f == "hash_longest":
                    w[retired + getattr(HANDLE_STATS.word, f)] = max(
                        w[retired + getattr(HANDLE_STATS.word, f)],
                        w[hs + getattr(HANDLE_STATS.word, f)],
                    )
                else:
                    w[retired + getattr(HANDLE_STATS.word, f)] += w[
                        hs + getattr(HANDLE_STATS.word, f)
                    ]
            chain = self._meta_chain(
                w[self.p + POOL_HEADER.word.handles_head], HANDLE_STATS.word.next, HANDLE_STATS.size
            )
            cur = off if off in chain else 0
            prev = chain[chain.index(off) - 1] if cur and chain.index(off) else 0
            if cur:
                nxt = w[hs + HANDLE_STATS.word.next]
                if prev:
                    w[(prev >> 3) + HANDLE_STATS.word.next] = nxt
                else:
                    w[self.p + POOL_HEADER.word.handles_head] = nxt
        self.meta_free(off)

    @property
    def retired_file_counts(self) -> dict[str, int]:
        """Per-file counters of files whose entries were freed, summed."""
        w = self.w0
        retired = self.p + POOL_HEADER.word.retired_files
        return {f: int(w[retired + getattr(FILE_STATS.word, f)]) for f in FSTAT_FIELDS}

    def global_stats(self) -> dict[str, int]:
        """Per-handle counters summed over every live, dead and retired handle."""
        w = self.w0
        out = {f: 0 for f in GSTAT_FIELDS}
        blocks = [w[self.p + POOL_HEADER.word.retired]]
        blocks += self._meta_chain(
            w[self.p + POOL_HEADER.word.handles_head], HANDLE_STATS.word.next, HANDLE_STATS.size
        )
        for off in blocks:
            b = off >> 3
            for f in GSTAT_FIELDS:
                v = w[b + getattr(HANDLE_STATS.word, f)]
                out[f] = max(out[f], v) if f == "hash_longest" else out[f] + v
        return out

    # -- files

    def entry(self, fidx: int) -> int:
        """Word index of file slot ``fidx``'s entry (0 if the slot is free)."""
        if not 0 <= fidx < MAX_FILES:
            self.caches[0].corrupt(f"file slot {fidx}")
        off = int(self.w0[self.p + POOL_HEADER.word.files + fidx])
        return self.meta_check(off, FILE_ENTRY.size) if off else 0

    def file_field(self, fidx: int, field: str) -> int:
        return int(self.w0[self.entry(fidx) + getattr(FILE_ENTRY.word, field)])

    def set_file_field(self, fidx: int, field: str, value: int) -> None:
        self.w0[self.entry(fidx) + getattr(FILE_ENTRY.word, field)] = value

    def file_mutex(self, fidx: int) -> SharedMutex | NullMutex:
        """The mutex of file slot ``fidx`` (it guards the page count)."""
        if not self.shared:
            return NullMutex("file")
        # The page count is one word, stored once: a dead holder cannot leave it torn.
        return SharedMutex(
            self.r0.base,
            self.w0,
            (self.entry(fidx) << 3) + FILE_ENTRY.offset("mutex"),
            f"file {fidx}",
            repair=lambda: None,
            panic=self._panic,
        )

    def fileid(self, fidx: int) -> bytes:
        e = self.entry(fidx)
        return b"".join(
            int(self.w0[e + FILE_ENTRY.word.fileid + i]).to_bytes(8, "little") for i in range(3)
        )[:20]

    def file_name(self, fidx: int) -> str | None:
        off, n = self.file_field(fidx, "name_off"), self.file_field(fidx, "name_len")
        if not off:
            return None
        self.meta_check(off, n)
        name = self.meta_bytes(off, n)
        if not name or b"\0" in name:
            self.caches[0].corrupt(f"file slot {fidx} has a name with a NUL byte, or none")
        return name.decode("utf-8", "surrogateescape")

    def file_cookie(self, fidx: int) -> bytes:
        off, n = self.file_field(fidx, "cookie_off"), self.file_field(fidx, "cookie_len")
        if off:
            self.meta_check(off, n)
        return self.meta_bytes(off, n) if off else b""

    def file_slots(self) -> list[int]:
        """Slots holding a file entry."""
        w = self.w0
        base = self.p + POOL_HEADER.word.files
        return [i for i in range(MAX_FILES) if w[base + i]]

    def open_entry(
        self,
        fileid: bytes,
        *,
        page_size: int,
        lsn_offset: int,
        clear_len: int,
        ftype: int,
        flags: int,
        pages: int,
        max_pages: int,
        writable: bool,
        name: str | None,
        cookie: bytes,
    ) -> tuple[int, bool]:
        """Find the entry of ``fileid`` (or make one) and count one more open handle.

        Returns ``(slot, created)``. Raises :class:`InvalidArgument` if the file is already in
        the pool with another page size or LSN offset, :class:`CacheFull` if the table is full.
        """
        w = self.w0
        base = self.p + POOL_HEADER.word.files
        key = fileid.ljust(24, b"\0")
        ids = [int.from_bytes(key[i * 8 : (i + 1) * 8], "little") for i in range(3)]
        with self.mutex:
            free = -1
            for i in range(MAX_FILES):
                off = w[base + i]
                if not off:
                    if free < 0:
                        free = i
                    continue
                e = self.meta_check(off, FILE_ENTRY.size)
                if w[e + FILE_ENTRY.word.flags] & (FF_DEAD | FF_TEMP):
                    continue
                if [w[e + FILE_ENTRY.word.fileid + k] for k in range(3)] != ids:
                    continue
                what = "file" if name is None else repr(name)
                if w[e + FILE_ENTRY.word.page_size] != page_size:
                    raise InvalidArgument(
                        f"{what} is already in the pool with page size "
                        f"{w[e + FILE_ENTRY.word.page_size]}, not {page_size}; open it with "
                        f"page_size={w[e + FILE_ENTRY.word.page_size]}"
                    )
                if w[e + FILE_ENTRY.word.lsn_offset] != lsn_offset + 1:
                    raise InvalidArgument(
                        f"{what} is already in the pool with another lsn_offset "
                        f"({int(w[e + FILE_ENTRY.word.lsn_offset]) - 1}, not {lsn_offset})"
                    )
                if (w[e + FILE_ENTRY.word.flags] & FF_NOFILE) != (flags & FF_NOFILE):
                    raise InvalidArgument(
                        f"{what} is already in the pool with another nofile setting"
                    )
                if (w[e + FILE_ENTRY.word.flags] & FF_CHECKSUM) != (flags & FF_CHECKSUM):
                    on = "on" if w[e + FILE_ENTRY.word.flags] & FF_CHECKSUM else "off"
                    raise InvalidArgument(
                        f"{what} is already in the pool with checksums {on}; every open "
                        "must use the same checksum setting"
                    )
                w[e + FILE_ENTRY.word.refcnt] += 1
                if writable:
                    w[e + FILE_ENTRY.word.rw_opens] += 1
                if not w[e + FILE_ENTRY.word.max_pages] and max_pages:
                    w[e + FILE_ENTRY.word.max_pages] = max_pages
                return i, False
            if free < 0:
                free = self._reclaim_slot()
            if free < 0:
                raise CacheFull(f"the pool's file table is full ({MAX_FILES} files)")
            name_b = name.encode("utf-8", "surrogateescape") if name is not None else b""
            off = self.meta_alloc(FILE_ENTRY.size)
            e = off >> 3
            for k in range(3):
                w[e + FILE_ENTRY.word.fileid + k] = ids[k]
            w[e + FILE_ENTRY.word.refcnt] = 1
            w[e + FILE_ENTRY.word.page_size] = page_size
            w[e + FILE_ENTRY.word.lsn_offset] = lsn_offset + 1
            w[e + FILE_ENTRY.word.clear_len] = clear_len
            w[e + FILE_ENTRY.word.ftype] = ftype
            w[e + FILE_ENTRY.word.flags] = flags
            w[e + FILE_ENTRY.word.pages] = pages
            w[e + FILE_ENTRY.word.orig_pages] = pages
            w[e + FILE_ENTRY.word.max_pages] = max_pages
            w[e + FILE_ENTRY.word.rw_opens] = 1 if writable else 0
            w[e + FILE_ENTRY.word.owner_pid] = self.pid if flags & FF_TEMP else 0
            w[e + FILE_ENTRY.word.name_off] = self.meta_store(name_b)
            w[e + FILE_ENTRY.word.name_len] = len(name_b)
            w[e + FILE_ENTRY.word.cookie_off] = self.meta_store(cookie)
            w[e + FILE_ENTRY.word.cookie_len] = len(cookie)
            w[e + FILE_ENTRY.word.written_gen] = 0
            w[e + FILE_ENTRY.word.synced_gen] = 0
            if self.shared:
                SharedMutex(self.r0.base, w, off + FILE_ENTRY.offset("mutex"), "file").initialize()
            w[base + free] = off  # published last: the entry is complete
            return free, True

    def _reclaim_slot(self) -> int:
        """Free the entries of closed files that no longer have cached pages; first free slot."""
        w = self.w0
        base = self.p + POOL_HEADER.word.files
        cached = self._files_with_buffers()
        first = -1
        for i in range(MAX_FILES):
            off = w[base + i]
            e = self.meta_check(off, FILE_ENTRY.size) if off else 0
            if (
                off
                and w[e + FILE_ENTRY.word.refcnt] == 0
                and (i + 1) not in cached
                # pages written but not yet fsynced: the next sync must still find the file
                and w[e + FILE_ENTRY.word.written_gen] <= w[e + FILE_ENTRY.word.synced_gen]
            ):
                self._free_entry(i)
            if not w[base + i] and first < 0:
                first = i
        return first

    def any_buffers(self, fidx: int) -> bool:
        """True if some buffer of file slot ``fidx`` is still cached."""
        return (fidx + 1) in self._files_with_buffers()

    def _files_with_buffers(self) -> set[int]:
        files = set()
        for cache in self.caches:
            w = cache.words
            for b, bw in enumerate(cache.bucket_words):
                if w[bw + BUCKET.word.count]:
                    with cache.mutexes[b]:
                        for off in cache.chain(b):
                            files.add(int(w[(off >> 3) + BH.word.file]))
        return files

    def pins(self) -> list[tuple[int, int, int, int]]:
        """Every pinned buffer now, in every process: (file slot, pgno, pins, when the first
        of them was taken, in CLOCK_MONOTONIC_COARSE ns). Each bucket is read under its
        mutex, so a chain is walked only while it cannot change."""
        out: list[tuple[int, int, int, int]] = []
        for cache in self.caches:
            w = cache.words
            for b, bw in enumerate(cache.bucket_words):
                if not w[bw + BUCKET.word.count]:
                    continue
                with cache.mutexes[b]:
                    off = w[bw + BUCKET.word.head]
                    left = int(
                        w[bw + BUCKET.word.count]
                    )  # bounds the walk should a chain be corrupt
                    while off and left > 0:
                        h = off >> 3
                        ref = int(w[h + BH.word.ref])
                        if ref and w[h + BH.word.file]:
                            out.append(
                                (
                                    int(w[h + BH.word.file]) - 1,
                                    int(w[h + BH.word.pgno]),
                                    ref,
                                    int(w[h + BH.word.pinned_at]),
                                )
                            )
                        off = w[h + BH.word.next]
                        left -= 1
        return out

    def _free_entry(self, fidx: int) -> None:
        """Free a closed file's entry (caller holds the pool mutex); its counters are kept."""
        w = self.w0
        base = self.p + POOL_HEADER.word.files
        off = w[base + fidx]
        e = self.meta_check(off, FILE_ENTRY.size)
        retired = self.p + POOL_HEADER.word.retired_files
        for f, v in self.file_stats(fidx).items():
            w[retired + getattr(FILE_STATS.word, f)] += v
        w[base + fidx] = 0
        for f in ("name_off", "cookie_off"):
            if w[e + getattr(FILE_ENTRY.word, f)]:
                self.meta_free(w[e + getattr(FILE_ENTRY.word, f)])
        self.meta_free(off)

    def close_entry(self, fidx: int, writable: bool, discard: bool) -> int:
        """Count one handle fewer; returns the handles left. ``discard`` marks the file dead
        (its buffers are dropped, not written) when the last handle goes."""
        w = self.w0
        e = self.entry(fidx)
        with self.mutex:
            if not w[e + FILE_ENTRY.word.refcnt]:
                self.caches[0].corrupt(f"file slot {fidx}'s handle count would go below zero")
            w[e + FILE_ENTRY.word.refcnt] -= 1
            if writable and w[e + FILE_ENTRY.word.rw_opens]:
                w[e + FILE_ENTRY.word.rw_opens] -= 1
            left = int(w[e + FILE_ENTRY.word.refcnt])
            if left == 0 and discard:
                w[e + FILE_ENTRY.word.flags] |= FF_DEAD
        return left

    def drop_file_buffers(self, fidx: int) -> None:
        """Remove every unpinned buffer of a dead file (dirty ones too: they are not wanted)."""
        file_tag = fidx + 1
        for cache in self.caches:
            w = cache.words
            for b, bw in enumerate(cache.bucket_words):
                if not w[bw + BUCKET.word.count]:
                    continue
                freed = []
                with cache.mutexes[b]:
                    prev = 0
                    for off in cache.chain(b):
                        h = off >> 3
                        nxt = w[h + BH.word.next]
                        if (
                            w[h + BH.word.file] == file_tag
                            and w[h + BH.word.ref] == 0
                            and not w[h + BH.word.flags] & (BH_READING | BH_WRITING)
                        ):
                            if prev:
                                w[(prev >> 3) + BH.word.next] = nxt
                            else:
                                w[bw + BUCKET.word.head] = nxt
                            cache.decrement(bw + BUCKET.word.count, f"bucket {b}'s count")
                            if w[h + BH.word.flags] & BH_DIRTY:
                                cache.decrement(bw + BUCKET.word.dirty, f"bucket {b}'s dirty count")
                            freed.append(off)
                        else:
                            prev = off
                for off in freed:
                    self.free_buffer(cache, off)

    def file_stats_block(self, fidx: int) -> int:
        """Allocate this handle's counters for file ``fidx`` and link them; word index."""
        off = self.meta_alloc(FILE_STATS.size)
        w = self.w0
        e = self.entry(fidx)
        with self.mutex:
            w[(off >> 3) + FILE_STATS.word.next] = w[e + FILE_ENTRY.word.stats_head]
            w[e + FILE_ENTRY.word.stats_head] = off
        return off >> 3

    def release_file_stats_block(self, fidx: int, fs: int) -> None:
        """Fold a handle's file counters into the entry's retired counters and free them."""
        w = self.w0
        e = self.entry(fidx)
        off = fs << 3
        retired = e + FILE_ENTRY.word.retired
        with self.mutex:
            for f in FSTAT_FIELDS:
                w[retired + getattr(FILE_STATS.word, f)] += w[fs + getattr(FILE_STATS.word, f)]
            chain = self._meta_chain(
                w[e + FILE_ENTRY.word.stats_head], FILE_STATS.word.next, FILE_STATS.size
            )
            cur = off if off in chain else 0
            prev = chain[chain.index(off) - 1] if cur and chain.index(off) else 0
            if cur:
                nxt = w[fs + FILE_STATS.word.next]
                if prev:
                    w[(prev >> 3) + FILE_STATS.word.next] = nxt
                else:
                    w[e + FILE_ENTRY.word.stats_head] = nxt
        self.meta_free(off)

    def file_stats(self, fidx: int) -> dict[str, int]:
        """A file's counters summed over every handle that has or had it open."""
        w = self.w0
        e = self.entry(fidx)
        out = {
            f: int(w[e + FILE_ENTRY.word.retired + getattr(FILE_STATS.word, f)])
            for f in FSTAT_FIELDS
        }
        for cur in self._meta_chain(
            w[e + FILE_ENTRY.word.stats_head], FILE_STATS.word.next, FILE_STATS.size
        ):
            b = cur >> 3
            for f in FSTAT_FIELDS:
                out[f] += w[b + getattr(FILE_STATS.word, f)]
        return out

    # -- buffers

    def alloc_buffer(self, cache: Cache, page_size: int) -> int:
        """A fresh buffer from the cache's free space, or 0 if its share of the cache is used.

        The share (``cache_size / ncache`` bytes of pages) is enforced exactly, whatever room
        the region's arena has left, so the cache holds what ``cache_size`` says. The header
        records ``page_size`` at once, so that whichever path frees the buffer gives back
        exactly what was taken; the chunk is tagged with this process's pid until the buffer
        is linked into a bucket (:meth:`settle_buffer`), so that a process killed in between
        leaves a frame :meth:`reclaim_lost_buffers` can find.
        """
        w = cache.words
        used_w = cache.hdr + CACHE_HEADER.word.page_bytes_used
        with cache.alloc_mutex:
            if w[used_w] + page_size > w[cache.hdr + CACHE_HEADER.word.page_bytes]:
                return 0
            try:
                off = cache.allocator.alloc(BH.size + page_size, tag=self.pid)
            except CacheFull:
                return 0
            w[(off >> 3) + BH.word.page_size] = page_size
            w[used_w] += page_size
            w[cache.hdr + CACHE_HEADER.word.buffers] += 1
        return off

    def free_buffer(self, cache: Cache, bh: int) -> None:
        """Return an unlinked buffer's memory to the cache (the page bytes its header says
        it took: :meth:`alloc_buffer` records them before anything else can see it)."""
        w = cache.words
        with cache.alloc_mutex:
            if (
                w[(bh >> 3) + BH.word.page_size] > w[cache.hdr + CACHE_HEADER.word.page_bytes_used]
                or not w[cache.hdr + CACHE_HEADER.word.buffers]
            ):
                cache.corrupt(f"buffer {bh} is larger than the cache's pages in use")
            w[cache.hdr + CACHE_HEADER.word.page_bytes_used] -= w[(bh >> 3) + BH.word.page_size]
            w[cache.hdr + CACHE_HEADER.word.buffers] -= 1
            cache.allocator.free(bh)

    @staticmethod
    def settle_buffer(cache: Cache, bh: int) -> None:
        """Clear the limbo tag of a buffer just linked into its bucket (caller holds the
        bucket mutex): from here on the chain owns it."""
        cache.words[(bh >> 3) - _TAG_FROM_BH] = 0

    def reclaim_lost_buffers(self, cache: Cache, dead_pids: frozenset[int] = frozenset()) -> int:
        """Free the buffers that a dead process took (allocated, or unlinked as a victim) but
        never linked into a bucket; returns how many.

        Such a buffer's chunk is tagged with the taker's pid (see :meth:`alloc_buffer`). Only
        tags of dead processes are looked at; a buffer found linked after all (its taker died
        between linking it and clearing the tag) just has its tag cleared. The bucket mutex
        decides, since linking happens under it. ``dead_pids`` are pids the registry of live
        processes found dead even though a process with that pid runs now (a recycled pid,
        which :func:`~aiodbenv._process.is_alive` cannot tell from the taker).
        """
        from .._process import is_alive

        with cache.alloc_mutex:
            tagged = cache.allocator.tagged()
        if not tagged:
            return 0
        w = cache.words
        dead: dict[int, bool] = {}
        freed = 0
        for bh, pid in tagged:
            if pid == self.pid:
                continue  # ours, in flight in this process
            if pid not in dead:
                dead[pid] = pid in dead_pids or not is_alive(pid)
            if not dead[pid]:
                continue
            x = bh >> 3
            tag, pgno = int(w[x + BH.word.file]), int(w[x + BH.word.pgno])
            if tag:
                c, b = self.locate(tag - 1, pgno)
                if c is not cache:
                    b = -1
            else:
                b = -1
            linked = False
            if b >= 0:
                with cache.mutexes[b]:
                    if w[(bh >> 3) - _TAG_FROM_BH] != pid:
                        continue  # changed meanwhile
                    off = w[cache.bucket_words[b] + BUCKET.word.head]
                    n = 0
                    limit = self.r0.size  # a bound on any chain walk
                    while off and off != bh and n < limit:
                        off = w[(off >> 3) + BH.word.next]
                        n += 1
                    linked = off == bh
                    if linked:
                        w[(bh >> 3) - _TAG_FROM_BH] = 0
            if not linked:
                with cache.alloc_mutex:
                    # Re-check under the allocator mutex: nobody else may free it twice.
                    if w[(bh >> 3) - _TAG_FROM_BH] != pid:
                        continue
                    w[(bh >> 3) - _TAG_FROM_BH] = 0
                    w[cache.hdr + CACHE_HEADER.word.page_bytes_used] -= w[x + BH.word.page_size]
                    w[cache.hdr + CACHE_HEADER.word.buffers] -= 1
                    cache.allocator.free(bh)
                freed += 1
        return freed

    def find_victim(
        self, cache: Cache, can_write: Callable[[int], bool], aggressive: bool
    ) -> Victim | None:
        """The best buffer to evict among a few buckets from the cache's hand.

        Skips pinned buffers, buffers under I/O, and dirty buffers this process cannot write.
        Unless ``aggressive``, also skips the most recently used tenth, and looks at
        ``SEARCH_BUCKETS`` non-empty buckets; aggressive looks at every bucket.
        """
        w = cache.words
        nb = cache.nbuckets
        hand_w = cache.hdr + CACHE_HEADER.word.hand
        start = int(w[hand_w]) % nb
        counter = w[cache.hdr + CACHE_HEADER.word.lru_counter]
        recent = (
            0 if aggressive else counter - max(1, w[cache.hdr + CACHE_HEADER.word.buffers] // 10)
        )
        limit = nb if aggressive else SEARCH_BUCKETS
        best: Victim | None = None
        best_prio = 0
        seen = 0
        for i in range(nb):
            b = (start + i) % nb
            bw = cache.bucket_words[b]
            if not w[bw + BUCKET.word.count]:
                continue
            seen += 1
            with cache.mutexes[b]:
                for off in cache.chain(b):
                    h = off >> 3
                    if w[h + BH.word.ref] == 0 and not w[h + BH.word.flags] & (
                        BH_READING | BH_WRITING
                    ):
                        prio = w[h + BH.word.priority]
                        if (aggressive or prio < recent) and (best is None or prio < best_prio):
                            dirty = bool(w[h + BH.word.flags] & BH_DIRTY)
                            if not dirty or can_write(int(w[h + BH.word.file])):
                                best = Victim(
                                    cache,
                                    b,
                                    off,
                                    int(w[h + BH.word.file]),
                                    int(w[h + BH.word.pgno]),
                                    int(w[h + BH.word.page_size]),
                                    dirty,
                                )
                                best_prio = prio
            if seen >= limit and best is not None:
                w[hand_w] = (b + 1) % nb
                return best
        w[hand_w] = (start + 1) % nb
        return best

    def unlink_victim(self, v: Victim) -> bool:
        """Take a clean, unpinned victim out of its bucket; False if it changed meanwhile."""
        cache = v.cache
        w = cache.words
        with cache.mutexes[v.bucket]:
            h = v.bh >> 3
            if (
                w[h + BH.word.ref]
                or w[h + BH.word.flags] & (BH_READING | BH_WRITING | BH_DIRTY)
                or w[h + BH.word.file] != v.file
                or w[h + BH.word.pgno] != v.pgno
            ):
                return False
            # Tagged before it leaves the chain: killed from here until it is linked again,
            # the buffer is found by reclaim_lost_buffers instead of being lost.
            w[h - _TAG_FROM_BH] = self.pid
            if not cache.unlink(v.bucket, v.bh):
                w[h - _TAG_FROM_BH] = 0
                return False
            w[h + BH.word.file] = 0
        return True


def dirty_pages(regions: Sequence[Region]) -> int:
    """Dirty pages in the caches ``regions`` (the pool's regions of an environment nobody has
    open: read without locks, from the buckets' dirty counts). Offsets and counts read from
    the regions are checked against their sizes; a bucket array that does not fit counts 0."""
    total = 0
    for region in regions:
        w = region.words
        hdr = CACHE_HEADER_AT // WORD
        nb = int(w[hdr + CACHE_HEADER.word.nbuckets])
        start = int(w[hdr + CACHE_HEADER.word.buckets_off])
        if start <= 0 or start % WORD or start + nb * BUCKET.size > len(w) * WORD:
            continue
        for b in range(nb):
            total += min(int(w[(start + b * BUCKET.size) // WORD + BUCKET.word.dirty]), 1 << 32)
    return total


def new_fileid() -> bytes:
    """A fresh 20-byte id for a file with no device/inode (temporary or nofile)."""
    return b"\xff" + secrets.token_bytes(19)
