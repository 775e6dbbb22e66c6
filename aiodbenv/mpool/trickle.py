"""Trickle and checkpoint (Berkeley DB's mp_trickle.c, and the checkpoint's page work).

Trickle writes just enough of the least recently used dirty pages to keep a share of the cache
clean; a checkpoint writes every page dirty when it starts, spread over time, then fsyncs. Both
are built on :mod:`aiodbenv.mpool.sync` (collecting, claims, fsync) and
:mod:`aiodbenv.mpool.bh` (writing); the background workers that schedule them, and the
record of a complete checkpoint, are :mod:`aiodbenv._workers`'.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import Incomplete
from . import csync, synchop
from .bhwrite import SyncResult, write_items
from .fsync import fsync_pending
from .layout import HANDLE_STATS
from .sync import collect_dirty, raw_of, settle_claims, sift

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["checkpoint", "trickle", "trickle_result"]

PINNED_RETRIES = 20


async def trickle(pool: PoolBase, pct: int) -> int:
    """Write the fewest dirty pages that leave ``pct``% of the cached pages clean; returns
    how many were written."""
    return (await trickle_result(pool, pct)).written


async def trickle_result(pool: PoolBase, pct: int) -> SyncResult:
    """:func:`trickle`, returning the whole :class:`SyncResult`."""
    pool._enter()
    try:
        return await _trickle(pool, pct)
    finally:
        pool._leave()


async def _trickle(pool: PoolBase, pct: int) -> SyncResult:
    core = pool._core
    total = sum(cache.buffers() for cache in core.caches)
    clean = total - sum(cache.dirty() for cache in core.caches)
    target = (total * pct + 99) // 100
    if clean >= target:
        return SyncResult()
    need = target - clean
    result = SyncResult()
    # The compiled path picks the `need` least recently used of the pages it can write, in C,
    # and writes them in worker-thread calls; the Python path the rest, if that is too few.
    # Without a log, collecting and writing them is one call (synchop).
    others: list[tuple[int, ...]] | None = None
    prep = synchop.prepare(pool, None)
    if prep is not None:
        hop = await synchop.sync_in_one_call(pool, prep, None, False, result, limit=need)
        if hop.fast is not None:
            need -= hop.taken
            others = hop.fast.others
    elif csync.usable(pool._core):
        fast = await csync.collect(pool, None, limit=need)
        if fast is not None:
            taken = fast.n  # (write_fast unmaps fast's entries when done)
            await csync.write_fast(pool, fast, result)
            need -= taken
            others = fast.others
    if others is not None:
        found = await sift(pool, raw_of(pool, others), None) if need > 0 else None
    else:
        found = await collect_dirty(pool, None)
    if found is not None and not result.errors:
        items, prios = found.items, found.prios
        # Write the least recently used dirty pages (those eviction would take next), in
        # file order for the disk. Both sorts run on C-level keys: no Python call per page.
        picked = sorted(sorted(range(len(items)), key=prios.__getitem__)[:need])
        part = await write_items(pool._io, [items[i] for i in picked])
        result.merge(part)
        result.errors += part.errors
    core.meta_words[pool._hs + HANDLE_STATS.word.page_trickle] += result.written
    if result.errors:
        raise result.errors[0]
    return result


async def checkpoint(
    pool: PoolBase, spread: float, progress: Callable[[int, int], None] | None
) -> SyncResult:
    """The checkpoint algorithm (see :func:`aiodbenv._workers.run_checkpoint`, which records a
    complete one): write every page dirty now, spread over ``spread`` seconds, retry the ones
    found busy, fsync, and raise :class:`Incomplete` if some stayed busy."""
    deadline = time.monotonic() + pool.wait_timeout
    fast = await csync.collect(pool, None) if csync.usable(pool._core) else None
    found = await (
        collect_dirty(pool, None) if fast is None else sift(pool, raw_of(pool, fast.others), None)
    )
    items, held, claimed = found.items, found.held, found.claimed
    result = SyncResult()
    skipped: set[tuple[int, int]] = set()
    before = 0 if fast is None else fast.n  # the compiled path's pages come first
    total = before + len(items)
    t0 = time.monotonic()

    async def paced(done: int) -> None:
        if progress is not None:
            progress(done, total)
        if spread > 0 and done < total:
            ahead = t0 + spread * done / total - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)

    if fast is not None:
        # Spread out: chunks of 256 KiB (the Python path's batch), so the pacing has steps.
        await csync.write_fast(pool, fast, result, paced, 256 << 10 if spread > 0 else 0)
        if result.errors:
            raise result.errors[0]
        skipped, result.skipped = result.skipped, set()
    step = 64
    for start in range(0, len(items), step):
        part = await write_items(pool._io, items[start : start + step])
        result.merge(part)
        if part.errors:
            raise part.errors[0]
        skipped |= part.skipped  # busy when their batch came: they are retried below
        await paced(before + min(len(items), start + step))
    # Pages that were dirty but pinned, or being written by another writer, when the
    # checkpoint began must still be written (or their writer's write must end); pages
    # dirtied since are the next checkpoint's business.
    waiting = set(held) | skipped | {(it[0], it[1]) for it, _ in claimed}
    stalled: set[int] = set()
    for attempt in range(PINNED_RETRIES):
        if not waiting:
            break
        if claimed:
            stuck = await settle_claims(pool, claimed, deadline)
            if stuck:
                stalled = {pid for _, pid in stuck}
                break
        else:
            await asyncio.sleep(0.005 * (attempt + 1))
        found = await collect_dirty(pool, {f for f, _ in waiting})
        part = await write_items(pool._io, [it for it in found.items if (it[0], it[1]) in waiting])
        result.merge(part)
        if part.errors:
            raise part.errors[0]
        claimed = [(it, pid) for it, pid in found.claimed if (it[0], it[1]) in waiting]
        waiting &= set(found.held) | part.skipped | {(it[0], it[1]) for it, _ in claimed}
    # Every file with pages written but not yet fsynced, whoever wrote them (a failed fsync
    # panics the environment: RunRecovery, and nothing is recorded).
    await fsync_pending(pool, None, result)
    if result.errors:
        raise result.errors[0]
    if waiting:
        why = (
            f"writer process(es) {sorted(stalled)} did not finish within {pool.wait_timeout} s"
            if stalled
            else "pinned or being written"
        )
        result.incomplete += len(waiting)
        result.stalled_writers |= stalled
        raise Incomplete(
            f"checkpoint: {len(waiting)} dirty page(s) stayed {why}; {result.written} written",
            result=result,
        )
    return result
