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
import os
import types
from collections.abc import Generator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from .. import _io
from ..errors import (
    InvalidArgument,
    LogBufferFull,
    RunRecovery,
    TxnTooLarge,
)
from ..log.lsn import LSN
from ..log.record import HEADER as _LOG_HEADER
from ..mpool.fget import MODE_CREATE, MODE_GET, MODE_NEW
from ..mpool.layout import FILE_ENTRY, MAX_PGNO
from . import batch as _batch
from . import commit as _commit
from .ids import next_owner_id
from .latch import acquire, latch_key, release, try_latch
from .stat import COMMIT_WORD, TxnStats, W

if TYPE_CHECKING:
    from ..log.log import Log
    from ..mpool.file import PoolFile
    from ..mpool.page import Page
    from ..mpool.pool import Pool

__all__ = ["LATCH_TIMEOUT", "MAX_PAGES", "CommitInfo", "Txn", "TxnPage"]

Durability = Literal["sync", "write_nosync", "nosync"]
_DURABILITIES = ("sync", "write_nosync", "nosync")

#: The most pages one transaction may take (``TxnTooLarge`` past it). Latches are held until
#: the end of the transaction: keep transactions short and small.
MAX_PAGES = 64
_LOG_HEADER_BYTES = _LOG_HEADER.size

#: Seconds a transaction waits for a page latch by default (``LockTimeout`` then).
LATCH_TIMEOUT = 30.0


@dataclass(frozen=True)
class CommitInfo:
    """What a commit did: ``lsn`` of its log record (``LSN(0, 0)`` if it changed nothing and
    logged nothing), the ``durability`` it was committed with, and ``pages`` it changed."""

    lsn: LSN
    durability: Durability
    pages: int


class TxnPage:
    """A page taken by a transaction: ``data`` is a private, writable copy of the page (its
    bytes without any checksum trailer). Change it freely; it reaches shared memory only when
    the transaction commits. The 8 bytes at the file's ``lsn_offset`` belong to the library:
    changes to them are ignored (the commit stamps its LSN there)."""

    __slots__ = ("_bf", "_desc", "_entry", "_page", "data", "file", "pgno")

    def __init__(
        self,
        file: PoolFile,
        page: Page,
        data: Any,
        bf: _batch.BatchFile,
        desc: Any,
        entry: bytes,
    ) -> None:
        #: The file and page number.
        self.file = file
        self.pgno = page.pgno
        #: The private copy.
        self.data = memoryview(data)
        self._page = page
        self._bf = bf
        # The compiled commit's descriptor and what keeps its copy alive (commit.take), or
        # None for the Python commit; the file's batch entry.
        self._desc = desc
        self._entry = entry

    def __repr__(self) -> str:
        return f"<TxnPage {self.pgno} of {self.file.name!r}>"


_ACTIVE, _COMMITTING, _DONE = 0, 1, 2

# The current task of a loop, asked on every begin, page and commit. In CPython 3.11
# asyncio.current_task(loop) is a Python function around this dict's get (the C one came in
# 3.12): the lookup itself, when that is so.
_tasks = getattr(asyncio.tasks, "_current_tasks", None)
_task_of: Any = (
    _tasks.get
    if isinstance(_tasks, dict) and isinstance(asyncio.current_task, types.FunctionType)
    else asyncio.current_task
)

#: The attribute of a file handle that holds its batch entry, worst-case page cost and logged
#: entry bytes (computed once per file handle; an attribute, not a weak dictionary: the
#: lookup is on every tx.page).
_FILE_ATTR = "_txn_batch_file"


