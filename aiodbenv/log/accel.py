"""The compiled log append (aiodbenv/_csrc/60_log.c), configured per log handle.

:func:`fast_put` returns a :class:`FastPut` for a log handle when the compiled accelerator is
in use, else None (``AIODBENV_MUTEX=abi``, or no compiler at install time): then every put
runs :meth:`~aiodbenv.log.core.LogCore.append`, its complete Python twin. The compiled call
does only the common append (room in the buffer, the mutex free); everything else (buffer full,
the next file, an in-memory log with commit space reserved (:mod:`aiodbenv.log.reserve`), a
record larger than the buffer, a held mutex, a dead holder) is handed back and done by the
Python path, so both paths share one implementation of the rare cases.
"""

from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import Executor, Future, InvalidStateError
from typing import Any

from ..mpool.hot import module as _hot
from ..region.layout import MAX_PROCS
from ..region.mutex import ffi, speedups
from ..region.mutex import unlock as unlock
from .layout import LOG_HEADER
from .lsn import LSN
from .record import REC_USER

__all__ = [
    "COMPILED",
    "HALF",
    "PYTHON",
    "ROUND_COMPILED",
    "BehindJob",
    "FastPut",
    "behind_job",
    "crc32",
    "fast_put",
]

#: True when puts go through the compiled append.
COMPILED = speedups is not None and hasattr(speedups, "aiodb_log_put")
#: Result bit of the compiled append: the buffer is now more than half full.
HALF = (1 << 62) if not COMPILED else int(speedups.AIODB_LOG_HALF)
#: Result of the compiled append: nothing done, take the Python path.
PYTHON = -2000 if not COMPILED else int(speedups.AIODB_LOG_PYTHON)
#: Result of the compiled append: a header word failed its bounds check.
CORRUPT = -1000000 if not COMPILED else int(speedups.AIODB_CORRUPT)
#: Result of the compiled append: the mutex's holder died; it is held, nothing was done.
OWNER_DEAD = -errno.EOWNERDEAD

_W = LOG_HEADER.word


class FastPut:
    """The compiled append's arguments for one log handle:
    ``fn(args, rtype, data, len(data))`` appends."""

    __slots__ = ("args", "fn", "keep", "put", "putter")

    def __init__(self, core: Any) -> None:
        h = core.h
        half = core.bsize // 2 if not core.inmemory else 1 << 62
        ptr = core.mutex.ptr
        values = [
            int(ffi.cast("uintptr_t", core.region.base)),
            int(ffi.cast("uintptr_t", ptr)) if ptr is not None else 0,
            core.b0,
            core.bsize,
            int(core.inmemory),
            core.nslots,
            core.file_size,
            half,
            core.mutex.nowait_index,
            h + _W.f_lsn,
            h + _W.tail,
            h + _W.cur_file_size,
            h + _W.st_records,
            h + _W.st_bytes,
            h + _W.rsv_total,
        ]
        # The addresses stay valid while the region is mapped: the handle drops this object
        # (its puts go the Python way) when it closes, before the region is unmapped.
        self.keep = (core.region, ptr)
        self.args = ffi.new("uint64_t[]", values)
        self.fn = speedups.aiodb_log_put
        #: ``putter.put(data)``: the whole plain put in C, the LSN made there too
        #: (:mod:`aiodbenv._hot`'s LogPutter); None without that module (``AIODBENV_HOT``).
        self.putter: Any = None
        if _hot is not None:
            self.putter = _hot.LogPutter(
                int(ffi.cast("uintptr_t", ffi.addressof(speedups, "aiodb_log_put"))),
                int(ffi.cast("uintptr_t", self.args)),
                self.args,
                LSN,
                REC_USER,
                HALF,
            )
        #: ``put(data)``: append; the LSN, else the append's int result (the buffer passed
        #: half, or why nothing was appended), or None if ``data`` is not bytes.
        self.put: Any = self.putter.put if self.putter is not None else self._put_cffi

    def _put_cffi(self, data: Any) -> Any:
        """:attr:`put` without :mod:`aiodbenv._hot`: the cffi append, the LSN made here."""
        if type(data) is not bytes:
            return None
        word = self.fn(self.args, REC_USER, data, len(data))
        if word < 0 or word & HALF:
            return word
        return tuple.__new__(LSN, (word >> 32, word & 0xFFFFFFFF))


