"""Reading pages that are not in the OS page cache: a small fixed pool of reader threads.

A miss whose page must come from the disk cannot be read on the event loop. Sending it through
anyio's ``to_thread`` costs a task, a capacity limiter and a hop of 100-250 µs each way, more
than the read itself on a fast disk. Here each pool handle keeps a few reader threads fed by a
``queue.SimpleQueue``: a read is one ``put`` and one future; the thread ``preadv``s (the GIL
released), and completions come back to the loop in batches: one ``call_soon_threadsafe`` per
batch, made by the thread that finds the completion list empty. Several threads keep
concurrent misses overlapping on the disk.

Where io_uring can be had (the compiled accelerator, a kernel that allows it) reads go
through it instead, without a thread (:class:`aiodbenv.mpool.uring.UringReader`);
``AIODBENV_READER`` chooses (:func:`reader_kind`).
``AIODBENV_READER=anyio`` uses the older batcher (:class:`aiodbenv.mpool.bh.ReadBatcher`)
instead, for comparison (``benchmarks``); both Python readers read through
:func:`aiodbenv._io.preadv`, so fault injection reaches either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable

from .. import _io

__all__ = ["READERS", "READER_THREADS", "PageReader", "ReaderThreads", "reader_kind", "use_threads"]

logger = logging.getLogger("aiodbenv")

#: Reader threads per pool handle: enough to keep a few dozen concurrent misses overlapping
#: on the disk (each blocks in one read at a time); started as reads need them.
READER_THREADS = 8


#: The values of ``AIODBENV_READER``.
READERS = ("auto", "uring", "threads", "anyio")


def reader_kind() -> str:
    """``AIODBENV_READER``, checked: ``auto`` (the default: io_uring where it can be had,
    else reader threads), ``uring`` (:class:`aiodbenv.mpool.uring.UringReader`, or an error
    where io_uring cannot be had), ``threads`` (:class:`ReaderThreads`) or ``anyio`` (anyio's
    threads). Read when a pool handle makes its reader."""
    choice = os.environ.get("AIODBENV_READER", "auto")
    if choice not in READERS:
        raise ValueError(f"AIODBENV_READER must be one of {', '.join(READERS)}, not {choice!r}")
    return choice


def use_threads() -> bool:
    """Whether page reads use a reader of this module's kind -- reader threads or io_uring,
    both delivering through ``submit_call`` -- rather than anyio's threads
    (``AIODBENV_READER=anyio``)."""
    return reader_kind() != "anyio"


#: What a read hands its result to, on the loop: the bytes read, or the read's exception.
Done = Callable[[int | BaseException], object]
_Job = tuple[int, memoryview, int, Done]


class PageReader:
    """What every page reader of this module's kind offers on top of its ``submit_call``
    (reader threads, io_uring): a future for a read, and an awaitable read."""

    _loop: asyncio.AbstractEventLoop

    def submit_call(self, fd: int, view: memoryview, offset: int, done: Done) -> None:
        """Start reading ``view`` from ``fd`` at ``offset``; ``done`` gets the result."""
        raise NotImplementedError

    async def read(self, fd: int, view: memoryview, offset: int) -> int:
        """Read ``view`` from ``fd`` at ``offset``; returns the bytes read (short only at the
        end of the file; raises the read's OSError). Cancellation: the read still runs to its
        end (the view must stay valid: the caller's buffer is pinned until then); its result
        is dropped."""
        return await self.submit(fd, view, offset)

    def submit(self, fd: int, view: memoryview, offset: int) -> asyncio.Future[int]:
        """Start the read (now, or -- the io_uring reader -- with the other reads of this turn
        of the loop, at its end; the caller may await it later); the future gets the bytes
        read or the read's OSError. Cancelling the future drops the result, not the read."""
        fut: asyncio.Future[int] = self._loop.create_future()

        def deliver(res: int | BaseException) -> None:
            if fut.done():
                return  # its reader was cancelled
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

        self.submit_call(fd, view, offset, deliver)
        return fut


class ReaderThreads(PageReader):
    """Reader threads of one pool handle, bound to the event loop that made them."""

    def __init__(self, nthreads: int = READER_THREADS) -> None:
        self._loop = asyncio.get_running_loop()
        self._max = nthreads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job (changed under _lock)
        self._lock = threading.Lock()
        self._done: list[tuple[Done, int | BaseException]] = []
        #: Reads submitted and not yet delivered to the loop.
        self._running = 0
        #: Reads delivered to the loop since the threads were made.
        self.reads = 0
        self._closed = False

    @property
    def _queue(self) -> int:
        """Reads not yet taken by a thread."""
        return self._jobs.qsize()

    def submit_call(self, fd: int, view: memoryview, offset: int, done: Done) -> None:
        """Queue the read now; ``done`` gets its result on the loop, called directly by the
        batch delivery (no future, no task: the caller's own wake-up is the only loop turn
        after the read). ``done`` must not raise (an exception is logged)."""
        if self._closed:
            raise RuntimeError("the pool's reader threads are stopped")
        self._running += 1
        self._jobs.put((fd, view, offset, done))
        with self._lock:
            spare = self._idle
        if spare < self._jobs.qsize() and len(self._threads) < self._max:
            t = threading.Thread(target=self._work, name="aiodbenv-reader", daemon=True)
            self._threads.append(t)
            t.start()

    def _work(self) -> None:
        jobs, lock, done = self._jobs, self._lock, self._done
        while True:
            with lock:
                self._idle += 1
            job = jobs.get()
            with lock:
                self._idle -= 1
            if job is None:
                return
            fd, view, offset, call = job
            res: int | BaseException
            try:
                res = _io.preadv(fd, [view], offset)
            except BaseException as err:  # delivered to the reader, whatever it is
                res = err
            with lock:
                first = not done
                done.append((call, res))
            if first:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return

    def _deliver(self) -> None:
        with self._lock:
            batch = self._done[:]
            self._done.clear()
        self._running -= len(batch)
        self.reads += len(batch)
        for call, res in batch:
            try:
                call(res)
            except Exception:  # one reader's bug must not lose the others' results
                logger.exception("handing a page read to its reader failed")

    @property
    def threads(self) -> int:
        """Reader threads started (and not stopped)."""
        return len(self._threads)

    def close(self) -> None:
        """Stop the threads once the reads queued have run (the pool is closing, and has
        waited for its reads). Never blocks."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        self._threads.clear()

    def __repr__(self) -> str:
        return f"<ReaderThreads {len(self._threads)} threads, {self._running} reads>"
