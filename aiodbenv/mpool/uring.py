"""Reading pages that are not in the OS page cache through io_uring, without a thread.

:class:`~aiodbenv.mpool.readers.ReaderThreads` costs two thread wake-ups per read besides the
disk's (its thread, then the loop): on a loaded two-CPU machine each is as long as the read.
Here the loop thread hands the read to the kernel itself (``IORING_OP_READ``, one
``io_uring_enter``; aiodbenv/_csrc/45_reader.c), the kernel starts the disk at once and copies
the page into the frame in this thread's own context when the disk is done, and the loop,
watching the ring's descriptor with ``add_reader``, reaps every completion of a wake-up in one
call and hands each to its reader (the same ``done`` callbacks as the reader threads'). Reads
overlap up to the ring's depth (64); more wait in a queue, in order.

A read made while none is at the disk starts at once. Reads made while others are at the
disk (concurrent misses) are gathered and started together at the end of the loop's turn, in
one ``io_uring_enter``: the kernel hands them to the device as one batch, with one
notification of the device for all of them. On a virtual disk each notification cost the
loop thread 20-30 µs; with 32 coroutines missing on a dropped cache, gathering them (and
skipping the miss's RWF_NOWAIT attempt, which starts a disk read of its own, while misses keep
going to the disk: aiodbenv/_csrc/40_miss.c) doubled the rate of misses here.

Used by default where it can be had (``AIODBENV_READER=auto``: the compiled accelerator in
use, and neither the kernel nor a seccomp filter refusing io_uring); ``AIODBENV_READER=uring``
insists on it (a pool handle's first disk read raises where it cannot be had), ``threads``
and ``anyio`` choose the Python readers.
While a test's I/O fault (:func:`aiodbenv._io.inject`) or crash-test signal plan is armed,
reads go to reader threads instead, so that :func:`aiodbenv._io.preadv` -- the seam those
hooks watch -- makes them.

A forked child never uses its parent's ring: it is closed in the child at the fork (the
parent's stays as it was), and the child's handles refuse to work anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections import deque
from typing import Any

from .. import _io
from ..region.mutex import ffi, speedups
from .readers import Done, PageReader, ReaderThreads

__all__ = ["DEPTH", "UringReader", "available"]

logger = logging.getLogger("aiodbenv")

#: Reads in flight at once per pool handle (more wait in a queue): enough for a few dozen
#: concurrent misses, and the kernel keeps twice as many completion slots.
DEPTH = 64

#: How long closing waits for reads still in flight (only when the pool could not wait for
#: them itself: the loop stopped, say) before the ring is closed under them; the kernel
#: cancels them then, so no page is copied into a frame afterwards.
CLOSE_WAIT = 2.0

#: Why io_uring cannot be used here, found once per process ("" until tried, None if it can).
_why_not: str | None = ""

_live: weakref.WeakSet[UringReader] = weakref.WeakSet()


def available() -> str | None:
    """None if this process can read through io_uring, else why not (no compiled
    accelerator, ``AIODBENV_MUTEX=abi``, the kernel or a seccomp filter refusing
    ``io_uring_setup``). Tried once per process."""
    global _why_not
    if _why_not != "":
        return _why_not
    if speedups is None:
        _why_not = "the compiled accelerator is not in use"
        return _why_not
    err = ffi.new("int *")
    r = speedups.aiodb_reader_open(2, err)
    if r == ffi.NULL:
        _why_not = f"io_uring_setup failed: {os.strerror(err[0])}"
    else:
        speedups.aiodb_reader_close(r)
        _why_not = None
    return _why_not


class _Ring:
    """The C reader, closed once (by :meth:`UringReader.close`, at a fork in the child, or
    when the reader is collected)."""

    __slots__ = ("r",)

    def __init__(self, r: Any) -> None:
        self.r = r

    def close(self) -> None:
        r = self.r
        if r is None:
            return
        self.r = None
        wait = CLOSE_WAIT
        # Reads still in flight write into frames: give them a bounded time to finish first.
        deadline = time.monotonic() + wait
        tokens = ffi.new("uint64_t[]", DEPTH)
        results = ffi.new("int64_t[]", DEPTH)
        while speedups.aiodb_reader_inflight(r) and time.monotonic() < deadline:
            left = max(1, int((deadline - time.monotonic()) * 1000))
            if speedups.aiodb_reader_wait(r, min(left, 50)) < 0:
                break
            speedups.aiodb_reader_reap(r, tokens, results, DEPTH)
        if speedups.aiodb_reader_inflight(r):
            logger.warning(
                "closing the page reader with %d reads still in flight after %.1f s: the "
                "kernel cancels them",
                speedups.aiodb_reader_inflight(r),
                wait,
            )
        speedups.aiodb_reader_close(r)

    def forget(self) -> None:
        """In a forked child: drop this process's copy of the ring; nothing is waited for
        (the reads in flight are the parent's)."""
        r = self.r
        if r is not None:
            self.r = None
            speedups.aiodb_reader_close(r)


#: A read not yet in the kernel: descriptor, the caller's view, the C buffer over it (made
#: when the read is asked for, so a view the kernel cannot write fails the caller at once),
#: offset, and what gets the result.
_Job = tuple[int, memoryview, Any, int, Done]


class UringReader(PageReader):
    """The io_uring page reader of one pool handle, bound to the event loop that made it."""

    #: Reap right after a submit (tests turn it off to hold a completed read until the loop
    #: reaps it, as one still at the disk is).
    reap_on_submit = True

    def __init__(self, depth: int = DEPTH) -> None:
        why = available()
        if why is not None:
            raise RuntimeError(f"io_uring page reads are not available: {why}")
        self._loop = asyncio.get_running_loop()
        err = ffi.new("int *")
        r = speedups.aiodb_reader_open(depth, err)
        if r == ffi.NULL:
            raise OSError(err[0], f"io_uring_setup: {os.strerror(err[0])}")
        self._ring = _Ring(r)
        self._finalizer = weakref.finalize(self, self._ring.close)
        self._depth = depth
        self._fd = speedups.aiodb_reader_fd(r)
        self._tokens = ffi.new("uint64_t[]", depth)
        self._results = ffi.new("int64_t[]", depth)
        # token -> the reader's callback and the buffer the kernel writes (kept alive).
        self._calls: dict[int, tuple[Done, Any]] = {}
        self._next = 1
        self._waiting: deque[_Job] = deque()  # over the ring's depth, in order
        self._batch: list[_Job] = []  # to start together at the end of the loop's turn
        self._batch_due = False  # _start_batch is scheduled
        self._fds = ffi.new("int[]", depth)
        self._bufs = ffi.new("char *[]", depth)
        self._lens = ffi.new("uint64_t[]", depth)
        self._offs = ffi.new("uint64_t[]", depth)
        self._ids = ffi.new("uint64_t[]", depth)
        self._fallback: ReaderThreads | None = None
        #: Reads delivered to the loop through the ring since it was made.
        self.reads = 0
        #: ``io_uring_enter`` calls that started reads (fewer than the reads when reads made
        #: while others were at the disk started together).
        self.starts = 0
        self._closed = False
        self._loop.add_reader(self._fd, self._reap)
        _live.add(self)

    @property
    def _running(self) -> int:
        """Reads submitted and not yet delivered to the loop (the ring's, the queue's and the
        fallback threads')."""
        n = len(self._calls) + len(self._waiting) + len(self._batch)
        return n + (self._fallback._running if self._fallback is not None else 0)

    @property
    def _queue(self) -> int:
        """Reads not yet handed to the kernel (over the ring's depth, or gathered for the end
        of the loop's turn) or to a thread."""
        return (
            len(self._waiting)
            + len(self._batch)
            + (self._fallback._queue if self._fallback is not None else 0)
        )

    @property
    def threads(self) -> int:
        """Reader threads started for reads under a test's fault hooks (0 otherwise)."""
        return self._fallback.threads if self._fallback is not None else 0

    def submit_call(self, fd: int, view: memoryview, offset: int, done: Done) -> None:
        """Start the read: now if no other read is at the disk, else together with the other
        reads of this turn of the loop, at its end. ``done`` gets its result on the loop (the
        bytes read, or the OSError), called directly when the loop reaps it -- possibly
        before this returns, when the kernel had the page at once. ``done`` must not raise
        (an exception is logged). ``view`` must stay valid until then."""
        if self._closed:
            raise RuntimeError("the pool's page reader is closed")
        if _io._faults or _io._signal_plan:
            # Test hooks watch _io.preadv: let it make the read.
            self._threads().submit_call(fd, view, offset, done)
            return
        job = (fd, view, ffi.from_buffer(view, require_writable=True), offset, done)
        if self._waiting or len(self._calls) + len(self._batch) >= self._depth:
            self._waiting.append(job)
            return
        if self._calls or self._batch:
            # Others are at the disk: this one's wait is theirs anyway; starting it with the
            # rest of the turn's saves a device notification per read.
            self._batch.append(job)
            if not self._batch_due:
                self._batch_due = True
                self._loop.call_soon(self._start_batch)
            return
        self._start_many([job])
        if not self.reap_on_submit:
            return
        # The page may have come in since the miss found it missing (its RWF_NOWAIT attempt
        # started the disk read): the kernel then completes the read inside the submit, and
        # reaping now hands it over without a wake-up of the loop (``done`` runs before this
        # returns).
        self._reap()

    def _start_batch(self) -> None:
        """At the end of the loop's turn: start the reads gathered in it (unless a reap has
        started them already, with the ones waiting behind them)."""
        self._batch_due = False
        batch, self._batch = self._batch, []
        if batch and not self._closed:
            self._start_many(batch)
            if self.reap_on_submit:
                self._reap()

    def _start_many(self, jobs: list[_Job]) -> None:
        """Start ``jobs`` in one call. Those the kernel did not take wait first in line for
        the next completion (the ring was full, or took part of them); if it took none and
        said why (no memory, say), or nothing of ours is in flight to make room, reader
        threads read them and everything waiting, so that no read is left behind."""
        n = len(jobs)
        if n == 1:  # a lone miss's read: no arrays to fill
            fd, _, buf, offset, _ = jobs[0]
            rc = speedups.aiodb_reader_submit_one(
                self._ring.r, fd, buf, len(buf), offset, self._next
            )
        else:
            fds, bufs, lens, offs, ids = self._fds, self._bufs, self._lens, self._offs, self._ids
            for k, (fd, _, buf, offset, _) in enumerate(jobs):
                fds[k], bufs[k], lens[k], offs[k] = fd, buf, len(buf), offset
                ids[k] = self._next + k
            rc = speedups.aiodb_reader_submit_many(self._ring.r, n, fds, bufs, lens, offs, ids)
        started = max(rc, 0)
        self.starts += started > 0
        calls = self._calls
        for k in range(started):
            calls[self._next + k] = (jobs[k][4], jobs[k][2])
        self._next += n
        rest = jobs[started:]
        if not rest:
            return
        if rc >= 0 and calls:
            self._waiting.extendleft(reversed(rest))
            return
        # The kernel would not take them now: threads read them, and report whatever the
        # read itself gives.
        why = os.strerror(-rc) if rc < 0 else "no read of ours in flight to wait for"
        logger.debug("io_uring_enter took none of %d reads (%s): reading in threads", n, why)
        rest.extend(self._waiting)
        self._waiting.clear()
        for fd, view, buf, offset, done in rest:
            ffi.release(buf)
            self._threads().submit_call(fd, view, offset, done)

    def _threads(self) -> ReaderThreads:
        if self._fallback is None:
            self._fallback = ReaderThreads()
        return self._fallback

    def _reap(self) -> None:
        # The ring's descriptor is readable: completions wait. One call takes them all.
        r = self._ring.r
        if r is None:
            return
        tokens, results = self._tokens, self._results
        n = speedups.aiodb_reader_reap(r, tokens, results, self._depth)
        calls = self._calls
        for k in range(n):
            entry = calls.pop(tokens[k], None)
            if entry is None:
                continue
            ffi.release(entry[1])  # the read is done: the caller may release its view now
            res = results[k]
            out: int | BaseException = res
            if res < 0:
                out = OSError(-res, os.strerror(-res))
            self.reads += 1
            try:
                entry[0](out)
            except Exception:  # one reader's bug must not lose the others' results
                logger.exception("handing a page read to its reader failed")
        # Room made: the reads gathered for the end of this turn first (they were asked for
        # before any that waits), then the waiting ones, in one call.
        waiting, batch = self._waiting, self._batch
        room = self._depth - len(calls)
        if (waiting or batch) and room > 0 and not self._closed:
            jobs = batch[:room]
            del batch[: len(jobs)]
            while waiting and len(jobs) < room:
                jobs.append(waiting.popleft())
            self._start_many(jobs)

    def close(self) -> None:
        """Stop reading (the pool is closing, and has waited for its reads). Reads still in
        flight (the pool could not wait: its loop stopped) get a bounded time to finish
        before the ring is closed and the kernel cancels them; their results are dropped."""
        if self._closed:
            return
        self._closed = True
        if self._ring.r is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._drop_queued()
        self._finalizer()  # waits (bounded) for reads in flight into the buffers below
        for _, buf in self._calls.values():
            ffi.release(buf)
        self._calls.clear()
        if self._fallback is not None:
            self._fallback.close()

    def _forget_in_child(self) -> None:
        self._closed = True
        self._finalizer.detach()
        self._ring.forget()
        for _, buf in self._calls.values():
            ffi.release(buf)
        self._calls.clear()
        self._drop_queued()

    def _drop_queued(self) -> None:
        """Forget the reads not yet in the kernel (their buffers let go: never read)."""
        for job in [*self._waiting, *self._batch]:
            ffi.release(job[2])
        self._waiting.clear()
        self._batch.clear()

    def __repr__(self) -> str:
        queued = len(self._waiting) + len(self._batch)
        return f"<UringReader {len(self._calls)} reads in flight, {queued} queued>"


def _after_fork_in_child() -> None:
    for reader in list(_live):
        reader._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
