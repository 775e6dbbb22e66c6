"""Waking the flush waiters of other processes: a futex on a word of the log region.

A process whose flush waits for another process's writer blocks a worker thread in
``FUTEX_WAIT`` on the region's ``flush_seq`` word (with a short timeout, so every wait stays
bounded and a stalled writer is still noticed); the writer bumps the word after each round
and calls ``FUTEX_WAKE``. A futex on a shared mapping works across processes. Where the
system call is not available (an architecture whose syscall number is not known here), the
waiters fall back to polling with a back-off, which costs up to one poll interval of latency.
``AIODBENV_LOG_WAKE=poll`` forces the polling (so both ways can be tested and compared).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import cffi

__all__ = ["Futex", "futex_available"]

# SYS_futex by architecture (asm/unistd.h).
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine())
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_INT_MAX = (1 << 31) - 1

_ffi: Any = None
_lib: Any = None


def _load() -> bool:
    global _ffi, _lib
    if _lib is not None:
        return True
    if _SYS_FUTEX is None or os.environ.get("AIODBENV_LOG_WAKE", "").lower() == "poll":
        return False
    try:
        ffi = cffi.FFI()
        ffi.cdef("long syscall(long number, ...);")
        lib = ffi.dlopen(None)
        lib.syscall  # noqa: B018  (fail here, not at the first wait)
    except (OSError, AttributeError):
        return False
    _ffi, _lib = ffi, lib
    return True


def futex_available() -> bool:
    """True if cross-process wake-ups work here (else waiters poll)."""
    return _load()


class Futex:
    """The futex word at byte ``offset`` of a region whose start is the cffi pointer ``base``."""

    __slots__ = ("_addr",)

    def __init__(self, base: Any, offset: int) -> None:
        if not _load():
            raise OSError("futex not available")
        self._addr = _ffi.cast("uint32_t *", base + offset)

    def wait(self, expected: int, timeout: float) -> None:
        """Block this thread until the word is no longer ``expected`` (low 32 bits), a wake,
        or ``timeout`` seconds. Run it in a worker thread, never on the event loop."""
        ts = _ffi.new("int64_t[2]", [int(timeout), int((timeout % 1) * 1e9)])
        _lib.syscall(
            _ffi.cast("long", _SYS_FUTEX),
            self._addr,
            _ffi.cast("int", _FUTEX_WAIT),
            _ffi.cast("unsigned int", expected & 0xFFFFFFFF),
            ts,
            _ffi.NULL,
            _ffi.cast("int", 0),
        )

    def wake(self) -> None:
        """Wake every thread waiting on the word, in any process."""
        _lib.syscall(
            _ffi.cast("long", _SYS_FUTEX),
            self._addr,
            _ffi.cast("int", _FUTEX_WAKE),
            _ffi.cast("int", _INT_MAX),
            _ffi.NULL,
            _ffi.NULL,
            _ffi.cast("int", 0),
        )
