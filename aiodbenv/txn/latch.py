"""Page latches: one exclusive latch per buffer, shared by every process (``BH.latch``).

The latch word is 0 when free, else its owner: ``(registry slot + 1) << 32 | txn id``, with
:data:`LATCH_COMMITTING` set while the owner is inside a commit. It is *taken* under the
buffer's bucket mutex (test and set in one critical section); it is *released* by its owner
with a plain 8-byte store (nobody else writes a held latch, so no mutex is needed), or, when
the owner died, by the reaper (:func:`reap_latches`). A latched buffer is pinned by its owner,
so it can be neither evicted nor reused under the latch.

Deadlocks are prevented, not detected: a transaction *waits* for a busy latch only if the
latch's key (:func:`latch_key`: file slot, then page number) is above every key it already
holds. Every wait then goes up the order, so no cycle of waits can form; a busy latch below a
held one raises :class:`~aiodbenv.errors.Deadlock` at once (the caller aborts the transaction).
The cost is a false alarm now and then (the holder might never have wanted our page); a
transaction that takes its pages in ascending order never sees one.

Latched reads (``PoolFile.get(latch=True)``) stand outside that order, and a task can hold a
latch itself (its transaction's, or a latched read it has not ended) while asking for it
again. Within a process the holders are known (``pool._latch_tasks``: owner -> task) and so
are the waits (``pool._latch_waits``: task -> owner waited for): a wait whose chain of holders
leads back to the waiting task raises Deadlock at once, instead of running into the timeout
with a message blaming "another transaction". Across processes such a cycle ends with the
wait's timeout (LockTimeout).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import Deadlock, LockTimeout
from ..mpool.layout import BH, LATCH_COMMITTING, MAX_PGNO
from ..region.layout import TXN_STAT

if TYPE_CHECKING:
    from ..mpool.cache import Cache
    from ..mpool.handle import PoolBase
    from ..mpool.page import Page

__all__ = [
    "LATCH_COMMITTING",
    "LatchCounts",
    "acquire",
    "committing_by",
    "forget_read",
    "latch_key",
    "owner_slot",
    "release",
    "set_committing",
    "try_latch",
    "wake",
]

_H_LATCH = BH.word.latch
_S = TXN_STAT.word


#: Back-off of a latch wait: first and longest sleep (seconds).
_WAIT_MIN = 0.0002
_WAIT_MAX = 0.005


class LatchCounts(Protocol):
    """Where latch waits are counted (the transaction statistics)."""

    def add(self, word: int, n: int = 1) -> None:
        """Add ``n`` to the counter ``word`` of ``TXN_STAT``."""


def latch_key(fidx: int, pgno: int) -> int:
    """The order of latches: by file slot, then page number."""
    return fidx * MAX_PGNO + pgno


def owner_slot(owner: int) -> int:
    """The registry slot of a latch owner word (-1 for a free latch)."""
    return ((owner >> 32) & 0xFFFF) - 1 if owner else -1


def try_latch(cache: Cache, bucket: int, bh: int, owner: int) -> int:
    """Take the latch of buffer ``bh`` for ``owner`` if it is free: 0, else the holder's word.
    Under the bucket mutex (:class:`~aiodbenv.errors.LockTimeout` if it stays held)."""
    w = cache.words
    i = (bh >> 3) + _H_LATCH
    with cache.mutexes[bucket]:
        cur = int(w[i])
        if cur == 0:
            w[i] = owner
        return cur


def release(page: Page, owner: int) -> None:
    """Free the latch of pinned ``page`` if ``owner`` holds it (a plain store: see the module
    docstring). Synchronous, never waits."""
    cache = page._cache
    if cache is None or page._bh <= 0:
        return
    i = (page._bh >> 3) + _H_LATCH
    w = cache.words
    if int(w[i]) & ~LATCH_COMMITTING == owner:
        w[i] = 0


def set_committing(page: Page, owner: int) -> None:
    """Mark ``owner``'s latch of ``page`` as inside a commit (see :data:`LATCH_COMMITTING`)."""
    cache = page._cache
    assert cache is not None
    cache.words[(page._bh >> 3) + _H_LATCH] = owner | LATCH_COMMITTING


