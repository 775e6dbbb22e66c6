"""A simulated power loss through the I/O seam (``aiodbenv._io``), for the crash tests of the
log and of transactions, in one process or several.

:func:`record` patches the seam of the calling process so that every write, fsync and
preallocation of a watched file (log files, data files) is also appended to a *journal*, a
file shared by every process of the test. The real I/O and its journal entry are made under
one lock (a thread lock, then an ``flock`` of the journal), so the journal holds one order of
all the processes' I/O that is the order in which they reached the disk's cache. A process may
also journal a *mark* (a transaction begun, a commit acknowledged), which takes its place in
that order.

After the run, :func:`replay` rebuilds what the disk would hold if the power had gone just
before the ``crash_at``-th write or fsync: every file's bytes as of its last fsync (before the
crash point), plus the writes made since, each of which :meth:`Disk.lose_power` keeps, drops
or tears (a random prefix, or random 512-byte sectors), as a disk without a battery may.
Marks after the crash point are dropped too: what was acknowledged after the power went does
not count.
"""

from __future__ import annotations

import fcntl
import os
import random
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aiodbenv import _io

#: Journal record kinds. WRITE and SYNC count as I/Os (crash points); the others do not.
WRITE, SYNC, EXTEND, MARK = 1, 2, 3, 4
_REC = struct.Struct("<BIQI")  # kind, path length, offset, data length

#: File names the disk model follows (region files are not on the "disk": a power loss takes
#: them with it, and the tests remove them).
PREFIXES = ("log.", "data")


def _watched(path: str) -> bool:
    return os.path.basename(path).startswith(PREFIXES)


class Disk:
    """What the disk holds: each watched file's bytes as of its last fsync (``durable``) and
    the writes made since (``pending``)."""

    def __init__(self, base: dict[str, bytes] | None = None) -> None:
        self.durable: dict[str, bytearray] = {k: bytearray(v) for k, v in (base or {}).items()}
        self.pending: dict[str, list[tuple[int, bytes]]] = {}

    @staticmethod
    def snapshot(home: str) -> dict[str, bytes]:
        """The watched files of ``home`` as they are now (taken while nothing is unsynced)."""
        out = {}
        for name in os.listdir(home):
            path = os.path.join(home, name)
            if _watched(path):
                with open(path, "rb") as fh:
                    out[path] = fh.read()
        return out

    def write(self, path: str, offset: int, data: bytes) -> None:
        self.durable.setdefault(path, bytearray())
        self.pending.setdefault(path, []).append((offset, data))

    def extend(self, path: str, size: int) -> None:
        """A preallocation: the file is at least ``size`` bytes (zeros)."""
        image = self.durable.setdefault(path, bytearray())
        if len(image) < size:
            image.extend(bytes(size - len(image)))

    def sync(self, path: str) -> None:
        image = self.durable.setdefault(path, bytearray())
        for off, data in self.pending.pop(path, []):
            if len(image) < off + len(data):
                image.extend(bytes(off + len(data) - len(image)))
            image[off : off + len(data)] = data

    def lose_power(self, rng: random.Random, home: str) -> None:
        """Write each file as the disk would have it after the loss: its durable bytes, then
        each pending write kept (30%), dropped (30%), torn at a random byte (20%) or with
        random 512-byte sectors of it (20%). A watched file of ``home`` the disk never saw
        (made after the crash point by a process that ran on) is removed."""
        for name in os.listdir(home):
            path = os.path.join(home, name)
            if _watched(path) and path not in self.durable:
                os.unlink(path)
        for path, durable in self.durable.items():
            image = bytearray(durable)
            for off, data in self.pending.get(path, []):
                fate = rng.random()
                if fate < 0.3:
                    continue
                if len(image) < off + len(data):
                    image.extend(bytes(off + len(data) - len(image)))
                if fate < 0.6:
                    image[off : off + len(data)] = data
                elif fate < 0.8:
                    cut = rng.randint(0, len(data))
                    image[off : off + cut] = data[:cut]
                else:
                    for s in range(0, len(data), 512):
                        if rng.random() < 0.5:
                            image[off + s : off + s + 512] = data[s : s + 512]
            with open(path, "wb") as fh:
                fh.write(image)


# -- recording ------------------------------------------------------------------------------------


