"""The reaper: what a dead process held in the pool is given back, without anyone asking.

A handle of a shared environment has a slot in the registry of live processes
(:mod:`aiodbenv.region.registry`), and every buffer header counts pins per slot, so a
buffer's ``ref`` is always the sum of its slots' counts. When a slot's owner is found dead
(its OFD lock byte free, or its pid gone or recycled), the reaper claims the slot, and under
each bucket mutex in turn:

- drops the dead slot's pins (the count goes to 0 and ``ref`` is recomputed as the sum of the
  other slots', which also repairs a ``ref`` left one off by a process killed between the two
  stores -- both are made under the bucket mutex, whose robust repair recounts the same way);
- fails a read the dead process had in flight (the page is unlinked and flagged failed, so its
  waiters retry; the frame goes back to the cache with the last pin);
- releases a write claim it held (the page kept ``DIRTY`` through the write, so it is written
  again by the next sync).

A page the dead process held pinned and had flagged dirty stays dirty: it is written by the
next sync or eviction, and counted in ``dirty_inherited``. Changes it made in place without
flagging the page dirty (``set(dirty=True)`` or a dirty unpin) are unknown to the pool.

A buffer it left latched *inside a commit* keeps its pin and latch: the slot stays claimed
while a task of this pool finishes that commit from the log (:func:`_finish`, through the
log's hooks: :mod:`aiodbenv.txn.reapply`), then releases them and frees the slot; if the
log cannot be read, the environment is panicked.

With an in-memory log, the commit space its open transactions reserved in the log region is
given back (:mod:`aiodbenv.log.reserve`). Then the slot is freed, the environment's handle
count is corrected, and one WARNING per dead process names its pid and the pages it held.

It runs when a handle opens the environment, every :data:`REAP_INTERVAL` seconds from a small
task of each pool, when a pin finds no free frame, when a sync finds pinned dirty pages, and by
hand with ``python -m aiodbenv failchk``. A stopped process (SIGSTOP, a debugger) still holds
its lock and is never reaped.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _tasks
from ..errors import LockTimeout
from ..region.layout import MAX_PROCS
from ..region.mutex import BUSY, SYNC_WAIT, _wait_bound, attempt, step_waits
from ..region.mutex import trylock as _trylock
from ..region.registry import ProcInfo
from ..txn.latch import committing_by, reap_latches
from .cache import Cache
from .layout import (
    BH,
    BH_DIRTY,
    BH_FAILED,
    BH_READING,
    BH_WRITING,
    BUCKET,
    PINS_HALF,
)
from .sync import take_over_claim

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["REAP_INTERVAL", "Reaped", "reap"]

logger = logging.getLogger("aiodbenv")

T = TypeVar("T")

#: Seconds between two looks for dead processes by a pool's background task.
REAP_INTERVAL = 1.0

#: Seconds the reaper retries a busy bucket mutex before it leaves the slot for its next look.
BUCKET_WAIT = 0.005

#: Pages named in a reaper's warning before it says "and N more".
_NAMED_PAGES = 16


@dataclass
class Reaped:
    """What reaping one dead handle did: its ``slot`` and ``pid``, the ``pins`` dropped,
    the ``pages`` ``(file, pgno)`` it held pinned (``file`` is the path, or ``#index`` for a
    temporary file), the ``dirty`` ones of them kept dirty, the ``reads`` in flight failed
    (their waiters retry) and the write ``claims`` released."""

    slot: int
    pid: int
    opened: float
    pins: int = 0
    #: Page latches of transactions it held, released (its uncommitted changes never reached
    #: shared memory), and whether a commit it died inside could not be finished from the log
    #: (then the environment is panicked).
    latches: int = 0
    in_commit: bool = False
    #: Buffers it left latched inside a commit ``(cache, bucket, offset)``, kept pinned and
    #: latched until that commit is finished from the log (:func:`_finish`).
    committing: list[tuple[Cache, int, int]] = field(default_factory=list)
    pages: list[tuple[str, int]] = field(default_factory=list)
    dirty: int = 0
    reads: int = 0
    claims: int = 0


def reap(pool: PoolBase) -> list[Reaped]:
    """Reap every dead handle of the environment (see the module docstring); returns what
    was done, one entry per slot. Does nothing for a private environment. Synchronous and
    bounded: one walk of the buckets per dead handle, one bucket mutex at a time."""
    reg = pool._env_core.registry
    if reg is None or pool._env_core.closed:
        return []
    out = []
    for slot in reg.dead_slots():
        try:
            with step_waits():  # the environment mutex held (by a stopped process?): later
                info = reg.claim(slot)
        except LockTimeout:
            break
        if info is None:
            continue  # alive after all, or another process reaps it
        try:
            done = _reap_slot(pool, info, _can_finish(pool))
        except _Busy:
            _patiently(pool, reg.unclaim, slot)  # a bucket stayed busy: the next look finishes it
            continue
        except BaseException:
            _patiently(pool, reg.unclaim, slot)
            raise
        if done.committing:
            # The slot stays claimed (a reaper that dies leaves it to the next one) until its
            # unfinished commits are finished from the log, and is freed then.
            task = pool._io.spawn(_finish(pool, done))
            pool._finishing.add(task)
            task.add_done_callback(pool._finishing.discard)
            # Its failure (the pool closing under it) has nobody to go to: retrieved here.
            task.add_done_callback(_tasks.retrieve)
            continue
        # Before the slot is freed (a new process could take it and reserve): the dead
        # process's transactions will never commit, so their log space is given back.
        log = pool._io.log
        if log is not None:
            _patiently(pool, log.drop, slot)
        if _patiently(pool, functools.partial(reg.free, slot, pins=done.pins, dirty=done.dirty)):
            out.append(done)
    if out:
        _log(out)
        _reclaim_frames(pool, {r.pid for r in out})
        # Frames came back: wake a frame waiter per page whose pins were dropped (each wake-up
        # that finds nothing is passed on; waiters beyond the queue are not woken).
        for _ in range(sum(len(r.pages) for r in out)):
            pool._frame_released()
    return out


def _reclaim_frames(pool: PoolBase, pids: set[int]) -> None:
    """Free the frames the reaped processes had taken but not linked to a page (a frame in
    flight when they died). The frame-starved pin's own look trusts only a pid that is gone;
    the registry knows more: a reaped handle's pid is dead even if it names a process again
    (recycled), unless that is a live handle's. Best effort: a busy mutex leaves them to that
    look."""
    reg = pool._env_core.registry
    assert reg is not None
    live = {p.pid for p in reg.live() if p.slot == reg.slot or not reg.is_dead(p.slot)}
    dead = frozenset(pids - live - {pool._pid})
    if not dead:
        return
    freed = 0
    core = pool._core
    for cache in core.caches:
        try:
            with step_waits():
                freed += core.reclaim_lost_buffers(cache, dead)
        except LockTimeout:
            continue
    if freed:
        logger.warning(
            "freed %d frame(s) taken but never used by dead process(es) %s", freed, sorted(dead)
        )
        for _ in range(freed):
            pool._frame_released()


def _patiently(pool: PoolBase, fn: Callable[..., T], *args: Any) -> T | None:
    """``fn(*args)``, a registry update under the environment mutex that must happen (a
    claimed slot given back or freed). Off the event loop (a worker thread) it waits the
    synchronous bound (SYNC_WAIT). On the loop it is tried for STEP_WAIT, and if the mutex
    stays held (by a stopped process?) it is left to a task of the pool that retries with an
    async back-off: None then (not done yet). ``fn`` locks first and changes nothing on a
    timeout."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        token = _wait_bound.set(SYNC_WAIT)
        try:
            return fn(*args)
        finally:
            _wait_bound.reset(token)
    got = attempt(fn, *args)
    if got is BUSY:
        pool._later(fn, *args)
        return None
    return got


