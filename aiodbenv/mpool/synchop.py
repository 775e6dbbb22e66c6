"""A whole sync or trickle in one worker-thread call, when no step of it needs the event loop.

Every worker-thread call ends by waking the loop, which then hands the next step over. A
sync of 64 MiB by :mod:`aiodbenv.mpool.csync`'s steps (collect, four chunks of 16 MiB, the
fsync, the unmap) woke it seven times. Each wake-up is short, but both loops time their
sleeps in whole milliseconds (asyncio rounds epoll's timeout up to the next millisecond,
libuv counts milliseconds): a wake-up while a timer is due within the millisecond makes that
timer up to 1 ms late. The application's own sleeps and timeouts saw that, seven times per
sync (``benchmarks/lateness_quick.py``).

Here one call in a worker thread collects the dirty buffers, writes them chunk by chunk
through one staging buffer, and -- when nothing is left for the Python path (no pinned or
busy page, no failure) and the caller asked for it -- fsyncs every file with writes not yet
fsynced (whoever wrote them, as :func:`~aiodbenv.mpool.fsync.fsync_pending` does), then
unmaps its buffers; the loop then accounts what was done and records the fsyncs, as the
separate steps do. :func:`prepare` says whether that can be: no log (the write-ahead rule
flushes the log between a chunk's claim and its write), and every file the compiled path
would write already has a descriptor in this process (opening one is the loop's; without
it a trickle would pick its least recently used pages among fewer files). Otherwise the
steps run. The call runs in the pool's write-back lane (one thread), never in one of the
pool's I/O threads, which eviction batches, fsyncs and descriptors need meanwhile.

Cancellation: the chunk under way finishes (its claims released, its outcome accounted by a
task of the pool); the chunks not started are not written, their pages stay dirty, and no
fsync is started; the caller gets CancelledError.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._threads import run_to_end
from ..region.mutex import ffi
from . import csync
from .bhwrite import SyncResult
from .fsync import FsyncPlan, Outcome, plan_fsyncs, record_fsyncs, run_fsyncs
from .layout import FILE_ENTRY, MAX_FILES
from .staging import zeroed

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["Hop", "Prepared", "prepare", "sync_in_one_call"]

logger = logging.getLogger("aiodbenv")


@dataclass
class Prepared:
    """What the call needs from the loop: the route table (:func:`csync.routes`) and this
    process's write descriptors by file slot, taken on the loop (the thread must not walk
    the pool's open files while the loop opens and closes them)."""

    route: Any
    fds: dict[int, int]


def prepare(pool: PoolBase, files: set[int] | None) -> Prepared | None:
    """On the loop: what :func:`sync_in_one_call` needs, or None if the write-back of
    ``files`` (or all) cannot be one call (see the module docstring)."""
    if not csync.usable(pool._core) or pool._io.log is not None:
        return None
    route = csync.routes(pool, files)
    io = pool._io
    fds: dict[int, int] = {}
    for fidx in range(MAX_FILES):
        fd = io.fd_for_write(fidx) if route[fidx + 1] else None
        if fd is not None:
            fds[fidx] = fd
        elif route[fidx + 1] == 1:
            return None  # the compiled path would write it: a descriptor to open first
    return Prepared(route, fds)


@dataclass
class Hop:
    """What the call did: the buffers it collected (``fast``; None if it gave up before
    writing: a bucket held past the bound, or more dirty buffers than frames -- the caller
    then collects the Python way), how many the compiled path took (``taken``: all, or a
    trickle's ``limit`` least recently used), each chunk's outcome, the pages not written
    (``skipped``), the fsyncs made (plan and outcomes, or None if none was started), and
    what ended it early (``error``: raised on the loop once the rest is accounted)."""

    fast: csync.FastSet | None
    taken: int = 0
    chunks: list[tuple[int, csync.Chunk]] = field(default_factory=list)
    skipped: set[tuple[int, int]] = field(default_factory=set)
    fsync: tuple[FsyncPlan, list[Outcome]] | None = None
    error: BaseException | None = None


