"""File I/O primitives, and the one seam through which tests inject faults.

Every system call aiodbenv makes on environment files and data files goes through a function
here, so a test can make the Nth call of a kind fail (``ENOSPC``, ``EIO``, a short write) with
:func:`inject` without patching the rest of the library. The functions are synchronous: callers
decide whether to run them on the event loop (cheap, non-blocking cases) or in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "Fault",
    "fallocate",
    "fdatasync",
    "fsync",
    "inject",
    "open_file",
    "pread",
    "preadv",
    "pwritev",
    "step",
    "unlink",
]


@dataclass
class Fault:
    """One planned failure: the calls of ``op`` numbered ``after`` (0-based) onward fail.

    ``times`` limits how many calls fail (``None``: every call until the fault is removed).
    ``error`` is the errno raised as ``OSError`` (``None``: the call goes through, only
    ``delay`` applies); ``short`` instead makes a write report fewer bytes than asked (a short
    write, which the caller must treat as a failure) or a ``preadv`` report half of what it
    read (as ``RWF_NOWAIT`` does where the OS cache holds only part of a page); ``delay``
    sleeps that many seconds in the calling thread first (a slow disk).
    ``calls`` counts the calls seen, ``fired`` the failures produced.
    """

    op: str
    error: int | None = errno.EIO
    after: int = 0
    times: int | None = None
    short: bool = False
    delay: float = 0.0
    calls: int = 0
    fired: int = 0

    def _hit(self) -> bool:
        n = self.calls
        self.calls += 1
        if n < self.after:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


_faults: list[Fault] = []
_faults_lock = threading.Lock()

_OPS = frozenset({"open", "fallocate", "pread", "pwrite", "fsync", "fdatasync", "unlink"})


@contextlib.contextmanager
def inject(
    op: str,
    error: int | None = errno.EIO,
    *,
    after: int = 0,
    times: int | None = None,
    short: bool = False,
    delay: float = 0.0,
) -> Iterator[Fault]:
    """Make calls of ``op`` fail while the ``with`` block runs; yields the :class:`Fault`.

    ``op`` is one of ``open``, ``fallocate``, ``pread``, ``pwrite``, ``fsync``, ``fdatasync``,
    ``unlink``.
    Faults apply to every thread of this process.
    """
    if op not in _OPS:
        raise ValueError(f"unknown I/O operation {op!r}; expected one of {sorted(_OPS)}")
    fault = Fault(op=op, error=error, after=after, times=times, short=short, delay=delay)
    with _faults_lock:
        _faults.append(fault)
    try:
        yield fault
    finally:
        with _faults_lock:
            _faults.remove(fault)


def _parse_signal_plan(text: str) -> dict[tuple[str, str], tuple[int, int]]:
    plan: dict[tuple[str, str], tuple[int, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        op, when, nth, name = part.split(":")
        plan[(op, when)] = (int(nth), int(getattr(signal, name)))
    return plan


#: Crash tests: ``AIODBENV_TEST_SIGNAL="op:when:n:SIGNAME,..."`` makes this process send itself
#: SIGNAME at the n-th (1-based) ``before`` or ``after`` point of ``op`` (an I/O operation, or a
#: step named with :func:`step`), so a child process can be killed or stopped at an exact step
#: of write-back without sleeps. Read once at import; unset, it costs one test per call.
_signal_plan = _parse_signal_plan(os.environ.get("AIODBENV_TEST_SIGNAL", ""))
_signal_counts: dict[tuple[str, str], int] = {}


def _signal_point(op: str, when: str) -> None:
    spec = _signal_plan.get((op, when))
    if spec is None:
        return
    with _faults_lock:
        n = _signal_counts[(op, when)] = _signal_counts.get((op, when), 0) + 1
    if n == spec[0]:
        # To this thread, not the process: a process-directed SIGSTOP is taken by the main
        # thread, and a worker thread calling this could run on (write, release claims) until
        # the group stop reaches it. A thread-directed one stops (or kills) the whole process
        # when this thread returns from the call.
        signal.pthread_kill(threading.get_ident(), spec[1])


def step(name: str) -> None:
    """Mark a step of an operation (``claimed``, ``write_done``, ...) for crash tests: the
    ``AIODBENV_TEST_SIGNAL`` plan may stop or kill the process here. Free when unset."""
    if _signal_plan:
        _signal_point(name, "at")


def _check(op: str) -> Fault | None:
    """The fault that applies to this call of ``op``, after its delay; None for no error."""
    if _signal_plan:
        _signal_point(op, "before")
    if not _faults:  # the common case: one list test, no lock
        return None
    with _faults_lock:
        hit = next((f for f in _faults if f.op == op and f._hit()), None)
    if hit is None:
        return None
    if hit.delay:
        time.sleep(hit.delay)
    return hit if (hit.error is not None or hit.short) else None


def _raise(fault: Fault) -> None:
    code = fault.error if fault.error is not None else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected {fault.op} fault)")


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open``; returns the descriptor."""
    fault = _check("open")
    if fault is not None:
        _raise(fault)
    return os.open(path, flags, mode)


