"""Why an environment was panicked, kept in its header for every process to tell.

A panic is a flag in the environment header (``ENV_HEADER.panic``): every handle's next call
raises :class:`~aiodbenv.errors.RunRecovery`. The process that panics logs its reason, but the
others (the workers of a web backend, a monitoring command) only saw the flag and had to find
that log line. The first process to panic the environment also writes, before the flag, its
pid, the time and its reason (UTF-8, cut to :data:`~aiodbenv.region.layout.PANIC_REASON_BYTES`
bytes at a character boundary); later panics keep the first cause, which is the one that
matters. Two processes panicking at the same moment may both write: the fields are fixed in
size and each is a whole cause, so a reader gets one of them or, at worst, a reason mixed
from the two, never a read out of bounds.
"""

from __future__ import annotations

import time

from .layout import (
    ENV_HEADER,
    ENV_HEADER_OFFSET,
    ENV_HEADERS_END,
    ENV_WORD,
    LAYOUT_VERSION,
    PANIC_REASON_BYTES,
)

__all__ = ["cause", "cause_in", "note", "record"]

_PID = ENV_WORD + ENV_HEADER.word.panic_pid
_NS = ENV_WORD + ENV_HEADER.word.panic_ns
_FLAG = ENV_WORD + ENV_HEADER.word.panic
_VERSION = ENV_WORD + ENV_HEADER.word.version
_REASON = ENV_HEADER_OFFSET + ENV_HEADER.offset("panic_reason")


def _ours(words: memoryview) -> bool:
    """Is region 1 (``words``) long enough, and of this layout version? (A force remove may
    meet another version's environment: its flag is set, nothing else is written.)"""
    return len(words) * 8 >= ENV_HEADERS_END and words[_VERSION] == LAYOUT_VERSION


def record(words: memoryview, pid: int, reason: str) -> None:
    """Panic the environment whose region 1 is ``words``: write the cause (unless a cause is
    there already), then set the flag."""
    if _ours(words) and not words[_PID]:
        raw = reason.encode("utf-8", "replace")[: PANIC_REASON_BYTES - 1]
        raw = raw.decode("utf-8", "ignore").encode("utf-8")  # not a character cut in two
        b = words.cast("B")
        b[_REASON : _REASON + PANIC_REASON_BYTES] = raw.ljust(PANIC_REASON_BYTES, b"\0")
        words[_NS] = time.time_ns()
        words[_PID] = pid
    words[_FLAG] = 1


def cause(words: memoryview) -> str | None:
    """``"by process PID at TIME: REASON"`` for a panicked environment whose cause was
    recorded, else None."""
    if not _ours(words):
        return None
    pid = int(words[_PID])
    if not words[_FLAG] or not pid:
        return None
    raw = bytes(words.cast("B")[_REASON : _REASON + PANIC_REASON_BYTES])
    reason = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(words[_NS]) / 1e9))
    return f"by process {pid} at {when}: {reason}"


def cause_in(header: bytes) -> str | None:
    """:func:`cause` of region 1's headers as read from its file or segment (the first
    ``ENV_HEADERS_END`` bytes, of this layout version: a joiner checked it), None if short."""
    if len(header) < ENV_HEADERS_END:
        return None
    return cause(memoryview(bytearray(header[:ENV_HEADERS_END])).cast("Q"))


def note(why: str | None) -> str:
    """`` (CAUSE)`` to put in a message, or nothing without a recorded cause."""
    return f" ({why})" if why else ""