def _run(
    pool: PoolBase,
    prep: Prepared,
    tab: Any,
    keep: list[Any],
    files: set[int] | None,
    fsync: bool,
    limit: int,
    stop: list[bool],
) -> Hop:
    """In a worker thread: collect, write every chunk, fsync if nothing is left, unmap;
    ``stop[0]`` set by the loop (the caller was cancelled): no further chunk, no fsync.
    Never raises: what goes wrong is in ``hop.error``, after what was done."""
    fast = csync.collect_now(pool, prep.route, tab, keep, None, limit)
    hop = Hop(fast)
    if fast is None:
        return hop
    hop.taken = fast.n
    stages: list[Any] = []
    try:
        _write_all(pool, prep, fast, hop, stages, stop)
        left = bool(fast.others or hop.skipped) or stop[0]
        left = left or any(c.skipped or c.unreleased or c.error for _, c in hop.chunks)
        if fsync and not left:
            plan = plan_fsyncs(pool, files, prep.fds) or FsyncPlan([], {})
            hop.fsync = (plan, run_fsyncs(plan) if plan.targets else [])
    except BaseException as err:  # accounted for on the loop, then raised there
        hop.error = err
    try:
        # Unmapping megabytes of touched pages is milliseconds of kernel time: here, not on
        # the loop (the entries go too: ``others`` is a list of its own).
        csync.unmap(stages, fast)
    except BaseException as err:  # pragma: no cover - munmap does not fail here
        hop.error = hop.error or err
    return hop


def _write_all(
    pool: PoolBase,
    prep: Prepared,
    fast: csync.FastSet,
    hop: Hop,
    stages: list[Any],
    stop: list[bool],
) -> None:
    """In a worker thread: write ``fast``'s entries chunk by chunk into ``hop``, through
    one staging buffer (grown when a file's chunk needs more); after a failed chunk or once
    ``stop[0]`` is set, the rest go to ``hop.skipped`` unwritten."""
    core = pool._core
    stage = zeroed(0)
    stages.append(stage)
    failed = False
    for tag, lo, hi in fast.tags():
        fidx = tag - 1
        e = core.entry(fidx)
        fd = prep.fds.get(fidx)
        if failed or not e or fd is None:  # closed meanwhile: the Python rounds look again
            hop.skipped |= fast.keys(lo, hi)
            continue
        ps = int(core.meta_words[e + FILE_ENTRY.word.page_size])
        step = max(1, csync.CHUNK_BYTES // max(ps, 1))
        if len(stage) < min(hi - lo, step) * ps:
            stage = zeroed(min(hi - lo, step) * ps)
            stages.append(stage)
        view = ffi.from_buffer(stage)
        try:
            for start in range(lo, hi, step):
                if stop[0]:
                    failed = True
                    hop.skipped |= fast.keys(start, hi)
                    break
                end = min(hi, start + step)
                got = csync.Chunk()
                hop.chunks.append((fidx, got))
                csync.claim_write(pool, fast, fidx, fd, ps, -1, start, end, view, got)
                if got.error is not None:
                    failed = True
                    hop.skipped |= fast.keys(end, hi)
                    break
        finally:
            ffi.release(view)


async def sync_in_one_call(
    pool: PoolBase,
    prep: Prepared,
    files: set[int] | None,
    fsync: bool,
    result: SyncResult,
    limit: int = 0,
) -> Hop:
    """Collect and write back the dirty buffers of ``files`` (or all) that the compiled path
    can write (with ``limit``, only that many least recently used ones: trickle), and fsync
    if ``fsync`` and nothing was left, in one worker-thread call (``prep``: :func:`prepare`'s,
    just made); add what it did to ``result`` (pages not written go to ``result.skipped``,
    the first error to ``result.errors``). Returns the :class:`Hop`: its ``fast.others``
    are for the Python path, and ``hop.fsync`` None means the caller still fsyncs."""
    tab, keep = csync.table(pool)
    done = SyncResult()
    stop = [False]

    async def job() -> Hop:
        hop = await run_to_end(
            _run, pool, prep, tab, keep, files, fsync, limit, stop, limiter=pool._io.writeback_lane
        )
        for fidx, got in hop.chunks:
            if not csync.account(pool, fidx, got, done):
                break
        done.skipped |= hop.skipped
        if hop.fsync is not None:
            plan, outcomes = hop.fsync
            await record_fsyncs(pool, plan, outcomes, done)  # a failed fsync panics here
        if hop.error is not None:
            raise hop.error
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
