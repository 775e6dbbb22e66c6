"""A whole sync in one worker-thread call, when no step of it needs the event loop.

Every worker-thread call ends by waking the loop, which then hands the next step over. A
sync of 64 MiB by :mod:`aiodbenv.mpool.csync`'s steps (collect, four chunks of 16 MiB, the
fsync, the unmap) woke it seven times. Each wake-up is short, but both loops time their
sleeps in whole milliseconds (asyncio rounds epoll's timeout up to the next millisecond,
libuv counts milliseconds): a wake-up while a timer is due within the millisecond makes that
timer up to 1 ms late. The application's own sleeps and timeouts saw that, seven times per
sync (``benchmarks/lateness_quick.py``).

Here one call in a worker thread collects the dirty buffers, writes them chunk by chunk,
unmaps its buffers and -- when nothing is left for the Python path (no pinned or busy page,
no failure) and the caller asked for it -- fsyncs the files written; the loop then accounts
what was done and records the fsyncs, as the separate steps do. Only when no step needs the
loop in between: no log (the write-ahead rule flushes the log between a chunk's claim and its
write), every file to write with a descriptor in this process (opening one is the loop's).
Otherwise (:func:`usable` False) the steps run as before.

Cancellation: the chunk under way finishes (its claims released, its outcome accounted by a
task of the pool); the chunks not started are not written, their pages stay dirty, and no
fsync is made; the caller gets CancelledError.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ..region.mutex import ffi
from . import csync
from .bhwrite import SyncResult
from .fsync import FsyncPlan, Outcome, plan_fsyncs, record_fsyncs, run_fsyncs
from .layout import FILE_ENTRY

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["Hop", "sync_in_one_call", "usable"]


def usable(pool: PoolBase) -> bool:
    """Whether a write-back of ``pool`` may run in one worker-thread call (see above)."""
    return csync.usable(pool._core) and pool._io.log is None


@dataclass
class Hop:
    """What the call did: the buffers it left to the Python path (``others``, as
    :class:`csync.FastSet`'s), whether it fsynced (``fsync``: the plan and outcomes, or None
    if it did not), and whether it had to give up before writing (``fast`` None: a bucket
    held past the bound, or more dirty buffers than frames: the caller takes the steps)."""

    fast: csync.FastSet | None
    #: Buffers the compiled path took (all of them, or the ``limit`` least recently used).
    taken: int = 0
    chunks: list[tuple[int, csync.Chunk]] = field(default_factory=list)
    skipped: set[tuple[int, int]] = field(default_factory=set)
    fsync: tuple[FsyncPlan, list[Outcome]] | None = None
    #: What ended the call early (a panic), raised on the loop once the chunks done are
    #: accounted (their claims left held are handed to the pool's tasks there).
    error: BaseException | None = None


def _run(
    pool: PoolBase,
    route: Any,
    tab: Any,
    keep: list[Any],
    files: set[int] | None,
    fsync: bool,
    limit: int,
    stop: list[bool],
) -> Hop:
    """In a worker thread: collect, write every chunk, unmap, and fsync if nothing is left;
    ``stop[0]`` set by the loop (the caller was cancelled): no further chunk, no fsync."""
    fast = csync.collect_now(pool, route, tab, keep, None, limit)
    hop = Hop(fast)
    if fast is None:
        return hop
    hop.taken = fast.n
    stages: list[Any] = []
    try:
        _write_all(pool, fast, hop, stages, stop)
    except BaseException as err:  # accounted for on the loop, then raised there
        hop.error = err
        hop.skipped |= fast.keys(0, fast.n)
        return hop
    left = bool(fast.others) or bool(hop.skipped)
    left = left or any(c.skipped or c.unreleased or c.error for _, c in hop.chunks)
    if fsync and not left:
        plan = plan_fsyncs(pool, files)
        if plan is not None:
            hop.fsync = (plan, run_fsyncs(plan))
        else:
            hop.fsync = (FsyncPlan([], {}), [])
    # Unmapping megabytes of touched pages is milliseconds of kernel time: here, not on the
    # loop (the entries go too: ``others`` is a list of its own).
    csync.unmap(stages, fast)
    return hop


def _write_all(
    pool: PoolBase, fast: csync.FastSet, hop: Hop, stages: list[Any], stop: list[bool]
) -> None:
    """In a worker thread: write ``fast``'s entries chunk by chunk into ``hop``; after a
    failed chunk or once ``stop[0]`` is set, the rest go to ``hop.skipped`` unwritten."""
    core = pool._core
    io = pool._io
    failed = False
    for tag, lo, hi in fast.tags():
        fidx = tag - 1
        e = core.entry(fidx)
        fd = io.fd_for_write(fidx)
        if failed or not e or fd is None:  # closed meanwhile: the Python rounds look again
            hop.skipped |= fast.keys(lo, hi)
            continue
        ps = int(core.meta_words[e + FILE_ENTRY.word.page_size])
        step = max(1, csync.CHUNK_BYTES // max(ps, 1))
        stage = csync.zeroed(min(hi - lo, step) * ps)
        stages.append(stage)
        view = ffi.from_buffer(stage)
        for start in range(lo, hi, step):
            end = min(hi, start + step)
            if stop[0]:
                failed = True
                hop.skipped |= fast.keys(start, hi)
                break
            got = csync.Chunk()
            csync.claim_write(pool, fast, fidx, fd, ps, -1, start, end, view, got)
            hop.chunks.append((fidx, got))
            if got.error is not None:
                failed = True
                hop.skipped |= fast.keys(end, hi)
                break
        ffi.release(view)


async def sync_in_one_call(
    pool: PoolBase, files: set[int] | None, fsync: bool, result: SyncResult, limit: int = 0
) -> Hop:
    """Collect and write back the dirty buffers of ``files`` (or all) that the compiled path
    can write (with ``limit``, only that many least recently used ones: trickle), and fsync
    if ``fsync`` and nothing was left, in one worker-thread call; add
    what it did to ``result`` (pages found busy go to ``result.skipped``; the first error to
    ``result.errors``). Returns the :class:`Hop`: its ``others`` (``hop.fast.others``) are for
    the Python path, and ``hop.fsync`` None means the caller still fsyncs."""
    route = csync.routes(pool, files, fd_only=True)
    tab, keep = csync.table(pool)
    done = SyncResult()
    stop = [False]

    async def job() -> Hop:
        hop = await anyio.to_thread.run_sync(
            _run, pool, route, tab, keep, files, fsync, limit, stop, limiter=pool._io.limiter
        )
        for fidx, got in hop.chunks:
            if not csync.account(pool, fidx, got, done):
                break
        if hop.error is not None:
            raise hop.error
        done.skipped |= hop.skipped
        if hop.fsync is not None:
            plan, outcomes = hop.fsync
            await record_fsyncs(pool, plan, outcomes, done)
            done.errors += [out[1] for out in outcomes if out is not None]
        return hop

    task = pool._io.spawn(job())
    try:
        hop = await asyncio.shield(task)
    except asyncio.CancelledError:
        stop[0] = True
        pool._io.orphan(task, "a write-back")
        raise
    result.merge(done)
    result.errors += done.errors
    result.skipped |= done.skipped
    return hop
