"""The pool's synchronous core: the pool header, region-0 metadata, handles, the file index.

Everything in the core (this module, :mod:`~aiodbenv.mpool.ftable` and
:mod:`~aiodbenv.mpool.alloc`, each a layer of :class:`~aiodbenv.mpool.alloc.PoolCore`) runs on
the event-loop thread in short critical sections and never awaits; the async modules wrap it
with the I/O. All state is in the mpool regions, so every process sees the same buffers, pins
and files.

Lock order: the pool mutex (file index, handle list), then a file's mutex, then one bucket
mutex, then a region's allocator mutex. Never two bucket mutexes at once; never one across an
``await``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Collection, Sequence

from .._config import (
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
)
from ..errors import CorruptRegion
from ..region.backing import Region
from ..region.layout import WORD
from ..region.mutex import Mutex, NullMutex, SharedMutex, sync_waits
from .cache import Cache, bucket_hash
from .layout import (
    CACHE_HEADER,
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
    POOL_HEADER,
    POOL_HEADER_AT,
)
from .region import COUNTER_LIMIT, MUTEX_COUNTERS, check_counters

__all__ = ["CoreBase", "new_fileid"]


class CoreBase:
    """The bottom layer of the pool core: the caches, region 0's pool header and metadata
    allocator, the handle statistics and read access to the file index."""

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
        self.meta_region = r0
        self.meta_words = r0.words
        self.pool_hdr = POOL_HEADER_AT // WORD
        self.shared = shared
        self.pid = os.getpid()
        if shared:
            self.mutex: Mutex = SharedMutex(
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
        w, p = self.meta_words, self.pool_hdr
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
        counters = [mutex + i for i in MUTEX_COUNTERS]
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
            counters += [mutex + k for k in MUTEX_COUNTERS]
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
        if off & 7 or off < POOL_HEADER_AT + POOL_HEADER.size or off + size > self.meta_region.size:
            self.caches[0].corrupt(f"structure offset {off}")
        return off >> 3

    def _meta_chain(self, head: int, next_field: int, size: int) -> list[int]:
        """The offsets of a list in region 0 (statistics blocks), checked and bounded."""
        w = self.meta_words
        out: list[int] = []
        limit = self.meta_region.size // size + 1
        cur = int(head)
        while cur:
            if len(out) >= limit:
                self.caches[0].corrupt("a statistics list loops")
            out.append(cur)
            cur = int(w[self.meta_check(cur, size) + next_field])
        return out

    @staticmethod
    def _repair_pool() -> None:
        # File slots and list heads are single-word stores made after the structure they point
        # to is complete; refcounts may be one off for the dead process, which is harmless.
        return None

    def header(self, field: str) -> int:
        """A field of the pool header."""
        return int(self.meta_words[self.pool_hdr + getattr(POOL_HEADER.word, field)])

    def locate(self, fidx: int, pgno: int) -> tuple[Cache, int]:
        """The cache and bucket of page ``pgno`` of file slot ``fidx``."""
        h = bucket_hash(fidx, pgno)
        cache = self.caches[h % self.ncache] if self.ncache > 1 else self.caches[0]
        return cache, (h // self.ncache) % cache.nbuckets

    def meta_alloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` of region-0 metadata (file entries, names, statistics)."""
        c0 = self.caches[0]
        with c0.alloc_mutex:
            return c0.allocator.alloc(nbytes)

    def meta_free(self, off: int) -> None:
        """Free region-0 metadata at byte offset ``off``."""
        c0 = self.caches[0]
        with c0.alloc_mutex:
            c0.allocator.free(off)

    def meta_bytes(self, off: int, length: int) -> bytes:
        """``length`` bytes of region 0 at ``off`` (a stored name or cookie)."""
        return bytes(self.meta_region.buf[off : off + length])

    def meta_store(self, data: bytes) -> int:
        """Store ``data`` in region-0 metadata; its offset (0 for no data)."""
        if not data:
            return 0
        off = self.meta_alloc(len(data))
        self.meta_region.buf[off : off + len(data)] = data
        return off

    def attach_handle(self) -> int:
        """Allocate and link this handle's statistics block; returns its word index."""
        off = self.meta_alloc(HANDLE_STATS.size)
        w = self.meta_words
        w[(off >> 3) + HANDLE_STATS.word.pid] = self.pid
        with self.mutex:
            w[(off >> 3) + HANDLE_STATS.word.next] = w[
                self.pool_hdr + POOL_HEADER.word.handles_head
            ]
            w[self.pool_hdr + POOL_HEADER.word.handles_head] = off
        return off >> 3

    def detach_handle(self, hs: int) -> None:
        """Fold this handle's counters into the retired block, unlink and free it."""
        w = self.meta_words
        off = hs << 3
        retired = self.meta_check(w[self.pool_hdr + POOL_HEADER.word.retired], HANDLE_STATS.size)
        # The pool mutex first (a LockTimeout changes nothing: the caller may retry); the free
        # nested in it waits SYNC_WAIT, so that a retry never folds the counters twice.
        with self.mutex, sync_waits():
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
                w[self.pool_hdr + POOL_HEADER.word.handles_head],
                HANDLE_STATS.word.next,
                HANDLE_STATS.size,
            )
            cur = off if off in chain else 0
            prev = chain[chain.index(off) - 1] if cur and chain.index(off) else 0
            if cur:
                nxt = w[hs + HANDLE_STATS.word.next]
                if prev:
                    w[(prev >> 3) + HANDLE_STATS.word.next] = nxt
                else:
                    w[self.pool_hdr + POOL_HEADER.word.handles_head] = nxt
            self.meta_free(off)

    @property
    def retired_file_counts(self) -> dict[str, int]:
        """Per-file counters of files whose entries were freed, summed."""
        w = self.meta_words
        retired = self.pool_hdr + POOL_HEADER.word.retired_files
        return {f: int(w[retired + getattr(FILE_STATS.word, f)]) for f in FSTAT_FIELDS}

    def global_stats(self) -> dict[str, int]:
        """Per-handle counters summed over every live, dead and retired handle."""
        w = self.meta_words
        out = {f: 0 for f in GSTAT_FIELDS}
        blocks = [w[self.pool_hdr + POOL_HEADER.word.retired]]
        blocks += self._meta_chain(
            w[self.pool_hdr + POOL_HEADER.word.handles_head],
            HANDLE_STATS.word.next,
            HANDLE_STATS.size,
        )
        for off in blocks:
            b = off >> 3
            for f in GSTAT_FIELDS:
                v = w[b + getattr(HANDLE_STATS.word, f)]
                out[f] = max(out[f], v) if f == "hash_longest" else out[f] + v
        return out

    def entry(self, fidx: int) -> int:
        """Word index of file slot ``fidx``'s entry (0 if the slot is free)."""
        if not 0 <= fidx < MAX_FILES:
            self.caches[0].corrupt(f"file slot {fidx}")
        off = int(self.meta_words[self.pool_hdr + POOL_HEADER.word.files + fidx])
        return self.meta_check(off, FILE_ENTRY.size) if off else 0

    def file_field(self, fidx: int, field: str) -> int:
        """Field ``field`` of file slot ``fidx``'s entry."""
        return int(self.meta_words[self.entry(fidx) + getattr(FILE_ENTRY.word, field)])

    def set_file_field(self, fidx: int, field: str, value: int) -> None:
        """Set field ``field`` of file slot ``fidx``'s entry."""
        self.meta_words[self.entry(fidx) + getattr(FILE_ENTRY.word, field)] = value

    def file_mutex(self, fidx: int) -> Mutex:
        """The mutex of file slot ``fidx`` (it guards the page count)."""
        if not self.shared:
            return NullMutex("file")
        # The page count is one word, stored once: a dead holder cannot leave it torn.
        return SharedMutex(
            self.meta_region.base,
            self.meta_words,
            (self.entry(fidx) << 3) + FILE_ENTRY.offset("mutex"),
            f"file {fidx}",
            repair=lambda: None,
            panic=self._panic,
        )

    def fileid(self, fidx: int) -> bytes:
        """The 20-byte id of file slot ``fidx``."""
        e = self.entry(fidx)
        return b"".join(
            int(self.meta_words[e + FILE_ENTRY.word.fileid + i]).to_bytes(8, "little")
            for i in range(3)
        )[:20]

    def file_name(self, fidx: int) -> str | None:
        """The path of file slot ``fidx`` (None for a temporary file)."""
        off, n = self.file_field(fidx, "name_off"), self.file_field(fidx, "name_len")
        if not off:
            return None
        self.meta_check(off, n)
        name = self.meta_bytes(off, n)
        if not name or b"\0" in name:
            self.caches[0].corrupt(f"file slot {fidx} has a name with a NUL byte, or none")
        return name.decode("utf-8", "surrogateescape")

    def file_cookie(self, fidx: int) -> bytes:
        """The pgcookie of file slot ``fidx``."""
        off, n = self.file_field(fidx, "cookie_off"), self.file_field(fidx, "cookie_len")
        if off:
            self.meta_check(off, n)
        return self.meta_bytes(off, n) if off else b""

    def can_write(self, tag: int, registered: Collection[int]) -> bool:
        """Whether this process may write (so evict) a dirty page of the file with tag
        ``tag`` (slot + 1), given the file types ``registered`` with page transforms here."""
        e = self.entry(tag - 1)
        if not e:
            return False
        w0 = self.meta_words
        flags = w0[e + FILE_ENTRY.word.flags]
        if flags & FF_DEAD:
            return True  # its pages are dropped, not written
        if flags & FF_NOFILE:
            return False
        if flags & FF_TEMP:
            return bool(w0[e + FILE_ENTRY.word.owner_pid] == self.pid)
        ftype = int(w0[e + FILE_ENTRY.word.ftype])
        return not ftype or ftype in registered

    def file_slots(self) -> list[int]:
        """Slots holding a file entry."""
        w = self.meta_words
        base = self.pool_hdr + POOL_HEADER.word.files
        return [i for i in range(MAX_FILES) if w[base + i]]

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


def new_fileid() -> bytes:
    """A fresh 20-byte id for a file with no device/inode (temporary or nofile)."""
    return b"\xff" + secrets.token_bytes(19)
