"""Process-shared robust mutexes that live inside a region.

A :class:`SharedMutex` is a pthread mutex initialised ``PTHREAD_PROCESS_SHARED`` and
``PTHREAD_MUTEX_ROBUST`` in region memory, so every process that maps the region locks the same
mutex, and a holder killed with SIGKILL cannot wedge the others: the next locker gets
``EOWNERDEAD``. The mutex then calls its ``repair`` hook; if the hook makes the protected
structure whole again the mutex is marked consistent and the locker carries on, otherwise the
environment is panicked and :class:`~aiodbenv.errors.RunRecovery` is raised.

The pthread calls are bound with cffi, one ``lib`` and two ways to get it: the accelerator
module :mod:`aiodbenv._speedups`, compiled at install time when a C compiler was present
(~0.2 µs per lock+unlock), else ABI mode over libc (~0.5 µs). Setting ``AIODBENV_MUTEX=abi``
forces the fallback and with it every pure-Python path; :data:`BACKEND` says which is in use,
and :data:`speedups` is the compiled ``lib`` (with the pool's hot-path helpers) or None.
Robust mutexes belong to the thread that locked them: lock and unlock on one OS thread, and
never hold one across an ``await``.

Private environments need no cross-process exclusion and use :class:`NullMutex`.

Every wait for a held mutex is bounded (``pthread_mutex_timedlock``): a holder that is stopped
(SIGSTOP, a debugger) or wedged must not freeze the other processes. A contended lock waits at
most :data:`SYNC_WAIT` seconds, then raises :class:`~aiodbenv.errors.LockTimeout` naming the
holder's pid. Async callers run their synchronous critical sections under :func:`step_waits`,
which shortens the wait to :data:`STEP_WAIT` (a few milliseconds of event loop at most), and on
LockTimeout back off asynchronously and try again, up to the pool's ``wait_timeout``
(:func:`attempt` is one such try). Every lock taken on the event loop goes that way; the
:data:`SYNC_WAIT` bound is for worker threads, and for locks nested in a critical section that
has already changed something (:func:`sync_waits`), where a timeout would leave it half made.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any, TypeVar

from ..errors import CorruptRegion, LockTimeout, RunRecovery
from . import pthread_cdef as cdef
from .layout import MUTEX_SLOT, WORD

__all__ = [
    "BACKEND",
    "BACKOFF_MAX",
    "BUSY",
    "STEP_WAIT",
    "SYNC_WAIT",
    "Busy",
    "Mutex",
    "NullMutex",
    "SharedMutex",
    "attempt",
    "ffi",
    "lib",
    "owner_pid",
    "speedups",
    "step_waits",
    "sync_waits",
    "trylock",
    "unlock",
]


def _load() -> tuple[Any, Any, str]:
    if os.environ.get("AIODBENV_MUTEX", "").lower() != "abi":
        try:
            from .. import _speedups  # type: ignore[attr-defined]
        except ImportError:
            pass
        else:
            return _speedups.ffi, _speedups.lib, "compiled"
    import cffi

    abi_ffi = cffi.FFI()
    abi_ffi.cdef(cdef.CDEF)
    try:
        abi_lib = abi_ffi.dlopen(None)  # glibc >= 2.34 has pthread in libc itself
        abi_lib.pthread_mutex_consistent  # noqa: B018  (fail here, not at first lock)
    except (OSError, AttributeError):
        abi_lib = abi_ffi.dlopen("libpthread.so.0")
    return abi_ffi, abi_lib, "abi"


ffi, lib, BACKEND = _load()
#: The compiled module's lib when it is in use (it also has the pool's hot-path helpers).
speedups: Any = lib if BACKEND == "compiled" else None

#: ``trylock(ptr)`` and ``unlock(ptr)`` on a :attr:`SharedMutex.ptr`, for hot paths that lock
#: inline: ``if trylock(p): m.acquire_contended(rc)``, count ``nowait_index``, ``unlock(p)``.
trylock = lib.pthread_mutex_trylock
unlock = lib.pthread_mutex_unlock

#: Longest a synchronous caller waits for a held mutex before LockTimeout (seconds). It blocks
#: the calling thread: worker threads use it, the event loop only for nested locks.
SYNC_WAIT = 1.0
#: The wait of one attempt under :func:`step_waits`: async callers back off between attempts.
STEP_WAIT = 0.002
_wait_bound: ContextVar[float] = ContextVar("aiodbenv_lock_wait", default=SYNC_WAIT)


class Busy(enum.Enum):
    """The type of :data:`BUSY`."""

    BUSY = 0


#: What an attempt returns instead of its result when a mutex stayed held (nothing was done).
BUSY = Busy.BUSY

if speedups is not None:
    speedups.aiodb_set_lock_wait(int(SYNC_WAIT * 1e9))


_T = TypeVar("_T")


def attempt(fn: Callable[..., _T], *args: Any) -> _T | Busy:
    """``fn(*args)`` under :func:`step_waits`, or :data:`BUSY` if a lock in it timed out (so
    ``fn`` must lock first and change nothing on a timeout): one try of an event-loop caller,
    which then backs off asynchronously (the pool's ``_locked``) if it got BUSY."""
    token = _wait_bound.set(STEP_WAIT)
    try:
        return fn(*args)
    except LockTimeout:
        return BUSY
    finally:
        _wait_bound.reset(token)


@contextmanager
def sync_waits() -> Iterator[None]:
    """Within the block, a contended lock waits up to :data:`SYNC_WAIT` again, even under
    :func:`step_waits`: for the locks nested in a critical section that has already changed
    something, where a LockTimeout would leave the change half made. Only worker threads and
    locks held for a few word stores by everyone use it."""
    token = _wait_bound.set(SYNC_WAIT)
    try:
        yield
    finally:
        _wait_bound.reset(token)


@contextmanager
def step_waits() -> Iterator[None]:
    """Within the block, a contended lock waits only :data:`STEP_WAIT` before raising
    :class:`~aiodbenv.errors.LockTimeout`: for async callers that retry after a back-off."""
    token = _wait_bound.set(STEP_WAIT)
    try:
        yield
    finally:
        _wait_bound.reset(token)


def owner_pid(ptr: Any) -> int:
    """The pid of the process holding the pthread mutex at ``ptr``, 0 if unknown (a hint).

    A robust mutex's futex word (glibc's ``__lock``, the first 32-bit word) holds the owner's
    thread id, with the FUTEX_WAITERS and FUTEX_OWNER_DIED bits above it; it stays right after
    an EOWNERDEAD acquisition, when glibc's ``__owner`` field reads "inconsistent". The thread
    id of a process's main thread is its pid, and region mutexes are taken on the event loop's
    thread or on short-lived worker threads (whose ids are then named instead).
    """
    if ptr is None or ptr == ffi.NULL:
        return 0
    return int(ffi.cast("uint32_t *", ptr)[0]) & 0x3FFFFFFF


def timed_lock(ptr: Any, seconds: float) -> int:
    """``pthread_mutex_timedlock`` for at most ``seconds``; its return code."""
    until = time.time() + seconds
    ts = ffi.new("int64_t[2]", [int(until), int((until % 1) * 1e9)])
    return int(lib.pthread_mutex_timedlock(ptr, ts))


_W_WAITS = MUTEX_SLOT.offset("waits") // WORD
_W_NOWAITS = MUTEX_SLOT.offset("nowaits") // WORD
_W_OWNER_DIED = MUTEX_SLOT.offset("owner_died") // WORD
_W_HOLDER = MUTEX_SLOT.offset("holder_pid") // WORD


class SharedMutex:
    """A robust process-shared mutex at ``offset`` in a region (a ``MUTEX_SLOT``).

    ``base`` is a cffi ``char *`` to the start of the region and ``words`` the region as
    ``memoryview.cast('Q')``. ``repair`` runs, with the mutex held, when the previous holder died
    while holding it; it must leave the protected structure consistent or raise. ``panic`` marks
    the environment panicked; it is called when there is no repair hook or the hook fails.
    """

    __slots__ = ("_m", "_panic", "_pid", "_repair", "_w", "_words", "name", "nowait_index", "ptr")

    def __init__(
        self,
        base: Any,
        words: memoryview,
        offset: int,
        name: str,
        *,
        repair: Callable[[], None] | None = None,
        panic: Callable[[str], None] | None = None,
    ) -> None:
        if offset % WORD:
            raise ValueError("mutex offset must be word-aligned")
        self.name = name
        self._m = base + offset
        #: The pthread mutex, for hot paths that lock inline (see :func:`trylock`).
        self.ptr = self._m
        #: Word index of the no-wait counter, for hot paths that count inline.
        self.nowait_index = offset // WORD + _W_NOWAITS
        self._words = words
        self._w = offset // WORD
        self._repair = repair
        self._panic = panic
        self._pid = os.getpid()

    def rebind(self, words: memoryview) -> None:
        """Count in ``words`` from now on: a view of the same region that outlives the
        region's own (see :meth:`aiodbenv.log.state.LogState.keep_mapped`)."""
        self._words = words

    def initialize(self) -> None:
        """Initialise the pthread mutex in place (the creator does this once, before magic)."""
        attr = ffi.new("char[]", cdef.MUTEXATTR_STORAGE_BYTES)
        for rc in (
            lib.pthread_mutexattr_init(attr),
            lib.pthread_mutexattr_setpshared(attr, cdef.PTHREAD_PROCESS_SHARED),
            lib.pthread_mutexattr_setrobust(attr, cdef.PTHREAD_MUTEX_ROBUST),
            lib.pthread_mutex_init(self._m, attr),
        ):
            if rc:
                raise OSError(rc, f"initialising mutex {self.name}: {os.strerror(rc)}")
        lib.pthread_mutexattr_destroy(attr)
        w = self._words
        w[self._w + _W_WAITS] = w[self._w + _W_NOWAITS] = 0
        w[self._w + _W_OWNER_DIED] = w[self._w + _W_HOLDER] = 0

    def __enter__(self) -> None:
        rc = lib.pthread_mutex_trylock(self._m)
        if rc:
            self.acquire_contended(rc)
        try:
            w = self._words
            if not rc:
                w[self._w + _W_NOWAITS] += 1
            w[self._w + _W_HOLDER] = self._pid
        except BaseException:
            # Nothing may stop __enter__ between locking and returning, or the mutex would
            # stay locked in the region for good: let go, then report.
            lib.pthread_mutex_unlock(self._m)
            raise

    def acquire_contended(self, rc: int, wait: float | None = None) -> None:
        """Finish acquiring after ``pthread_mutex_trylock`` returned ``rc`` (non-zero): wait
        if it is held (at most ``wait`` seconds, default the bound in force, see
        :func:`step_waits`), repair or panic if its holder died. On return the mutex is held;
        raises :class:`~aiodbenv.errors.LockTimeout` (not held) if the wait ran out."""
        if rc == errno.EBUSY:
            bound = _wait_bound.get() if wait is None else wait
            rc = timed_lock(self._m, bound)
            if rc in (0, errno.EOWNERDEAD):
                try:  # the words read after the wait: they may have moved (rebind)
                    self._words[self._w + _W_WAITS] += 1
                except BaseException:
                    lib.pthread_mutex_unlock(self._m)  # never left locked: see __enter__
                    raise
            elif rc == errno.ETIMEDOUT:
                raise self.timeout(bound)
        if rc == errno.EOWNERDEAD:
            self._owner_died()
        elif rc:
            self._failed(rc)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._words[self._w + _W_HOLDER] = 0
        rc = lib.pthread_mutex_unlock(self._m)
        if rc:
            raise OSError(rc, f"unlocking mutex {self.name}: {os.strerror(rc)}")

    def timeout(self, waited: float) -> LockTimeout:
        """The error for a wait of ``waited`` seconds that did not get the mutex."""
        pid = owner_pid(self._m) or int(self._words[self._w + _W_HOLDER])
        who = f"process {pid}" if pid else "another process"
        err = LockTimeout(
            f"mutex {self.name} is held by {who} and was not released within {waited:g} s "
            f"(is that process stopped or stuck?)"
        )
        err.pid = pid
        err.mutex = self.name
        return err

    def _owner_died(self) -> None:
        # We hold the mutex, but the structure it protects may be half-changed.
        w = self._words
        w[self._w + _W_OWNER_DIED] += 1
        dead = w[self._w + _W_HOLDER]
        # Hot paths lock inline without recording themselves, so the pid may be unknown.
        who = f"process {dead}" if dead else "a process"
        try:
            if self._repair is None:
                raise RunRecovery("nothing can repair what it protects")
            self._repair()
        except BaseException as err:
            reason = f"{who} died holding mutex {self.name} and it could not be repaired"
            if self._panic is not None:
                self._panic(reason)
            # Marking it consistent before unlocking keeps the mutex usable for the processes
            # that still need to read the panic flag and close; the panic stops everyone else.
            lib.pthread_mutex_consistent(self._m)
            w[self._w + _W_HOLDER] = 0
            lib.pthread_mutex_unlock(self._m)
            raise RunRecovery(f"PANIC: {reason} ({err}); {RunRecovery.ADVICE}") from err
        lib.pthread_mutex_consistent(self._m)

    def _failed(self, rc: int) -> None:
        if rc == errno.ENOTRECOVERABLE:
            reason = f"mutex {self.name} is not recoverable"
            if self._panic is not None:
                self._panic(reason)
            raise RunRecovery(f"PANIC: {reason}; {RunRecovery.ADVICE}")
        if rc == errno.EINVAL:
            # Its bytes in the region are not a mutex any more: the region is corrupt.
            reason = f"mutex {self.name} is corrupt (EINVAL)"
            if self._panic is not None:
                self._panic(reason)
            raise CorruptRegion(f"PANIC: {reason}; run recovery")
        raise OSError(rc, f"locking mutex {self.name}: {os.strerror(rc)}")

    def stats(self) -> tuple[int, int, int]:
        """``(waits, nowaits, owner_died)`` counted across every process."""
        w = self._words
        return (w[self._w + _W_WAITS], w[self._w + _W_NOWAITS], w[self._w + _W_OWNER_DIED])

    def holder_pid(self) -> int:
        """Pid of the process holding the mutex now, 0 if none (a hint, read unlocked)."""
        return int(self._words[self._w + _W_HOLDER])


class NullMutex:
    """The mutex of a private region: one process, one event loop, nothing to exclude."""

    __slots__ = ("name",)

    #: No pthread mutex: hot paths that lock inline skip the call.
    ptr = None
    nowait_index = 0

    def __init__(self, name: str) -> None:
        self.name = name

    def initialize(self) -> None:
        """Nothing to initialise."""

    def acquire_contended(self, rc: int, wait: float | None = None) -> None:
        """Never called: a private region has no pthread mutex to contend for."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def stats(self) -> tuple[int, int, int]:
        """Always ``(0, 0, 0)``: a private region never waits."""
        return (0, 0, 0)

    def holder_pid(self) -> int:
        """Always 0."""
        return 0


#: Either kind of mutex: a shared one in a region, or the no-op one of a private environment.
Mutex = SharedMutex | NullMutex


#: Longest pause between two attempts of :func:`backoff_locked`.
BACKOFF_MAX = 0.005


async def backoff_locked(
    fn: Callable[..., _T],
    args: tuple[Any, ...],
    timeout: float,
    *,
    between: Callable[[], object] | None = None,
    name: str | None = None,
) -> _T:
    """``fn(*args)``, a synchronous critical section that locks first and changes nothing
    when a lock times out, with bounded waits on the event loop: each attempt waits at most
    :data:`STEP_WAIT` for a held mutex; after a :class:`~aiodbenv.errors.LockTimeout` the
    caller sleeps (0.5 ms, doubling up to :data:`BACKOFF_MAX`) and tries again, for up to
    ``timeout`` seconds, then raises LockTimeout naming the holder (and the mutex ``name``,
    or the one that timed out). ``between`` runs between attempts (it may raise, e.g. when
    the handle is closing). Cancellation: between attempts; nothing is held."""
    deadline: float | None = None
    delay = 0.0005
    while True:
        token = _wait_bound.set(STEP_WAIT)
        try:
            return fn(*args)
        except LockTimeout as err:
            last = err
        finally:
            _wait_bound.reset(token)
        now = time.monotonic()
        if deadline is None:
            deadline = now + timeout
        if now >= deadline:
            mutex = name or last.mutex
            who = f"process {last.pid}" if last.pid else "another process"
            final = LockTimeout(
                f"mutex {mutex} is held by {who} and was not released within "
                f"{timeout:g} s (is that process stopped or stuck?)"
            )
            final.pid, final.mutex = last.pid, mutex
            raise final from last
        await asyncio.sleep(min(delay, deadline - now))
        delay = min(delay * 2, BACKOFF_MAX)
        if between is not None:
            between()