def _can_finish(pool: PoolBase) -> bool:
    """Whether a commit left unfinished by a dead process can be finished from the log here
    (a log, and an event loop to read it on); else the environment is panicked."""
    log = pool._io.log
    if log is None or log.finish is None or pool._closing:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _finish(pool: PoolBase, done: Reaped) -> None:
    """Finish the commits dead slot ``done.slot`` left on ``done.committing`` from the log,
    then release their latches, drop its pins and free the slot. If the log cannot be read,
    the environment is panicked (only recovery can tell then); if the pool is closing, the
    slot is given back for another process to reap."""
    reg, log, s = pool._env_core.registry, pool._io.log, done.slot
    assert reg is not None and log is not None and log.finish is not None
    try:
        _records, applied = await log.finish(s, done.committing)
        for cache, b, off in done.committing:
            pins, dirty = await pool._locked(_release_committing, cache, b, off, s, check=False)
            done.pins += pins
            done.dirty += dirty
            done.latches += 1
    except BaseException as err:
        if pool._closing or pool._closed or not isinstance(err, Exception):
            _patiently(pool, reg.unclaim, s)
            raise
        if isinstance(err, LockTimeout):
            # A mutex, or the log writer, held by a stopped process: the buffers stay pinned
            # and latched and the slot is given back; the next look finishes it (again).
            _patiently(pool, reg.unclaim, s)
            logger.warning(
                "finishing the commit process %d died inside is left for the reaper's next "
                "look: %s",
                done.pid,
                err,
            )
            return
        done.in_commit = True
        pool._env_core.panic(
            f"process {done.pid} died inside a transaction commit, which could not be "
            f"finished from the log ({err!r})"
        )
        return
    _patiently(pool, log.drop, s)
    if _patiently(pool, functools.partial(reg.free, s, pins=done.pins, dirty=done.dirty)):
        logger.warning(
            "process %d died inside the commit of %d page(s): %s",
            done.pid,
            len(done.committing),
            f"{applied} page(s) finished from its log record"
            if applied
            else "nothing to finish (its record never reached the log, or every page was "
            "already copied)",
        )
        _log([done])
        pool._finished.append(done)
        _reclaim_frames(pool, {done.pid})
        for _ in range(len(done.committing) + len(done.pages)):
            pool._frame_released()