#: States of a compiled write behind (:class:`BehindJob`).
JOB_RUNNING, JOB_DONE, JOB_STUCK, JOB_FAILED, JOB_QUEUED = 0, 1, 2, 3, 4
# The job array's slots, in the order of the J_* enum in aiodbenv/_csrc/60_log.c.
_J_STATE, _J_ERR, _J_FD, _J_FILE, _J_FOFF, _J_START, _J_END, _J_COMMITS = range(8)
_J_IDENT = 8  # pid, start time, token
_J_INDEXES = 11  # word indexes of w_lsn ... flusher_token
_J_EVFD = 20
# The whole round's slots (aiodbenv/_csrc/65_logflush.c's JX_* enum, after J_COUNT).
_JX_SYNC, _JX_MORE, _JX_INDEXES = 21, 22, 23
_JX_NSLOTS, _JX_SOCK, _JX_ROUNDS, _JX_SENT = 35, 36, 37, 38
_JX_ALIVE = 41
_J_COUNT = 44
#: True when a flush round runs as one compiled call (aiodbenv/_csrc/65_logflush.c).
ROUND_COMPILED = COMPILED and hasattr(speedups, "aiodb_log_round")
#: Whether new log handles run their compiled rounds in a round thread of their own (else in
#: the writer's executor thread; tests that gate that thread turn it off).
ROUND_THREAD = os.environ.get("AIODBENV_LOG_ROUND_THREAD", "1") != "0"


