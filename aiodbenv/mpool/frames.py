"""Getting a frame for a page (Berkeley DB's mp_alloc.c, its waiting half).

A miss needs a frame: free space in the cache, else a victim (written first if dirty, through
the buffer I/O owner), else a wait for an unpin, first come first served, with a poll for
frames other processes release. The synchronous choice of a victim is
:meth:`aiodbenv.mpool.alloc.PoolCore.find_victim`; this layer does the waiting and the writing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

from .._process import is_alive
from ..errors import (
    CacheFull,
    LockTimeout,
    NoSpace,
)
from ..region.mutex import BUSY, attempt, step_waits
from . import csync
from .bhwrite import write_items
from .cache import BufRef, Cache
from .handle import POLL_MAX, POLL_MIN, PoolBase
from .layout import (
    BH,
    BH_DIRTY,
    BH_WRITING,
    BUCKET,
    HANDLE_STATS,
)
from .sync import take_over_claim
from .victims import dirty_met, write_lru_batch

__all__ = ["PoolFrames"]

logger = logging.getLogger("aiodbenv")

#: Back-off between failed writes of dirty victims (a full or failing disk): first, longest.
_WRITE_RETRY_MIN = 0.001
_WRITE_RETRY_MAX = 0.1


class PoolFrames(PoolBase):
    """A pool handle's frames: allocation, eviction and the queue of frame waiters."""

    def _wake_all_frames(self) -> None:
        """Wake every frame waiter (the pool is closing: they leave)."""
        q = self._frame_queue
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(None)

    def _arm_frame_poll(self) -> None:
        if self._frame_poll is None and self._frame_queue:
            self._frame_poll = asyncio.get_running_loop().call_later(
                self._frame_poll_delay, self._poll_frames
            )

    def _poll_frames(self) -> None:
        # Frames released in other processes wake nobody here: wake the first waiter now and
        # then to look (backing off while nothing turns up; a frame found resets the step).
        self._frame_poll = None
        q = self._frame_queue
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(None)
                self.frame_polls += 1
                break
        self._frame_poll_delay = min(self._frame_poll_delay * 2, POLL_MAX)
        self._arm_frame_poll()

    async def _wait_frame_turn(self, first: bool, timeout: float) -> None:
        """Queue for a frame and wait to be woken (or ``timeout`` seconds). ``first`` keeps
        the front of the queue for a waiter whose turn just came to nothing.

        Cancellation: the waiter leaves the queue; a wake-up it had already received is
        passed on to the next waiter, so that no released frame goes unnoticed.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            self._frame_queue.appendleft(fut)
        else:
            self._frame_queue.append(fut)
        self._arm_frame_poll()
        self._frame_waiting += 1
        try:
            await asyncio.wait((fut,), timeout=timeout)
        except BaseException:
            if fut.done():
                self._frame_released()  # hand the wake-up on
            raise
        finally:
            self._frame_waiting -= 1
            if not fut.done():
                fut.cancel()
                try:
                    self._frame_queue.remove(fut)
                except ValueError:
                    pass

    async def _get_frame(self, cache: Cache, page_size: int) -> int:
        """A buffer of ``page_size`` bytes in ``cache``: free space, else an evicted victim
        (written first if dirty), else wait for an unpin (or CacheFull if ``fail_fast``).

        Waiters are served in order: a newcomer queues behind those already waiting, and
        each released frame wakes one of them. Gives up after ``wait_timeout`` seconds with
        :class:`CacheFull`, or :class:`NoSpace` if the victims' writes kept failing with a
        full disk (failed writes are retried with a back-off, not in a spin).
        """
        core = self._core
        deadline: float | None = None
        turn = not self._frame_queue  # somebody queued first: wait behind them
        write_delay = _WRITE_RETRY_MIN
        write_error: BaseException | None = None
        registered = self._io.registry  # what victim choice needs to know of this process
        while True:
            if turn:
                off = self._attempt(core.alloc_buffer, cache, page_size)
                if off is BUSY:
                    off = await self._locked(core.alloc_buffer, cache, page_size)
                if off:
                    self._got_frame()
                    return off
                victim = self._attempt(core.find_victim, cache, registered, False)
                if victim is BUSY:
                    victim = await self._locked(core.find_victim, cache, registered, False)
                if victim is None:
                    victim = self._attempt(core.find_victim, cache, registered, True)
                    if victim is BUSY:
                        victim = await self._locked(core.find_victim, cache, registered, True)
                if core.dirty_met:  # a dirty best passed over: write such pages meanwhile
                    core.dirty_met = False
                    dirty_met(self, cache)
                if victim is not None:
                    written = False
                    if victim.dirty:
                        written, err = await self._write_victim(victim)
                        self._check()
                        if not written:
                            # The disk refuses the write (the page stays dirty): back off and
                            # try again, until wait_timeout.
                            write_error = err or write_error
                            now = time.monotonic()
                            if deadline is None:
                                deadline = now + self.wait_timeout
                            elif now >= deadline:
                                self._give_up_writing(write_error)
                            await asyncio.sleep(min(write_delay, max(0.0, deadline - now)))
                            write_delay = min(write_delay * 2, _WRITE_RETRY_MAX)
                            self._check()
                            continue
                    unlinked = self._attempt(core.unlink_victim, victim)
                    if unlinked is BUSY:
                        unlinked = await self._locked(core.unlink_victim, victim)
                    if unlinked:
                        w0 = core.meta_words
                        w0[
                            self._hs
                            + (
                                HANDLE_STATS.word.rw_evict
                                if written
                                else HANDLE_STATS.word.ro_evict
                            )
                        ] += 1
                        self._got_frame()
                        if victim.page_size == page_size:
                            return victim.bh
                        await self._free_frame(cache, victim.bh)
                    continue
                if time.monotonic() - self._claims_swept > 0.5:
                    # No victim: perhaps frames are held by claims of writers that died.
                    self._claims_swept = time.monotonic()
                    if await self._take_over_dead_claims():
                        continue
                if self._reclaim(cache):
                    reclaimed: int = await self._locked(core.reclaim_lost_buffers, cache)
                    if reclaimed:
                        continue  # frames came back
                if self._reap_due(0.0 if deadline is None else 0.05):
                    continue  # a dead process's pins were dropped: look again
                if self.fail_fast:
                    raise CacheFull(
                        "unable to allocate space from the buffer cache: every frame is pinned"
                    )
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.wait_timeout
                self._core.meta_words[self._hs + HANDLE_STATS.word.alloc_waits] += 1
            elif now >= deadline:
                if write_error is not None:
                    self._give_up_writing(write_error)
                raise CacheFull(
                    f"unable to allocate space from the buffer cache: every frame stayed "
                    f"pinned for {self.wait_timeout} s{self._pin_holders_text()}"
                )
            await self._wait_frame_turn(turn, deadline - now)
            turn = True
            self._check()

    async def _free_frame(self, cache: Cache, bh: int) -> None:
        """Give an unlinked buffer back to the cache, even if cancelled meanwhile (a frame
        must never be lost): the free runs in a task of the pool."""
        try:
            with step_waits():
                self._core.free_buffer(cache, bh)  # the usual case: at once
        except LockTimeout:
            await asyncio.shield(self._later(self._core.free_buffer, cache, bh))

    def _reclaim(self, cache: Cache) -> bool:
        """Whether to look for frames that killed processes left outside every chain (see
        :meth:`PoolCore.reclaim_lost_buffers`): when no victim is found, at most once a second
        per cache in this process (the look walks every allocation of the region)."""
        now = time.monotonic()
        if now - self._reclaimed_at.get(cache.index, 0.0) < 1.0:
            return False
        self._reclaimed_at[cache.index] = now
        return True

    def _got_frame(self) -> None:
        # Frames are coming free again: the poll restarts at its shortest step.
        self._frame_poll_delay = POLL_MIN

    def _give_up_writing(self, err: BaseException | None) -> None:
        code = getattr(err, "errno", None)
        if isinstance(err, NoSpace) or code in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(
                f"no frame for a page after {self.wait_timeout} s: every dirty page that could "
                f"be evicted failed to write ({err}); the disk is full"
            ) from err
        raise CacheFull(
            f"no frame for a page after {self.wait_timeout} s: every dirty page that could be "
            f"evicted failed to write ({err})"
        ) from err

    async def _take_over_dead_claims(self) -> int:
        """Release every write claim held by a dead process (their pages stay dirty and
        become evictable after a write); returns how many. Walks every bucket."""
        core = self._core
        found: list[tuple[Cache, int, int, int]] = []
        since = time.monotonic()
        for cache in core.caches:
            w = cache.words
            for b, bw in enumerate(cache.bucket_words):
                if not b & 255 and time.monotonic() - since > 0.001:
                    await asyncio.sleep(0)  # a large cache: let the loop run meanwhile
                    since = time.monotonic()
                if not w[bw + BUCKET.word.count]:
                    continue
                try:
                    with step_waits(), cache.mutexes[b]:
                        for off in cache.chain(b):  # offsets checked, the walk bounded
                            x = off >> 3
                            if w[x + BH.word.flags] & BH_WRITING:
                                found.append((cache, b, off, int(w[x + BH.word.io_pid])))
                except LockTimeout:
                    continue  # held elsewhere (a stopped process?): a later sweep looks
        alive: dict[int, bool] = {self._pid: True}
        taken = 0
        for cache, b, off, pid in found:
            if pid not in alive:
                alive[pid] = is_alive(pid)
            # One try (STEP_WAIT): a held bucket is left for a later sweep.
            if not alive[pid] and attempt(take_over_claim, cache, b, off, pid) is True:
                taken += 1
        if taken:
            logger.warning("took over %d page write(s) left by dead process(es)", taken)
        return taken

    async def _write_victim(self, v: BufRef) -> tuple[bool, BaseException | None]:
        """Write a dirty victim; ``(True, None)`` if it is clean now (or dropped), else
        ``(False, the error if any)``.

        With the compiled write-back, the victim goes out with a batch of the cache's least
        recently used dirty pages (:mod:`aiodbenv.mpool.victims`): one worker-thread call for
        many misses. A victim the batch did not clean (a page it cannot write, a failed
        batch) is written alone, the Python way.
        """
        if csync.usable(self._core):
            batch = await write_lru_batch(self, v.cache, v.bucket, v)
            self._check()
            w = v.cache.words
            x = v.bh >> 3
            if not batch.errors and not (
                w[x + BH.word.flags] & BH_DIRTY
                and w[x + BH.word.file] == v.fidx + 1
                and w[x + BH.word.pgno] == v.pgno
            ):
                return True, None  # clean now, or changed: the unlink checks under the lock
        try:
            result = await write_items(self._io, [v])
        except OSError as err:
            return False, err
        if result.written == 1 or result.dropped == 1:
            return True, None
        return False, result.errors[0] if result.errors else None