def _release_committing(cache: Cache, b: int, off: int, slot: int) -> tuple[int, int]:
    """Under bucket ``b``'s mutex: free the latch dead ``slot`` held inside a commit on buffer
    ``off`` and drop its pins there; returns (pins dropped, 1 if the page is dirty)."""
    cache.lock(b)
    try:
        w, x = cache.words, off >> 3
        if committing_by(w, x, slot):
            w[x + BH.word.latch] = 0
        return _drop_pins(cache, off, slot), int(bool(w[x + BH.word.flags] & BH_DIRTY))
    finally:
        cache.unlock(b)


def _drop_pins(cache: Cache, off: int, slot: int) -> int:
    """Under the bucket mutex: drop ``slot``'s pins of buffer ``off`` and recompute its
    ``ref`` as the sum of the other slots' (which also repairs one left one off); returns
    how many were dropped."""
    w, halves, x = cache.words, cache.halves, off >> 3
    p = (off >> 1) + PINS_HALF
    held = int(halves[p + slot])
    halves[p + slot] = 0
    ref = sum(halves[p : p + MAX_PROCS])
    if w[x + BH.word.ref] != ref:
        w[x + BH.word.ref] = ref
    return held


def _reap_slot(pool: PoolBase, info: ProcInfo, finishing: bool) -> Reaped:
    core = pool._core
    reg = pool._env_core.registry
    assert reg is not None
    s, pid = info.slot, info.pid
    # A live handle with the same pid (a recycled one) owns any read or write claim by it.
    others = {p.pid for p in reg.live() if p.slot != s and not reg.is_dead(p.slot)}
    done = Reaped(slot=s, pid=pid, opened=info.opened)
    claims: list[tuple[Cache, int, int]] = []
    freed: list[tuple[Cache, int]] = []
    names: dict[int, str] = {}
    try:
        for cache in core.caches:
            w = cache.words
            for b, bw in enumerate(cache.bucket_words):
                if not w[bw + BUCKET.word.head]:
                    continue
                _lock(cache, b)
                try:
                    # Every offset is checked, and the walk bounded (CorruptRegion otherwise);
                    # the chain is read whole before any of its buffers may be unlinked.
                    for off in cache.chain(b):
                        x = off >> 3
                        if finishing and committing_by(w, x, s):
                            # Pinned and latched until its commit is finished (_finish).
                            done.committing.append((cache, b, off))
                            continue
                        held = _drop_pins(cache, off, s)
                        flags = int(w[x + BH.word.flags])
                        if held:
                            done.pins += held
                            fidx = int(w[x + BH.word.file]) - 1
                            if fidx not in names:
                                names[fidx] = core.file_name(fidx) or f"#{fidx}"
                            done.pages.append((names[fidx], int(w[x + BH.word.pgno])))
                            if flags & BH_DIRTY:
                                done.dirty += 1
                        latched = reap_latches(w, x, s)
                        if latched is not None:
                            done.latches += 1
                            if latched and not done.in_commit:
                                # Its batch may be in the log and only partly in the
                                # buffers: only recovery can tell, so everyone must stop.
                                done.in_commit = True
                                pool._env_core.panic(
                                    f"process {pid} died inside a transaction commit; "
                                    "run recovery (Env.open(..., recover=True))"
                                )
                        ref = int(w[x + BH.word.ref])  # recounted by _drop_pins
                        dead_io = int(w[x + BH.word.io_pid]) == pid and pid not in others
                        if flags & BH_READING and dead_io and held:
                            # Its read will never finish: waiters see FAILED and retry.
                            cache.unlink(b, off)
                            w[x + BH.word.flags] = BH_FAILED
                            done.reads += 1
                            if not ref:
                                freed.append((cache, off))
                        elif flags & BH_WRITING and dead_io:
                            claims.append((cache, b, off))
                finally:
                    cache.unlock(b)
    finally:
        # Also when a busy bucket cut the walk short: what was done so far is finished.
        for cache, b, off in claims:
            try:
                with step_waits():
                    if take_over_claim(cache, b, off, pid):
                        done.claims += 1
            except LockTimeout:  # the bucket is busy now: a pool task finishes it
                pool._later(take_over_claim, cache, b, off, pid)
                done.claims += 1
        for cache, off in freed:
            pool._settle(core.free_buffer, cache, off)  # now, or by a task: never lost
    return done


