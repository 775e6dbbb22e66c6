"""Buffer I/O (Berkeley DB's mp_bh.c): the one owner of a pool handle's reads and writes.

:class:`BufferIO` holds everything a page read or write needs and nothing else: the open files
of this process (their descriptors), the descriptors the pool opened to write other
processes' files, the page transforms registered here, the worker-thread limiter, the tasks
the I/O runs in, the read batcher and the write counters. Eviction (a dirty victim) and
write-back (sync, trickle, checkpoint) are both given this object, never the whole ``Pool``:
reading pages in is :mod:`~aiodbenv.mpool.bhread`, writing them out
:mod:`~aiodbenv.mpool.bhwrite`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .. import _io, _tasks
from .._threads import run_to_end
from .alloc import PoolCore
from .layout import (
    FILE_ENTRY,
    FILE_STATS,
)
from .readers import ReaderThreads, reader_kind
from .uring import UringReader, available

if TYPE_CHECKING:
    from .file import PoolFile

__all__ = [
    "IO_THREADS",
    "BufferIO",
    "LogHooks",
    "PageIn",
    "PageOut",
    "ReadBatcher",
    "close_fds",
    "new_temp_fd",
]

T = TypeVar("T")


#: ``pgin(pgno, page, cookie)`` / ``pgout(pgno, page, cookie)``: transform a page in place
#: after it is read / before it is written. Raise to fail the read or write.
PageIn = Callable[[int, memoryview, bytes], None]


PageOut = Callable[[int, memoryview, bytes], None]


logger = logging.getLogger("aiodbenv")


@dataclass(frozen=True)
class LogHooks:
    """What write-back needs of the environment's log, and nothing more (the pool never imports
    the log package: the environment, which owns both, sets this on :attr:`BufferIO.log`).

    LSNs cross this seam as ``(file, offset)`` pairs. ``flush(file, offset)`` makes the log
    durable up to and including that LSN (raising, e.g. ``RunRecovery``, if it cannot);
    ``end()`` is the LSN the next record will get (read under the log mutex);
    ``checkpoint(file, offset)`` appends and flushes a checkpoint record carrying that
    ``ckp_lsn`` and returns the record's LSN;
    ``lsn(file, offset)`` makes the public LSN value handed back to users;
    ``quiet()`` is the ``ckp_lsn`` of the last checkpoint record if nothing was logged after
    it, else None (a checkpoint without ``force`` then appends no record).
    """

    flush: Callable[[int, int], Awaitable[None]]
    end: Callable[[], Awaitable[tuple[int, int]]]
    checkpoint: Callable[[int, int], Awaitable[tuple[int, int]]]
    lsn: Callable[[int, int], tuple[int, int]]
    quiet: Callable[[], tuple[int, int] | None] = lambda: None
    #: Drops the in-memory log's commit space reserved by the transactions of registry slot
    #: ``slot`` (the reaper calls it for a dead process's slot; nothing for a file log).
    drop: Callable[[int], object] = lambda slot: None
    #: ``finish(slot, buffers)``: apply from the log the commits that dead registry ``slot``
    #: left unfinished on ``buffers`` ``(cache, bucket, offset)``, latched and flagged
    #: committing (:mod:`aiodbenv.txn.reapply`); returns (records found, pages applied).
    #: None: the reaper panics the environment instead.
    finish: Callable[[int, list[Any]], Awaitable[tuple[int, int]]] | None = None


#: Pages read per worker-thread hop at most; a hop costs 100-300 µs, a cached pread 2 µs.
_READ_BATCH = 64
#: Concurrent worker threads doing this pool's I/O.
IO_THREADS = 4


class ReadBatcher:
    """Sends reads to worker threads in batches: one hop serves every read queued meanwhile."""

    def __init__(
        self, limiter: anyio.CapacityLimiter, spawn: Callable[[Coroutine[Any, Any, None]], object]
    ) -> None:
        self._limiter = limiter
        self._spawn = spawn
        self._queue: list[tuple[int, memoryview, int, asyncio.Future[int]]] = []
        self._running = 0

    async def read(self, fd: int, view: memoryview, offset: int) -> int:
        """Read ``view`` from ``fd`` at ``offset`` in a worker thread, with the reads queued
        meanwhile; returns the bytes read (raises the read's OSError). Cancellation: the read
        still runs (its batch is under way or queued); its result is dropped."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((fd, view, offset, fut))
        if self._running < IO_THREADS:
            self._launch()
        return await fut

    def _launch(self) -> None:
        batch, self._queue = self._queue[:_READ_BATCH], self._queue[_READ_BATCH:]
        if not batch:
            return
        self._running += 1
        self._spawn(self._run(batch))

    async def _run(self, batch: list[tuple[int, memoryview, int, asyncio.Future[int]]]) -> None:
        cancelled: asyncio.CancelledError | None = None
        results: list[int | BaseException]
        try:
            results = await run_to_end(
                _read_many,
                [(fd, view, off) for fd, view, off, _ in batch],
                limiter=self._limiter,
            )
        except asyncio.CancelledError as err:
            # This task was cancelled (a shutdown cancelling every task): the thread has
            # ended or never ran (run_to_end holds the cancellation back until then), and
            # its results are lost. The readers were not cancelled themselves: each gets an
            # error of its own, and the cancellation stays this task's.
            cancelled = err
            lost = "the read's batch was cancelled before its results reached the loop"
            results = [OSError(errno.ECANCELED, lost) for _ in batch]
        except Exception as err:  # pragma: no cover - the thread itself failed
            results = [err] * len(batch)
        finally:
            self._running -= 1
        for (_, _, _, fut), res in zip(batch, results):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
        if self._queue and self._running < IO_THREADS:
            self._launch()
        if cancelled is not None:
            raise cancelled


def _read_many(jobs: list[tuple[int, memoryview, int]]) -> list[int | BaseException]:
    out: list[int | BaseException] = []
    for fd, view, offset in jobs:
        try:
            out.append(_io.preadv(fd, [view], offset))
        except OSError as err:
            out.append(err)
    return out


def new_temp_fd() -> int:
    """A backing file for a temporary pool file: unlinked at once, so it cannot outlive us."""
    fd, path = tempfile.mkstemp(prefix="aiodbenv-tmp-")
    os.unlink(path)
    return fd


def close_fds(fds: list[int], mapped: mmap.mmap | None) -> None:
    """In a worker thread: close ``fds`` and the map ``mapped`` (a file's last handle or the
    pool is closing); a descriptor already closed is not an error."""
    if mapped is not None:
        try:
            mapped.close()
        except BufferError:
            pass  # a view of a mapped page outlived its pin; the map goes with the last view
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class BufferIO:
    """The I/O of one pool handle, with one owner for each thing it uses.

    ``core`` is the pool's synchronous core, ``hs`` the word index of this handle's
    statistics block, ``pid`` this process. ``settle(fn, *args)`` runs a critical section now
    or, if its mutex stays held, in a task that retries (the pool's); ``await locked(fn,
    *args)`` runs one with bounded lock waits and an async back-off between attempts, raising
    LockTimeout at the pool's ``wait_timeout`` (the pool's ``_locked``); ``notify()`` wakes this
    process's waiters for a page or a frame; ``closing()`` says whether the pool is closing.

    Descriptors: a file handle's own descriptor belongs to its :class:`PoolFile` (in
    :attr:`files`); one opened here to write a file no handle of this process has open for
    writing belongs to this object (:attr:`wfds`), which closes it when the file's last
    handle closes or the pool does.
    """

    def __init__(
        self,
        core: PoolCore,
        hs: int,
        pid: int,
        *,
        settle: Callable[..., None],
        locked: Callable[..., Awaitable[Any]],
        notify: Callable[[], None],
        closing: Callable[[], bool],
    ) -> None:
        self.core = core
        self.hs = hs
        self.pid = pid
        self.settle = settle
        self.locked = locked
        self.notify = notify
        self.closing = closing
        #: The open files of this process's handle (their descriptors read and write pages).
        self.files: set[PoolFile] = set()
        #: ftype -> (pgin, pgout) registered in this process.
        self.registry: dict[int, tuple[PageIn | None, PageOut | None]] = {}
        # File slot -> descriptor opened here to write a file no handle of this process has
        # open for writing: only write_fd opens one (one per file, under that file's lock),
        # only close_wfd (the file's last handle) and close_all close it.
        self.wfds: dict[int, int] = {}
        self.wfd_locks: dict[int, asyncio.Lock] = {}
        #: The environment's log, when it has one: every page write of a file with an
        #: ``lsn_offset`` first flushes it up to the batch's largest page LSN (the WAL rule).
        self.log: LogHooks | None = None
        #: Descriptors whose filesystem refuses RWF_NOWAIT (reads of them go to a thread).
        self.no_nowait: set[int] = set()
        #: The I/O tasks under way (fills, read batches, write batches, fsyncs): closing
        #: waits for them, so no descriptor is closed and no region detached under one.
        self.tasks: set[asyncio.Future[Any]] = set()
        # Made on first use: a pool is built in a worker thread, where anyio objects cannot be.
        self._limiter_obj: anyio.CapacityLimiter | None = None
        self._lane_obj: anyio.CapacityLimiter | None = None
        self._reader_obj: ReadBatcher | ReaderThreads | UringReader | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The pool's worker threads: at most IO_THREADS of its I/O calls run at once."""
        if self._limiter_obj is None:
            self._limiter_obj = anyio.CapacityLimiter(IO_THREADS)
        return self._limiter_obj

    @property
    def writeback_lane(self) -> anyio.CapacityLimiter:
        """The worker thread of whole write-backs made in one call (``mpool/synchop.py``):
        one at a time, and never one of :attr:`limiter`'s, which the other I/O of the pool
        (eviction batches, fsyncs, descriptors) needs meanwhile."""
        if self._lane_obj is None:
            self._lane_obj = anyio.CapacityLimiter(1)
        return self._lane_obj

    @property
    def reader(self) -> ReadBatcher | ReaderThreads | UringReader:
        """What reads this handle's pages from the disk: io_uring where it can be had, else its
        reader threads (``AIODBENV_READER`` chooses: ``anyio`` for the batcher that sends them
        to anyio's worker threads); see :func:`~aiodbenv.mpool.readers.reader_kind`. Raises
        RuntimeError for ``uring`` where io_uring cannot be had."""
        if self._reader_obj is None:
            kind = reader_kind()
            if kind == "auto":
                kind = "uring" if available() is None else "threads"
            if kind == "uring":
                self._reader_obj = UringReader()
            elif kind == "threads":
                self._reader_obj = ReaderThreads()
            else:
                self._reader_obj = ReadBatcher(self.limiter, self.spawn)
        return self._reader_obj

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start I/O work as a task tracked until it ends (closing waits for it).

        The caller awaits it; if the caller is cancelled first, it hands the task to
        :meth:`orphan`, which logs a failure nobody else will see.
        """
        task = _tasks.start(coro)  # nothing may stop it half-way: see aiodbenv._tasks
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def track(self, fut: asyncio.Future[Any]) -> None:
        """Count ``fut`` as I/O under way until it is done (closing waits for it): work that
        runs without a task of its own, such as a read in a reader thread."""
        self.tasks.add(fut)
        fut.add_done_callback(self.tasks.discard)

    @staticmethod
    def orphan(task: asyncio.Task[Any], what: str) -> None:
        """Nobody awaits ``task`` any more (its caller was cancelled): log its failure."""

        def report(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and (err := t.exception()) is not None:
                logger.error("%s failed after its caller was cancelled: %r", what, err)

        task.add_done_callback(report)

    def pgin(self, ftype: int) -> PageIn | None:
        """The pgin registered here for files of type ``ftype`` (0: none)."""
        return self.registry.get(ftype, (None, None))[0] if ftype else None

    def pgout(self, ftype: int) -> PageOut | None:
        """The pgout registered here for files of type ``ftype`` (0: none)."""
        return self.registry.get(ftype, (None, None))[1] if ftype else None

    def own_file(self, fidx: int) -> PoolFile | None:
        """The open file of this process's handle in file slot ``fidx``, if any."""
        for f in self.files:
            if f._fidx == fidx:
                return f
        return None

    def fd_for_write(self, fidx: int) -> int | None:
        """A descriptor this process may write file slot ``fidx`` through, if it has one."""
        for f in self.files:
            if f._fidx == fidx and not f.readonly and f._fd is not None:
                return f._fd
        return self.wfds.get(fidx)

    async def write_fd(self, fidx: int, temp: bool) -> int:
        """A descriptor to write file slot ``fidx`` through, opened if this process has none.

        One owner per descriptor: a handle's own descriptor belongs to the handle; one
        opened here belongs to this object (:attr:`wfds`), and a temporary file's new backing
        file to its handle (reads need it too). Concurrent writers of one file wait on its
        lock, so exactly one descriptor is opened and nothing is closed twice. Raises OSError.

        Cancellation: called only from the pool's write-batch tasks, which are never
        cancelled (their callers shield them); a cancelled waiter for the lock opens nothing.
        """
        fd = self.fd_for_write(fidx)
        if fd is not None:
            return fd
        lock = self.wfd_locks.setdefault(fidx, asyncio.Lock())
        async with lock:
            fd = self.fd_for_write(fidx)
            if fd is not None:
                return fd
            if temp:
                f = self.own_file(fidx)
                if f is None:
                    raise OSError(errno.EBADF, "temporary file is not open in this process")
                fd = await run_to_end(new_temp_fd, limiter=self.limiter)
                f._fd = fd
                return fd
            path = self.core.file_name(fidx)
            if path is None:
                raise OSError(errno.EBADF, "file has no path to write to")
            fd = await run_to_end(
                _io.open_file, path, os.O_RDWR | os.O_CLOEXEC, limiter=self.limiter
            )
            self.wfds[fidx] = fd
            return fd

    def count_write(self, fidx: int, pages: int, nbytes: int, calls: int = 1) -> None:
        """Count ``calls`` successful writes (1: one pwritev) of ``pages`` pages of file slot
        ``fidx``, ``nbytes`` in all."""

        w0 = self.core.meta_words
        f = self.own_file(fidx)
        if f is not None:
            base = f._fs
        else:
            # Not open here (evicting another process's page): count it in the file's retired
            # counters, under the pool mutex since other processes may do the same.
            e = self.core.entry(fidx)
            if not e:
                return
            # A counter, not a record anything depends on: a pool mutex held by a stopped
            # process defers it to a task instead of blocking the event loop.
            self.settle(
                _count_retired, self.core, e + FILE_ENTRY.word.retired, pages, nbytes, calls
            )
            return
        w0[base + FILE_STATS.word.page_out] += pages
        w0[base + FILE_STATS.word.write_calls] += calls
        w0[base + FILE_STATS.word.bytes_out] += nbytes

    def close_wfd(self, fidx: int) -> int | None:
        """The descriptor opened here to write file slot ``fidx``, now no longer kept (the
        caller closes it): its last handle in this process is closing."""
        return self.wfds.pop(fidx, None)

    async def close_all(self) -> None:
        """Close every descriptor opened here for writing (the pool is closing).

        Cancellation: the close runs in a worker thread and finishes; the descriptors are
        forgotten first, so none is closed twice.
        """
        if isinstance(self._reader_obj, ReaderThreads | UringReader):
            self._reader_obj.close()  # the pool waited for its reads first
        if self.wfds:
            fds = list(self.wfds.values())
            self.wfds.clear()
            await run_to_end(close_fds, fds, None)


def _count_retired(core: PoolCore, base: int, pages: int, nbytes: int, calls: int = 1) -> None:
    """Count a write in a file entry's retired counters (under the pool mutex, taken first:
    other processes may count there too)."""
    w0 = core.meta_words
    with core.mutex:
        w0[base + FILE_STATS.word.page_out] += pages
        w0[base + FILE_STATS.word.write_calls] += calls
        w0[base + FILE_STATS.word.bytes_out] += nbytes
