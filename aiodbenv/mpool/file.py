"""``PoolFile``: a file opened into the pool (memp_fopen's handle, DB_MPOOLFILE).

Its public calls are here; page access (the hit path, the slow path of a pin, unpinning) is
the layer below, :class:`~aiodbenv.mpool.fget.PageAccess`.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from typing import Any, Literal, overload

from ..errors import InvalidArgument
from ..region.mutex import step_waits
from ..txn import latch
from ..txn.ids import next_owner_id
from .fget import MODE_CREATE, MODE_GET, MODE_LAST, MODE_NEW, RELEASED_BY_CLOSE
from .fput import PageRelease
from .layout import FILE_ENTRY, LATCH_READER, MAX_PGNO
from .miss import Missed, disk_frame
from .page import PAGE_CLEAN, PAGE_DIRTY, PAGE_DISCARD, LatchedPinContext, Page, PinContext
from .stat import FileStat, file_stat
from .sync import SyncResult, write_back

__all__ = ["PoolFile"]

logger = logging.getLogger("aiodbenv")


class PoolFile(PageRelease):
    """A file open in the pool. Made by :meth:`aiodbenv.Pool.open_file`.

    Pages are pinned with :meth:`get` (``async with f.get(7) as page``), :meth:`new`,
    :meth:`last` or :meth:`pin`, and unpinned at the end of the ``async with`` block or by
    :meth:`unpin`. A page may be pinned many times, by many coroutines and processes; a pinned
    page is never evicted or moved.
    """

    #: The compiled hot path of this file (:mod:`aiodbenv.mpool.hotpath`), or None.
    _hotc: Any = None

    @property
    def name(self) -> str | None:
        """The file's path, or None for a temporary file."""
        return self._path

    @property
    def pages(self) -> int:
        """Pages the pool knows of (the last page number + 1), counting pages not yet written."""
        return int(self._w0[self._entry + FILE_ENTRY.word.pages])

    @property
    def fileid(self) -> bytes:
        """The 20-byte id that makes every open of this file share one set of pages."""
        return self._core.fileid(self._fidx)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def mapped(self) -> bool:
        """True if pages are served from a read-only memory map of the file (``st_map``)."""
        return self._map is not None

    @overload
    def get(
        self, pgno: int, *, create: bool = False, latch: Literal[False] = False
    ) -> PinContext: ...
    @overload
    def get(
        self, pgno: int, *, create: bool = False, latch: Literal[True]
    ) -> LatchedPinContext: ...
    @overload
    def get(
        self, pgno: int, *, create: bool = False, latch: bool
    ) -> PinContext | LatchedPinContext: ...
    def get(
        self, pgno: int, *, create: bool = False, latch: bool = False
    ) -> PinContext | LatchedPinContext:
        """Pin page ``pgno`` (memp_fget); with ``create``, make it if it does not exist
        (``DB_MPOOL_CREATE``: zero-filled, pgin applied, dirty).

        ``latch=True`` also takes the page's transaction latch until the unpin (waiting, async
        and for at most ``pool.wait_timeout`` seconds, while a transaction holds it): the
        page then never shows part of a commit. A plain pin shows the buffer as it is: a
        commit copying its images in can be seen half done.

        Use as ``async with f.get(pgno) as page`` or ``page = await f.get(pgno)``. Raises
        :class:`~aiodbenv.errors.PageNotFound` for a page past the end without ``create``,
        :class:`~aiodbenv.errors.NoSpace` past ``max_pages``,
        :class:`~aiodbenv.errors.CacheFull` when no frame frees up in time.

        Cancellation: a pin cancelled while its page is being read leaves no pin held; the read
        finishes in the background so that other waiters get the page.
        """
        if type(pgno) is not int or not 0 <= pgno < MAX_PGNO:
            raise InvalidArgument(f"page number must be an int in 0..2**40-1, not {pgno!r}")
        if latch:
            return LatchedPinContext(self, pgno, MODE_CREATE if create else MODE_GET)
        return PinContext(self, pgno, MODE_CREATE if create else MODE_GET)

    async def _pin_latched(self, pgno: int, mode: int, scoped: bool = False) -> Page:
        """Pin and latch (see :meth:`get`). ``scoped``: the ``async with`` form, whose unpin is
        the same task's: the latch is known to be that task's (a wait of that task for it
        again raises Deadlock, see aiodbenv.txn.latch); the ``await`` form's page may be
        handed to another task to unpin. Cancellation: neither pinned nor latched."""
        page = await self._pin(pgno, mode)
        # Flagged a reader's: write-back leaves its buffer alone (see layout.quiet_latch).
        owner = ((self._slot + 1) << 32) | next_owner_id() | LATCH_READER
        try:
            if page._cache is None:
                raise InvalidArgument("pages of a memory-mapped file have no latch")
            await latch.acquire(self._pool, page, owner, 0, -1, self._pool.wait_timeout, None)
        except BaseException:
            pending = self._unpin(page, 0)
            if pending is not None:
                await asyncio.shield(pending)
            raise
        self._latched[page] = owner
        task = asyncio.current_task() if scoped else None
        if task is not None:  # (see latch._waits_for)
            self._pool._latch_tasks[owner] = task
            self._pool._latch_reads.add(owner)
        return page

    def new(self) -> PinContext:
        """Pin a new page at the end of the file (``DB_MPOOL_NEW``): zero-filled, dirty, pgin
        not applied; ``page.pgno`` is its number. No two callers get the same page."""
        return PinContext(self, -1, MODE_NEW)

    def last(self) -> PinContext:
        """Pin the last page of the file (``DB_MPOOL_LAST``)."""
        return PinContext(self, -1, MODE_LAST)

    async def pin(
        self,
        pgno: int | None = None,
        *,
        create: bool = False,
        new: bool = False,
        last: bool = False,
    ) -> Page:
        """The explicit form of :meth:`get`, :meth:`new` and :meth:`last`: returns the pinned
        page; unpin it with :meth:`unpin`. ``create``, ``new`` and ``last`` exclude each other
        (``InvalidArgument``)."""
        if create + new + last > 1:
            raise InvalidArgument("create, new and last exclude each other")
        if new or last:
            if pgno is not None:
                raise InvalidArgument("new and last choose the page number themselves")
            return await self._pin(-1, MODE_NEW if new else MODE_LAST)
        if type(pgno) is not int or not 0 <= pgno < MAX_PGNO:
            raise InvalidArgument(f"page number must be an int in 0..2**40-1, not {pgno!r}")
        return await self._pin(pgno, MODE_CREATE if create else MODE_GET)

    async def _pin(self, pgno: int, mode: int, missed: Missed | None = None) -> Page:
        self._check()
        pool = self._pool
        pool._enter()
        try:
            frame = disk_frame(missed)
            if frame:
                cache, b = self._core.locate(self._fidx, pgno)
                pool._got_frame()
                await pool._fill(self, cache, b, frame, pgno, mode, nowait=False)
                page = self._page(cache, b, frame, pgno)
            else:
                page = await self._pin_slow(pgno, mode, missed)
        finally:
            pool._leave()
        if self._closed or pool._closing:
            # The file or the environment began closing while this pin waited: a page handed
            # out now would be unpinned under the caller at once. Give it back instead.
            self._unpin(page, 0)
            what = "file" if self._closed else "environment"
            raise InvalidArgument(f"the {what} was closed while the pin waited")
        return page

    async def unpin(
        self, page: Page, *, dirty: bool = False, clean: bool = False, discard: bool = False
    ) -> None:
        """Unpin ``page`` (memp_fput). ``dirty``: it was changed and must be written before
        its buffer is reused; ``clean``: forget earlier changes; ``discard``: evict it first.
        Flags set with :meth:`Page.mark_dirty` and friends also apply.

        Raises :class:`~aiodbenv.errors.InvalidArgument` for ``clean`` with ``dirty`` or a page
        that is not pinned (more unpins than pins, or one that closing its file or environment
        unpinned already), :class:`~aiodbenv.errors.PermissionDenied` for ``dirty`` on a
        read-only file. Never awaits I/O. It awaits only when the page's bucket mutex is held
        by another process for more than a few milliseconds: the release then backs off and
        retries without blocking the event loop, and raises
        :class:`~aiodbenv.errors.LockTimeout` naming the holder after ``pool.wait_timeout``
        seconds (the pin then stays counted in the region). Cancellation: the page is unpinned
        for the caller at once either way; a release still waiting for the mutex finishes in
        the background.
        """
        if self._latched:
            owner = self._latched.pop(page, 0)
            if owner:
                latch.release(page, owner)
                latch.forget_read(self._pool, owner)
                latch.wake(self._pool, page)
        flags = page._flags
        if dirty and clean:
            flags = PAGE_DIRTY | PAGE_CLEAN  # refused by _unpin's check
        elif dirty:
            flags = (flags & ~PAGE_CLEAN) | PAGE_DIRTY
        elif clean:
            flags = (flags & ~PAGE_DIRTY) | PAGE_CLEAN
        if discard:
            flags |= PAGE_DISCARD
        pending = self._unpin(page, flags)
        if pending is not None:
            await asyncio.shield(pending)

    def set(
        self, page: Page, *, dirty: bool = False, clean: bool = False, discard: bool = False
    ) -> None:
        """Set a pinned page's flags without unpinning it (memp_fset): ``dirty`` and ``clean``
        apply at once, ``discard`` when the page is unpinned. At least one flag is required.

        Synchronous, so it never waits long: if another process holds the page's bucket
        mutex, this waits for it at most ``aiodbenv.region.mutex.STEP_WAIT`` (2 ms; everyone
        holds a bucket mutex for microseconds, so only a stopped or stuck holder gets this
        far), then raises :class:`~aiodbenv.errors.LockTimeout` (a
        :class:`~aiodbenv.errors.TryAgain`) naming the holder, with nothing changed: call it
        again later, or pass the flag to :meth:`unpin`, which waits for the mutex without
        blocking the event loop. It does not defer the change: a page whose dirty mark
        waited for its unpin would be missed by a ``sync()`` made meanwhile."""
        if self._forked:
            self._refuse_forked()
        if not (dirty or clean or discard):
            raise InvalidArgument("set needs at least one of dirty, clean, discard")
        self._check_flags(page, (PAGE_DIRTY if dirty else 0) | (PAGE_CLEAN if clean else 0))
        cache = page._cache
        if (dirty or clean) and cache is not None:
            w = cache.words
            # First, and one short wait only (never a blocking one on the event loop): a
            # LockTimeout leaves nothing changed.
            with step_waits(), cache.mutexes[page._bucket]:
                self._apply_dirty(
                    w,
                    page._bh >> 3,
                    cache.bucket_words[page._bucket],
                    PAGE_DIRTY if dirty else PAGE_CLEAN,
                )
        if dirty:
            self._pool._note_dirty(self.page_size)
        if discard:
            page._flags |= PAGE_DISCARD

    async def sync(self) -> SyncResult:
        """Write every dirty page of this file and fsync it if it has page writes no fsync
        has covered yet, by any process (memp_fsync).

        Raises :class:`~aiodbenv.errors.Incomplete` if pinned dirty pages could not be written,
        or another process's write of some did not finish within the pool's ``wait_timeout``
        (retry later); a failed write leaves its page dirty and raises; a failed fsync panics
        the environment (:class:`~aiodbenv.errors.RunRecovery`). Cancellation: pages already
        handed to a write finish it; the rest stay dirty.
        """
        self._check()
        return await write_back(self._pool, files={self._fidx}, fsync=True, reason="fsync")

    async def close(self) -> None:
        """Close the file (memp_fclose). No implied sync: dirty pages stay in the cache and are
        written by eviction, sync or trickle from any process, except those of a temporary file,
        which are dropped (with its backing file). A transaction of this process inside a
        commit with pages of this file is waited for first (its images land, its pages are
        released; up to the pool's ``wait_timeout``, then LockTimeout and nothing is closed);
        other transactions lose their pages of it (their commit is refused). Pages still pinned
        through this handle are unpinned. Closing twice is harmless. In a forked child:
        ForkedProcessError.

        Cancellation: once the close has begun (the file is ``closed`` from its first step), it
        finishes in a task of the pool (which closing the environment waits for): the handle's
        entry is given back and its descriptor closed; the caller gets CancelledError. A close
        cancelled before it began did nothing: close again.
        """
        if self._forked:
            self._refuse_forked()
        if self._closed:
            return
        if self._latched and self._pool._committing:
            committing, latched = self._pool._committing, self._latched
            await self._pool._wait_commits(
                lambda: any(owner in committing for owner in latched.values()),
                self._path or "a temporary file",
            )
            if self._closed:
                return
        if self._pins:
            self._warn_pinned()
        pending = []
        for page, owner in self._latched.items():
            latch.release(page, owner)
            latch.forget_read(self._pool, owner)
            latch.wake(self._pool, page)
        self._latched.clear()
        # A dirty mark on a page of a read-only file cannot apply: it is dropped here, where
        # the pin must go whatever it carries (an unpin would refuse it, after the release).
        keep = ~PAGE_DIRTY if self.readonly else -1
        for page in list(self._pins):
            task = self._unpin(page, page._flags & keep)
            page._bh = RELEASED_BY_CLOSE
            if task is not None:
                pending.append(task)
        self._closed = True
        self._hot = False
        if self._hotc is not None:
            self._hotc.disable()
        await self._pool._to_end(self._finish_close(pending), "closing a file")

    async def _finish_close(self, pending: list[asyncio.Task[None]]) -> None:
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)  # failures are logged
        await self._pool._close_file(self)

    def _warn_pinned(self) -> None:
        """Closing with pages still pinned is a leak in the caller (a pin never released):
        say which pages, in the log and as a ResourceWarning."""
        pgnos = sorted({p.pgno for p in self._pins})
        shown = ", ".join(map(str, pgnos[:20])) + (", ..." if len(pgnos) > 20 else "")
        text = (
            f"closing {self._path or '(temporary file)'} with {len(self._pins)} pin(s) still "
            f"held on page(s) {shown}; they are unpinned now (with the flags set on them)"
        )
        logger.warning("aiodbenv: %s", text)
        warnings.warn(text, ResourceWarning, stacklevel=3)

    def stat(self) -> FileStat:
        """This file's statistics (its DB_MPOOL_FSTAT), summed over every process. In a private
        environment, only on its event loop's thread (see :meth:`Pool.stat`)."""
        self._check()
        return file_stat(self._core, self._fidx)

    async def __aenter__(self) -> PoolFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<PoolFile {self._path!r} page_size={self.page_size}>"
