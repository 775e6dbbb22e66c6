"""``Pool``: an environment's shared buffer pool, as one ``Env`` handle sees it.

The pool's state is in the mpool regions (:class:`~aiodbenv.mpool.alloc.PoolCore`); a handle
adds what is per process, in layers, each calling only the ones below it: its state, checks and
lock waits (:mod:`~aiodbenv.mpool.handle`), frames (:mod:`~aiodbenv.mpool.frames`), reading
pages in (:mod:`~aiodbenv.mpool.bhread`), opening files (:mod:`~aiodbenv.mpool.fopen`), and
here the public calls. Its I/O has one owner, :class:`~aiodbenv.mpool.bh.BufferIO`. I/O never
runs on the event loop except a read of a page that is already in the OS page cache
(``RWF_NOWAIT``). See "Pool map" in docs/design.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ..errors import InvalidArgument, LockTimeout
from .bh import PageIn, PageOut
from .bhwrite import SyncResult
from .fopen import FileOpener, PoolFiles
from .layout import HANDLE_STATS
from .reaper import Reaped
from .stat import PoolStat, pool_stat
from .sync import write_back
from .trickle import trickle

logger = logging.getLogger("aiodbenv")

__all__ = ["FileOpener", "PageIn", "PageOut", "Pool"]


class Pool(PoolFiles):
    """The shared buffer pool of an environment (Berkeley DB's mpool), through one handle.

    Get it as ``env.pool``. ``fail_fast`` (default False) makes a pin that finds every frame
    pinned raise :class:`~aiodbenv.errors.CacheFull` at once instead of waiting up to
    ``wait_timeout`` seconds (default 30) for another pin to be released.
    """

    @property
    def cache_size(self) -> int:
        """The cache size in bytes (``st_cachesize``)."""
        return self._core.header("cache_size")

    @property
    def page_size(self) -> int:
        """The environment's default page size."""
        return self._core.header("page_size")

    @property
    def ncache(self) -> int:
        """The number of caches (mpool regions)."""
        return self._core.ncache

    def dirty_share(self) -> float:
        """The fraction (0..1) of cached pages that are dirty, read from the buckets."""
        caches = self._core.caches
        total = sum(cache.buffers() for cache in caches)
        return sum(cache.dirty() for cache in caches) / total if total else 0.0

    def reap(self) -> list[Reaped]:
        """Reclaim what dead processes held (their pins, reads and write claims; see "A worker
        that dies" in the pool documentation) and return what was done, one ``Reaped`` per dead
        handle. Runs by itself (at open, every second, and when a pin or a sync finds pages
        held); call it to reap at once. Nothing to do for a private environment. Synchronous:
        never awaits, never blocks on a busy mutex (a slot it cannot finish is left for the
        next look)."""
        return self._reap()

    def slot_pins(self) -> dict[int, int]:
        """Pins held per registry slot, summed over every buffer (for statistics; reads the
        counts without locking, so a figure may be a pin off while pins change)."""
        return self._slot_pins()

    def register(self, ftype: int, pgin: PageIn | None, pgout: PageOut | None) -> None:
        """Register page transforms for files of type ``ftype`` in this process
        (memp_register; the newest registration wins).

        ``pgin(pgno, page, cookie)`` runs after a page of such a file is read (and for pages
        made with ``create``), ``pgout`` before one is written, on a copy; ``cookie`` is the
        file's ``pgcookie``. They may run on the event loop thread or a worker thread: keep them
        quick and thread-safe. A process that has not registered a type cannot write (so
        cannot evict) dirty pages of such files; register every type in every process.
        """
        if type(ftype) is not int or ftype <= 0:
            raise InvalidArgument(f"ftype must be a positive int, not {ftype!r}")
        for fn in (pgin, pgout):
            if fn is not None and not callable(fn):
                raise InvalidArgument(f"{fn!r} is not callable")
        self._io.registry[ftype] = (pgin, pgout)

    def open_file(
        self,
        path: str | os.PathLike[str] | None,
        *,
        page_size: int | None = None,
        create: bool = False,
        readonly: bool = False,
        nommap: bool = False,
        ftype: int = 0,
        lsn_offset: int = -1,
        pgcookie: bytes = b"",
        fileid: bytes | None = None,
        nofile: bool = False,
        max_pages: int | None = None,
        mode: int = 0o600,
        checksum: bool = False,
    ) -> FileOpener:
        """Open ``path`` (relative to the home) in the pool (memp_fopen).

        ``page_size`` (a power of two, default the environment's) must match any other open of
        the same file. Two opens of one file, through any path or hard link and from any
        process, share one set of pages: files are identified by device and inode, or by
        ``fileid`` (20 bytes) when given. ``create`` creates a missing file with ``mode``;
        ``readonly`` opens it read-only and, without pgin/pgout, ``nommap`` or a size over the
        environment's ``mmap_size``, maps it and serves pages from the map. ``ftype`` selects
        registered pgin/pgout, called with ``pgcookie``. ``lsn_offset`` is where the page LSN
        lives (-1: none). ``path=None`` is a private temporary file whose backing file is made
        only when one of its dirty pages must be written, and removed at close. ``nofile``
        keeps the pages in the cache only, never written; ``max_pages`` limits the file
        (set_maxsize: creating past it raises NoSpace).

        ``checksum`` (Berkeley DB's ``DB_CHKSUM``) keeps a checksum in the last 8 bytes of
        every page: ``page.data`` is ``page_size - 8`` bytes, the trailer is set when the page
        is written and checked when it is read back (a mismatch raises
        :class:`~aiodbenv.errors.PageCorrupt` naming the file and page; an all-zero page,
        never written, is accepted). Every open of the file must agree (InvalidArgument
        otherwise); such a file is never memory-mapped (see the pool guide for the layout).

        ``await pool.open_file(...)`` or ``async with pool.open_file(...) as f``. Raises
        :class:`~aiodbenv.errors.NotFound` (missing without ``create``),
        :class:`~aiodbenv.errors.InvalidArgument` (bad page size, a size that is not a whole
        number of pages, another page size or LSN offset than an earlier open, ...).

        Cancellation: the open runs to its end in a task of the pool (closing the environment
        waits for it); the caller gets CancelledError, and a file opened meanwhile is closed
        again, so no descriptor or file-table entry is lost.
        """
        return FileOpener(
            self,
            dict(
                path=path,
                page_size=page_size,
                create=create,
                readonly=readonly,
                nommap=nommap,
                ftype=ftype,
                lsn_offset=lsn_offset,
                pgcookie=pgcookie,
                fileid=fileid,
                nofile=nofile,
                max_pages=max_pages,
                mode=mode,
                checksum=checksum,
            ),
        )

    async def sync(self, lsn: object = None) -> SyncResult:
        """Write every dirty page in the pool, then fsync every file with page writes no fsync
        has covered yet, by any process (memp_sync).

        Every page write of a file opened with ``lsn_offset`` first makes the environment's log
        durable up to the largest page LSN of its batch (the write-ahead rule; a failed log
        flush leaves those pages dirty and raises). ``lsn`` (an :class:`aiodbenv.LSN`) needs a
        log (:class:`~aiodbenv.errors.InvalidArgument` without one, or for anything but a pair
        of unsigned 32-bit ints): as in Berkeley DB, every dirty page is written whatever the
        LSN, and the result's ``lsn`` is the largest page LSN written (``LSN(0, 0)`` if none
        carried one); an ``lsn`` past the end of the log is an InvalidArgument (Berkeley DB
        accepts it unchecked), as for ``log.flush(lsn)``. Pages pinned while dirty cannot be
        written: the call writes everything else, then raises
        :class:`~aiodbenv.errors.Incomplete` (``DB_INCOMPLETE``; retry after they are unpinned).
        Pages another process is writing are waited for up to ``wait_timeout`` seconds (a dead
        writer's are taken over and written here), then reported the same way, naming the
        writer's pid. A failed write leaves its page dirty and raises
        (:class:`~aiodbenv.errors.NoSpace` on a full disk); a failed fsync panics the
        environment and raises :class:`~aiodbenv.errors.RunRecovery`. Pages of other processes'
        temporary files and of nofile files are not written. Cancellation: writes and fsyncs
        already under way (with their log flushes) finish; untouched pages stay dirty.
        """
        self._check()
        if lsn is not None:
            hooks = self._io.log
            if hooks is None:
                raise InvalidArgument(
                    "sync(lsn) needs a log, and this environment has none: call sync() "
                    "without one, or open the environment with log=True"
                )
            if not (
                isinstance(lsn, tuple)
                and len(lsn) == 2
                and all(type(x) is int and 0 <= x < 1 << 32 for x in lsn)
            ):
                raise InvalidArgument(f"sync(lsn): lsn must be an aiodbenv.LSN, not {lsn!r}")
            end = tuple(await hooks.end())
            if tuple(lsn) > end:
                # Berkeley DB accepts it unchecked; like log.flush(lsn), refuse it here.
                raise InvalidArgument(
                    f"sync(lsn): LSN {hooks.lsn(*lsn)} is past the end of the log "
                    f"({hooks.lsn(*end)})"
                )
        self._core.meta_words[self._hs + HANDLE_STATS.word.sync_calls] += 1
        result = await write_back(self, files=None, fsync=True, reason="sync")
        if self._io.log is not None:
            result.lsn = self._io.log.lsn(*(result.lsn or (0, 0)))
        return result

    async def trickle(self, pct: int) -> int:
        """Write just enough dirty pages that ``pct`` percent of the cache's pages are clean
        (memp_trickle); returns how many were written. ``pct`` must be 1..100.

        Cancellation: pages already handed to a write finish it; the call returns nothing.
        """
        self._check()
        if type(pct) is not int or not 1 <= pct <= 100:
            raise InvalidArgument(f"trickle percentage must be 1..100, not {pct!r}")
        return await trickle(self, pct)

    def stat(self) -> PoolStat:
        """The pool's statistics (memp_stat): DB_MPOOL_STAT with per-file DB_MPOOL_FSTAT,
        summed over every process.

        It visits every hash bucket to count the pinned and dirty buffers: about 2 ms per
        64 MiB of cache here, so a cache of gigabytes holds the calling thread for tens of
        milliseconds. On an event loop, call it as ``await asyncio.to_thread(env.pool.stat)``
        for such a cache (the walk runs without the GIL; a ``prometheus_client`` scrape
        thread does the same). The counts are no atomic snapshot: they are summed while every
        process goes on pinning and writing.

        A private environment's buffers have no mutexes, so its statistics can only be read
        on the thread of the event loop it was opened on: from any other thread this raises
        :class:`~aiodbenv.InvalidArgument` (as :meth:`PoolFile.stat` does)."""
        self._check()
        env = self._env_core
        reaper = tuple(
            env.env_field(name) for name in ("procs_reaped", "pins_reclaimed", "dirty_inherited")
        )
        return pool_stat(self._core, reaper)  # type: ignore[arg-type]

    async def _close_files(self) -> Exception | None:
        """Close every file this handle opened: a page a caller left pinned is unpinned with
        the flags set on it. Every file is tried; the first failure is returned, not raised,
        so that the environment's close can make its final writes first (they must see the
        pages those unpins marked dirty)."""
        # From here no file opens (a page written to one after the final writes was lost in a
        # private environment), and the opens under way end first, so that none is missed.
        self._no_opens = True
        since = time.monotonic()
        while self._opening:
            await self._wait_change(0.01)
            since = self._say_waiting(
                since,
                self._opening,
                "file open(s) under way to end; is one blocked (a FIFO, a hung file system)?",
            )
        failed: Exception | None = None
        for f in list(self._io.files):
            try:
                await f.close()
            except Exception as err:  # handed to the caller
                failed = failed or err
        return failed

    async def _close(self) -> None:
        """Close every file this handle opened and detach (at Env close). New calls fail with
        InvalidArgument from here on; waiting pins are woken and give up; reads and writes
        under way finish first."""
        if self._closed:
            return
        self._closing = True
        self._notify()
        task, self._reaper_task = self._reaper_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._wake_all_frames()
        if self._frame_poll is not None:
            self._frame_poll.cancel()
            self._frame_poll = None
        await self._quiesce()
        try:
            failed = await self._close_files()
            await self._io.close_all()
            if failed is not None:
                raise failed
        finally:
            self._closed = True
            # Every latch of this handle went with its files (transactions never ended
            # included): nothing is known of them any more.
            self._latch_tasks.clear()
            self._latch_waits.clear()
            self._latch_reads.clear()
            if not self._env_core.panicked:
                # With an async back-off: a pool mutex held by a stopped process must not
                # freeze the loop. At wait_timeout the handle's counters stay linked (stat
                # keeps counting them) and the close goes on.
                try:
                    await self._locked(self._core.detach_handle, self._hs, check=False)
                except LockTimeout as err:
                    logger.warning("closing the pool left its statistics block: %s", err)
