"""Pool statistics: Berkeley DB's DB_MPOOL_STAT and DB_MPOOL_FSTAT, exact across processes.

Counters are kept in statistics blocks in the region, one per handle (and per handle and file),
each written only by its own process, so no increment is ever lost; a handle that closes folds
its counts into a retired block. Reading sums the blocks. Page counts (clean, dirty) are read
from the buckets, and the lock figures from the mutexes themselves.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..errors import InvalidArgument
from .alloc import PoolCore
from .layout import (
    FF_NOFILE,
    FF_TEMP,
    PIN_CLOCK,
)
from .statwalk import Pinned, walk

__all__ = ["FileStat", "PoolStat", "file_stat", "pool_stat"]


@dataclass(frozen=True)
class FileStat:
    """One file's statistics (DB_MPOOL_FSTAT, plus what write-back costs it).

    ``file_name`` is None for a temporary file. ``cache_hit``/``cache_miss``: pins found /
    not found in the cache; ``map``: pins served from a read-only memory map; ``page_create``,
    ``page_in``, ``page_out``: pages created, read and written; ``write_calls`` and
    ``bytes_out``: the pwritev calls and bytes that wrote them; ``pages``: the pages the pool
    knows of; ``open_handles``: handles that have it open in all processes; ``pinned``: its
    pages pinned now (by any process) and ``oldest_pin_age``: seconds since the longest-held
    of those pins began (None when none is pinned). A pin held for long keeps its page from
    being evicted or written.
    """

    file_name: str | None
    page_size: int
    cache_hit: int
    cache_miss: int
    map: int
    page_create: int
    page_in: int
    page_out: int
    write_calls: int
    bytes_out: int
    pages: int
    open_handles: int
    temp: bool
    nofile: bool
    pinned: int = 0
    oldest_pin_age: float | None = None


@dataclass(frozen=True)
class PoolStat:
    """The pool's statistics (DB_MPOOL_STAT), summed over every process.

    Fields keep Berkeley DB's names without ``st_``: ``cache_size``, ``ncache``,
    ``page_size`` (the default), ``mmap_size``; ``cache_hit``, ``cache_miss``, ``map``,
    ``page_create``, ``page_in``, ``page_out`` (all files); ``ro_evict``/``rw_evict`` (clean /
    dirty pages forced out); ``hash_buckets``, ``hash_searches``, ``hash_longest``,
    ``hash_examined``; ``pages``, ``page_clean``, ``page_dirty`` (buffers now); ``page_trickle``
    (written by trickle); ``region_wait``/``region_nowait`` (lock calls of the pool's mutexes
    that had to block / did not); plus ``alloc_waits`` (pins that waited for a frame),
    ``write_calls``, ``bytes_out``, ``write_failures``, ``sync_calls``, ``dirtied_bytes``
    (bytes of pages unpinned dirty), what the background workers wrote (``trickle_*`` and
    ``checkpoint_*``: runs, pages, write calls, bytes, failures: what each costs a flash
    device), ``page_pinned`` (buffers pinned now, by any process), ``oldest_pin_age``
    (seconds since the longest-held pin now began; None when nothing is pinned), what the
    reaper of dead processes did (``procs_reaped``: dead handles whose slots it freed;
    ``pins_reclaimed``: the pins they held, dropped; ``dirty_inherited``: pages they held
    pinned and dirty, kept dirty for the next sync), and ``files``.
    """

    cache_size: int
    ncache: int
    page_size: int
    mmap_size: int
    cache_hit: int
    cache_miss: int
    map: int
    page_create: int
    page_in: int
    page_out: int
    ro_evict: int
    rw_evict: int
    hash_buckets: int
    hash_searches: int
    hash_longest: int
    hash_examined: int
    pages: int
    page_clean: int
    page_dirty: int
    page_trickle: int
    region_wait: int
    region_nowait: int
    alloc_waits: int
    write_calls: int
    bytes_out: int
    write_failures: int
    sync_calls: int
    dirtied_bytes: int
    trickle_runs: int
    trickle_pages: int
    trickle_write_calls: int
    trickle_bytes: int
    trickle_failures: int
    checkpoint_runs: int
    checkpoint_pages: int
    checkpoint_write_calls: int
    checkpoint_bytes: int
    checkpoint_failures: int
    procs_reaped: int
    pins_reclaimed: int
    dirty_inherited: int
    files: tuple[FileStat, ...]
    page_pinned: int = 0
    oldest_pin_age: float | None = None


def _pin_ages(
    pins: list[tuple[int, int, int, int]], now: int
) -> tuple[dict[int, int], dict[int, float]]:
    """Pinned buffers per file slot, and the age in seconds of each file's oldest pin."""
    count: dict[int, int] = {}
    oldest: dict[int, float] = {}
    for fidx, _pgno, _ref, since in pins:
        count[fidx] = count.get(fidx, 0) + 1
        # A stamp from the future (written by a process that read the clock a moment later)
        # is an age of 0, not a negative one.
        age = max(0, now - since) / 1e9 if since else 0.0
        oldest[fidx] = max(oldest.get(fidx, 0.0), age)
    return count, oldest