class Journal:
    """The shared journal, as one process appends to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()  # flock does not exclude the threads of one process
        self.ios = 0  # this process's count, for information

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal: the I/O made and journaled inside is ordered against every
        other process's."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def append(self, kind: int, path: str, offset: int = 0, data: bytes = b"") -> None:
        """Append one record (the caller holds :meth:`locked`)."""
        raw = path.encode("utf-8", "surrogateescape")
        os.write(self._fd, _REC.pack(kind, len(raw), offset, len(data)) + raw + data)

    def mark(self, data: bytes) -> None:
        """Journal a mark (not an I/O) at this point of the order."""
        with self.locked():
            self.append(MARK, "", 0, data)

    def close(self) -> None:
        os.close(self._fd)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _patched(journal: Journal) -> dict[str, Callable[..., Any]]:
    real_pwritev, real_sync = _io.pwritev, {"fsync": _io.fsync, "fdatasync": _io.fdatasync}
    real_fallocate = _io.fallocate

    def pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        path = _fd_path(fd)
        if not _watched(path):
            return real_pwritev(fd, buffers, offset)
        data = b"".join(bytes(b) for b in buffers)
        with journal.locked():
            n = real_pwritev(fd, buffers, offset)
            journal.append(WRITE, path, offset, data[:n])
            journal.ios += 1
        return n

    def syncer(name: str) -> Callable[[int], None]:
        real = real_sync[name]

        def sync(fd: int) -> None:
            path = _fd_path(fd)
            if not _watched(path):
                return real(fd)
            with journal.locked():
                real(fd)
                journal.append(SYNC, path)
                journal.ios += 1

        return sync

    def fallocate(fd: int, offset: int, length: int) -> None:
        path = _fd_path(fd)
        if not _watched(path):
            return real_fallocate(fd, offset, length)
        with journal.locked():
            real_fallocate(fd, offset, length)
            journal.append(EXTEND, path, offset + length)

    return {
        "pwritev": pwritev,
        "fsync": syncer("fsync"),
        "fdatasync": syncer("fdatasync"),
        "fallocate": fallocate,
    }


@contextmanager
def record(journal_path: str) -> Iterator[Journal]:
    """Journal this process's I/O of watched files to ``journal_path`` while the block runs."""
    journal = Journal(journal_path)
    saved = {name: getattr(_io, name) for name in ("pwritev", "fsync", "fdatasync", "fallocate")}
    for name, fn in _patched(journal).items():
        setattr(_io, name, fn)
    try:
        yield journal
    finally:
        for name, fn in saved.items():
            setattr(_io, name, fn)
        journal.close()


def install(journal_path: str) -> Journal:
    """For a child process: journal its I/O until it exits (never undone)."""
    cm = record(journal_path)
    _installed.append(cm)  # kept: a collected generator would run its finally and undo it
    return cm.__enter__()


_installed: list[Any] = []


# -- replaying ------------------------------------------------------------------------------------


def read_journal(path: str) -> Iterator[tuple[int, str, int, bytes]]:
    """The records of a journal: ``(kind, path, offset, data)``; a torn last record (its
    writer killed mid-append) ends it."""
    with open(path, "rb") as fh:
        raw = fh.read()
    pos = 0
    while pos + _REC.size <= len(raw):
        kind, plen, offset, dlen = _REC.unpack_from(raw, pos)
        end = pos + _REC.size + plen + dlen
        if end > len(raw):
            return
        p = raw[pos + _REC.size : pos + _REC.size + plen].decode("utf-8", "surrogateescape")
        yield kind, p, offset, raw[pos + _REC.size + plen : end]
        pos = end


def count_ios(path: str) -> int:
    """How many writes and fsyncs a journal holds so far."""
    return sum(1 for kind, *_ in read_journal(path) if kind in (WRITE, SYNC))


def replay(
    journal_path: str, base: dict[str, bytes], crash_at: int
) -> tuple[Disk, list[bytes], int]:
    """The disk just before the ``crash_at``-th (1-based) write or fsync of the journal (at its
    end if it holds fewer; ``crash_at`` < 1: at its end), the marks journaled before that
    point, and the number of I/Os before it."""
    disk = Disk(base)
    marks: list[bytes] = []
    ios = 0
    for kind, path, offset, data in read_journal(journal_path):
        if kind in (WRITE, SYNC):
            if ios + 1 == crash_at:
                break
            ios += 1
        if kind == WRITE:
            disk.write(path, offset, data)
        elif kind == SYNC:
            disk.sync(path)
        elif kind == EXTEND:
            disk.extend(path, offset)
        elif kind == MARK:
            marks.append(data)
    return disk, marks, ios
