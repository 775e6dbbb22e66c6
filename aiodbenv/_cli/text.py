"""Statistics as text: ``db_stat``-style pages for ``stat`` and ``demo``, and the screen of
``watch``."""

from __future__ import annotations

import time

from .._workers import Health
from ..log.stat import LogStat
from ..mpool.stat import PoolStat
from ..region.environment import EnvStat

__all__ = ["format_env_stat", "format_log_stat", "format_pool_stat", "human_size", "watch_text"]


def human_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1 (``1.5 KiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def format_env_stat(st: EnvStat) -> str:
    """``db_stat -e``-style text for an :class:`~aiodbenv.EnvStat`."""
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.created))
    lines = [
        f"Environment home:           {st.home}",
        f"Region kind:                {st.kind}",
        f"Layout version:             {st.version}",
        f"Environment id:             {st.env_id:#018x}",
        f"Created:                    {created} by process {st.creator_pid}",
        f"Open handles:               {st.handles}",
        f"Handles ever opened:        {st.opens}",
        f"Panicked:                   {'yes' if st.panicked else 'no'}",
        f"Cache size:                 {human_size(st.cache_size)} in {st.ncache} cache(s)",
        f"Default page size:          {st.page_size}",
        f"Maximum mmap file size:     {human_size(st.mmap_size)}",
        f"System memory key:          {st.shm_key if st.shm_key is not None else '-'}",
        f"Region mode:                {st.mode:#05o}",
        f"Flags:                      {', '.join(sorted(st.flags)) or '-'}",
        f"Mutexes:                    {st.mutex_backend}",
        f"Mutex waits:                {st.mutex_waits}",
        f"Mutex no-waits:             {st.mutex_nowaits}",
        f"Mutex holders found dead:   {st.mutex_owner_died}",
        f"Regions:                    {len(st.regions)}",
        f"Live processes:             {len(st.processes)}",
    ]
    for proc in st.processes:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(proc.opened))
        lines.append(f"  pid {proc.pid:<8} open since {since}, {proc.pins} pin(s) held")
    for r in st.regions:
        lines += [
            "=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=",
            f"Region {r.region_id} ({r.type})",
            f"  Size:                     {human_size(r.size)} ({r.size} bytes)",
            f"  Backing:                  {r.backing}",
            f"  Allocator arena:          {r.alloc.arena} bytes, {r.alloc.used} used, "
            f"{r.alloc.free} free in {r.alloc.free_chunks} chunk(s)",
            f"  Allocations:              {r.alloc.allocs} ({r.alloc.frees} freed, "
            f"{r.alloc.failures} failed)",
        ]
    return "\n".join(lines)


def format_pool_stat(st: PoolStat) -> str:
    """``db_stat -m``-style text for a :class:`~aiodbenv.PoolStat`: value, then meaning."""
    rows: list[tuple[object, str]] = [
        (human_size(st.cache_size), "Total cache size"),
        (st.ncache, "Number of caches"),
        (st.page_size, "Default pagesize"),
        (human_size(st.mmap_size), "Maximum memory-mapped file size"),
        (st.cache_hit, "Requested pages found in the cache"),
        (st.cache_miss, "Requested pages not found in the cache"),
        (st.map, "Requested pages mapped into the process' address space"),
        (st.page_create, "Pages created in the cache"),
        (st.page_in, "Pages read into the cache"),
        (st.page_out, "Pages written from the cache to the backing file"),
        (st.write_calls, "Write calls (runs of adjacent pages)"),
        (human_size(st.bytes_out), "Bytes written"),
        (st.write_failures, "Failed writes"),
        (st.ro_evict, "Clean pages forced from the cache"),
        (st.rw_evict, "Dirty pages forced from the cache"),
        (st.page_trickle, "Dirty pages written by trickle-sync thread"),
        (st.pages, "Current total page count"),
        (st.page_clean, "Current clean page count"),
        (st.page_dirty, "Current dirty page count"),
        (st.page_pinned, "Current pinned page count (all processes)"),
        (_age(st.oldest_pin_age), "Age of the oldest pin now held"),
        (st.hash_buckets, "Number of hash buckets used for page location"),
        (st.hash_searches, "Total number of times hash chains searched for a page"),
        (st.hash_longest, "The longest hash chain searched for a page"),
        (st.hash_examined, "Total number of hash chain entries checked for page"),
        (st.region_wait, "The number of region locks that required waiting"),
        (st.region_nowait, "The number of region locks granted without waiting"),
        (st.alloc_waits, "Pins that waited for a free frame"),
        (st.sync_calls, "Sync calls"),
        (human_size(st.dirtied_bytes), "Bytes of pages unpinned dirty"),
        (st.trickle_runs, "Trickle worker runs"),
        (st.trickle_pages, "Pages written by the trickle worker"),
        (st.trickle_write_calls, "Write calls by the trickle worker"),
        (human_size(st.trickle_bytes), "Bytes written by the trickle worker"),
        (st.trickle_failures, "Trickle worker failures"),
        (st.checkpoint_runs, "Checkpoints completed by a checkpoint worker"),
        (st.checkpoint_pages, "Pages written by checkpoint workers"),
        (st.checkpoint_write_calls, "Write calls by checkpoint workers"),
        (human_size(st.checkpoint_bytes), "Bytes written by checkpoint workers"),
        (st.checkpoint_failures, "Checkpoint worker failures"),
        (st.procs_reaped, "Dead processes reaped"),
        (st.pins_reclaimed, "Pins of dead processes reclaimed"),
        (st.dirty_inherited, "Dirty pages inherited from dead processes"),
    ]
    lines = [f"{v!s:<12}{text}" for v, text in rows]
    for f in st.files:
        lines += [
            "=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=",
            "Pool File: " + (f.file_name or "(temporary)") + (" (nofile)" if f.nofile else ""),
        ]
        for v, text in [
            (f.page_size, "Page size"),
            (f.pages, "Pages known to the pool"),
            (f.open_handles, "Open handles"),
            (f.pinned, "Pages pinned now (all processes)"),
            (_age(f.oldest_pin_age), "Age of the oldest pin now held"),
            (f.cache_hit, "Requested pages found in the cache"),
            (f.cache_miss, "Requested pages not found in the cache"),
            (f.map, "Requested pages mapped into the process' address space"),
            (f.page_create, "Pages created in the cache"),
            (f.page_in, "Pages read into the cache"),
            (f.page_out, "Pages written from the cache to the backing file"),
            (f.write_calls, "Write calls"),
            (human_size(f.bytes_out), "Bytes written"),
        ]:
            lines.append(f"{v!s:<12}{text}")
    return "\n".join(lines)