class BehindJob:
    """The compiled write behind of one log handle: :meth:`start` hands a round (started
    with ``begin_write``, the writer role held) to the writer's thread, which writes it,
    publishes it (``end_write``), lets the role go and wakes other processes' waiters in one
    C call without the GIL; :meth:`state` tells how far it got (``JOB_*``)."""

    __slots__ = ("_done", "_started_once", "core", "current_round", "fast", "j", "thread")

    def __init__(self, core: Any, fast: FastPut) -> None:
        h = core.h
        self.core = core
        self.fast = fast  # its parameter array is read by the thread
        self.j = ffi.new("uint64_t[]", _J_COUNT)
        self.j[_J_IDENT : _J_IDENT + 3] = [core.pid, core.start_time, core.token]
        self.j[_J_INDEXES:_J_EVFD] = [
            h + getattr(_W, name)
            for name in (
                "w_lsn",
                "flush_seq",
                "st_writes",
                "st_file_bytes",
                "last_write_end",
                "st_block_rewrites",
                "flusher_pid",
                "flusher_start",
                "flusher_token",
            )
        ]
        self.j[_JX_INDEXES:_JX_NSLOTS] = [
            h + getattr(_W, name)
            for name in (
                "s_lsn",
                "st_fsyncs",
                "st_flushes",
                "st_max_commits",
                "st_min_commits",
                "pending_commits",
                "want_write",
                "file_ready",
                "failed_errno",
                "failed_file",
                "wake_want",
                "wake_name",
            )
        ]
        self.j[_JX_NSLOTS] = MAX_PROCS
        #: Whether the handle's round thread runs (started with the first round; False: the
        #: rounds go to the executor's thread, as they do if it cannot be started).
        self.thread = False
        self._started_once = False
        self._done: Future[None] | None = None
        #: The CRound (aiodbenv.log.rounddata) the job array describes now: a round made
        #: before it reads as finished (the array, and its state, are the newer round's).
        self.current_round: object | None = None
        # Once the job is not idle, the start fills it: until then it reads as done.
        self.j[_J_STATE] = JOB_DONE
        if fast.putter is not None:
            # The compiled put returns the LSN itself past half while a write behind is
            # queued or running (nothing for Python to do then).
            fast.putter.set_job(int(ffi.cast("uintptr_t", self.j)), self.j)

    def set_socket(self, fd: int) -> None:
        """The datagram socket wake-ups are sent by (-1: none; waiters then re-check on
        their timeout)."""
        self.j[_JX_SOCK] = fd + 1

    def start(
        self,
        executor: Executor,
        fd: int,
        file: int,
        foff: int,
        start: int,
        end: int,
        commits: int,
        evfd: int,
        sync: bool = False,
        more: int = 0,
    ) -> Future[None] | None:
        """Have ``executor`` (the writer's thread) write buffer bytes ``[start, end)`` at
        ``foff`` of ``file`` (open as ``fd``), fdatasync it if ``sync``, publish it, run up
        to ``more`` further rounds for the flush and write-through calls of any process
        registered meanwhile, let the role go and wake the waiters, in one call without the
        GIL; the call adds 1 to the eventfd ``evfd`` when done (-1: none). The round runs in
        the handle's round thread (None returned), else in ``executor`` (its future)."""
        j = self.j
        j[_J_STATE], j[_J_EVFD] = JOB_QUEUED, evfd + 1
        j[_J_FD], j[_J_FILE], j[_J_FOFF] = fd, file, foff
        j[_J_START], j[_J_END], j[_J_COMMITS] = start, end, commits
        j[_JX_SYNC], j[_JX_MORE] = int(sync), more
        if not self.thread and not self._started_once and ROUND_THREAD:
            self._started_once = True
            if speedups.aiodb_log_thread_start(self.fast.args, j) == 0:
                self.thread = True
                _BY_JOB[int(ffi.cast("uintptr_t", j))] = self
        if self.thread:
            speedups.aiodb_log_thread_go(j)
            return None
        return executor.submit(self._run)

    def busy(self) -> bool:
        """Whether a round is queued for the round thread or running in it."""
        return int(self.j[_J_STATE]) in (JOB_QUEUED, JOB_RUNNING)

    def done_future(self) -> Future[None]:
        """A future resolved (in the round thread) when the round under way has ended: for a
        handle that closes while its round runs in the round thread (:mod:`.orphan`)."""
        f: Future[None] = Future()
        self._done = f
        state = int(speedups.aiodb_log_thread_notify(self.j))
        if state not in (JOB_QUEUED, JOB_RUNNING):
            self._resolve()
        return f

    def _resolve(self) -> None:
        f = self._done
        if f is not None and not f.done():
            try:
                f.set_result(None)
            except InvalidStateError:
                pass  # resolved by the other side meanwhile

    def quit(self) -> None:
        """Ask the round thread to end (after the round it runs, if any). The job (and the
        arrays the thread reads) is kept until the thread has ended."""
        if self.thread:
            speedups.aiodb_log_thread_quit(self.j)
            self.thread = False
        _forget_ended()

    def current(self) -> tuple[int, int, int, bool, int]:
        """``(file, start, end, sync, commits)`` of the round the job describes now (after
        further rounds, the last one: what the loop publishes if it is left stuck)."""
        j = self.j
        return (
            int(j[_J_FILE]),
            int(j[_J_START]),
            int(j[_J_END]),
            bool(j[_JX_SYNC]),
            int(j[_J_COMMITS]),
        )

    def rounds(self) -> tuple[int, int]:
        """``(rounds, wake-ups sent)`` by the last call (for tests)."""
        return int(self.j[_JX_ROUNDS]), int(self.j[_JX_SENT])

    def wake(self, everyone: bool) -> int:
        """Send the waiters' wake-ups a publish owes (see :mod:`aiodbenv.log.wakesock`),
        without the GIL's help: the number sent."""
        return int(speedups.aiodb_log_wake(self.fast.args, self.j, int(everyone)))

    def _run(self) -> None:
        if speedups.aiodb_log_round(self.fast.args, self.j) == OWNER_DEAD:
            self._repair()

    def _repair(self) -> None:
        # Left held for us, its holder dead: repair here, in the thread that holds it (a
        # robust mutex is its locker's), as any locker would; the loop publishes.
        core = self.core
        core.mutex.acquire_contended(errno.EOWNERDEAD)
        if core._ptr is not None:
            unlock(core._ptr)

    def state(self) -> int:
        """``JOB_QUEUED`` until the writer's thread starts it, ``JOB_RUNNING`` while it
        works, then ``JOB_DONE`` (published, role let
        go), ``JOB_STUCK`` (written, not published: the mutex stayed held or its holder died)
        or ``JOB_FAILED`` (the write failed with :meth:`error`)."""
        return int(self.j[_J_STATE])

    def error(self) -> int:
        """The errno of a failed write."""
        return int(self.j[_J_ERR])


