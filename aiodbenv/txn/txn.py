"""``Txn``: an atomic, durable update of pages, Generic-WAL style (redo only, no steal).

``tx.page(f, pgno)`` pins the buffer, takes its exclusive latch (:mod:`aiodbenv.txn.latch`)
and hands out a private copy; nothing in shared memory changes until commit. Commit diffs each
copy against the buffer (unchanged under the latch), appends every change as ONE log record
(:mod:`aiodbenv.txn.batch`), copies the images into the buffers, stamps the commit LSN at the
file's ``lsn_offset``, and releases the latches; then it flushes the log as the durability
asks. No uncommitted byte reaches the log or a data file, so nothing is ever undone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from .. import _io, _tasks
from ..errors import (
    CommitNotDurable,
    InvalidArgument,
    LockTimeout,
    LogBufferFull,
    RunRecovery,
)
from ..log.lsn import LSN
from ..mpool.hotpath import FINISHED
from . import batch as _batch
from . import commit as _commit
from .ids import next_owner_id
from .latch import release, wake
from .stat import COMMIT_WORD, TxnStats, W
from .take import (
    _ACTIVE,
    _COMMITTING,
    _DONE,
    MAX_PAGES,
    Durability,
    TxnPage,
    TxnTaking,
    _task_of,
)

if TYPE_CHECKING:
    from ..log.log import Log
    from ..mpool.pool import Pool

__all__ = ["LATCH_TIMEOUT", "MAX_PAGES", "CommitInfo", "Txn", "TxnPage"]

_DURABILITIES = ("sync", "write_nosync", "nosync")

#: Seconds a transaction waits for a page latch by default (``LockTimeout`` then).
LATCH_TIMEOUT = 30.0


@dataclass(frozen=True)
class CommitInfo:
    """What a commit did: ``lsn`` of its log record (``LSN(0, 0)`` if it changed nothing and
    logged nothing), the ``durability`` it was committed with, and ``pages`` it changed."""

    lsn: LSN
    durability: Durability
    pages: int


class Txn(TxnTaking):
    """A transaction: made by :meth:`aiodbenv.Env.txn`.

    ``async with env.txn() as tx:`` commits when the block ends and aborts on an exception
    (also on cancellation); ``tx = await env.txn()`` leaves it to :meth:`commit` or
    :meth:`abort`. It belongs to the task that began it: any use from another task raises
    InvalidArgument.
    """

    __slots__ = ()

    def __init__(
        self,
        pool: Pool,
        log: Log,
        durability: Durability,
        stats: TxnStats,
        latch_timeout: float,
    ) -> None:
        if durability not in _DURABILITIES:
            raise InvalidArgument(
                f"durability must be 'sync', 'write_nosync' or 'nosync', not {durability!r}"
            )
        self._pool = pool
        self._log = log
        # Pages are taken by part 78's one call when it is there and nothing must be reserved
        # in the log first (a file log).
        self._fast = _commit.FAST and not log._c.inmemory
        self._task = _task_of(asyncio.get_running_loop())
        if self._task is None:
            raise InvalidArgument("a transaction must be begun inside an asyncio task")
        # Asked of this loop from now on: current_task() without it looks the running loop
        # up, a getpid() system call each time in CPython 3.11.
        self._loop = self._task.get_loop()
        self.durability = durability
        self.latch_timeout = latch_timeout
        self._stats = stats
        self._owner = ((pool._slot + 1) << 32) | next_owner_id()
        self._pages = {}
        self._held_max = -1
        self._bytes = _batch.HEADER_SIZE  # worst-case size of the commit's record
        # Bytes of an in-memory log reserved for the commit record (header included), so
        # that the commit never finds the ring full (aiodbenv.log.reserve); 0 for a file log.
        self._reserved = 0
        self._state = _ACTIVE
        # What the commit did (its LSN and pages changed; None until committed): the
        # CommitInfo is made from it when asked for (result), not for every `async with`.
        self._done = None
        self._result = None
        stats._w[stats._base + W.begins] += 1

    @property
    def result(self) -> CommitInfo | None:
        """The result of the commit (:class:`CommitInfo`), once committed; None before."""
        if self._result is None and self._done is not None:
            self._result = CommitInfo(self._done[0], self.durability, self._done[1])
        return self._result

    # -- taking pages ---------------------------------------------------------------------------

    # -- ending ---------------------------------------------------------------------------------

    async def abort(self) -> None:
        """Drop every change: the private copies are discarded, the latches released, the
        pages unpinned. Shared memory and the log never saw them. Aborting an ended
        transaction does nothing. Cancellation: the release is done at once; only waits for
        busy bucket mutexes of the unpins go on in the background."""
        if asyncio.current_task(self._loop) is not self._task:
            raise InvalidArgument("this transaction belongs to another task")
        if self._state != _ACTIVE:
            return
        self._state = _DONE
        if self._pool._closed:
            # The handle's close took the pages back and detached the regions: nothing to do.
            self._retire_all()
            self._pages.clear()
            self._pool._latch_tasks.pop(self._owner, None)
            return
        self._stats.add(W.aborts)
        await self._release_all()
        await self._unreserve(self._reserved)

    async def _release_all(self) -> None:
        pending = self._release_now()
        if pending:
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))

    def _retire_all(self) -> None:
        """Release every taken page's copy (TxnPage._retire): the transaction is over."""
        for tp in self._pages.values():
            tp._retire()

    def _release_now(self, released: bool = False) -> list[Awaitable[None]]:
        """Release every latch (unless ``released``: the commit did) and unpin every page;
        the unpins left to a pool task (a bucket mutex held past a few milliseconds) are
        returned, for the caller to await. A page that cannot be released (its file closed
        under the transaction, a forked child, an over-unpin) does not keep the others: they
        are released, then the first such error is raised (the unpins still under way finish
        in the background)."""
        pending: list[Awaitable[None]] = []
        error: Exception | None = None
        self._pool._committing.pop(self._owner, None)
        self._pool._latch_tasks.pop(self._owner, None)
        self._retire_all()
        for tp in self._pages.values():
            f, page = tp.file, tp._page
            try:
                if f._forked:
                    f._refuse_forked()  # the latches are the parent's: leave them be
                f._latched.pop(page, None)
                if not released:
                    release(page, self._owner)
                wake(self._pool, page)
                # The compiled unpin (the context's), else the Python one.
                hotc = f._hotc
                done = hotc.unpin_now(page) if hotc is not None else False
                if done is False:
                    done = f._unpin(page, 0)
                if done is not True and done is not None and done is not FINISHED:
                    pending.append(done)
            except Exception as err:
                error = error or err
        self._pages.clear()
        if error is not None:
            for aw in pending:
                asyncio.ensure_future(aw).add_done_callback(_tasks.retrieve)
            raise error
        return pending

    async def commit(self) -> CommitInfo:
        """Commit: log every change as one record, copy the new images into the buffers
        (under the latches: no reader that latches sees half of it), stamp the commit LSN on
        each page, mark them dirty, release the latches; then flush the log as
        ``durability`` says (``sync``: written and fsynced, with group commit; ``write_nosync``:
        written; ``nosync``: left in the log buffer). Returns :class:`CommitInfo`.

        A failure before the record is logged (a bucket mutex held past the pool's
        ``wait_timeout``, an in-memory log that is full, no room in the log buffer because
        another process's log writer is stopped: LockTimeout) aborts and raises; a failure to
        log or flush panics the environment (RunRecovery). If, once committed, the wait for
        the fsync (``sync``) or the write (``write_nosync``) times out, CommitNotDurable is
        raised: the commit happened (``result`` says so); do not retry it.

        Cancellation: before the record is in the log (marking the pages dirty, waiting for
        log buffer space), the transaction is aborted with nothing changed; after, the commit
        is whole in shared memory and only the wait for its flush is abandoned (the caller
        cannot tell whether the flush completed). A ``write_nosync`` commit, or one whose
        record is larger than the log buffer, runs in a task that finishes in the background
        either way.
        """
        await self._commit_checked()
        result = self.result
        assert result is not None
        return result

    async def _commit_checked(self) -> None:
        """:meth:`commit` without making its CommitInfo (``async with`` does not need it)."""
        if self._begin_commit():
            await self._commit(inline=True)
        else:
            await self._commit_task()

    def _begin_commit(self) -> bool:
        """Check and enter the committing state: True if the commit runs inline (in the
        caller's task), False if in a task of its own (:meth:`_commit_task`)."""
        self._check()
        if self._pool._closed or self._log._closed:
            # Its regions are detached: nothing could be marked, logged or copied in.
            raise InvalidArgument("the environment handle was closed under the transaction")
        self._state = _COMMITTING
        if self._pages:  # closing a file waits for a commit holding its pages
            self._pool._committing[self._owner] = self
        # The common case, without a task per commit: a put (without flush) of a record that
        # fits in the buffer appends nothing if it is cancelled (it can wait only for buffer
        # space or a new log file), so cancellation is clean at every step. _bytes is the
        # record's worst-case size, checked as pages were taken.
        return self.durability != "write_nosync" and self._bytes + 16 <= self._log._c.bsize

    async def _commit_task(self) -> None:
        task = _tasks.start(self._commit(inline=False))
        task.add_done_callback(_tasks.retrieve)
        if self._owner in self._pool._latch_tasks:
            # This task releases the latches now, whatever becomes of the caller (a cancelled
            # caller that retries must wait for it, not be told it waits for itself).
            self._pool._latch_tasks[self._owner] = task
        # Also if it never ran (its loop closing): no close waits for it then.
        task.add_done_callback(lambda _: self._pool._committing.pop(self._owner, None))
        await asyncio.shield(task)

    async def _commit(self, inline: bool) -> None:
        pages = list(self._pages.values())
        log = self._log
        try:
            # The first change of a page after the last checkpoint *record* is a full image:
            # a page written from then on may be torn by a power loss, and recovery (which
            # starts a checkpoint further back) needs a whole image to repair it.
            # (The last checkpoint record's LSN word, 0 if none: Log.last_checkpoint's first.)
            built = _commit.prepare(
                self._pool, pages, self._log._c.word("ckp_rec"), self._bytes, self._owner
            )
        except BaseException:
            await self._end_aborted()
            raise
        if not built.changed:
            self._state = _DONE
            self._stats.add(W.readonly_commits)
            await self._release_all()
            await self._unreserve(self._reserved)
            self._done = (LSN(0, 0), 0)
            return
        pool = self._pool
        try:
            # Every latch flagged committing first, then the changed pages marked dirty: a
            # checkpoint copies a latched page whose latch is not flagged (it holds the last
            # commit's bytes), and one that claimed a page marked dirty but not yet flagged
            # would write it clean before the copy-in (see latch.LATCH_COMMITTING). A page
            # marked dirty that has not changed yet costs a write at most.
            if not built.marked and not _commit.mark_now(pool, pages, built, self._owner):
                await _commit.mark(pool, pages, built, self._owner)
        except BaseException:
            await self._end_aborted()
            raise
        if _io._signal_plan:  # _io.step's own test, without its call
            _io.step("txn.committing")
        record = built.record
        try:
            # Appended only: a put that raises has appended nothing. The write (write_nosync)
            # or flush (sync) is waited for once the images are in and the latches released.
            if self._reserved:
                # Released in the append's critical section: never refused for space.
                lsn = await log._put_reserved(record, self._reserved, False)
                self._reserved = 0
            else:
                lsn = await log.put(record)
        except (LogBufferFull, InvalidArgument, LockTimeout):
            # (A record written straight to the file that fails once its place is taken
            # panics the environment: RunRecovery, below.)
            # Nothing was appended (no room came, the writer stalled): the commit did not
            # happen (release clears the flag).
            await self._end_aborted()
            raise
        except asyncio.CancelledError:
            if not inline:
                raise  # only the task's own cancellation (loop shutdown) gets here
            # A put without flush of a record that fits the buffer appends nothing when
            # cancelled (see commit): aborted, nothing changed.
            await self._end_aborted()
            raise
        except BaseException as err:
            self._log_failed(err)
        if _io._signal_plan:  # _io.step's own test, without its call
            _io.step("txn.logged")
        try:
            released = _commit.apply(pages, built, lsn, self._owner)
        except BaseException as err:
            # Logged but not whole in the buffers: only recovery can make it whole.
            reason = f"a transaction's logged commit could not be copied in ({err!r})"
            self._retire_all()
            pool._committing.pop(self._owner, None)
            pool._env_core.panic(reason)
            raise RunRecovery(f"PANIC: {reason}; {RunRecovery.ADVICE}") from err
        st = self._stats
        sw, sb = st._w, st._base
        sw[sb + W.pages_logged] += len(built.changed)
        if built.fulls:
            sw[sb + W.full_images] += built.fulls
        sw[sb + COMMIT_WORD[self.durability]] += 1
        self._state = _DONE
        self._done = (lsn, len(built.changed))
        pending = self._release_now(released)  # usually all done: no coroutine
        if pending:
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
        if _io._signal_plan:  # _io.step's own test, without its call
            _io.step("txn.released")
        if self.durability != "nosync":
            try:
                await self._make_durable(lsn)
            except LockTimeout as err:
                raise _not_durable(lsn, self.durability, err) from err

    async def _make_durable(self, lsn: LSN) -> None:
        """Wait for the committed record at ``lsn`` to be fsynced (``sync``) or written."""
        log, word = self._log, (lsn[0] << 32) | lsn[1]
        if self.durability == "sync":
            # Not Log.flush(lsn): its check against the log's end reads two region words
            # without the mutex, and a round moving the buffer meanwhile can make the end look
            # smaller than this record's LSN (a spurious InvalidArgument). Ours is in the log.
            if word >= log._c.word("s_lsn"):
                log._check()
                await log._flush_word(word)
        elif word >= log._c.word("w_lsn"):
            log._check()
            await log._write_through(word)

    def _log_failed(self, err: BaseException) -> NoReturn:
        """The append failed in a way that may have left the record in the log: only recovery
        can tell, so the environment is panicked (the pages stay as they are)."""
        reason = f"a transaction's commit record could not be logged ({err!r})"
        self._retire_all()
        self._pool._committing.pop(self._owner, None)  # no close waits for this commit
        self._pool._env_core.panic(reason)
        raise RunRecovery(f"PANIC: {reason}; {RunRecovery.ADVICE}") from err

    async def _end_aborted(self) -> None:
        """The commit failed before its record was logged: end as an abort."""
        self._state = _DONE
        self._stats.add(W.aborts)
        await self._release_all()
        await self._unreserve(self._reserved)

    # -- await / async with -----------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Txn]:
        if False:  # pragma: no cover - makes this a generator
            yield
        return self

    async def __aenter__(self) -> Txn:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != _ACTIVE:
            return
        if exc_type is None:
            # _commit_checked's body: one coroutine less per `async with`.
            if self._begin_commit():
                await self._commit(inline=True)
            else:
                await self._commit_task()
        else:
            await self.abort()

    def __repr__(self) -> str:
        state = ("active", "committing", "ended")[self._state]
        return f"<Txn {self._owner & 0xFFFFFFFF} {state}, {len(self._pages)} page(s)>"


def _not_durable(lsn: LSN, durability: str, err: LockTimeout) -> CommitNotDurable:
    what = "fsynced" if durability == "sync" else "written to the log file"
    out = CommitNotDurable(
        f"the transaction is committed (its record at {lsn} is in the log buffer and its pages "
        f"changed) but was not {what} in time: {err} Do not retry it; env.log.flush() makes it "
        "durable once the writer goes on"
    )
    out.lsn, out.pid = lsn, err.pid
    return out