def fallocate(fd: int, offset: int, length: int) -> None:
    """Reserve disk blocks so that later stores into a mapping cannot hit a full disk.

    ``posix_fallocate`` returns ``ENOSPC`` up front instead of a ``SIGBUS`` on first touch.
    """
    fault = _check("fallocate")
    if fault is not None:
        _raise(fault)
    os.posix_fallocate(fd, offset, length)


def pread(fd: int, length: int, offset: int) -> bytes:
    """``os.pread``."""
    fault = _check("pread")
    if fault is not None:
        _raise(fault)
    return os.pread(fd, length, offset)


def preadv(fd: int, buffers: Sequence[memoryview | bytearray], offset: int, flags: int = 0) -> int:
    """``os.preadv`` into ``buffers``; returns the bytes read (short at the end of the file).

    With ``os.RWF_NOWAIT`` the kernel answers ``BlockingIOError`` instead of waiting for the
    disk, which lets the event loop read pages that are already in the OS page cache.
    """
    fault = _check("pread")
    if fault is not None:
        if fault.short:  # read it all, report half: what RWF_NOWAIT does on a partly cached page
            return os.preadv(fd, buffers, offset, flags) // 2
        _raise(fault)
    n = os.preadv(fd, buffers, offset, flags)
    if _signal_plan:
        _signal_point("pread", "after")
    return n


def pwritev(fd: int, buffers: Sequence[bytes | bytearray | memoryview], offset: int) -> int:
    """Write ``buffers`` at ``offset`` with one ``pwritev``; returns the bytes written.

    A short write is returned as such; the caller decides whether to continue or fail.
    """
    fault = _check("pwrite")
    if fault is not None:
        if fault.short:  # write all but the last byte, as a kernel stopping short would
            data = b"".join(bytes(b) for b in buffers)[:-1]
            return os.pwrite(fd, data, offset) if data else 0
        _raise(fault)
    n = os.pwritev(fd, buffers, offset)
    if _signal_plan:
        _signal_point("pwrite", "after")
    return n


def fsync(fd: int) -> None:
    """``os.fsync``."""
    fault = _check("fsync")
    if fault is not None:
        _raise(fault)
    os.fsync(fd)
    if _signal_plan:
        _signal_point("fsync", "after")


def fdatasync(fd: int) -> None:
    """``os.fdatasync``: the log's flush (its files are preallocated, so no size change needs
    the metadata fsync would also write)."""
    fault = _check("fdatasync")
    if fault is not None:
        _raise(fault)
    os.fdatasync(fd)
    if _signal_plan:
        _signal_point("fdatasync", "after")


def unlink(path: str) -> None:
    """``os.unlink``."""
    fault = _check("unlink")
    if fault is not None:
        _raise(fault)
    os.unlink(path)