#: Jobs whose round thread was started, by the address of their job array: kept alive until
#: the thread has ended (it reads their arrays), and found by the repair callback, which the
#: thread makes with that address.
_BY_JOB: dict[int, BehindJob] = {}

#: How often the loop looks again for round threads that were asked to end and have not yet
#: (one ends within a round's time: at once when idle, after its write on a slow disk).
_FORGET_POLL = 0.05
_forget_on: asyncio.AbstractEventLoop | None = None  # the loop a look is scheduled on


def _forget_ended() -> None:
    """Drop the jobs whose round thread has ended (their arrays are no longer read), and, on
    a running loop, look again later while a thread asked to end still runs: a closed
    handle's job, and what it refers to (the log's views kept for a late write), must not
    wait for the next close to go."""
    global _forget_on
    ending = False
    for key, job in list(_BY_JOB.items()):
        if job.thread:
            continue
        if job.j[_JX_ALIVE] == 0:
            _BY_JOB.pop(key, None)  # another loop's thread may have dropped it meanwhile
        else:
            ending = True
    if not ending:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop to look from: the next close looks again
    if _forget_on is loop:
        return  # a look is due on this loop already (one on a loop since closed never comes)
    _forget_on = loop
    loop.call_later(_FORGET_POLL, _forget_again)


def _forget_again() -> None:
    global _forget_on
    _forget_on = None
    _forget_ended()


if ROUND_COMPILED:

    @ffi.def_extern(name="aiodb_log_repair_cb")  # type: ignore[untyped-decorator]
    def _repair_cb(j: Any) -> None:
        """The round thread found the log mutex held by a dead process (it holds it now)."""
        job = _BY_JOB.get(int(ffi.cast("uintptr_t", j)))
        if job is not None:
            job._repair()

    @ffi.def_extern(name="aiodb_log_done_cb")  # type: ignore[untyped-decorator]
    def _done_cb(j: Any) -> None:
        """The round thread ended a round its closed handle waits for."""
        job = _BY_JOB.get(int(ffi.cast("uintptr_t", j)))
        if job is not None:
            job._resolve()


def behind_job(core: Any, fast: FastPut | None) -> BehindJob | None:
    """The compiled write behind of a file log handle with the compiled append, or None."""
    if fast is None or core.inmemory or not ROUND_COMPILED:
        return None
    return BehindJob(core, fast)


def fast_put(core: Any) -> FastPut | None:
    """The compiled append for ``core`` (a :class:`~aiodbenv.log.core.LogCore`), or None."""
    return FastPut(core) if COMPILED else None


def crc32(data: bytes) -> int:
    """The compiled CRC-32 of ``data`` (for tests: it must equal ``zlib.crc32``)."""
    if not COMPILED:
        raise RuntimeError("the compiled accelerator is not in use")
    return int(speedups.aiodb_log_crc32(data, len(data)))


def _forget_in_child() -> None:
    # A forked child has none of the parent's round threads: their jobs (and the parent's
    # cores they refer to) are nobody's there, and one still ending would be polled forever.
    global _forget_on
    _BY_JOB.clear()
    _forget_on = None


os.register_at_fork(after_in_child=_forget_in_child)
