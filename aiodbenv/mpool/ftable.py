"""The shared file table: open and close entries, per-handle file statistics (mp_fopen.c's
shared half; the per-process half, descriptors and ``PoolFile``, is :mod:`~aiodbenv.mpool.fopen`).
"""

from __future__ import annotations

from ..errors import CacheFull, InvalidArgument, NoSpace
from ..region.mutex import SharedMutex, sync_waits
from .core import CoreBase
from .layout import (
    BH,
    BUCKET,
    FF_CHECKSUM,
    FF_DEAD,
    FF_NOFILE,
    FF_TEMP,
    FILE_ENTRY,
    FILE_STATS,
    FSTAT_FIELDS,
    MAX_FILES,
    POOL_HEADER,
)

__all__ = ["FileTable"]


class FileTable(CoreBase):
    """The pool core with the file table's life cycle: entries made, shared, freed."""

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
        w = self.meta_words
        base = self.pool_hdr + POOL_HEADER.word.files
        key = fileid.ljust(24, b"\0")
        ids = [int.from_bytes(key[i * 8 : (i + 1) * 8], "little") for i in range(3)]
        # The pool mutex first (a LockTimeout changes nothing: event-loop callers retry with
        # a back-off); the locks nested in it (buckets, the allocator) are held for a few
        # stores by anyone and must not time out half-way through: SYNC_WAIT for them.
        with self.mutex, sync_waits():
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
                SharedMutex(
                    self.meta_region.base, w, off + FILE_ENTRY.offset("mutex"), "file"
                ).initialize()
            w[base + free] = off  # published last: the entry is complete
            return free, True

    def _reclaim_slot(self) -> int:
        """Free the entries of closed files that no longer have cached pages; first free slot."""
        w = self.meta_words
        base = self.pool_hdr + POOL_HEADER.word.files
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

    def free_unused_entry(self, fidx: int) -> None:
        """Free the entry of dead file ``fidx`` if no buffer of it is left (pool mutex first,
        so a LockTimeout changes nothing; the bucket and allocator locks nested in it wait
        SYNC_WAIT)."""
        with self.mutex, sync_waits():
            if not self.any_buffers(fidx):
                self._free_entry(fidx)

    def _free_entry(self, fidx: int) -> None:
        """Free a closed file's entry (caller holds the pool mutex); its counters are kept."""
        w = self.meta_words
        base = self.pool_hdr + POOL_HEADER.word.files
        off = w[base + fidx]
        e = self.meta_check(off, FILE_ENTRY.size)
        retired = self.pool_hdr + POOL_HEADER.word.retired_files
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
        w = self.meta_words
        e = self.entry(fidx)
        with self.mutex:  # first: a LockTimeout changes nothing
            if not w[e + FILE_ENTRY.word.refcnt]:
                self.caches[0].corrupt(f"file slot {fidx}'s handle count would go below zero")
            w[e + FILE_ENTRY.word.refcnt] -= 1
            if writable and w[e + FILE_ENTRY.word.rw_opens]:
                w[e + FILE_ENTRY.word.rw_opens] -= 1
            left = int(w[e + FILE_ENTRY.word.refcnt])
            if left == 0 and discard:
                w[e + FILE_ENTRY.word.flags] |= FF_DEAD
        return left

    def file_stats_block(self, fidx: int) -> int:
        """Allocate this handle's counters for file ``fidx`` and link them; word index."""
        w = self.meta_words
        e = self.entry(fidx)
        # The pool mutex first, then the allocator (nested, SYNC_WAIT): a LockTimeout of the
        # pool mutex changes nothing, so event-loop callers can retry.
        with self.mutex, sync_waits():
            off = self.meta_alloc(FILE_STATS.size)
            w[(off >> 3) + FILE_STATS.word.next] = w[e + FILE_ENTRY.word.stats_head]
            w[e + FILE_ENTRY.word.stats_head] = off
        return off >> 3

    def release_file_stats_block(self, fidx: int, fs: int) -> None:
        """Fold a handle's file counters into the entry's retired counters and free them."""
        w = self.meta_words
        e = self.entry(fidx)
        off = fs << 3
        retired = e + FILE_ENTRY.word.retired
        # The pool mutex first; the free nested in it (SYNC_WAIT), so that a LockTimeout
        # changes nothing and a retry cannot fold or free the block twice.
        with self.mutex, sync_waits():
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
        w = self.meta_words
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

    def extend_file(self, fidx: int, pgno: int | None, path: str | None) -> int:
        """Grow the pool's idea of file slot ``fidx``: to ``pgno + 1`` pages, or by one page
        for a new page (``pgno`` None; returns the new page's number). Enforces ``max_pages``
        with NoSpace (``path`` names the file in the message)."""
        w0 = self.meta_words
        e = self.entry(fidx)
        with self.file_mutex(fidx):
            pages = int(w0[e + FILE_ENTRY.word.pages])
            target = pages if pgno is None else pgno
            limit = int(w0[e + FILE_ENTRY.word.max_pages])
            if limit and target >= limit:
                raise NoSpace(f"file {path!r} is limited to {limit} pages")
            if target >= pages:
                w0[e + FILE_ENTRY.word.pages] = target + 1
        return target
