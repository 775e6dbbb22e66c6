"""The environment together with its buffer pool and log: the blocking steps of opening and
removing that concern them, run by :class:`aiodbenv.Env` in worker threads.

Opening asks the environment for one region per cache (:func:`pool_plan`), has the creator lay
them out before the environment's magic is written, then attaches the pool to them
(:func:`open_with_pool`). Removing refuses, unless forced, while the cache holds pages nobody
has written yet (:func:`refuse_dirty_pages`), since removing would throw them away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from . import _tasks
from ._config import Settings
from ._threads import run_to_end
from ._workers import run_checkpoint
from .errors import Busy, LockTimeout
from .log.log import Log
from .log.orphan import late_work
from .log.region import attach_log, format_log, log_spec
from .mpool.pool import Pool
from .mpool.region import dirty_pages, format_pool, pool_region_sizes
from .region.backing import Region
from .region.create import Formatter, RegionSpec
from .region.environment import EnvCore, RegionRow
from .region.layout import KIND_PRIVATE, REGION_TYPE_MPOOL
from .region.open import open_environment

__all__ = [
    "Closing",
    "close_log_and_pool",
    "close_quietly",
    "open_with_pool",
    "pool_plan",
    "refuse_dirty_pages",
]

logger = logging.getLogger("aiodbenv")

#: How often a closing handle looks whether its log's late work has ended.
_LATE_POLL = 0.01


def pool_plan(settings: Settings, home: str) -> tuple[list[RegionSpec], Formatter]:
    """The regions the pool (and the log, if ``settings`` ask for one) need and the formatter
    that lays them out (given every region; region 1 is the environment's, the log's comes
    last). Raises :class:`~aiodbenv.errors.ConfigError` for sizes no pool can have."""
    specs = [RegionSpec(REGION_TYPE_MPOOL, size) for size in pool_region_sizes(settings)]
    log_region = log_spec(settings)
    if log_region is not None:
        specs.append(log_region)
    shared = settings.region != "private"

    def format_regions(regions: list[Region]) -> None:
        format_pool(regions[1 : 1 + settings.ncache], settings, shared)
        if log_region is not None:
            format_log(regions[-1], settings, home, shared)

    return specs, format_regions


def open_with_pool(
    path: str,
    settings: Settings,
    create: bool,
    specs: list[RegionSpec],
    formatter: Formatter,
) -> tuple[EnvCore, Pool, Log | None]:
    """Open the environment and attach its pool and log, in a worker thread: attaching builds
    one object per hash bucket, which would stall the event loop for a large cache."""
    core = open_environment(path, settings, create=create, extra=specs, formatter=formatter)
    try:
        types = {row[0]: row[1] for row in core.region_table()}
        mpool = [r for r in core.regions if types.get(r.region_id) == REGION_TYPE_MPOOL]
        log = attach_log(core, settings)
        return core, Pool(core, mpool, shared=core.kind != KIND_PRIVATE), log
    except BaseException:
        close_quietly(core)
        raise


async def close_log_and_pool(log: Log | None, pool: Pool, *, flush: bool) -> None:
    """Close the log (flushing what is buffered if ``flush``), then the pool, even if the
    first fails; commits under way end first (:func:`settle_commits`)."""
    await settle_commits(pool)
    try:
        if log is not None:
            await log._close(flush=flush)
    finally:
        await pool._close()


async def settle_commits(pool: Pool) -> None:
    """Before a handle closes: wait for this process's commits under way (a cancelled
    caller's, finishing in the background) and for the commits of dead processes it is
    finishing from the log (the reaper's): they need the log and their pages. Up to the
    pool's ``wait_timeout``; then LockTimeout is logged and the closing goes on."""
    if pool._committing or pool._finishing:
        try:
            await pool._wait_commits(
                lambda: bool(pool._committing or pool._finishing), "the environment"
            )
        except LockTimeout as err:
            logger.warning("aiodbenv: %s", err)


class Closing:
    """A handle's close: started once and shared by every caller. Its outcome (an error of
    the final writes, RunRecovery) goes to each caller who waits for it to the end; a caller
    cancelled meanwhile leaves it to the next close, which raises it (after a cancelled close
    that is the only way to learn it). Once a caller has had it, closing again does nothing."""

    def __init__(self) -> None:
        self._task: asyncio.Future[None] | None = None
        self._told = False

    async def run(self, close: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._task is None:
            self._task = _tasks.start(close())
        elif self._told and self._task.done():
            return
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            raise  # this caller was cancelled: the close goes on, its outcome is kept
        except BaseException:
            self._told = True
            raise
        self._told = True


async def close_files_then_write(
    pool: Pool, private: bool, ran_checkpoints: bool, write: bool
) -> None:
    """A closing handle's files, then (if ``write``) its last writes: all of a private
    cache's dirty pages (nobody else can ever write them), else a final checkpoint if its
    checkpoint worker ran. The files go first, as documented: a page a caller left pinned is
    unpinned with its flags, so the writes see every page marked dirty (a private cache's
    pinned dirty page was lost with the region when the writes came first). A file that
    failed to close is raised after the writes."""
    failed = await pool._close_files()
    if write and private:
        await pool.sync()
    elif write and ran_checkpoints:
        await run_checkpoint(pool)
    if failed is not None:
        raise failed


def close_quietly(core: EnvCore) -> None:
    """Close ``core`` after a failed or abandoned open; the original error is the one to see."""
    try:
        core.close()
    except Exception:
        pass


def refuse_dirty_pages(
    home: str, regions: list[Region], table: list[RegionRow], force: bool
) -> None:
    """Removing discards the cache: unless forced, refuse while it holds unwritten changes."""
    types = {row[0]: row[1] for row in table}
    n = dirty_pages([r for r in regions if types.get(r.region_id) == REGION_TYPE_MPOOL])
    if not n:
        return
    if not force:
        raise Busy(
            f"environment {home} has {n} dirty page(s) in its cache that removing would "
            f"discard; checkpoint first (python -m aiodbenv checkpoint -1 -h {home}) or "
            "remove with force"
        )
    logger.warning("removing environment %s with force: %d dirty page(s) discarded", home, n)


async def close_core(log: Log | None, core: EnvCore) -> None:
    """The handle's last step: uncount it, detach its regions, unlock the home
    (``core.close``). While work of its log outlives the log's close (a write on a disk
    slower than ``wait_timeout``), that step waits for it in the background: the handle
    stays counted and the home locked, so no one may remove the environment, or create a
    private one in its place, and write the log where the late write is going to land."""
    if log is None or not late_work(log):
        await run_to_end(core.close)  # no sub-task a shutdown could cancel
        return
    logger.warning(
        "closing %s: a log write outlived the close's wait; the handle stays counted (and "
        "the regions attached) until it ends",
        core.home,
    )
    _tasks.start(_close_after(log, core)).add_done_callback(_tasks.retrieve)


async def _close_after(log: Log, core: EnvCore) -> None:
    deadline = time.monotonic() + max(60.0, 10 * log.wait_timeout)
    while late_work(log) and time.monotonic() < deadline:
        await asyncio.sleep(_LATE_POLL)
    await run_to_end(core.close)