def _now() -> int:
    return time.clock_gettime_ns(PIN_CLOCK)


def _check_walker(core: PoolCore) -> None:
    """Refuse a bucket walk of a private region from a thread other than its event loop's:
    its buffers have no mutexes, and the compiled walk runs without the GIL, so it would
    follow chains the loop is changing (it once never returned)."""
    owner = core.loop_thread
    if not core.shared and owner is not None and threading.get_ident() != owner:
        raise InvalidArgument(
            "a private environment's pool statistics can only be read on the thread of the "
            "event loop it was opened on (its buffers have no mutexes); a file or System V "
            "environment allows other threads"
        )


def file_stat(
    core: PoolCore, fidx: int, pins: tuple[dict[int, int], dict[int, float]] | None = None
) -> FileStat:
    """Statistics of file slot ``fidx``."""
    if pins is None:
        _check_walker(core)
        found: list[Pinned] = []
        for cache in core.caches:
            walk(cache, core.shared, found)
        pins = _pin_ages([p for p in found if p[0] == fidx], _now())
    counts = core.file_stats(fidx)
    flags = core.file_field(fidx, "flags")
    return FileStat(
        file_name=core.file_name(fidx),
        page_size=core.file_field(fidx, "page_size"),
        pages=core.file_field(fidx, "pages"),
        open_handles=core.file_field(fidx, "refcnt"),
        temp=bool(flags & FF_TEMP),
        nofile=bool(flags & FF_NOFILE),
        pinned=pins[0].get(fidx, 0),
        oldest_pin_age=pins[1].get(fidx),
        **counts,
    )


def pool_stat(core: PoolCore, reaper: tuple[int, int, int] = (0, 0, 0)) -> PoolStat:
    """Statistics of the whole pool; ``reaper`` is ``(procs_reaped, pins_reclaimed,
    dirty_inherited)`` from the environment's registry."""
    _check_walker(core)
    all_pins: list[Pinned] = []
    pages = dirty = waits = nowaits = 0
    mutexes = [core.mutex]
    for cache in core.caches:
        # One pass over the buckets: their pinned buffers, dirty counts and mutex counters.
        d, wt, nw = walk(cache, core.shared, all_pins)
        # The walk is no snapshot: other processes (and, with the GIL released, this one's
        # other threads) insert, dirty and free buffers meanwhile. Counting the buffers after
        # it includes those inserted during it; a buffer counted dirty then freed is clamped
        # away, so page_clean is never negative.
        n = cache.buffers()
        pages += n
        dirty += min(d, n)
        waits += wt
        nowaits += nw
        mutexes.append(cache.alloc_mutex)
    pins = _pin_ages(all_pins, _now())
    files = tuple(file_stat(core, i, pins) for i in core.file_slots())
    g = core.global_stats()
    for m in mutexes:
        wt, nw, _ = m.stats()
        waits += wt
        nowaits += nw

    def total(name: str) -> int:
        return int(sum(getattr(f, name) for f in files)) + core.retired_file_counts.get(name, 0)

    searches = total("cache_hit") + total("cache_miss")  # one bucket search per pin
    return PoolStat(
        cache_size=core.header("cache_size"),
        ncache=core.ncache,
        page_size=core.header("page_size"),
        mmap_size=core.header("mmap_size"),
        cache_hit=total("cache_hit"),
        cache_miss=total("cache_miss"),
        map=total("map"),
        page_create=total("page_create"),
        page_in=total("page_in"),
        page_out=total("page_out"),
        ro_evict=g["ro_evict"],
        rw_evict=g["rw_evict"],
        hash_buckets=core.total_buckets,
        hash_searches=searches,
        # Only chains longer than one entry are recorded on the hot path.
        hash_longest=max(g["hash_longest"], 1 if searches else 0),
        hash_examined=searches + g["hash_examined_extra"],
        pages=pages,
        page_clean=pages - dirty,
        page_dirty=dirty,
        page_trickle=g["page_trickle"],
        region_wait=waits,
        region_nowait=nowaits,
        alloc_waits=g["alloc_waits"],
        write_calls=total("write_calls"),
        bytes_out=total("bytes_out"),
        write_failures=g["write_failures"],
        sync_calls=g["sync_calls"],
        **{f: g[f] for f in g if f.startswith(("trickle_", "checkpoint_"))},
        dirtied_bytes=g["dirtied_bytes"],
        procs_reaped=reaper[0],
        pins_reclaimed=reaper[1],
        dirty_inherited=reaper[2],
        files=files,
        page_pinned=len(all_pins),
        oldest_pin_age=max(pins[1].values()) if all_pins else None,
    )
