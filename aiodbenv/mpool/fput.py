"""Unpinning pages (Berkeley DB's mp_fput.c): mark dirty or clean, drop the pin, stamp the
buffer's priority when its last pin goes. In C when the compiled accelerator is installed
(``aiodb_unpin_at``), else in Python; a bucket mutex that stays held defers the release to a
task of the pool rather than block the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from .. import _io
from ..errors import (
    InvalidArgument,
    LockTimeout,
    PermissionDenied,
)
from ..region.mutex import STEP_WAIT
from ..region.mutex import trylock as _trylock
from . import accel
from .cache import Cache
from .fget import B_DIRTY, C_BUFFERS, C_LRU, H_FLAGS, H_PRIO, H_REF, RELEASED_BY_CLOSE, PageAccess
from .layout import (
    BH_DIRTY,
    BH_REDIRTIED,
    BH_WRITING,
)
from .page import PAGE_CLEAN, PAGE_DIRTY, PAGE_DISCARD, Page

__all__ = ["PageRelease", "view_exported"]

logger = logging.getLogger("aiodbenv")

_c_unpin = accel.unpin_at  # the compiled unpin, when installed
_CRASH_STEPS = bool(_io._signal_plan)  # crash tests: killed mid-unpin


def view_exported(pgno: int) -> None:
    """An unpin met a buffer still taken from ``page.data`` (``memoryview.release`` raised
    BufferError). The view cannot be taken back, so it is left to its holder, who now reads
    memory the pool may give to another page; the pin is released all the same, since keeping
    it would hold the frame for good (the environment could not close)."""
    logger.warning(
        "page %d was unpinned while a buffer taken from its page.data was still held: that "
        "buffer now refers to memory the pool may reuse; release it before the unpin",
        pgno,
    )


class PageRelease(PageAccess):
    """The unpin side of a :class:`~aiodbenv.mpool.file.PoolFile`."""

    def _disarm(self) -> None:
        super()._disarm()
        self._unpin = self._refuse_forked  # type: ignore[method-assign,assignment]
        hotc = getattr(self, "_hotc", None)  # PoolFile's compiled hot path, if any
        if hotc is not None:
            hotc.disable()

    def _check_flags(self, page: Page, flags: int) -> None:
        """Raise the error a bad unpin or set deserves (called only when something is off)."""
        if page._file is not self:
            raise InvalidArgument(f"page {page.pgno} belongs to another file handle")
        if page._bh == RELEASED_BY_CLOSE:
            raise InvalidArgument(
                f"page {page.pgno} of {self._path or '(temporary file)'} was already unpinned "
                "when its file (or environment) was closed"
            )
        if page._bh < 0:
            raise InvalidArgument(f"page {page.pgno} is not pinned: more unpins than pins")
        if flags & PAGE_DIRTY and flags & PAGE_CLEAN:
            raise InvalidArgument("clean and dirty exclude each other")
        if flags & PAGE_DIRTY and self.readonly:
            raise PermissionDenied(f"dirty flag set for page {page.pgno} of a read-only file")

    @staticmethod
    def _apply_dirty(w: memoryview, x: int, bw: int, flags: int) -> None:
        bh_flags = w[x + H_FLAGS]
        if flags & PAGE_DIRTY:
            # Dirtied while a copy is being written: that copy is stale, and its write must
            # not clean the page (the Python form of aiodb_unpin_at).
            new = bh_flags | BH_DIRTY | (BH_REDIRTIED if bh_flags & BH_WRITING else 0)
            if not bh_flags & BH_DIRTY:
                w[bw + B_DIRTY] += 1
            if new != bh_flags:
                w[x + H_FLAGS] = new
        elif flags & PAGE_CLEAN and bh_flags & BH_DIRTY:
            w[x + H_FLAGS] = bh_flags & ~(BH_DIRTY | BH_REDIRTIED)
            # Wraps at 0 as the compiled twin does; write-back's walk reports the count.
            w[bw + B_DIRTY] = (w[bw + B_DIRTY] - 1) & 0xFFFFFFFFFFFFFFFF

    def _unpin(self, page: Page, flags: int) -> asyncio.Task[None] | None:
        """Drop the pin of ``page``. Returns None when done, or, if the bucket's mutex was
        held past a few milliseconds, the pool task that finishes the release (await it to
        see it through; see :meth:`_release_py`)."""
        bh = page._bh
        if (
            page._file is not self
            or bh < 0
            or (flags & PAGE_DIRTY and (flags & PAGE_CLEAN or self.readonly))
        ):
            if flags & PAGE_DIRTY and self.readonly and not flags & PAGE_CLEAN:
                self._check_flags(page, 0)  # a page of another handle, or not pinned
                # Dirty on a read-only file: refused, but the pin goes all the same (without
                # the mark). Kept, it would hold its frame for good, and every close of the
                # file (and of the environment) would meet it again and fail.
                # A release left pending finishes in the pool's background (it logs a failure).
                self._unpin(page, flags & ~PAGE_DIRTY)
                raise PermissionDenied(
                    f"dirty flag set for page {page.pgno} of a read-only file; the page was "
                    "unpinned without it"
                )
            self._check_flags(page, flags)
        if flags & PAGE_DIRTY:
            self._pool._note_dirty(self.page_size)
        page._bh = -1
        self._pins.discard(page)
        try:
            page.data.release()
        except BufferError:
            view_exported(page.pgno)  # the pin is released all the same: no frame leaks
        cache = page._cache
        if cache is None:  # a mapped page: nothing in the cache to release
            return None
        b = page._bucket
        if _c_unpin is not None:
            r = _c_unpin(
                cache.wptr,
                cache.c_mptrs,
                cache.c_nowait_words,
                cache.c_bucket_words,
                b,
                bh >> 3,
                cache.hdr,
                flags,
                self._slot,
            )
            if r == 1:
                self._pool._frame_released()
                return None
            if r == 0:
                return None
            if r == 2:
                self._pool._panic_unpinned(page.pgno)
            if r == -errno.EOWNERDEAD:
                cache.release_dead_holder(b)
            # contended (or repaired): do it the Python way, which waits for the mutex
        return self._release_py(page.pgno, cache, b, bh, flags)

    def _release_py(
        self, pgno: int, cache: Cache, b: int, bh: int, flags: int
    ) -> asyncio.Task[None] | None:
        """Drop one pin of buffer ``bh`` with PAGE_* ``flags`` (the Python form of the
        compiled ``aiodb_unpin_at``). The bucket mutex is waited for a few milliseconds at most:
        if its holder keeps it (stopped?), the release is finished by a task of the pool that
        backs off and retries up to ``wait_timeout``, returned for the caller to await."""
        try:
            self._release_locked(pgno, cache, b, bh, flags, STEP_WAIT)
        except LockTimeout:
            return self._pool._later(self._release_locked, pgno, cache, b, bh, flags, None)
        return None

    def _release_locked(
        self, pgno: int, cache: Cache, b: int, bh: int, flags: int, wait: float | None
    ) -> None:
        w = cache.words
        x = bh >> 3
        p = cache.mptrs[b]
        if p:
            rc = _trylock(p)
            if rc:
                cache.mutexes[b].acquire_contended(rc, wait)
            else:
                w[cache.nowait_words[b]] += 1
        try:
            if flags & (PAGE_DIRTY | PAGE_CLEAN):
                self._apply_dirty(w, x, cache.bucket_words[b], flags)
            ref = w[x + H_REF]
            p = (bh >> 1) + self._pslot
            halves = cache.halves
            mine = halves[p]
            if ref and mine:
                ref -= 1
                w[x + H_REF] = ref
                if _CRASH_STEPS:
                    _io.step("unpin.counted")
                halves[p] = mine - 1
                if not ref:
                    hdr = cache.hdr
                    counter = w[hdr + C_LRU] + 1
                    w[hdr + C_LRU] = counter
                    if flags & PAGE_DISCARD:
                        w[x + H_PRIO] = 0
                    elif w[x + H_FLAGS] & BH_DIRTY:
                        # Dirty buffers go a little later than clean ones (a tenth of the
                        # cache later), so eviction prefers pages that need no write.
                        w[x + H_PRIO] = counter + w[hdr + C_BUFFERS] // 10 + 1
                    else:
                        w[x + H_PRIO] = counter
                    released = True
                else:
                    released = False
            else:
                released = None  # the shared pin count is already 0: someone over-unpinned
        finally:
            cache.unlock(b)
        if released is None:
            self._pool._panic_unpinned(pgno)
        elif released:
            self._pool._frame_released()