class _Busy(Exception):
    """A bucket mutex stayed held (by a live process, perhaps a stopped one)."""


def _lock(cache: Cache, b: int) -> None:
    """Lock bucket ``b`` without ever blocking the event loop: trylock, retried for at most
    :data:`BUCKET_WAIT` seconds (a holder is normally out within microseconds), else _Busy.
    A holder found dead is repaired, as by any locker."""
    p = cache.mptrs[b]
    if not p:
        return  # a private region
    deadline = time.monotonic() + BUCKET_WAIT
    while True:
        rc = _trylock(p)
        if rc == 0:
            return
        if rc != errno.EBUSY:
            cache.mutexes[b].acquire_contended(rc)  # EOWNERDEAD: repaired and held
            return
        if time.monotonic() >= deadline:
            raise _Busy(f"bucket {b}")
        time.sleep(0)


def _log(reaped: list[Reaped]) -> None:
    by_pid: dict[int, list[Reaped]] = {}
    for r in reaped:
        by_pid.setdefault(r.pid, []).append(r)
    for pid, parts in by_pid.items():
        pages = [pg for r in parts for pg in r.pages]
        shown = ", ".join(f"{name}:{pgno}" for name, pgno in pages[:_NAMED_PAGES])
        more = f" and {len(pages) - _NAMED_PAGES} more" if len(pages) > _NAMED_PAGES else ""
        logger.warning(
            "process %d died with the environment open (%d handle(s)): dropped %d pin(s) of "
            "%d page(s)%s; %d dirty page(s) inherited (written by the next sync), %d read(s) "
            "failed for retry, %d write claim(s) released",
            pid,
            len(parts),
            sum(r.pins for r in parts),
            len(pages),
            f" [{shown}{more}]" if pages else "",
            sum(r.dirty for r in parts),
            sum(r.reads for r in parts),
            sum(r.claims for r in parts),
        )
