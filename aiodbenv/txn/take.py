"""Taking pages for a transaction (:class:`TxnTaking`, the base of
:class:`~aiodbenv.txn.txn.Txn`): ``tx.page(f, pgno)`` pins the buffer, takes its exclusive latch
(:mod:`aiodbenv.txn.latch`) and hands out a private copy (:class:`TxnPage`); nothing in shared
memory changes until commit. A cached page whose latch is free is taken without a coroutine,
in one compiled call after the pin where the accelerator has it (:func:`~aiodbenv.txn.commit.take`).
"""

from __future__ import annotations

import asyncio
import os
import types
from typing import TYPE_CHECKING, Any, Literal

from .._tasks import start as _run_to_end
from ..errors import InvalidArgument, TxnTooLarge
from ..log.record import HEADER as _LOG_HEADER
from ..mpool.fget import MODE_CREATE, MODE_GET, MODE_NEW
from ..mpool.layout import FILE_ENTRY, MAX_PGNO
from ..region.mutex import ffi as _ffi
from . import batch as _batch
from . import commit as _commit
from .latch import acquire, latch_key, release, try_latch, wake
from .stat import TxnStats, W

if TYPE_CHECKING:
    from ..log.log import Log
    from ..log.lsn import LSN
    from ..mpool.file import PoolFile
    from ..mpool.page import Page
    from ..mpool.pool import Pool
    from .txn import CommitInfo

__all__ = ["MAX_PAGES", "TxnPage", "TxnTaking"]

Durability = Literal["sync", "write_nosync", "nosync"]

#: The most pages one transaction may take (``TxnTooLarge`` past it). Latches are held until
#: the end of the transaction: keep transactions short and small.
MAX_PAGES = 64
_LOG_HEADER_BYTES = _LOG_HEADER.size
_cast: Any = _ffi.cast if _ffi is not None else None


class TxnPage:
    """A page taken by a transaction: ``data`` is a private, writable copy of the page (its
    bytes without any checksum trailer). Change it freely; it reaches shared memory only when
    the transaction commits. The 8 bytes at the file's ``lsn_offset`` belong to the library:
    changes to them are ignored (the commit stamps its LSN there).

    When the transaction ends (commit or abort), ``data`` is released, as a :class:`Page`'s is
    when it is unpinned: a later read or write raises ``ValueError`` instead of changing a copy
    nobody will look at. (A buffer of it that something still holds, such as a NumPy array
    over it, keeps the copy alive; changes through it go nowhere either.) A commit that
    panics the environment (:class:`~aiodbenv.RunRecovery`) releases it too."""

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

    def _retire(self) -> None:
        """The transaction ended: release the view of the copy (see the class)."""
        try:
            self.data.release()
        except BufferError:
            # Exported (numpy.frombuffer, a PickleBuffer): the holder keeps the copy, but
            # ``data`` itself must still refuse, so it becomes an already-released view.
            gone = memoryview(b"")
            gone.release()
            self.data = gone


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


class TxnTaking:
    """What a transaction does before it ends: take pages (:meth:`page`, :meth:`new`).
    Its state is :class:`~aiodbenv.txn.txn.Txn`'s, made by its constructor."""

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

    _pool: Pool
    _log: Log
    _fast: bool
    _task: asyncio.Task[Any]
    _loop: asyncio.AbstractEventLoop
    durability: Durability
    #: Seconds :meth:`page` waits for a latch before LockTimeout.
    latch_timeout: float
    _stats: TxnStats
    _owner: int
    _pages: dict[tuple[int, int], TxnPage]
    _held_max: int
    _bytes: int
    _reserved: int
    _state: int
    _done: tuple[LSN, int] | None
    _result: CommitInfo | None

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
        owner = self._owner
        hotc = f._hotc if _commit.HOT_TAKE else None
        if hotc is not None:
            # The pin and the take in one compiled call (see commit.HOT_TAKE).
            taken = hotc.txn_take(pgno, owner, bf.lsn_offset, f._fidx, len(entry))
            if type(taken) is not tuple:
                return taken  # type: ignore[no-any-return]
            page, data = taken
            desc = None
        else:
            page = f._pin_hit(pgno)
            if page is None or page._cache is None:
                return page
            try:
                r, data, desc = _commit.take(
                    page, owner, True, False, bf.lsn_offset, f._fidx, entry
                )
            except BaseException:
                return page  # _take tries again, and raises with the page unpinned
            if r:
                return page
        # Latched and pinned: until the page is the transaction's, a failure here (out of
        # memory) would leave a latch nothing knows of, held for good.
        try:
            if desc is None:
                # The commit calls take the descriptor's address as a cffi pointer; the
                # TxnCopy after it keeps its memory alive.
                desc = (_cast("uint64_t *", data.desc), data)
            tp = TxnPage(f, page, data, bf, desc, entry)
            self._pages[(f._fidx, pgno)] = tp
            f._latched[page] = owner
            self._pool._latch_tasks[owner] = self._task  # (see latch._waits_for)
        except BaseException:
            self._pages.pop((f._fidx, pgno), None)
            f._latched.pop(page, None)
            release(page, owner)
            wake(self._pool, page)
            f._unpin(page, 0)  # a pool task finishes it if its bucket is busy
            raise
        st = self._stats
        st._w[st._base + W.latch_nowait] += 1
        key = f._fidx * MAX_PGNO + page.pgno  # latch_key
        if key > self._held_max:
            self._held_max = key
        self._bytes += cost
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
            wake(self._pool, page)
            pending = f._unpin(page, 0)
            if pending is not None:
                await asyncio.shield(pending)
            await self._unreserve(want)
            raise
        # Known to the file too, so that closing it (or the environment) releases the latch
        # of a transaction that was never ended.
        f._latched[page] = self._owner
        self._pool._latch_tasks[self._owner] = self._task  # (see latch._waits_for)
        if key > self._held_max:
            self._held_max = key
        self._bytes += cost
        tp = TxnPage(f, page, data, bf, desc, entry)
        self._pages[(f._fidx, page.pgno)] = tp
        return tp

    async def _unreserve(self, nbytes: int) -> None:
        """Give back ``nbytes`` of this transaction's reservation (nothing for a file log)."""
        if nbytes <= 0:
            return
        self._reserved -= nbytes
        # A task nothing may cancel: a shutdown cancelling every task must not leave the
        # reservation half given back (aiodbenv._tasks).
        await asyncio.shield(_run_to_end(self._log._release(nbytes)))
