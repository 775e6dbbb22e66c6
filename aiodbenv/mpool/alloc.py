"""Frames: buffer allocation, victim choice and the frames dead processes lost (mp_alloc.c).

Replacement follows Berkeley DB's priority stamps: every unpin bumps the cache's counter and a
buffer whose last pin goes is stamped with it (a discarded buffer with 0, a dirty one a little
later so clean ones go first). A victim is the lowest stamp among the unpinned buffers of a few
buckets, skipping the most recently used tenth; looking at several buckets approximates LRU
closely without any shared list to lock on every unpin.
"""

from __future__ import annotations

from collections.abc import Collection

from .._process import is_alive
from ..errors import CacheFull
from ..region.mutex import sync_waits
from .cache import BufRef, Cache
from .ftable import FileTable
from .layout import (
    BH,
    BH_DIRTY,
    BH_READING,
    BH_WRITING,
    BUCKET,
    CACHE_HEADER,
    CHUNK_TAG_BEFORE_BH,
)

__all__ = ["SEARCH_BUCKETS", "PoolCore", "drop_dirty"]

#: Buckets the victim search compares before it settles for the best it has seen.
SEARCH_BUCKETS = 4


class PoolCore(FileTable):
    """The whole synchronous core of one handle's view of the pool: this layer adds frames
    (allocation, eviction, reclaiming lost ones) to the file table and the base."""

    #: Set by :meth:`find_victim` when it passed a dirty best over for a clean buffer: the
    #: caller clears it and starts a batch of dirty victims (:mod:`~aiodbenv.mpool.victims`).
    dirty_met = False
    #: Pass a dirty best over for a clean buffer (set by the pool handle: only when dirty
    #: victims are written in the background, see :mod:`~aiodbenv.mpool.victims`).
    clean_first = False
    #: The thread of the event loop the environment was opened on (set by Env.open): a
    #: private region's buffers have no mutexes, so only that thread may walk them.
    loop_thread: int | None = None

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
        cache.words[(bh >> 3) - CHUNK_TAG_BEFORE_BH] = 0

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
                    if w[(bh >> 3) - CHUNK_TAG_BEFORE_BH] != pid:
                        continue  # changed meanwhile
                    off = w[cache.bucket_words[b] + BUCKET.word.head]
                    n = 0
                    limit = self.meta_region.size  # a bound on any chain walk
                    while off and off != bh and n < limit:
                        off = w[(off >> 3) + BH.word.next]
                        n += 1
                    linked = off == bh
                    if linked:
                        w[(bh >> 3) - CHUNK_TAG_BEFORE_BH] = 0
            if not linked:
                with cache.alloc_mutex:
                    # Re-check under the allocator mutex: nobody else may free it twice.
                    if w[(bh >> 3) - CHUNK_TAG_BEFORE_BH] != pid:
                        continue
                    w[(bh >> 3) - CHUNK_TAG_BEFORE_BH] = 0
                    w[cache.hdr + CACHE_HEADER.word.page_bytes_used] -= w[x + BH.word.page_size]
                    w[cache.hdr + CACHE_HEADER.word.buffers] -= 1
                    cache.allocator.free(bh)
                freed += 1
        return freed

    def find_victim(
        self, cache: Cache, registered: Collection[int], aggressive: bool
    ) -> BufRef | None:
        """The best buffer to evict among a few buckets from the cache's hand.

        Skips pinned buffers, buffers under I/O, and dirty buffers this process cannot write
        (:meth:`can_write`, given the file types with page transforms ``registered`` here:
        everything it needs, so nothing above the core is called under a bucket mutex).
        Unless ``aggressive``, also skips the most recently used tenth, and looks at
        ``SEARCH_BUCKETS`` non-empty buckets; aggressive looks at every bucket.

        With :attr:`clean_first`, a dirty best is passed over for the best clean buffer of
        the buckets searched, if there is one (setting :attr:`dirty_met`, for the caller to
        start writing dirty victims in the background): a miss waits for a write only when no
        clean buffer is left where it looked. The compiled miss (aiodbenv/_csrc/40_miss.c)
        chooses the same.
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
        # The best so far, as read under its bucket mutex: (tag, pgno, bucket, bh, page size,
        # dirty). A plain tuple: the record is made once, for the one returned.
        best: tuple[int, int, int, int, int, bool] | None = None
        best_prio = 0
        clean: tuple[int, int, int, int, int, bool] | None = None
        clean_prio = 0
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
                            tag = int(w[h + BH.word.file])
                            if not dirty or self.can_write(tag, registered):
                                best = (
                                    tag,
                                    int(w[h + BH.word.pgno]),
                                    b,
                                    off,
                                    int(w[h + BH.word.page_size]),
                                    dirty,
                                )
                                best_prio = prio
                        if (
                            (aggressive or prio < recent)
                            and not w[h + BH.word.flags] & BH_DIRTY
                            and (clean is None or prio < clean_prio)
                        ):
                            clean = (
                                int(w[h + BH.word.file]),
                                int(w[h + BH.word.pgno]),
                                b,
                                off,
                                int(w[h + BH.word.page_size]),
                                False,
                            )
                            clean_prio = prio
            if seen >= limit and best is not None:
                w[hand_w] = (b + 1) % nb
                return self._choose(cache, best, clean)
        w[hand_w] = (start + 1) % nb
        return None if best is None else self._choose(cache, best, clean)

    def _choose(
        self,
        cache: Cache,
        best: tuple[int, int, int, int, int, bool],
        clean: tuple[int, int, int, int, int, bool] | None,
    ) -> BufRef:
        if best[5] and clean is not None and self.clean_first:
            self.dirty_met = True
            return _victim(cache, clean)
        return _victim(cache, best)

    def unlink_victim(self, v: BufRef) -> bool:
        """Take a clean, unpinned victim out of its bucket; False if it changed meanwhile."""
        cache = v.cache
        w = cache.words
        with cache.mutexes[v.bucket]:
            h = v.bh >> 3
            if (
                w[h + BH.word.ref]
                or w[h + BH.word.flags] & (BH_READING | BH_WRITING | BH_DIRTY)
                or w[h + BH.word.file] != v.fidx + 1
                or w[h + BH.word.pgno] != v.pgno
            ):
                return False
            # Tagged before it leaves the chain: killed from here until it is linked again,
            # the buffer is found by reclaim_lost_buffers instead of being lost.
            w[h - CHUNK_TAG_BEFORE_BH] = self.pid
            if not cache.unlink(v.bucket, v.bh):
                w[h - CHUNK_TAG_BEFORE_BH] = 0
                return False
            w[h + BH.word.file] = 0
        return True

    def drop_file_buffers(self, fidx: int) -> None:
        """Remove every unpinned buffer of a dead file (dirty ones too: they are not wanted)."""
        tag = fidx + 1
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
                            w[h + BH.word.file] == tag
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
                # Unlinked above: they must be freed now, whatever the caller's lock bound
                # (a LockTimeout here would lose them), so a whole retry stays harmless.
                with sync_waits():
                    for off in freed:
                        self.free_buffer(cache, off)


def _victim(cache: Cache, best: tuple[int, int, int, int, int, bool]) -> BufRef:
    tag, pgno, b, bh, page_size, dirty = best
    return BufRef(tag - 1, pgno, cache, b, bh, page_size, dirty)


def drop_dirty(item: BufRef) -> int:
    """Drop the dirty mark of a dead (closed for good) file's page if it is unpinned and not
    under I/O; 1 if dropped. Locks the bucket first: a LockTimeout changes nothing."""
    _fidx, pgno, cache, b, bh = item[:5]
    w = cache.words
    x = bh >> 3
    cache.lock(b)
    try:
        flags = w[x + BH.word.flags]
        if (
            w[x + BH.word.file] == item[0] + 1
            and w[x + BH.word.pgno] == pgno
            and flags & BH_DIRTY
            and not w[x + BH.word.ref]
            and not flags & (BH_READING | BH_WRITING)
        ):
            w[x + BH.word.flags] = flags & ~BH_DIRTY
            cache.decrement(cache.bucket_words[b] + BUCKET.word.dirty, f"bucket {b}'s dirty count")
            return 1
        return 0
    finally:
        cache.unlock(b)
