"""The state of one pool handle and the helpers every layer of ``Pool`` uses.

:class:`PoolBase` is the bottom layer of :class:`~aiodbenv.mpool.pool.Pool`: what the handle
holds (its core, its I/O owner, its waiters), the checks every call makes (a forked process, a
closing or panicked environment), the bounded lock waits of the slow paths
(:meth:`~PoolBase._attempt`, :meth:`~PoolBase._locked`, :meth:`~PoolBase._settle`: each takes a
small synchronous critical section that locks first), the wake-ups of waiters, and the look for
dead processes. The layers above it: frames (:mod:`~aiodbenv.mpool.frames`), reading pages in
(:mod:`~aiodbenv.mpool.bhread`), opening files (:mod:`~aiodbenv.mpool.fopen`), the public calls
(:mod:`~aiodbenv.mpool.pool`).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _tasks
from .._attrs import Flag, Seconds
from ..errors import ForkedProcessError, InvalidArgument, LockTimeout, RunRecovery
from ..region import panic
from ..region.backing import Region
from ..region.mutex import BUSY, Busy, _wait_bound, backoff_locked, step_waits
from ..region.mutex import STEP_WAIT as _STEP_WAIT
from . import csync
from .alloc import PoolCore
from .bh import BufferIO
from .hot import module as _hot_module
from .layout import (
    HANDLE_STATS,
    POOL_HEADER,
)
from .reaper import REAP_INTERVAL, Reaped, reap
from .statwalk import slot_pins

if TYPE_CHECKING:
    from ..region.environment import EnvCore
    from .page import Page

__all__ = ["PoolBase"]

#: Starts a new budget for the compiled misses (None without the compiled hot path).
_loop_turned: Any = _hot_module.loop_turned if _hot_module is not None else None

T = TypeVar("T")

logger = logging.getLogger("aiodbenv")


#: Forks since this module loaded, counted in the child: a handle compares it with the count
#: at its opening instead of calling getpid() on every check (a syscall, three per miss).
_forks = [0]


def _count_fork() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_count_fork)

#: The frame-waiter poll (for frames released by other processes): first and longest step.
POLL_MIN = 0.0002
POLL_MAX = 0.005
#: Seconds between the warnings of a close waiting for work under way that does not end.
SAY_EVERY = 5.0


class PoolBase:
    """The bottom layer of a pool handle: its state, checks, lock waits and wake-ups."""

    #: Raise CacheFull at once when every frame is pinned, instead of waiting.
    fail_fast = Flag()
    #: Seconds a pin waits for a frame before raising CacheFull.
    wait_timeout = Seconds()

    def __init__(self, env: EnvCore, regions: list[Region], shared: bool) -> None:
        self._env_core = env
        core = PoolCore(regions, shared, env.panic)
        self._core = core
        # Clean-first victims only with a writer of dirty victims in the background (the
        # compiled write-back): without it a dirty page passed over would stay dirty until a
        # sync, so the search takes the dirty best and writes it (see PoolCore.find_victim).
        core.clean_first = csync.usable(core)
        self._panic_words, self._panic_index = env.panic_word()
        self._hs = core.attach_handle()
        self._pid = os.getpid()
        self._fork_gen = _forks[0]
        #: The I/O: descriptors, page transforms, worker threads, I/O tasks, write counters.
        self._io = BufferIO(
            core,
            self._hs,
            self._pid,
            settle=self._settle,
            locked=self._locked,
            notify=self._notify,
            closing=lambda: self._closing,
        )
        self._claims_swept = 0.0  # when _get_frame last looked for dead writers' claims
        #: This handle's registry slot: the per-buffer pin counts it changes (0: private).
        self._slot = env.registry.slot if env.registry is not None else 0
        self._reaped_at = 0.0  # when the reaper last looked, from a frame or sync wait
        self._reaper_task: asyncio.Task[None] | None = None
        self._reaped_at_open: list[Reaped] = []  # for failchk: what opening this handle reaped
        self._changed: asyncio.Future[None] | None = None
        self._waiters = 0
        # Coroutines waiting for a frame, first come first served: each released frame wakes
        # the first one (one wake-up per frame, not a stampede). Frames freed by other
        # processes are only seen by polling, which one timer does for the whole queue.
        self._frame_queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._frame_poll: asyncio.TimerHandle | None = None
        self._frame_poll_delay = POLL_MIN
        #: Wake-ups handed to frame waiters: by a released frame, and by the poll timer.
        self.frame_wakeups = 0
        self.frame_polls = 0
        self._frame_waiting = 0  # coroutines inside _wait_frame_turn
        #: This process's transactions inside a commit, by owner (aiodbenv.txn): closing a file
        #: waits for those holding its pages (PoolFile.close).
        self._committing: dict[int, object] = {}
        #: Who holds this process's page latches, and what they wait for (aiodbenv.txn.latch):
        #: latch owner -> the task it belongs to (a transaction's, or a latched read's), and
        #: task -> the owner whose latch it waits for. A wait that would end only when the
        #: waiting task itself goes on (its own transaction, or a cycle of this process's
        #: tasks) is refused at once instead of running into the timeout.
        self._latch_tasks: dict[int, asyncio.Task[Any]] = {}
        self._latch_waits: dict[asyncio.Task[Any], tuple[int, Page]] = {}
        #: The owners in _latch_tasks that are latched reads (closing a file drops them).
        self._latch_reads: set[int] = set()
        #: Latch waits by buffer (id of its cache, offset): woken by this process's releases.
        self._latch_sleepers: dict[tuple[int, int], list[asyncio.Future[None]]] = {}
        #: The reaper's tasks finishing dead processes' commits from the log (the handle's
        #: close waits for them before it closes the log).
        self._finishing: set[asyncio.Task[None]] = set()
        #: What those tasks did, once done (for failchk; the last few only).
        self._finished: collections.deque[Reaped] = collections.deque(maxlen=64)
        self._reclaimed_at: dict[int, float] = {}  # cache index -> last look for lost frames
        self._closed = False
        # Closing waits for all of this: coroutines inside a slow path (a miss, a sync) and the
        # tasks the pool spawned for I/O (fills, read batches, write batches, fsyncs), so that
        # no descriptor is closed and no region detached under a read or write in flight.
        self._closing = False
        self._last_yield = time.monotonic()
        self._since_yield = 0
        self._busy = 0
        self._reading = 0  # slow paths waiting for a disk read (not running meanwhile)
        # Dirty unpins in this process since a worker last looked, and who to wake.
        self._dirtied_w = self._hs + HANDLE_STATS.word.dirtied_bytes
        self._dirty_pages = 0
        self._dirty_wake_at = 0  # 0: nobody is listening
        self._dirty_event: asyncio.Event | None = None
        self.fail_fast = False
        self.wait_timeout = 30.0
        # Set when the environment's close begins closing the files: no file opens after.
        self._no_opens = False
        self._opening = 0  # opens under way

    def _check(self) -> None:
        if _forks[0] != self._fork_gen:
            raise ForkedProcessError(
                "this pool handle belongs to another process; open the environment again"
            )
        if self._closed or self._closing:
            raise InvalidArgument(
                "the environment is closed" if self._closed else "the environment is closing"
            )
        # The panic word first (one read); the property also knows a closed environment.
        if self._panic_words[self._panic_index] and self._env_core.panicked:
            self._check_panic()

    def _check_panic(self) -> None:
        """Raise RunRecovery if the environment is panicked, saying why if it was a failed
        fsync (in any process)."""
        fsync_err = self._fsync_failure() if self._env_core.panicked else None
        if fsync_err:
            why = panic.note(self._env_core.panic_cause())
            raise RunRecovery(
                f"PANIC: environment {self._env_core.home} is panicked: {fsync_err}{why}; "
                f"{RunRecovery.ADVICE}"
            )
        self._env_core.check_panic()

    def _fsync_failure(self) -> str | None:
        """What failed, if the environment panicked because an fsync failed (any process)."""

        core = self._core
        w0 = core.meta_words
        code = int(w0[core.pool_hdr + POOL_HEADER.word.fsync_errno])
        if not code:
            return None
        off, n = (
            int(w0[core.pool_hdr + POOL_HEADER.word.fsync_name_off]),
            int(w0[core.pool_hdr + POOL_HEADER.word.fsync_name_len]),
        )
        name = core.meta_bytes(off, n).decode("utf-8", "surrogateescape") if off else "a file"
        return (
            f"fsync of {name} failed with errno {code} ({errno.errorcode.get(code, '?')}: "
            f"{os.strerror(code)}); pages written to it may be lost"
        )

    def _fsync_failed(self, name: str, err: OSError) -> None:
        """An fsync failed: panic the environment and raise RunRecovery (never returns).

        After a failed fsync the kernel may have dropped the dirty pages it could not write
        and marked them clean, so a second fsync can succeed with the data gone (PostgreSQL's
        "fsyncgate"). No page of the pool can be trusted to be on disk any more: every process
        must stop and recover, and no later call may report success.
        """

        core = self._core
        w0 = core.meta_words
        code = err.errno or errno.EIO
        if not w0[
            core.pool_hdr + POOL_HEADER.word.fsync_errno
        ]:  # the first failure is the one reported
            raw = name.encode("utf-8", "surrogateescape")[:4096]
            try:
                off = core.meta_store(raw)
            except Exception:  # no room to keep the name: the errno alone still says it
                off, raw = 0, b""
            w0[core.pool_hdr + POOL_HEADER.word.fsync_name_off] = off
            w0[core.pool_hdr + POOL_HEADER.word.fsync_name_len] = len(raw)
            w0[core.pool_hdr + POOL_HEADER.word.fsync_errno] = code
        reason = f"fsync of {name} failed: {os.strerror(code)} (errno {code})"
        self._env_core.panic(reason)
        raise RunRecovery(
            f"PANIC: {reason}; pages written to it may be lost; {RunRecovery.ADVICE}"
        ) from err

    def _enter(self) -> None:
        """A slow path begins (closing waits for it to end); raises if the pool is closing."""
        self._check()
        self._busy += 1

    def _leave(self) -> None:
        self._busy -= 1
        if self._closing:
            self._notify()

    def _loop_had_turn(self) -> None:
        """A read that waited for the disk has completed, on the loop: the loop had its turn
        since the miss began, so the misses that follow start a new budget (Python's here,
        the compiled misses' in hot.c) instead of yielding at once. Without this, 32
        coroutines missing on a cold cache yielded about twice per miss, for nothing."""
        self._since_yield = 0
        self._last_yield = time.monotonic()
        if _loop_turned is not None:
            _loop_turned()

    async def _breathe(self) -> bool:
        """Let other tasks run now and then during a run of slow-path pins.

        A miss served from the OS page cache completes without awaiting anything (~20 µs); a
        loop of them would otherwise hold the event loop for as long as it runs. The budget
        is for the whole pool, shared by the coroutines in a slow path: about 48 misses, or a
        millisecond, then whoever is running yields. With many coroutines missing at once,
        each gets a share, so one turn of the event loop stays about a millisecond long.
        Slow paths waiting for a disk read take no share: they do not run until their read
        completes, and that completion is a turn of the loop (:meth:`_loop_had_turn`).
        Returns whether it yielded (the caller's checks may have changed meanwhile).
        """
        self._since_yield += 1
        now = time.monotonic()
        share = 48 // max(1, self._busy - self._reading)
        if self._since_yield >= share or now - self._last_yield > 0.001:
            self._since_yield = 0
            self._last_yield = now
            await asyncio.sleep(0)
            return True
        return False

    async def _quiesce(self) -> None:
        """Wait until no slow path runs and no I/O task of the pool is left.

        Pins and syncs under way notice the close at their next step and leave; one whose task
        is never resumed again would be waited for forever (detaching the regions under it is
        not safe), so the wait says what it waits for every few seconds.
        """
        since = time.monotonic()
        while self._busy or self._io.tasks:
            if self._io.tasks:
                await asyncio.wait(list(self._io.tasks))  # never cancels them (gather would)
            else:
                await self._wait_change(0.01)
            since = self._say_waiting(
                since,
                self._busy,
                "pin(s) or sync(s) under way to notice the close; is a task holding one never "
                "resumed?",
            )

    @staticmethod
    def _say_waiting(since: float, n: int, what: str) -> float:
        """A close's wait for ``n`` things under way that must end first (``what``): every
        :data:`SAY_EVERY` seconds since ``since``, say so, since one that never ends is waited
        for forever. Returns when it last spoke (or ``since``)."""
        now = time.monotonic()
        if now - since <= SAY_EVERY:
            return since
        logger.warning("closing the pool waits for %d %s", n, what)
        return now

    async def _to_end(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        """Run ``coro`` to its end even if the caller is cancelled: as a task that closing the
        pool waits for (it counts as a slow path under way, so it may itself wait for the
        pool's I/O tasks). Cancellation: the caller gets CancelledError at once; the task goes
        on, and a failure nobody receives is logged as ``what``."""
        self._busy += 1
        task = _tasks.start(coro)
        task.add_done_callback(lambda _t: self._leave())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._io.orphan(task, what)
            raise

    def _panic_unpinned(self, pgno: int) -> None:
        self._env_core.panic(f"page {pgno} returned to the pool more often than it was pinned")
        raise RunRecovery(
            f"PANIC: page {pgno} was unpinned more often than pinned; {RunRecovery.ADVICE}"
        )

    @staticmethod
    def _attempt(fn: Callable[..., T], *args: Any) -> T | Busy:
        """``fn(*args)`` with a lock wait of a few milliseconds at most, or ``BUSY`` (nothing
        done) if a mutex stayed held: the slow paths' usual case, without making a coroutine;
        on ``BUSY`` they go on with :meth:`_locked`."""
        token = _wait_bound.set(_STEP_WAIT)
        try:
            return fn(*args)
        except LockTimeout:
            return BUSY
        finally:
            _wait_bound.reset(token)

    async def _locked(self, fn: Callable[..., T], *args: Any, check: bool = True) -> T:
        """``fn(*args)``, a synchronous critical section, with bounded lock waits: each
        attempt waits at most a few milliseconds for a held mutex; on
        :class:`~aiodbenv.errors.LockTimeout` the call backs off asynchronously (the event
        loop keeps running) and tries again, up to ``wait_timeout`` seconds, then raises
        LockTimeout naming the holder. ``fn`` must change nothing when a lock times out (each
        of its critical sections locks first), so that it can simply be called again.

        ``check``: stop between attempts if the pool is closing (not for bookkeeping that
        must be finished, such as a deferred release). Cancellation: between attempts;
        nothing is held.
        """
        return await backoff_locked(
            fn, args, self.wait_timeout, between=self._check if check else None
        )

    def _later(self, fn: Callable[..., object], *args: Any) -> asyncio.Task[Any]:
        """Run ``fn(*args)`` through :meth:`_locked` in a task of the pool, for a synchronous
        caller whose critical section found its mutex held; a final failure is logged."""
        task = self._io.spawn(self._locked(fn, *args, check=False))
        task.add_done_callback(_log_failure)
        return task

    def _settle(self, fn: Callable[..., object], *args: Any) -> None:
        """Run the bookkeeping ``fn(*args)`` now if its mutex is free within a few
        milliseconds, else in a task of the pool that keeps trying (see :meth:`_locked`):
        for steps that must happen (releasing a pin, failing a read) on paths that cannot
        wait, such as callbacks and cancellations. ``fn`` changes nothing when it times out."""
        try:
            with step_waits():
                fn(*args)
        except LockTimeout:
            self._later(fn, *args)

    def _frame_released(self) -> None:
        """A frame may be free or evictable now: wake the first frame waiter (only one)."""
        q = self._frame_queue
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(None)
                self.frame_wakeups += 1
                return

    async def _wait_commits(self, holding: Callable[[], bool], what: str) -> None:
        """Wait while ``holding()``: a transaction of this process is inside a commit that
        closing ``what`` would cut off (its pins dropped, or the log closed under its append).
        Bounded by ``wait_timeout``: then LockTimeout, and the caller closes nothing."""
        delay, deadline = 0.0005, time.monotonic() + self.wait_timeout
        while holding() and not self._env_core.panicked:  # panicked: no commit goes on
            if time.monotonic() > deadline:
                err = LockTimeout(
                    f"closing {what}: a transaction's commit did not end within "
                    f"{self.wait_timeout:g} s"
                )
                err.mutex = "commit"
                raise err
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _notify(self) -> None:
        fut = self._changed
        if fut is not None:
            self._changed = None
            if not fut.done():
                fut.set_result(None)

    def _note_dirty(self, page_size: int) -> None:
        """A page was unpinned (or set) dirty: count its bytes, and wake the background
        workers when enough pages were dirtied here since they last looked."""
        self._core.meta_words[self._dirtied_w] += page_size
        self._dirty_pages += 1
        if self._dirty_wake_at and self._dirty_pages >= self._dirty_wake_at:
            self._dirty_pages = 0
            if self._dirty_event is not None:
                self._dirty_event.set()

    def _listen_dirty(self, every: int) -> asyncio.Event:
        """An event set whenever ``every`` more pages are dirtied in this process (the lowest
        ``every`` of all listeners applies)."""
        if self._dirty_event is None:
            self._dirty_event = asyncio.Event()
        every = max(1, every)
        self._dirty_wake_at = every if not self._dirty_wake_at else min(self._dirty_wake_at, every)
        return self._dirty_event

    def _reap(self) -> list[Reaped]:
        """Reap now (see :meth:`aiodbenv.mpool.pool.Pool.reap`)."""
        self._check()
        self._reaped_at = time.monotonic()
        return reap(self)

    def _slot_pins(self) -> dict[int, int]:
        """Pins held per registry slot (see :meth:`aiodbenv.mpool.pool.Pool.slot_pins`)."""
        return slot_pins(self._core.caches)

    def _pin_holders_text(self) -> str:
        """``"; pins held by process(es) [pid (n pins), ...]"``, from the registry (empty for a
        private environment): who a wait for a frame waited on."""
        reg = self._env_core.registry
        if reg is None:
            return ""
        pins = self._slot_pins()
        held = [
            f"{p.pid}{' (this process)' if p.pid == self._pid else ''} ({pins[p.slot]} pins)"
            for p in reg.live()
            if pins.get(p.slot)
        ]
        return f"; pins held by process(es) {', '.join(held)}" if held else ""

    def _reap_due(self, gap: float = 0.05) -> bool:
        """Reap now, before a wait or an error, unless the reaper looked less than ``gap``
        seconds ago; True if something was reclaimed. The first look of a wait or a sync
        passes ``gap=0``: a look made just before the holder died would hide its death.
        Looking is cheap when nobody died (one ``fcntl`` per open handle)."""
        if self._env_core.registry is None or time.monotonic() - self._reaped_at < gap:
            return False
        return bool(self._reap())

    def _start_reaper(self) -> None:
        """Start the background look for dead processes (a shared environment's handle)."""
        if self._env_core.registry is not None and self._reaper_task is None:
            self._reaper_task = asyncio.get_running_loop().create_task(
                self._reaper_loop(), name="aiodbenv reaper"
            )

    async def _reaper_loop(self) -> None:
        while not self._closing:
            try:
                if not self._env_core.panicked:
                    self._reap()
            except Exception:  # reported, and looked at again next time
                logger.exception("the reaper of dead processes failed")
            await asyncio.sleep(REAP_INTERVAL)

    async def _wait_change(self, timeout: float) -> None:
        """Wait for a frame release or I/O completion in this process, or ``timeout``
        seconds (other processes' changes are only seen by polling)."""
        fut = self._changed
        if fut is None:
            fut = self._changed = asyncio.get_running_loop().create_future()
        self._waiters += 1
        try:
            # A plain future, and asyncio.wait (which never cancels it): wait_for on an Event
            # made a sub-task, which a shutdown cancelling every task cancelled, and the
            # CancelledError then ended a closing that nothing may stop (aiodbenv._tasks).
            await asyncio.wait({fut}, timeout=timeout)
        finally:
            self._waiters -= 1

    def _can_write(self, tag: int) -> bool:
        """Whether this process may write a dirty page of the file with tag ``tag``."""
        return self._core.can_write(tag, self._io.registry)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("deferred pool bookkeeping failed: %s", task.exception())
