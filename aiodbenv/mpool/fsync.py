"""Durability by generation (Berkeley DB's mp_sync.c, its fsync half).

Every successful page write bumps its file entry's ``written_gen``; :func:`fsync_pending`
fsyncs every file whose ``written_gen`` is ahead of ``synced_gen``, whoever wrote to it, and
records what each fsync covered. A failed fsync panics the environment (see
:mod:`aiodbenv.mpool.sync`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import _io
from .._threads import run_to_end
from ..region.mutex import BUSY, attempt
from .alloc import PoolCore
from .bhwrite import SyncResult
from .layout import (
    FF_DEAD,
    FF_NOFILE,
    FF_TEMP,
    FILE_ENTRY,
    MAX_FILES,
)

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["FsyncPlan", "Outcome", "fsync_pending", "plan_fsyncs", "record_fsyncs", "run_fsyncs"]

logger = logging.getLogger("aiodbenv")


#: Per target: None (fsynced), ("open", err): it could not be opened (an ordinary error:
#: nothing was lost yet), ("fsync", err): the fsync failed (fatal).
Outcome = tuple[str, OSError] | None


@dataclass
class FsyncPlan:
    """The files an fsync pass covers: ``(slot, this process's descriptor or None, path to
    open for it or None, written generation)``, and each slot's file id when planned (the
    slot may be freed and reused by another file while the fsync runs: what it covered is
    recorded only if the slot still holds the same file)."""

    targets: list[tuple[int, int | None, str | None, int]]
    ids: dict[int, bytes]


def plan_fsyncs(
    pool: PoolBase, files: set[int] | None, fds: dict[int, int] | None = None
) -> FsyncPlan | None:
    """Which files (of ``files``, or all) have page writes not yet covered by an fsync, to
    be fsynced through this process's descriptor or one opened by path (None: none).
    ``fds``: this process's write descriptors by slot, taken on the loop (a worker thread
    must not walk the pool's open files while the loop changes them); None: looked up
    here, on the loop."""
    core = pool._core
    w0 = core.meta_words
    plan = FsyncPlan([], {})
    for fidx in range(MAX_FILES) if files is None else sorted(files):
        e = core.entry(fidx)
        if not e or w0[e + FILE_ENTRY.word.flags] & (FF_DEAD | FF_NOFILE | FF_TEMP):
            continue
        gen = int(w0[e + FILE_ENTRY.word.written_gen])
        if gen <= w0[e + FILE_ENTRY.word.synced_gen]:
            continue
        fd = pool._io.fd_for_write(fidx) if fds is None else fds.get(fidx)
        path = None if fd is not None else core.file_name(fidx)
        if fd is not None or path is not None:
            plan.targets.append((fidx, fd, path, gen))
            plan.ids[fidx] = core.fileid(fidx)
    return plan if plan.targets else None


def run_fsyncs(plan: FsyncPlan) -> list[Outcome]:
    """In a worker thread: fsync each target (opening it by path if this process has no
    descriptor); one outcome per target."""
    _io.step("fsync_begin")
    res: list[Outcome] = []
    for _fidx, fd, path, _gen in plan.targets:
        if fd is None:
            assert path is not None
            try:
                own = _io.open_file(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                res.append(("open", err))
                continue
        try:
            _io.fsync(own if fd is None else fd)
            res.append(None)
        except OSError as err:
            res.append(("fsync", err))
        finally:
            if fd is None:
                os.close(own)
    return res


async def record_fsyncs(
    pool: PoolBase, plan: FsyncPlan, res: list[Outcome], result: SyncResult
) -> None:
    """On the loop (in a task of the pool, so a cancelled caller changes nothing): record
    what each fsync covered, panic the environment for a failed one, add to ``result`` (the
    files fsynced, and each failure's error)."""
    if not plan.targets:
        return
    core = pool._core
    w0 = core.meta_words
    for i, ((fidx, _fd, path, gen), out) in enumerate(zip(plan.targets, res)):
        e = core.entry(fidx)
        if (
            out is not None
            and out[0] == "open"
            and isinstance(out[1], FileNotFoundError)
            and e
            and not w0[e + FILE_ENTRY.word.refcnt]
        ):
            # Closed everywhere and then removed: nothing is left to make durable, and
            # the next sync must not fail on it again.
            logger.warning("%s was removed before its last writes were fsynced", path)
            res[i] = out = None
        if out is None:
            if e and core.fileid(fidx) == plan.ids[fidx]:
                # The file mutex held by a stopped process must not freeze the loop:
                # one short try, then retries with an async back-off up to wait_timeout
                # (LockTimeout then: the file is fsynced again by the next sync).
                if attempt(_record_synced, core, fidx, e, gen) is BUSY:
                    await pool._locked(_record_synced, core, fidx, e, gen, check=False)
            result.files_synced += 1
            continue
        result.errors.append(out[1])
        if out[0] == "fsync":
            pool._fsync_failed(path or core.file_name(fidx) or f"file slot {fidx}", out[1])
    _io.step("fsync_end")


async def fsync_pending(pool: PoolBase, files: set[int] | None, result: SyncResult) -> None:
    """fsync every file (of ``files``, or all) with page writes not yet covered by an fsync,
    whoever wrote them (one worker-thread hop), and record what each fsync covered.

    A file is fsynced through this process's descriptor if it has one, else through one
    opened by its path just for this (fsync flushes the file, whatever descriptor wrote it).
    Temporary and nofile files are never made durable. A failed fsync panics the environment
    and raises :class:`~aiodbenv.errors.RunRecovery` (see the module docstring).

    Cancellation: the fsyncs under way finish as a task of the pool, recording what they
    covered (or panicking); the caller gets CancelledError.
    """
    plan = plan_fsyncs(pool, files)
    if plan is None:
        return
    done = SyncResult()

    async def job() -> None:
        res = await run_to_end(run_fsyncs, plan, limiter=pool._io.limiter)
        await record_fsyncs(pool, plan, res, done)

    task = pool._io.spawn(job())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        pool._io.orphan(task, "an fsync")
        raise
    result.files_synced += done.files_synced
    result.errors += done.errors


def _record_synced(core: PoolCore, fidx: int, e: int, gen: int) -> None:
    """Record that file slot ``fidx`` (entry word ``e``) is fsynced up to generation ``gen``
    (under its file mutex, taken first: a LockTimeout changes nothing)."""
    w0 = core.meta_words
    with core.file_mutex(fidx):
        if w0[e + FILE_ENTRY.word.synced_gen] < gen:
            w0[e + FILE_ENTRY.word.synced_gen] = gen
