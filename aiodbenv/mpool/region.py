"""Sizing and formatting the pool's regions (Berkeley DB's mp_region.c).

The creator of an environment sizes the ``ncache`` mpool regions (:func:`pool_region_sizes`)
and lays out a new pool in them (:func:`format_pool`); :func:`check_counters` is the range
check every attach applies to the counts it will add to; :func:`dirty_pages` reads the dirty
counts of a pool nobody has open.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._config import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_MMAP_SIZE,
    DEFAULT_PAGE_SIZE,
    Settings,
)
from ..errors import CorruptRegion
from ..region.alloc import Allocator
from ..region.backing import Region
from ..region.layout import ALLOC_CHUNK, MUTEX_SLOT, REGION_HEADER, WORD
from ..region.mutex import SharedMutex
from .layout import (
    BH,
    BUCKET,
    CACHE_HEADER,
    CACHE_HEADER_AT,
    HANDLE_STATS,
    POOL_HEADER,
    POOL_HEADER_AT,
)

__all__ = [
    "COUNTER_LIMIT",
    "MUTEX_COUNTERS",
    "REGION_COUNTERS",
    "check_counters",
    "dirty_in",
    "dirty_pages",
    "format_pool",
    "nbuckets_for",
    "pool_region_sizes",
]

#: Metadata room reserved in cache 0 for file entries, names, cookies and statistics blocks.
_META_RESERVE = 48 * 1024
#: Allocator overhead per buffer: its chunk header, plus rounding.
_CHUNK_OVERHEAD = ALLOC_CHUNK.size + 16
#: No count or statistic in a region reaches this; one that does is corrupt (and adding one
#: to 2**64 - 1 would fail in Python, wrap in C).
COUNTER_LIMIT = 1 << 62
#: Word indexes, within a mutex slot, of its counters (checked when a region is attached).
MUTEX_COUNTERS = [getattr(MUTEX_SLOT.word, f) for f in ("waits", "nowaits", "owner_died")]
#: Word indexes, within a region header, of its allocator's counters.
REGION_COUNTERS = [
    getattr(REGION_HEADER.word, f) for f in ("bytes_used", "allocs", "frees", "failures")
] + [REGION_HEADER.word.alloc_mutex + i for i in MUTEX_COUNTERS]


def check_counters(words: memoryview, indexes: Sequence[int], limit: int, what: str) -> None:
    """Raise :class:`CorruptRegion` if a count at one of the word ``indexes`` reaches
    ``limit`` (checked when a region is attached)."""
    for i in indexes:
        if words[i] >= limit:
            raise CorruptRegion(f"{what}: count {int(words[i])} at word {i} is out of range")


def nbuckets_for(pages: int) -> int:
    """Hash buckets for a cache of ``pages`` pages (odd, at least 17)."""
    # Berkeley DB sizes the table for chains of about 2.5 pages; at least a handful of buckets.
    n = max(17, int(pages / 2.5))
    return n | 1


def pool_region_sizes(settings: Settings) -> list[int]:
    """Sizes of the ``ncache`` mpool regions for ``settings`` (before rounding)."""
    cache_size = settings.cache_size or DEFAULT_CACHE_SIZE
    ncache = settings.ncache
    page_size = settings.page_size or DEFAULT_PAGE_SIZE
    sizes = []
    for i in range(ncache):
        share = cache_size // ncache
        pages = max(1, share // page_size)
        size = (
            CACHE_HEADER.size
            + nbuckets_for(pages) * BUCKET.size
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
    cache_size = settings.cache_size or DEFAULT_CACHE_SIZE
    page_size = settings.page_size or DEFAULT_PAGE_SIZE
    for index, region in enumerate(regions):
        w = region.words
        c = CACHE_HEADER_AT // WORD
        share = cache_size // ncache
        nb = nbuckets_for(max(1, share // page_size))
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
        total += dirty_in(w, start // WORD, nb)
    return total


def dirty_in(words: memoryview, first: int, nbuckets: int) -> int:
    """Dirty buffers in the ``nbuckets`` consecutive buckets whose first starts at word
    ``first``, from their dirty counts: one strided slice summed in C (a trickle asks for this
    on every call). A corrupt count cannot make the result absurd: it is capped at 2**32 per
    bucket."""
    stride = BUCKET.size // WORD
    lo = first + BUCKET.word.dirty
    return min(sum(words[lo : lo + nbuckets * stride : stride]), nbuckets << 32)