def format_log_stat(st: LogStat) -> str:
    """``db_stat -l``-style text for a :class:`~aiodbenv.LogStat`: value, then meaning."""
    rows: list[tuple[object, str]] = [
        (f"{st.magic:#x}", "Log magic number"),
        (st.version, "Log version number"),
        ("in memory" if st.inmemory else "files", "Where the log is kept"),
        (human_size(st.lg_bsize), "Log record cache size"),
        (human_size(st.lg_size), "Current log file size"),
        (st.records, "Records entered into the log"),
        (human_size(st.bytes), "Log bytes written"),
        (st.wcount, "Total log file I/O writes"),
        (st.wcount_fill, "Total log file I/O writes due to overflow"),
        (st.scount, "Total log file flushes"),
        (st.cur_file, "Current log file number"),
        (st.cur_offset, "Current log file offset"),
        (st.disk_file, "On-disk log file number"),
        (st.disk_offset, "On-disk log file offset"),
        (st.maxcommitperflush, "Maximum commits in a log flush"),
        (st.mincommitperflush, "Minimum commits in a log flush"),
        (st.region_wait, "The number of region locks that required waiting"),
        (st.region_nowait, "The number of region locks granted without waiting"),
        (human_size(st.file_bytes), "Bytes written to log files"),
        (st.block_rewrites, "Writes that rewrote a partly written 4 KiB block"),
        (st.flushes, "Log fsyncs that served a flush call"),
        (st.switches, "Log files started"),
        (st.checkpoints, "Checkpoint records"),
        (st.last_checkpoint or "-", "LSN of the last checkpoint record"),
    ]
    return "\n".join(f"{v!s:<12}{text}" for v, text in rows)


def watch_text(st: EnvStat, ps: PoolStat, health: Health) -> str:
    """One screen of ``watch``: the environment, its cache, its workers and its files."""
    checkpoint = health.last_checkpoint
    searches = ps.cache_hit + ps.cache_miss
    ratio = f"{ps.cache_hit / searches:.1%}" if searches else "-"
    when = time.strftime("%H:%M:%S", time.localtime(checkpoint)) if checkpoint else "never"
    lines = [
        f"aiodbenv {st.home}  ({st.kind}, {st.handles} handles)  {time.strftime('%H:%M:%S')}",
        f"cache {human_size(ps.cache_size)}: {ps.pages} pages, {ps.page_dirty} dirty, "
        f"hit ratio {ratio} ({ps.cache_hit} hits, {ps.cache_miss} misses)",
        f"pages in {ps.page_in}, created {ps.page_create}, out {ps.page_out} "
        f"({human_size(ps.bytes_out)} in {ps.write_calls} writes), evicted {ps.ro_evict} clean "
        f"+ {ps.rw_evict} dirty",
        f"trickle: {ps.trickle_pages} pages in {ps.trickle_runs} runs, "
        f"{ps.trickle_failures} failures; checkpoints: {ps.checkpoint_runs} "
        f"({ps.checkpoint_pages} pages, {human_size(ps.checkpoint_bytes)}), "
        f"{ps.checkpoint_failures} failures, last {when}",
        f"locks: {ps.region_nowait} immediate, {ps.region_wait} waited; "
        f"{ps.page_pinned} pages pinned, oldest pin {_age(ps.oldest_pin_age)}",
    ]
    for w in health.shared:  # trouble in any process, as the region records it
        if w.consecutive_failures:
            lines.append(
                f"{w.kind} FAILING: {w.consecutive_failures} in a row (process "
                f"{w.failed_pid}): {w.last_error}"
            )
    for f in ps.files:
        lines.append(
            f"  {f.file_name or '(temporary)'}: {f.cache_hit} hits, {f.cache_miss} "
            f"misses, {f.page_out} pages out in {f.write_calls} writes, {f.pinned} pinned"
        )
    return "\n".join(lines)
