"""The registry of live processes: one slot per open handle of a shared environment.

A handle takes a free slot of the environment header's ``procs`` array (under the environment
mutex), writes its pid and its process start time there, and holds an OFD byte lock
(``F_OFD_SETLK``) on byte ``slot`` of the home's ``__db.procs`` for as long as it is open. The
kernel drops that lock when the process dies, however it dies, so a slot whose byte is
unlocked belongs to a dead handle. An OFD lock, unlike a classic POSIX lock, is not dropped by
a ``close()`` of some other descriptor of the file in the same process, and it is held by an
open file description, not a pid, so a recycled pid cannot inherit it. The start time (field
22 of ``/proc/PID/stat``) is checked as well: a slot whose pid is gone, or now names a process
started at another time, is dead even if some descendant still holds the description open
(inherited through ``fork`` without ``exec``).

Each buffer header counts pins per slot (:data:`aiodbenv.mpool.layout.BH` ``pins``); the
reaper (:mod:`aiodbenv.mpool.reaper`) uses the slot index of a dead handle to drop exactly
the pins it held. Private environments have no registry.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
import weakref
from dataclasses import dataclass

from ..errors import Busy
from .layout import ENV_HEADER, ENV_WORD, MAX_PROCS, PROC_SLOT, PROC_SLOT_WORDS, PROCS_WORD
from .mutex import NullMutex, SharedMutex
from .slotstat import retire_txn_stat

__all__ = ["LOCK_FILE", "ProcInfo", "Registry", "process_start_time", "read_slots"]

#: The lock file in the home whose byte N is locked by the handle in slot N.
LOCK_FILE = "__db.procs"

FREE, IN_USE, REAPING = 0, 1, 2


# struct flock on Linux (64-bit off_t): short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid; native alignment pads it to 32 bytes. l_pid must be 0 for OFD locks.
_FLOCK = "@hhqqi4x"
_F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)


def process_start_time(pid: int) -> int:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field
    22), or 0 if there is no such process (or it is a zombie, which is dead for us)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    # The command name (field 2) is in parentheses and may hold any byte, ')' included: the
    # fields after it start after the last ')'. Field 3 is the state, field 22 the start time.
    rest = data[data.rfind(b")") + 2 :].split()
    if len(rest) < 20 or rest[0] in (b"Z", b"X", b"x"):
        return 0
    return int(rest[19])


_open_registries: weakref.WeakSet[Registry] = weakref.WeakSet()


def _forget_in_child() -> None:
    # A forked child shares the parent's open file descriptions: closing its copies drops
    # nothing while the parent lives, and keeps a child that outlives the parent from making
    # the parent's slot look alive (the start-time check catches that case too).
    for reg in list(_open_registries):
        reg._drop_fd()


os.register_at_fork(after_in_child=_forget_in_child)


@dataclass(frozen=True)
class ProcInfo:
    """A slot of the registry: the handle's ``slot``, ``pid``, when it opened (``opened``,
    seconds since the epoch) and the ``pins`` it holds (filled in by the pool's statistics)."""

    slot: int
    pid: int
    opened: float
    start_time: int
    pins: int = 0


class Registry:
    """This handle's slot in an environment's registry, and the view of everyone else's.

    ``words`` is region 1 as 8-byte words; ``mutex`` the environment mutex, which guards
    every slot's ``state``. Blocking (a few system calls): run from a worker thread or in
    short steps on the loop.
    """

    __slots__ = ("__weakref__", "_fd", "_mutex", "_start", "_w", "home", "pid", "slot")

    def __init__(
        self, home: str, words: memoryview, mutex: SharedMutex | NullMutex, mode: int
    ) -> None:
        self.home = home
        self._w = words
        self._mutex = mutex
        self.pid = os.getpid()
        self._start = process_start_time(self.pid)
        path = os.path.join(home, LOCK_FILE)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            os.fchmod(self._fd, mode)  # exactly the environment's mode, as its region files
        except FileExistsError:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(self._fd).st_size < MAX_PROCS:
                os.ftruncate(self._fd, MAX_PROCS)  # lockable past EOF too; this is for eyes
            self.slot = self._take()
        except BaseException:
            os.close(self._fd)
            raise
        _open_registries.add(self)

    # -- the lock file

    def _lock(self, slot: int, op: int, kind: int) -> bytes:
        arg = struct.pack(_FLOCK, kind, os.SEEK_SET, slot, 1, 0)
        return fcntl.fcntl(self._fd, op, arg)

    def _held_by_another(self, slot: int) -> bool:
        """Whether an open file description other than ours holds byte ``slot``."""
        out = self._lock(slot, _F_OFD_GETLK, fcntl.F_WRLCK)
        return bool(struct.unpack(_FLOCK, out)[0] != fcntl.F_UNLCK)

    def _take(self) -> int:
        with self._mutex:
            for s in range(MAX_PROCS):
                base = PROCS_WORD + s * PROC_SLOT_WORDS
                if self._w[base + PROC_SLOT.word.state] != FREE:
                    continue
                try:
                    self._lock(s, _F_OFD_SETLK, fcntl.F_WRLCK)
                except OSError as err:
                    if err.errno in (errno.EAGAIN, errno.EACCES):
                        continue  # a slot freed by a reaper while its owner lives (stopped)
                    raise
                w = self._w
                retire_txn_stat(w, base + PROC_SLOT.word.txn_stat)
                w[base + PROC_SLOT.word.pid] = self.pid
                w[base + PROC_SLOT.word.start_time] = self._start
                w[base + PROC_SLOT.word.opened_ns] = time.time_ns()
                w[base + PROC_SLOT.word.reaper] = 0
                w[base + PROC_SLOT.word.reaper_start] = 0
                w[base + PROC_SLOT.word.state] = IN_USE
                # The handle is counted in the same critical section that takes the slot, so a
                # process killed at any point is counted exactly as long as its slot is in use.
                w[ENV_WORD + ENV_HEADER.word.refcnt] += 1
                w[ENV_WORD + ENV_HEADER.word.opens] += 1
                return s
        raise Busy(
            f"environment {self.home}: all {MAX_PROCS} process slots are taken by open handles"
        )

    # -- liveness

    def _word(self, slot: int, name: str) -> int:
        return int(self._w[PROCS_WORD + slot * PROC_SLOT_WORDS + getattr(PROC_SLOT.word, name)])

    def _set(self, slot: int, name: str, value: int) -> None:
        self._w[PROCS_WORD + slot * PROC_SLOT_WORDS + getattr(PROC_SLOT.word, name)] = value

    def is_dead(self, slot: int) -> bool:
        """Whether the handle in ``slot`` is gone: its lock byte is free, or its pid is gone or
        names a process with another start time (a recycled pid). Never true for our own slot
        or a stopped process (it still holds its lock)."""
        if slot == self.slot or self._fd < 0:
            return False
        if not self._held_by_another(slot):
            return True
        pid = self._word(slot, "pid")
        start = self._word(slot, "start_time")
        return process_start_time(pid) != start

    def _reaper_dead(self, slot: int) -> bool:
        pid = self._word(slot, "reaper")
        return process_start_time(pid) != self._word(slot, "reaper_start")

    def dead_slots(self) -> list[int]:
        """The in-use slots whose handles are dead (cheap: one ``fcntl`` per in-use slot)."""
        out = []
        for s in range(MAX_PROCS):
            state = self._word(s, "state")
            if state == IN_USE and self.is_dead(s):
                out.append(s)
            elif state == REAPING and s != self.slot and self._reaper_dead(s):
                out.append(s)  # its reaper died half-way: reaping again is harmless
        return out

    def claim(self, slot: int) -> ProcInfo | None:
        """Mark dead ``slot`` as being reaped by this process; None if it is not dead or
        another live process reaps it already. Returns what the slot held."""
        with self._mutex:
            state = self._word(slot, "state")
            if state == IN_USE:
                if not self.is_dead(slot):
                    return None
            elif state != REAPING or not self._reaper_dead(slot):
                return None
            self._set(slot, "reaper", self.pid)
            self._set(slot, "reaper_start", self._start)
            self._set(slot, "state", REAPING)
            return self._info(slot)

    def unclaim(self, slot: int) -> None:
        """Give back a slot this process claimed but could not finish reaping (a bucket stayed
        busy): it is in use again, still dead, and the next look reaps it."""
        with self._mutex:
            if self._word(slot, "state") == REAPING and self._word(slot, "reaper") == self.pid:
                self._set(slot, "reaper", 0)
                self._set(slot, "reaper_start", 0)
                self._set(slot, "state", IN_USE)

    def free(self, slot: int, *, pins: int, dirty: int) -> bool:
        """Free a slot this process reaped (its pins are gone): count it, the ``pins`` dropped
        and the ``dirty`` pages inherited, and uncount its handle, which the dead process
        never closed. False if another reaper took the slot over meanwhile."""
        w = self._w
        with self._mutex:
            if self._word(slot, "state") != REAPING or self._word(slot, "reaper") != self.pid:
                return False
            for name in ("pid", "start_time", "opened_ns", "reaper", "reaper_start"):
                self._set(slot, name, 0)
            self._set(slot, "state", FREE)
            w[ENV_WORD + ENV_HEADER.word.procs_reaped] += 1
            w[ENV_WORD + ENV_HEADER.word.pins_reclaimed] += pins
            w[ENV_WORD + ENV_HEADER.word.dirty_inherited] += dirty
            if w[ENV_WORD + ENV_HEADER.word.refcnt] > 0:
                w[ENV_WORD + ENV_HEADER.word.refcnt] -= 1
            return True

    def _info(self, slot: int) -> ProcInfo:
        return ProcInfo(
            slot=slot,
            pid=self._word(slot, "pid"),
            opened=self._word(slot, "opened_ns") / 1e9,
            start_time=self._word(slot, "start_time"),
        )

    def live(self) -> list[ProcInfo]:
        """Every in-use slot (dead ones not yet reaped included: see :meth:`is_dead`)."""
        return [self._info(s) for s in range(MAX_PROCS) if self._word(s, "state") == IN_USE]

    # -- leaving

    def _drop_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def leave(self) -> None:
        """Free our slot, uncount our handle and drop the slot's lock (at close; idempotent).
        A slot a reaper took from us (it judged us dead) is left to it, and so is the count."""
        if self._fd < 0 or os.getpid() != self.pid:
            return
        w = self._w
        try:
            with self._mutex:
                if (
                    self._word(self.slot, "state") == IN_USE
                    and self._word(self.slot, "pid") == self.pid
                ):
                    for name in ("pid", "start_time", "opened_ns"):
                        self._set(self.slot, name, 0)
                    self._set(self.slot, "state", FREE)
                    if w[ENV_WORD + ENV_HEADER.word.refcnt] > 0:
                        w[ENV_WORD + ENV_HEADER.word.refcnt] -= 1
        finally:
            self._drop_fd()


def read_slots(words: memoryview) -> list[tuple[int, int, int, int, int]]:
    """Rows ``(slot, state, pid, start_time, opened_ns)`` of every non-free slot, read
    without locking (for statistics)."""
    out = []
    for s in range(MAX_PROCS):
        base = PROCS_WORD + s * PROC_SLOT_WORDS
        state = int(words[base + PROC_SLOT.word.state])
        if state != FREE:
            out.append(
                (
                    s,
                    state,
                    int(words[base + PROC_SLOT.word.pid]),
                    int(words[base + PROC_SLOT.word.start_time]),
                    int(words[base + PROC_SLOT.word.opened_ns]),
                )
            )
    return out
