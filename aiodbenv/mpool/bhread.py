"""Reading a page into its frame (Berkeley DB's mp_bh.c, ``__memp_pgread``).

A new page, or one the OS page cache holds (``RWF_NOWAIT``), is filled at once on the loop; a
read that must go to the disk runs in a worker thread through the buffer I/O owner's read
batcher, as a task of the pool so that a cancelled caller never leaves a buffer half read.
Waiters for a page being read poll until it is published (or failed), and take over a read
whose reader died.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from typing import Any

from .. import _io
from .._process import is_alive
from ..errors import (
    LockTimeout,
    PageCorrupt,
    PageNotFound,
    TryAgain,
)
from ..region.mutex import BUSY
from . import accel
from .cache import Cache
from .checksum import verify as verify_checksum
from .fget import MODE_GET, MODE_LAST, MODE_NEW, PageAccess
from .frames import PoolFrames
from .layout import (
    BH,
    BH_DIRTY,
    BH_FAILED,
    BH_READING,
    BUCKET,
    FILE_ENTRY,
    FILE_STATS,
    PINS_HALF,
)
from .readers import ReaderThreads
from .uring import UringReader

__all__ = ["PoolReads"]

_ZEROS: dict[int, bytes] = {}

#: The compiled publish of a page read whole (aiodbenv/_csrc/40_miss.c), or None.
_c_publish = accel.miss_publish
_EOWNERDEAD = -errno.EOWNERDEAD


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z


def _verify(f: PageAccess, pgno: int, view: memoryview) -> None:
    """Check a page just read from a checksummed file (before pgin)."""
    if not verify_checksum(pgno, view):
        raise PageCorrupt(
            f"page {pgno} of {f._path!r} fails its checksum: the page on disk is torn or corrupt",
            path=f._path,
            pgno=pgno,
        )


class PoolReads(PoolFrames):
    """A pool handle's page reads: fill, publish, fail, and wait for another's read."""

    async def _fill(
        self,
        f: PageAccess,
        cache: Cache,
        b: int,
        bh: int,
        pgno: int,
        mode: int,
        nowait: bool = True,
    ) -> None:
        """Read (or zero) the freshly inserted buffer ``bh`` of page ``pgno``, then publish it.

        A new page, or one the OS page cache holds, is done at once, without an await. A read
        that must go to the disk runs as its own task: if the caller is cancelled, the read
        still completes (other waiters may want the page) and the caller's pin is dropped
        afterwards. ``nowait=False``: straight to the disk read (the compiled miss found the OS
        page cache without the page, or skipped asking while misses keep going to the disk).
        """
        try:
            done = nowait and self._attempt(self._fill_now, f, cache, b, bh, pgno, mode)
            if done is BUSY:
                done = await self._locked(self._fill_now, f, cache, b, bh, pgno, mode)
            if done:
                return
        except (LockTimeout, asyncio.CancelledError):
            # Out of lock attempts (or cancelled between them): the buffer was neither
            # published nor failed. Fail it, so that its waiters try again.
            self._settle(self._fail_read, cache, b, bh)
            raise
        reader = self._io.reader
        if isinstance(reader, ReaderThreads | UringReader) and f._fd is not None:
            await self._fill_by_thread(reader, f._fd, f, cache, b, bh, pgno, mode)
            return
        job = self._io.spawn(self._fill_job(f, cache, b, bh, pgno, mode))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            if job.done():
                self._drop_abandoned_pin(job, f, cache, b, bh)
            else:
                job.add_done_callback(lambda j: self._drop_abandoned_pin(j, f, cache, b, bh))
            raise

    def _fill_now(self, f: PageAccess, cache: Cache, b: int, bh: int, pgno: int, mode: int) -> bool:
        """Fill the buffer without waiting if possible; False if the disk must be read."""
        ps = f.page_size
        fd = f._fd
        new = mode == MODE_NEW or fd is None
        if not new and (fd is None or fd in self._io.no_nowait):
            return False
        start = bh + BH.size
        view = cache.buf[start : start + ps]
        try:
            if new:
                view[:] = _zeros(ps)
                created = True
            else:
                assert fd is not None
                try:
                    n = int(_io.preadv(fd, [view], pgno * ps, os.RWF_NOWAIT))
                except BlockingIOError:
                    return False  # not in the OS page cache
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._io.no_nowait.add(fd)  # this filesystem refuses RWF_NOWAIT
                    return False
                if 0 < n < ps:
                    # Only part of a large page is cached: RWF_NOWAIT stops short of the rest,
                    # which is not the end of the file. The thread reads it whole.
                    return False
                if n == 0:  # past the end of the file: a page the pool knows of, never written
                    self._check_short_read(f, pgno, n, mode)
                    view[:] = _zeros(ps)
                elif f.checksum:
                    _verify(f, pgno, view)
                created = n == 0
            self._apply_pgin(f, pgno, view, mode)
        except BaseException:
            self._fail_read(cache, b, bh)
            raise
        finally:
            view.release()
        self._publish(f, cache, b, bh, created)
        return True

    def _check_short_read(self, f: PageAccess, pgno: int, n: int, mode: int) -> None:
        """A read of page ``pgno`` stopped at the end of the file after ``n`` bytes.

        Zeros are right for a page the pool made (create or new) that was never written: it
        lies past the pages the file had when the pool first opened it. A page the file had
        then, or part of a page, means the file was truncated behind the pool's back: a
        ``get`` without create raises :class:`PageNotFound` rather than hand out zeros as
        data (with create, the page is made again, zero-filled, as Berkeley DB does).
        """
        if mode not in (MODE_GET, MODE_LAST):
            return
        orig = int(f._w0[f._entry + FILE_ENTRY.word.orig_pages])
        if n or pgno < orig:
            raise PageNotFound(
                f"page {pgno} of {f._path!r} is past the end of the file on disk (the file had "
                f"{orig} pages when the pool opened it and was truncated since); use create=True "
                "to make it again"
            )

    def _apply_pgin(self, f: PageAccess, pgno: int, view: memoryview, mode: int) -> None:
        if mode != MODE_NEW and f.ftype:
            pgin = self._io.registry.get(f.ftype, (None, None))[0]
            if pgin is not None:
                pgin(pgno, view, f.cookie)

    def _publish(self, f: PageAccess, cache: Cache, b: int, bh: int, created: bool) -> None:
        """The buffer holds its page: clear READING (a created page is dirty) and wake waiters."""
        w = cache.words
        x = bh >> 3
        bw = cache.bucket_words[b]
        with cache.mutexes[b]:
            flags = w[x + BH.word.flags] & ~BH_READING
            if created and not flags & BH_DIRTY:
                flags |= BH_DIRTY  # a created page exists nowhere else: it must be written
                w[bw + BUCKET.word.dirty] += 1
            w[x + BH.word.flags] = flags
            _io.step("read.publish")  # crash tests: killed with the page read, mutex held
            w[x + BH.word.io_pid] = 0
        self._core.meta_words[
            f._fs + (FILE_STATS.word.page_create if created else FILE_STATS.word.page_in)
        ] += 1
        if self._waiters:
            self._notify()

    def _drop_abandoned_pin(
        self, job: asyncio.Task[None], f: PageAccess, cache: Cache, b: int, bh: int
    ) -> None:
        if job.cancelled() or job.exception() is not None:
            return  # the failure path already dropped the pin
        self._settle(self._release_pin, cache, b, bh)

    def _release_pin(self, cache: Cache, b: int, bh: int) -> None:
        w = cache.words
        x = bh >> 3
        with cache.mutexes[b]:
            if w[x + BH.word.ref] and self._drop_slot_pin(cache, bh):
                w[x + BH.word.ref] -= 1
        self._frame_released()

    def _drop_slot_pin(self, cache: Cache, bh: int) -> bool:
        """Take one pin off this handle's count in buffer ``bh`` (bucket mutex held); False if
        it had none."""
        p = (bh >> 1) + PINS_HALF + self._slot
        halves = cache.halves
        if not halves[p]:
            return False
        halves[p] -= 1
        return True

    async def _fill_job(
        self, f: PageAccess, cache: Cache, b: int, bh: int, pgno: int, mode: int
    ) -> None:
        """Read the page in a worker thread (batched with other reads), then publish it."""
        ps = f.page_size
        start = bh + BH.size
        view = cache.buf[start : start + ps]
        try:
            assert f._fd is not None
            n = await self._io.reader.read(f._fd, view, pgno * ps)
            created = self._check_read(f, pgno, mode, view, n)
        except BaseException:
            self._settle(self._fail_read, cache, b, bh)
            raise
        finally:
            view.release()
        try:
            await self._locked(self._publish, f, cache, b, bh, created)
        except BaseException:
            self._settle(self._fail_read, cache, b, bh)
            raise

    def _check_read(self, f: PageAccess, pgno: int, mode: int, view: memoryview, n: int) -> bool:
        """A blocking read of ``n`` bytes into ``view``: zero-fill past the end of the file,
        verify the checksum, apply pgin. Returns whether the page was created (n == 0)."""
        ps = f.page_size
        if n < ps:  # a blocking read stops short only at the end of the file
            self._check_short_read(f, pgno, n, mode)
            view[n:] = _zeros(ps - n)
        elif f.checksum:
            _verify(f, pgno, view)
        self._apply_pgin(f, pgno, view, mode)
        return n == 0

    async def _fill_by_thread(
        self,
        reader: ReaderThreads | UringReader,
        fd: int,
        f: PageAccess,
        cache: Cache,
        b: int,
        bh: int,
        pgno: int,
        mode: int,
    ) -> None:
        """Read the page through io_uring or in a reader thread. Its completion, called on
        the loop, checks and publishes the page (or fails the read) before the caller resumes:
        no task, and one turn of the loop between the read and the caller.

        Cancellation: the read and its publication go on for the page's other waiters; the
        caller's pin is dropped once the page is published (a failed read drops it itself).
        """
        loop = asyncio.get_running_loop()
        ps = f.page_size
        view = cache.buf[bh + BH.size : bh + BH.size + ps]
        waiter: asyncio.Future[None] = loop.create_future()
        # Closing the file or the pool waits for it. Counted as I/O under way by hand, not by
        # track(): its done callback would cost a turn of the loop per read.
        finished: asyncio.Future[None] = loop.create_future()
        tasks = self._io.tasks
        tasks.add(finished)

        def settle(err: BaseException | None) -> None:
            # Published (err None), or failed with our pin dropped.
            # Out of the set whatever became of the future: one left there done (cancelled,
            # say) would make every later close loop on it.
            tasks.discard(finished)
            if not finished.done():
                finished.set_result(None)
            if waiter.done():  # the caller was cancelled: its pin goes now
                if err is None:
                    self._settle(self._release_pin, cache, b, bh)
                return
            if err is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(err)

        def published_later(task: asyncio.Task[None]) -> None:
            err = asyncio.CancelledError() if task.cancelled() else task.exception()
            if err is not None:
                self._settle(self._fail_read, cache, b, bh)
            settle(err)

        submitted = False
        # A page with nothing to check or convert, read whole, is published by one compiled
        # call (the miss context of its cache holds what that needs): no Python critical
        # section on the loop per disk read.
        ctxs: list[Any] = getattr(f, "_miss_ctx", None) or []
        plain = bool(ctxs) and not f.checksum

        def done(res: int | BaseException) -> None:
            if submitted:
                # Called from the loop after the read waited: the loop had its turn. Not when
                # io_uring completed the read within the submit (the page was there by then):
                # nothing yielded, and a run of such misses must still let the loop run.
                self._loop_had_turn()
            if (
                plain
                and res == ps
                and not _io._signal_plan  # crash tests stop at the Python publish's step
                and (not f.ftype or self._io.pgin(f.ftype) is None)
            ):
                view.release()
                if self._publish_read(f, ctxs, cache, b, bh, settle):
                    return
                created = False
            else:
                try:
                    if isinstance(res, BaseException):
                        raise res
                    created = self._check_read(f, pgno, mode, view, res)
                except BaseException as err:
                    self._settle(self._fail_read, cache, b, bh)
                    settle(err)
                    return
                finally:
                    view.release()
            try:
                busy = self._attempt(self._publish, f, cache, b, bh, created) is BUSY
            except BaseException as err:
                self._settle(self._fail_read, cache, b, bh)
                settle(err)
                return
            if busy:  # the bucket is held: publish with the async back-off
                job = self._io.spawn(self._locked(self._publish, f, cache, b, bh, created))
                job.add_done_callback(published_later)
            else:
                settle(None)

        try:
            reader.submit_call(fd, view, pgno * ps, done)
            submitted = True
        except BaseException as err:
            view.release()
            self._settle(self._fail_read, cache, b, bh)
            settle(err)
            raise
        self._reading += 1  # waits for the disk: takes no share of the misses' budget
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Published just before the cancellation reached us: the pin is ours to drop.
                self._settle(self._release_pin, cache, b, bh)
            raise
        finally:
            self._reading -= 1

    def _publish_read(
        self,
        f: PageAccess,
        ctxs: list[Any],
        cache: Cache,
        b: int,
        bh: int,
        settle: Callable[[BaseException | None], None],
    ) -> bool:
        """Publish a page read whole in one compiled call. True if it is done (published,
        or failed with ``settle`` told); False if the Python publish must do it (the bucket
        is busy, or the buffer is not as the call expects)."""
        rc = _c_publish(ctxs[cache.index], b, bh)
        if rc == 0:
            if self._waiters:
                self._notify()
            settle(None)
            return True
        try:
            if rc == accel.CORRUPT:
                cache.corrupt(f"buffer {bh} of bucket {b} fails its check after a read")
            if rc == _EOWNERDEAD:
                cache.release_dead_holder(b)  # repairs the bucket (or panics and raises)
        except BaseException as err:
            try:
                self._settle(self._fail_read, cache, b, bh)
            finally:
                settle(err)  # the caller (and a close waiting for the read) always hears
            return True
        return False

    def _fail_read(self, cache: Cache, b: int, bh: int) -> None:
        """A read failed: unlink the buffer, flag it failed for waiters, drop our pin."""
        w = cache.words
        x = bh >> 3
        with cache.mutexes[b]:
            cache.unlink(b, bh)
            w[x + BH.word.flags] = BH_FAILED
            if self._drop_slot_pin(cache, bh):
                w[x + BH.word.ref] -= 1
            last = w[x + BH.word.ref] == 0
        if last:
            self._settle(self._core.free_buffer, cache, bh)
            self._frame_released()
        self._notify()

    async def _await_read(self, cache: Cache, b: int, bh: int, f: PageAccess) -> bool:
        """Wait (holding a pin) until another reader finishes ``bh``. False if its read failed
        (our pin is then dropped and the buffer freed by the last one out)."""
        w = cache.words
        x = bh >> 3
        delay = 0.00005
        checked = time.monotonic()
        deadline = checked + self.wait_timeout
        try:
            while w[x + BH.word.flags] & BH_READING:
                await self._wait_change(delay)
                self._check()  # closing: give the pin back (below) and leave
                delay = min(delay * 2, 0.002)
                now = time.monotonic()
                if now - checked > 0.5:
                    checked = now
                    await self._locked(self._adopt_dead_read, cache, b, bh, f)
                if now >= deadline and w[x + BH.word.flags] & BH_READING:
                    pid = int(w[x + BH.word.io_pid])
                    who = "this process" if pid == self._pid else f"process {pid}"
                    raise TryAgain(
                        f"page {int(w[x + BH.word.pgno])} of {f._path!r} has been being read by "
                        f"{who} for over {self.wait_timeout} s (alive, but not finishing: "
                        "stopped or stuck in I/O?); try again later"
                    )
        except BaseException:
            self._settle(self._release_failed_or_pin, cache, b, bh)
            raise
        if w[x + BH.word.flags] & BH_FAILED:
            self._settle(self._release_failed_or_pin, cache, b, bh)
            return False
        return True

    def _release_failed_or_pin(self, cache: Cache, b: int, bh: int) -> None:
        w = cache.words
        x = bh >> 3
        with cache.mutexes[b]:
            if self._drop_slot_pin(cache, bh):
                w[x + BH.word.ref] -= 1
            last = w[x + BH.word.ref] == 0 and w[x + BH.word.flags] & BH_FAILED
        if last:
            self._settle(self._core.free_buffer, cache, bh)
        self._frame_released()

    def _adopt_dead_read(self, cache: Cache, b: int, bh: int, f: PageAccess) -> None:
        """If the process reading ``bh`` died, fail its read so that the waiters retry."""
        w = cache.words
        x = bh >> 3
        pid = int(w[x + BH.word.io_pid])
        if not pid or pid == self._pid or is_alive(pid):
            return
        if self._env_core.registry is not None:
            self._reap()  # fails the dead reader's read and drops its pin, by its slot
            return
        with cache.mutexes[b]:
            if not (w[x + BH.word.flags] & BH_READING and w[x + BH.word.io_pid] == pid):
                return
            cache.unlink(b, bh)
            w[x + BH.word.flags] = BH_FAILED
            w[x + BH.word.ref] -= 1  # the dead reader's pin
