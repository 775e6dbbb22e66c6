"""Recovery (``DB_RECOVER``): replay committed transactions from the log into the data files.

Redo only. The scan starts at the ``ckp_lsn`` of the checkpoint before the last one (or the
first record if there was none; see :func:`_start`) and reads every transaction batch after
it (:mod:`aiodbenv.txn.batch`): a batch is one log record, so it is there entirely (its
checksum holds) or not at all. For each page of a batch: a full image is always applied (it
repairs a torn page, and every later change of the page follows it in the log); byte ranges
are applied only if the page's LSN is older than the batch. Each applied page gets the
batch's LSN and is marked dirty; the pool then writes and fsyncs every page, and a checkpoint
record is appended. Running it twice gives the same bytes.

A page of a ``checksum=True`` file that fails its checksum (torn by a power loss) is
rewritten from the first full image of it in the replayed log, and the batches after it are
applied on top; if the log holds byte ranges for it but no full image before them, recovery
applies everything else, writes no checkpoint record, and raises PageCorrupt naming the page.

:func:`stale_pages` is the check made when an environment's regions are created anew over a
log: a page of a committed batch whose LSN on disk is older than the batch means the data
files miss committed work (the regions were lost before the pages were written), so the open
raises RunRecovery instead of serving stale pages.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import _io
from ..errors import InvalidArgument, PageCorrupt, PageNotFound
from ..log.lsn import LSN
from ..log.record import FILE_HEADER_BYTES, CheckpointRecord
from ..log.redo import redo_start
from ..mpool.checksum import seal
from . import batch as _batch

if TYPE_CHECKING:
    from .._env import Env
    from ..mpool.file import PoolFile

__all__ = ["RecoveryStat", "recover", "stale_pages"]

logger = logging.getLogger("aiodbenv")


@dataclass(frozen=True)
class RecoveryStat:
    """What a recovery did: the log range it read (``start`` to ``end``), the committed
    ``batches`` found, the pages they changed that it ``applied`` (of them ``full_images``)
    and ``skipped`` (already as new as the batch), and the torn pages of checksummed files it
    ``repaired`` from a full image."""

    start: LSN
    end: LSN
    batches: int
    applied: int
    full_images: int
    skipped: int
    #: Pages torn on disk (failing their checksum) rewritten from a full image.
    repaired: int = 0


async def _start(env: Env) -> LSN | None:
    """Where replay starts (None: the first record): see :func:`aiodbenv.log.redo.redo_start`.
    If the checkpoint before the last is no longer in the log, replay starts at the last one,
    with a warning."""
    start, missing = await redo_start(env.log)
    if missing is not None:
        logger.warning(
            "aiodbenv: the checkpoint before the last (%s) is no longer in the log; "
            "recovery starts at the last one (%s): a page torn by a power loss while that "
            "checkpoint ran may not be repaired",
            missing,
            start,
        )
    return start


async def _batches(
    env: Env, start: LSN | None
) -> AsyncIterator[tuple[LSN, list[_batch.BatchFile], list[_batch.BatchPage]]]:
    log = env.log
    if start is not None and start >= log.end_lsn:
        return
    if start is not None:
        start = await _first_at_or_after(env, start)
    async with log.cursor(start) as cur:
        async for lsn, data in cur:
            if isinstance(data, CheckpointRecord) or not _batch.is_batch(data):
                continue
            try:
                files, pages = _batch.decode(data)
            except ValueError as err:
                # The record's checksum held, so this is a record a user put with our magic.
                raise ValueError(
                    f"log record {lsn} looks like a transaction but is not: {err}"
                ) from err
            yield lsn, files, pages


async def _first_at_or_after(env: Env, lsn: LSN) -> LSN:
    """``lsn`` if a record starts there, else the first record of the next file. A
    checkpoint's ``ckp_lsn`` is the end of the log when it began, where the next record was
    to go; if that record did not fit in the file, it went to the next one, and nothing
    starts at ``ckp_lsn`` itself."""
    async with env.log.cursor() as cur:
        try:
            await cur.set(lsn)
            return lsn
        except InvalidArgument:
            nxt = LSN(lsn.file + 1, FILE_HEADER_BYTES)
            if nxt >= env.log.end_lsn:
                return nxt
            await cur.set(nxt)  # InvalidArgument again: the log is not what it should be
            return nxt


class _Files:
    """The data files a recovery opens, by their logged path and format."""

    def __init__(self, env: Env) -> None:
        self._env = env
        self._open: dict[tuple[str, int, int, int], PoolFile] = {}

    async def get(self, bf: _batch.BatchFile, create: bool) -> PoolFile | None:
        key = (bf.path, bf.page_size, bf.data_size, bf.lsn_offset)
        f = self._open.get(key)
        if f is None:
            path = self._env.resolve(bf.path)
            if not create and not os.path.exists(path):
                return None
            f = await self._env.pool.open_file(
                path,
                create=create,
                page_size=bf.page_size,
                lsn_offset=bf.lsn_offset,
                checksum=bf.data_size != bf.page_size,
            )
            self._open[key] = f
        return f

    async def close(self) -> None:
        for f in self._open.values():
            await f.close()
        self._open.clear()


async def recover(env: Env) -> RecoveryStat:
    """Replay the log into the data files (see the module docstring) through ``env``'s pool,
    sync them and append a checkpoint record. Run it with no other process using the
    environment (``Env.open(..., recover=True)`` does, on regions it has just made).

    Cancellation: what was applied stays applied (in the cache, dirty); no checkpoint record
    is written, so the next recovery starts from the same place and gives the same bytes.
    """
    log = env.log
    start = await _start(env)
    files = _Files(env)
    batches = applied = fulls = skipped = repaired = 0
    # Pages that fail their checksum (torn) with no whole image yet: (path, pgno) -> the
    # first batch that could not be applied. A later full image repairs one.
    torn: dict[tuple[str, int], LSN] = {}
    try:
        async for lsn, bfiles, pages in _batches(env, start):
            batches += 1
            for bp in pages:
                bf = bfiles[bp.file]
                f = await files.get(bf, create=True)
                assert f is not None
                key = (bf.path, bp.pgno)
                if key in torn and bp.full is None:
                    continue  # no base to apply byte ranges to
                try:
                    ctx = f.get(bp.pgno, create=True)
                    p = await ctx.__aenter__()
                except PageCorrupt:
                    if bp.full is None:
                        torn.setdefault(key, lsn)
                        continue
                    # Torn, and this batch has a whole image: write it over the torn page
                    # (it is not cached), then read it back as any page.
                    await _rewrite(f, bf, bp.pgno, bp.full)
                    torn.pop(key, None)
                    repaired += 1
                    ctx = f.get(bp.pgno, create=True)
                    p = await ctx.__aenter__()
                try:
                    lo = bf.lsn_offset
                    if bp.full is not None:
                        p.data[:] = bp.full
                        fulls += 1
                    elif LSN.unpack(p.data, lo) < lsn:
                        for off, frag in bp.frags:
                            p.data[off : off + len(frag)] = frag
                    else:
                        skipped += 1
                        continue
                    p.data[lo : lo + 8] = lsn.pack()
                    p.mark_dirty()
                    applied += 1
                finally:
                    await ctx.__aexit__(None, None, None)
        end = log.end_lsn
        await env.pool.sync()
        if torn:
            # What could be applied is written; no checkpoint record, so a recovery after
            # the file is restored starts from the same place.
            (path, pgno), at = next(iter(torn.items()))
            more = f" (and {len(torn) - 1} more page(s))" if len(torn) > 1 else ""
            raise PageCorrupt(
                f"recovery cannot repair page {pgno} of {path}{more}: it fails its checksum "
                f"(torn by a crash, or corrupt), and the log from {start or LSN(0, 0)} holds "
                f"no whole image of it before the transaction at {at} that changed it; "
                "restore the file from a backup and recover again",
                path=env.resolve(path),
                pgno=pgno,
            )
        if batches:
            await log.checkpoint_record(end)
    finally:
        await files.close()
    return RecoveryStat(start or LSN(0, 0), end, batches, applied, fulls, skipped, repaired)


async def _rewrite(f: PoolFile, bf: _batch.BatchFile, pgno: int, image: bytes) -> None:
    """Write a whole page image straight to its place in the file, with its checksum trailer
    (for a torn page of a checksummed file, which the pool will not read). Cancellation: the
    write finishes in its thread."""
    page = bytearray(bf.page_size)
    page[: bf.data_size] = image
    if bf.data_size != bf.page_size:
        seal(pgno, memoryview(page))
    path = f.name
    assert path is not None

    def work() -> None:
        fd = _io.open_file(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if _io.pwritev(fd, [page], pgno * bf.page_size) != len(page):
                raise OSError(errno.EIO, f"short write repairing page {pgno} of {path}")
        finally:
            os.close(fd)

    await asyncio.to_thread(work)


async def stale_pages(env: Env, most: int = 1) -> list[tuple[str, int, LSN, str]]:
    """Pages of committed batches after the last checkpoint whose LSN in the data file is older
    than their batch, or that are missing or torn: ``(path, pgno, batch LSN, what)`` with
    ``what`` one of ``"older"``, ``"missing"``, ``"torn"``; at most ``most``.
    Reads the pages through the pool. Cancellation: nothing is changed."""
    out: list[tuple[str, int, LSN, str]] = []
    files = _Files(env)
    try:
        async for lsn, bfiles, pages in _batches(env, await _start(env)):
            for bp in pages:
                bf = bfiles[bp.file]
                f = await files.get(bf, create=False)
                what = "missing" if f is None else ""
                if f is not None:
                    try:
                        async with f.get(bp.pgno) as p:
                            if LSN.unpack(p.data, bf.lsn_offset) < lsn:
                                what = "older"
                    except PageNotFound:
                        what = "missing"
                    except PageCorrupt:
                        what = "torn"  # fails its checksum: recovery repairs it
                if what:
                    out.append((bf.path, bp.pgno, lsn, what))
                    if len(out) >= most:
                        return out
    finally:
        await files.close()
    return out
