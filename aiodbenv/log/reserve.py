"""Commit space reserved in the in-memory log, so that a transaction's commit never fails with
:class:`~aiodbenv.errors.LogBufferFull` (Berkeley DB's can).

The in-memory log is a ring of "files": starting the next one is refused when it would
overwrite the "file" holding the last checkpoint's ``ckp_lsn``. The *free space* is what can
still be appended before that: the current "file"'s remaining bytes plus every whole "file"
that can still start (each less its header record). Before any checkpoint nothing is needed
and the ring is unbounded, but a checkpoint taken then would need the current "file": free
space is counted as if it had been, so that reservations made before a checkpoint still hold
after it.

A transaction reserves, as it takes each page, the worst-case size of its commit record
(:meth:`LogReserve.reserve`, under the log mutex; refused with LogBufferFull then, leaving the
transaction usable). The bytes are counted in the log region, in total (``rsv_total``) and per
registry slot (``rsv``: the reaper drops a dead process's, a closing handle its own). A commit
holding a reservation releases it in the same critical section as its append; an abort
releases it.

The bound kept is ``free >= 2 * rsv_total + slack``. Records never span "files", so a record
of ``r`` bytes wastes less than ``r`` at a switch and a commit of ``r <= q`` reserved bytes
consumes less than ``2q``: the bound still holds after it for the others, and the commit
itself always fits. Every other record appended while a reservation is open is checked
against the bound (the compiled append hands such puts to Python: it reads ``rsv_total``):
a user record must leave ``2 * rsv_total + RESERVE_SLACK`` free, a checkpoint record only
``2 * rsv_total`` (checkpoints free space; the slack is theirs). Refused puts raise
LogBufferFull and append nothing.

For a file log every method here is a no-op: a file log waits for the writer instead of
failing.
"""

from __future__ import annotations

from ..errors import LogBufferFull
from ..region.layout import MAX_PROCS
from .layout import LOG_HEADER
from .record import FILE_HEADER_BYTES
from .state import LogState

__all__ = ["RESERVE_SLACK", "LogReserve"]

_W = LOG_HEADER.word
_U32 = 0xFFFFFFFF

#: Bytes kept free beyond twice the reserved total for checkpoint records, which are
#: appended even when a user record would be refused (a checkpoint record is < 64 bytes).
RESERVE_SLACK = 512


class LogReserve(LogState):
    """The reservation words of the log region (see the module docstring)."""

    #: This handle's registry slot (where its transactions' reservations are counted).
    rsv_slot = 0

    def _free_locked(self, ckp: int | None = None) -> tuple[int, int]:
        """In memory, under the mutex: (free bytes, bytes left in the current "file"), with
        the last checkpoint's ``ckp_lsn`` word, or ``ckp`` (one about to be recorded)."""
        w, h = self.w, self.h
        cur = w[h + _W.f_lsn] >> 32
        left = max(0, w[h + _W.cur_file_size] - (w[h + _W.tail] & _U32))
        needed = (w[h + _W.ckp_lsn] if ckp is None else ckp) >> 32
        if not needed or needed > cur:
            needed = cur  # no checkpoint yet: count as if one were taken now (see above)
        whole = max(0, needed + self.nslots - 1 - cur)
        return left + whole * (self.file_size - FILE_HEADER_BYTES), left

    def _full(self, what: str, free: int, want: int) -> LogBufferFull:
        return LogBufferFull(
            f"in-memory log buffer is full: {what} would leave {free} bytes free where "
            f"{want} are kept for the commit records of open transactions "
            f"({self.w[self.h + _W.rsv_total]} bytes reserved); checkpoint, end "
            "transactions, or use a larger log_buffer_size"
        )

    def check_put_locked(self, total: int, ckp: int | None) -> None:
        """In memory, under the mutex, with a reservation open: raise LogBufferFull if
        appending a record of ``total`` bytes (header included) would break the bound.
        ``ckp``: the record is a checkpoint carrying that ``ckp_lsn`` word, which will pin
        its "file" once recorded (an older one than the last checkpoint's shrinks the free
        space: it is counted with it), and may use the slack."""
        free, left = self._free_locked(ckp)
        after = free - total - (left if total > left else 0)
        want = 2 * self.w[self.h + _W.rsv_total] + (0 if ckp is not None else RESERVE_SLACK)
        if after < want:
            what = "a checkpoint record" if ckp is not None else "a record"
            raise self._full(f"appending {what} of {total} bytes", after, want)

    def release_locked(self, slot: int, nbytes: int) -> None:
        """Under the mutex: give back ``nbytes`` reserved by ``slot`` (never below 0)."""
        w, h = self.w, self.h
        i = h + _W.rsv + slot
        n = min(nbytes, w[i])
        w[i] -= n
        w[h + _W.rsv_total] -= min(n, w[h + _W.rsv_total])

    def reserve(self, nbytes: int) -> None:
        """Reserve ``nbytes`` of the in-memory log for a commit record, counted in this
        handle's slot; LogBufferFull (nothing reserved) if the bound would break. A no-op
        for a file log."""
        if not self.inmemory or nbytes <= 0:
            return
        with self.mutex:
            w, h = self.w, self.h
            free, _ = self._free_locked()
            total = w[h + _W.rsv_total] + nbytes
            want = 2 * total + RESERVE_SLACK
            if free < want:
                raise self._full(f"reserving {nbytes} bytes for a commit", free, want)
            w[h + _W.rsv + self.rsv_slot] += nbytes
            w[h + _W.rsv_total] = total

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` this handle reserved (an abort). A no-op for a file log."""
        if not self.inmemory or nbytes <= 0:
            return
        with self.mutex:
            self.release_locked(self.rsv_slot, nbytes)

    def drop_slot(self, slot: int) -> int:
        """Drop every reservation of registry slot ``slot`` (its process died, or this
        handle closes); the bytes dropped."""
        if not 0 <= slot < MAX_PROCS:
            return 0
        # Its flush waits' wake-up registration goes too (aiodbenv.log.wakesock).
        self.w[self.h + _W.wake_want + slot] = 0
        self.w[self.h + _W.wake_name + slot] = 0
        if not self.inmemory:
            return 0
        with self.mutex:
            n = int(self.w[self.h + _W.rsv + slot])
            self.release_locked(slot, n)
            return n

    def reserved(self, slot: int | None = None) -> int:
        """Bytes reserved in total, or by ``slot`` (for tests and statistics)."""
        return int(self.w[self.h + (_W.rsv_total if slot is None else _W.rsv + slot)])