async def acquire(
    pool: PoolBase,
    page: Page,
    owner: int,
    key: int,
    held_max: int,
    timeout: float,
    counts: LatchCounts | None,
) -> None:
    """Take the latch of pinned ``page`` for ``owner``, waiting (async, bounded back-off) while
    another holds it. ``key`` is the page's :func:`latch_key`; ``held_max`` the largest key the
    caller already holds (-1: none).

    Raises :class:`~aiodbenv.errors.Deadlock` at once if the latch is busy and ``key`` is below
    ``held_max`` (the order rule), or if its holder is the calling task itself, or a task of
    this process that waits (through others) for it (:func:`_waits_for`): those waits could
    never end. :class:`~aiodbenv.errors.LockTimeout` after ``timeout``
    seconds of waiting. A holder that died is released by the pool's reaper (every second),
    so the wait then ends by itself. Cancellation: between attempts; the latch is not held.
    """
    cache = page._cache
    assert cache is not None
    b, bh = page._bucket, page._bh
    cur = pool._attempt(try_latch, cache, b, bh, owner)
    if cur == 0:
        if counts is not None:
            counts.add(_S.latch_nowait)
        return
    if counts is not None:
        counts.add(_S.latch_waits)
    # While it waits, the wait is recorded for other tasks' checks (_waits_for).
    me = asyncio.current_task()
    deadline = time.monotonic() + timeout
    delay = _WAIT_MIN
    try:
        while True:
            if isinstance(cur, int):  # (Busy: the bucket mutex was busy, just try again)
                why = ""
                if key < held_max:
                    why = (
                        "by another transaction and is ordered before a page this transaction "
                        "holds: waiting could deadlock, so the transaction must abort and retry"
                    )
                elif me is not None and _waits_for(pool, cur, me):
                    why = (
                        "by this task itself (its own transaction, or a latched read it has not "
                        "ended), or by a task of this process that waits for this one: the wait "
                        "could never end. A task takes a page once (tx.page() of a page the "
                        "transaction holds returns it again) and ends a latched read of a page "
                        "before a transaction of its own takes it"
                    )
                if why:
                    if counts is not None:
                        counts.add(_S.deadlocks)
                    # One turn of the loop first: a caller that aborts and retries at once would
                    # otherwise never let the holder (a task of this process, perhaps) go on.
                    await asyncio.sleep(0)
                    raise Deadlock(f"page {page.pgno} is latched (slot {owner_slot(cur)}) {why}")
                if me is not None:
                    pool._latch_waits[me] = (cur & ~LATCH_COMMITTING, page)
            now = time.monotonic()
            if now >= deadline:
                if counts is not None:
                    counts.add(_S.latch_timeouts)
                err = LockTimeout(
                    f"the latch of page {page.pgno} stayed held by another transaction (slot "
                    f"{owner_slot(int(cur)) if isinstance(cur, int) else '?'}) for {timeout:g} s"
                )
                err.mutex = f"latch of page {page.pgno}"
                raise err
            await _pause(pool, (id(cache), bh), min(delay, deadline - now))
            delay = min(delay * 2, _WAIT_MAX)
            pool._check()  # a holder that died inside a commit panics the environment
            cur = pool._attempt(try_latch, cache, b, bh, owner)
            if cur == 0:
                return
    finally:
        if me is not None:
            pool._latch_waits.pop(me, None)


