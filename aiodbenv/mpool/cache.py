"""One cache (mpool region): its hash buckets, their mutexes, its buffer headers.

:class:`Cache` checks every offset it follows (a corrupt one panics the environment), walks and
repairs bucket chains and locks buckets inline. :func:`bucket_hash` is the page hash (the
compiled accelerator's ``aiodb_pin_one_cache`` is its C twin), and :class:`BufRef` names one
buffer: a page of a file in a bucket of a cache.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import NamedTuple, NoReturn

from .._config import MAX_NCACHE
from ..errors import CorruptRegion
from ..region.alloc import Allocator
from ..region.backing import Region
from ..region.layout import MAX_PROCS, MUTEX_SLOT, REGION_HEADER, WORD
from ..region.mutex import Mutex, NullMutex, SharedMutex, ffi
from ..region.mutex import trylock as _trylock
from ..region.mutex import unlock as _unlock
from .layout import (
    BH,
    BH_DIRTY,
    BUCKET,
    CACHE_HEADER,
    CACHE_HEADER_AT,
    PINS_HALF,
)
from .region import COUNTER_LIMIT, MUTEX_COUNTERS, REGION_COUNTERS, check_counters, dirty_in

__all__ = ["BufRef", "Cache", "bucket_hash"]

#: The page hash: ``(pgno * HASH_PGNO + fidx * HASH_FILE) & HASH_MASK`` picks the cache
#: (``h % ncache``) and the bucket (``h // ncache % nbuckets``). The C twin is in
#: aiodbenv/_speedups_build.py (``aiodb_pin_one_cache``).
HASH_PGNO = 0x9E3779B1
HASH_FILE = 509
HASH_MASK = 0xFFFFFFFFFFFF


def bucket_hash(fidx: int, pgno: int) -> int:
    """The hash of page ``pgno`` of file slot ``fidx`` (see :data:`HASH_PGNO`)."""
    return (pgno * HASH_PGNO + fidx * HASH_FILE) & HASH_MASK


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
        check_counters(w, REGION_COUNTERS, COUNTER_LIMIT, what)
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
            [first + b * step + mutex_w + i for b in range(nb) for i in MUTEX_COUNTERS],
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
            self.alloc_mutex: Mutex = SharedMutex(
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

    def release_dead_holder(self, b: int) -> None:
        """The compiled trylock of bucket ``b`` found its holder dead and left the mutex held:
        repair (or panic, which raises) the Python way, then let go so the caller can lock it
        again its usual way."""
        mx = self.mutexes[b]
        mx.acquire_contended(errno.EOWNERDEAD)
        if mx.ptr is not None:
            _unlock(mx.ptr)

    def dirty(self) -> int:
        """Buffers flagged dirty in this cache, from its buckets' dirty counts."""
        return dirty_in(self.words, self.bucket_words[0], self.nbuckets) if self.nbuckets else 0

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

    def __getitem__(self, b: int) -> Mutex:
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

    def __iter__(self) -> Iterator[Mutex]:
        return (self[b] for b in range(len(self)))


class BufRef(NamedTuple):
    """A buffer, as found by a walk of its bucket (and re-checked under the bucket mutex by
    whoever acts on it): page ``pgno`` of file slot ``fidx`` in buffer ``bh`` (a byte offset)
    of bucket ``bucket`` of ``cache``. A victim also says its page size and whether it was
    dirty when chosen."""

    fidx: int
    pgno: int
    cache: Cache
    bucket: int
    bh: int
    page_size: int = 0
    dirty: bool = False


_tuple_new = tuple.__new__


def found(fidx: int, pgno: int, cache: Cache, bucket: int, bh: int) -> BufRef:
    """A :class:`BufRef` for a buffer found by a walk (no page size, not a victim), built
    without the named tuple's argument handling: write-back makes one per dirty page."""
    return _tuple_new(BufRef, (fidx, pgno, cache, bucket, bh, 0, False))