class Txn:
    """A transaction: made by :meth:`aiodbenv.Env.txn`.

    ``async with env.txn() as tx:`` commits when the block ends and aborts on an exception
    (also on cancellation); ``tx = await env.txn()`` leaves it to :meth:`commit` or
    :meth:`abort`. It belongs to the task that began it: any use from another task raises
    InvalidArgument.
    """

    # One is made per transaction: slots make it and its attribute stores cheaper.
    __slots__ = (
        "_bytes",
        "_done",
        "_fast",
        "_held_max",
        "_log",
        "_loop",
        "_owner",
        "_pages",
        "_pool",
        "_reserved",
        "_result",
        "_state",
        "_stats",
        "_task",
        "durability",
        "latch_timeout",
    )

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
        self.durability: Durability = durability
        #: Seconds :meth:`page` waits for a latch before LockTimeout.
        self.latch_timeout = latch_timeout
        self._stats = stats
        self._owner = ((pool._slot + 1) << 32) | next_owner_id()
        self._pages: dict[tuple[int, int], TxnPage] = {}
        self._held_max = -1
        self._bytes = _batch.HEADER_SIZE  # worst-case size of the commit's record
        # Bytes of an in-memory log reserved for the commit record (header included), so
        # that the commit never finds the ring full (aiodbenv.log.reserve); 0 for a file log.
        self._reserved = 0
        self._state = _ACTIVE
        # What the commit did (its LSN and pages changed; None until committed): the
        # CommitInfo is made from it when asked for (result), not for every `async with`.
        self._done: tuple[LSN, int] | None = None
        self._result: CommitInfo | None = None
        stats._w[stats._base + W.begins] += 1

    @property
    def result(self) -> CommitInfo | None:
        """The result of the commit (:class:`CommitInfo`), once committed; None before."""
        if self._result is None and self._done is not None:
            self._result = CommitInfo(self._done[0], self.durability, self._done[1])
        return self._result

    # -- taking pages ---------------------------------------------------------------------------

    def _check(self) -> None:
        if _task_of(self._loop) is not self._task:
            raise InvalidArgument("this transaction belongs to another task")
        if self._state != _ACTIVE:
            raise InvalidArgument(
                "the transaction is committing"
                if self._state == _COMMITTING
                else "the transaction has ended"
            )

    def _lsn_offset(self, f: PoolFile) -> int:
        off = int(f._w0[f._entry + FILE_ENTRY.word.lsn_offset]) - 1
        if off < 0:
            raise InvalidArgument(
                f"{f.name or 'a temporary file'} was opened without lsn_offset: a transaction "
                "needs the place where the commit LSN is stamped on each page"
            )
        return off

    async def page(self, f: PoolFile, pgno: int, *, create: bool = False) -> TxnPage:
        """Take page ``pgno`` of ``f`` for writing: pin it, latch it (exclusive, between
        processes), and return a private copy (:class:`TxnPage`). Taking a page again returns
        the same copy, with this transaction's changes. ``create``: make the page if it does
        not exist (zero-filled).

        Raises InvalidArgument if ``f`` has no ``lsn_offset``; :class:`~aiodbenv.errors.TxnTooLarge`
        past ``MAX_PAGES`` (64) pages or the log's record size (the transaction stays usable);
        with an in-memory log, :class:`~aiodbenv.errors.LogBufferFull` if the ring cannot keep
        room for the commit record with this page (checkpoint, or use a larger
        ``log_buffer_size``; the transaction stays usable, and its commit is then never refused
        for space);
        :class:`~aiodbenv.errors.Deadlock` if the latch is busy and ordered below one this
        transaction holds (abort and retry; taking pages in ascending file and page order
        never gets it); :class:`~aiodbenv.errors.LockTimeout` after ``latch_timeout`` seconds.
        Cancellation: the page is neither pinned nor latched; the transaction stays usable.
        """
        self._check()
        if type(pgno) is not int or not 0 <= pgno < MAX_PGNO:
            raise InvalidArgument(f"page number must be an int in 0..2**40-1, not {pgno!r}")
        tp = self._pages.get((f._fidx, pgno))
        if tp is not None and tp.file is f:
            return tp
        pinned = None
        if self._fast:
            # A cached page with its latch free, without a coroutine; else the full path,
            # with the page if it was pinned here.
            got = self._take_now(f, pgno)
            if isinstance(got, TxnPage):
                return got
            pinned = got
        return await self._take(f, pgno, MODE_CREATE if create else MODE_GET, pinned)

    async def new(self, f: PoolFile) -> TxnPage:
        """Take a new page at the end of ``f`` (zero-filled; ``.pgno`` is its number), as
        :meth:`page` does. Cancellation: as :meth:`page` (the new page stays in the file,
        zero-filled)."""
        self._check()
        return await self._take(f, -1, MODE_NEW)

    def _file(self, f: PoolFile) -> tuple[_batch.BatchFile, int, bytes]:
        """What a commit logs of file ``f`` (its id, sizes, ``lsn_offset`` and path as
        logged: relative to the home when inside it, so that recovery of a moved home finds
        it), and the most bytes one of its pages can add to a batch. Computed once per file
        handle (they never change while it is open); raises InvalidArgument for a file a
        transaction cannot change."""
        got: tuple[_batch.BatchFile, int, bytes] | None = getattr(f, _FILE_ATTR, None)
        if got is not None:
            return got
        lo = self._lsn_offset(f)
        if f.name is None or f.nofile:
            raise InvalidArgument("transactions need a named file that is written to disk")
        if f.readonly:
            raise InvalidArgument(f"{f.name} is open read-only")
        path = f.name
        rel = os.path.relpath(path, self._pool._env_core.home)
        path = path if rel.startswith(os.pardir) else rel
        bf = _batch.BatchFile(f.fileid, f.page_size, f._data_size, lo, path)
        got = (bf, _batch.worst_size(f._data_size, path), _commit.file_entry(bf))
        setattr(f, _FILE_ATTR, got)
        return got

    def _take_now(self, f: PoolFile, pgno: int) -> TxnPage | Page | None:
        """:meth:`_take` of a cached page whose latch is free, in one compiled call for the
        latch and the copy (with a file log: nothing to reserve). Returns the taken page;
        else the page if it was pinned (the latch was busy, or the file cannot be changed:
        :meth:`_take` goes on with it), or None (nothing done)."""
        got = getattr(f, _FILE_ATTR, None)
        bf, cost, entry = got if got is not None else self._file(f)
        if len(self._pages) >= MAX_PAGES or self._bytes + cost > self._log._max_payload:
            return None  # _take raises
        page = f._pin_hit(pgno)
        if page is None or page._cache is None:
            return page
        owner = self._owner
        try:
            r, data, desc = _commit.take(page, owner, True, False, bf.lsn_offset, f._fidx, entry)
        except BaseException:
            return page  # _take tries again, and raises with the page unpinned
        if r:
            return page
        st = self._stats
        st._w[st._base + W.latch_nowait] += 1
        f._latched[page] = owner
        key = f._fidx * MAX_PGNO + page.pgno  # latch_key
        if key > self._held_max:
            self._held_max = key
        self._bytes += cost
        tp = TxnPage(f, page, data, bf, desc, entry)
        self._pages[(f._fidx, pgno)] = tp
        return tp

    async def _take(self, f: PoolFile, pgno: int, mode: int, pinned: Page | None = None) -> TxnPage:
        bf, cost, entry = self._file(f)
        lsn_off = bf.lsn_offset
        if len(self._pages) >= MAX_PAGES:
            raise TxnTooLarge(f"a transaction may take at most {MAX_PAGES} pages")
        limit = self._log._max_payload
        if self._bytes + cost > limit:
            raise TxnTooLarge(
                f"taking this page could make the commit's log record larger than a log "
                f"record may be ({limit} bytes): commit what you have first"
            )
        # In memory, room in the ring for the commit record with this page, before anything
        # is pinned (a refusal leaves the transaction as it was). Worst case: the record's
        # size as computed for TxnTooLarge, plus its log record header.
        log = self._log
        want = 0
        if log._c.inmemory and pinned is None:
            want = self._bytes + cost + _LOG_HEADER_BYTES - self._reserved
            await log._reserve(want)
            self._reserved += want
        try:
            # A cached page is pinned without an await (the pool's hit path); else the slow path.
            page = pinned
            if page is None:
                page = f._pin_hit(pgno) if mode != MODE_NEW else None
            if page is None:
                page = await f._pin(pgno, mode)
        except BaseException:
            await self._unreserve(want)
            raise
        try:
            if page._cache is None:
                raise InvalidArgument("pages of a memory-mapped file cannot be changed")
            if (f._fidx, page.pgno) in self._pages:
                # Only a new page can get here (MODE_NEW raced ourselves): not ours twice.
                raise InvalidArgument(f"page {page.pgno} is already taken by this transaction")
            key = latch_key(f._fidx, page.pgno)
            desc: Any = None
            if _commit.FAST:
                # One compiled call: latch (if free), private copy and commit descriptor.
                r, data, desc = _commit.take(
                    page, self._owner, True, mode == MODE_NEW, lsn_off, f._fidx, entry
                )
                if r:
                    await acquire(
                        self._pool,
                        page,
                        self._owner,
                        key,
                        self._held_max,
                        self.latch_timeout,
                        self._stats,
                    )
                    r, data, desc = _commit.take(
                        page, self._owner, False, mode == MODE_NEW, lsn_off, f._fidx, entry
                    )
                else:
                    self._stats.add(W.latch_nowait)
            else:
                # One try first, without a coroutine: the latch is usually free.
                if (
                    _commit.latch(page, self._owner)
                    if _commit.COMPILED
                    else self._pool._attempt(
                        try_latch, page._cache, page._bucket, page._bh, self._owner
                    )
                ):
                    await acquire(
                        self._pool,
                        page,
                        self._owner,
                        key,
                        self._held_max,
                        self.latch_timeout,
                        self._stats,
                    )
                else:
                    self._stats.add(W.latch_nowait)
                data = bytearray(page.data)
                if mode == MODE_NEW:
                    data[lsn_off : lsn_off + 8] = bytes(8)
        except BaseException:
            release(page, self._owner)  # if it was taken (a no-op otherwise)
            pending = f._unpin(page, 0)
            if pending is not None:
                await asyncio.shield(pending)
            await self._unreserve(want)
            raise
        # Known to the file too, so that closing it (or the environment) releases the latch
        # of a transaction that was never ended.
        f._latched[page] = self._owner
        if key > self._held_max:
            self._held_max = key
        self._bytes += cost
        tp = TxnPage(f, page, data, bf, desc, entry)
        self._pages[(f._fidx, page.pgno)] = tp
        return tp

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
        self._stats.add(W.aborts)
        await self._release_all()
        await self._unreserve(self._reserved)

    async def _unreserve(self, nbytes: int) -> None:
        """Give back ``nbytes`` of this transaction's reservation (nothing for a file log)."""
        if nbytes <= 0:
            return
        self._reserved -= nbytes
        await asyncio.shield(self._log._release(nbytes))

    async def _release_all(self) -> None:
        pending = self._release_now()
        if pending:
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))

    def _release_now(self, released: bool = False) -> list[asyncio.Task[None]]:
        """Release every latch (unless ``released``: the commit did) and unpin every page;
        the unpins left to a pool task (a bucket mutex held past a few milliseconds) are
        returned, for the caller to await."""
        pending = []
        for tp in self._pages.values():
            tp.file._latched.pop(tp._page, None)
            if not released:
                release(tp._page, self._owner)
            task = tp.file._unpin(tp._page, 0)
            if task is not None:
                pending.append(task)
        self._pages.clear()
        return pending

    async def commit(self) -> CommitInfo:
        """Commit: log every change as one record, copy the new images into the buffers
        (under the latches: no reader that latches sees half of it), stamp the commit LSN on
        each page, mark them dirty, release the latches; then flush the log as
        ``durability`` says (``sync``: written and fsynced, with group commit; ``write_nosync``:
        written; ``nosync``: left in the log buffer). Returns :class:`CommitInfo`.

        A failure before the record is logged (a bucket mutex held past the pool's
        ``wait_timeout``, an in-memory log that is full) aborts and raises; a failure to log
        or flush panics the environment (RunRecovery). Cancellation: before the record is in
        the log (marking the pages dirty, waiting for log buffer space), the transaction is
        aborted with nothing changed; after, the commit is whole in shared memory and only
        the wait for its flush is abandoned (the caller cannot tell whether the flush
        completed). A ``write_nosync`` commit, or one whose record is larger than the log
        buffer, runs in a task that finishes in the background either way.
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
        self._state = _COMMITTING
        # The common case, without a task per commit: a put (without flush) of a record that
        # fits in the buffer appends nothing if it is cancelled (it can wait only for buffer
        # space or a new log file), so cancellation is clean at every step. _bytes is the
        # record's worst-case size, checked as pages were taken.
        return self.durability != "write_nosync" and self._bytes + 16 <= self._log._c.bsize

    async def _commit_task(self) -> None:
        task = asyncio.ensure_future(self._commit(inline=False))
        task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def _commit(self, inline: bool) -> None:
        pages = list(self._pages.values())
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
            # Dirty first: a page flagged dirty that has not changed yet costs a write at most,
            # while a changed page a checkpoint sees clean would lose the commit. Then every
            # latch is marked committing (see latch.LATCH_COMMITTING).
            if not built.marked and not _commit.mark_now(pool, pages, built, self._owner):
                await _commit.mark(pool, pages, built, self._owner)
        except BaseException:
            await self._end_aborted()
            raise
        if _io._signal_plan:  # _io.step's own test, without its call
            _io.step("txn.committing")
        record = built.record
        try:
            wns = self.durability == "write_nosync"
            if self._reserved:
                # Released in the append's critical section: never refused for space.
                lsn = await self._log._put_reserved(record, self._reserved, wns)
                self._reserved = 0
            else:
                lsn = await self._log.put(record, write_nosync=wns)
        except (LogBufferFull, InvalidArgument):
            # Nothing was appended: the commit did not happen (release clears the flag).
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
            # The record may or may not be in the log: only recovery can tell.
            reason = f"a transaction's commit record could not be logged ({err!r})"
            pool._env_core.panic(reason)
            raise RunRecovery(f"PANIC: {reason}; run recovery") from err
        if _io._signal_plan:  # _io.step's own test, without its call
            _io.step("txn.logged")
        try:
            released = _commit.apply(pages, built, lsn, self._owner)
        except BaseException as err:
            # Logged but not whole in the buffers: only recovery can make it whole.
            reason = f"a transaction's logged commit could not be copied in ({err!r})"
            pool._env_core.panic(reason)
            raise RunRecovery(f"PANIC: {reason}; run recovery") from err
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
        if self.durability == "sync":
            # Not Log.flush(lsn): its check against the log's end reads two region words
            # without the mutex, and a round moving the buffer meanwhile can make the end look
            # smaller than this record's LSN (a spurious InvalidArgument). Ours is in the log.
            log = self._log
            word = (lsn[0] << 32) | lsn[1]
            if word >= log._c.word("s_lsn"):
                log._check()
                await log._flush_word(word)

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


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A commit whose caller was cancelled still ends: its error is logged by whoever awaited
    it, or dropped here without 'Task exception was never retrieved'."""
    if not task.cancelled():
        task.exception()