async def _pause(pool: PoolBase, where: tuple[int, int], seconds: float) -> None:
    """Sleep ``seconds`` between two tries of the latch of buffer ``where``, or less if a task
    of this process releases it meanwhile (:func:`wake`): the next try is then at once, not
    after up to 5 ms of back-off with the page pinned and its latch free (so that neither
    the waiters nor a checkpoint, which cannot write a page pinned without a transaction's
    latch, wait for nothing). Another process's release is seen at the next try."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    sleepers = pool._latch_sleepers.setdefault(where, [])
    sleepers.append(fut)
    timer = loop.call_later(seconds, _done, fut)
    try:
        await fut
    except asyncio.CancelledError:
        if fut.done() and not fut.cancelled():
            # Woken, then cancelled before it could try: the wake-up goes to the next waiter
            # (else it would sleep out its back-off with the latch free).
            _wake_at(pool, where)
        raise
    finally:
        timer.cancel()
        if pool._latch_sleepers.get(where) is sleepers:
            if fut in sleepers:
                sleepers.remove(fut)
            if not sleepers:
                del pool._latch_sleepers[where]


def _done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def wake(pool: PoolBase, page: Page) -> None:
    """After this process released the latch of ``page``: wake the task of this process that
    has waited longest for it (see :func:`_pause`). Synchronous; nothing to do when nobody
    waits."""
    if pool._latch_sleepers:
        _wake_at(pool, (id(page._cache), page._bh))


def _wake_at(pool: PoolBase, where: tuple[int, int]) -> None:
    sleepers = pool._latch_sleepers.get(where)
    if sleepers:
        # The longest waiting one (whose timer has not woken it already): the others
        # would only find the latch taken again.
        while sleepers and sleepers[0].done():
            sleepers.pop(0)
        if sleepers:
            _done(sleepers.pop(0))
        if not sleepers:
            del pool._latch_sleepers[where]


def _waits_for(pool: PoolBase, holder: int, me: asyncio.Task[Any]) -> bool:
    """Would waiting for the latch ``holder`` holds wait for the task ``me`` itself: is the
    holder ``me``'s, or a task of this process that waits (through others of it) for ``me``?
    Only this process's owners are known (another process's holder: False; a cycle through
    other processes ends with the wait's timeout)."""
    tasks, waits, mine = pool._latch_tasks, pool._latch_waits, pool._slot + 1
    for _ in range(len(waits) + 1):  # each task waits for one owner: a chain, or a cycle
        holder &= ~LATCH_COMMITTING
        if (holder >> 32) & 0xFFFF != mine:
            return False
        task = tasks.get(holder)
        if task is None or (task is not me and task.done()):
            return False  # unknown, or a task that ended: not a wait that cannot end
        if task is me:
            return True
        nxt = waits.get(task)
        if nxt is None:
            return False
        holder, page = nxt
        # Still waiting for that owner? (The entry is refreshed at each retry, so it can be
        # a few milliseconds old: the latch may have gone, its file closed.)
        cache = page._cache
        if cache is None or page._bh <= 0:
            return False
        if int(cache.words[(page._bh >> 3) + _H_LATCH]) & ~LATCH_COMMITTING != holder:
            return False
    return False


def forget_read(pool: PoolBase, owner: int) -> None:
    """A latch of ``owner`` was released: if it was a latched read's, forget its task (a
    transaction's stays known until the transaction ends: it may hold other latches)."""
    if owner in pool._latch_reads:
        pool._latch_reads.discard(owner)
        pool._latch_tasks.pop(owner, None)


def committing_by(w: memoryview, x: int, slot: int) -> bool:
    """Whether the latch of buffer word index ``x`` is held by ``slot`` inside a commit."""
    cur = int(w[x + _H_LATCH])
    return bool(cur & LATCH_COMMITTING) and owner_slot(cur) == slot


def reap_latches(w: memoryview, x: int, slot: int) -> bool | None:
    """For the reaper, under the bucket mutex of buffer word index ``x``: free the latch if
    dead ``slot`` held it. None if it did not; False if it was released; True if the owner
    died inside a commit: the latch is then kept (nobody may read a page that may hold half
    a commit) and the caller panics the environment at once."""
    cur = int(w[x + _H_LATCH])
    if not cur or owner_slot(cur) != slot:
        return None
    if cur & LATCH_COMMITTING:
        return True
    w[x + _H_LATCH] = 0
    return False
