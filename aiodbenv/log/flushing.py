"""Waiting until a record is durable (fsynced) or written, for a log handle: the short way
first (:mod:`aiodbenv.log.direct`: one compiled call starts a round, or a wait on the handle's
socket for another process's round), then the long way, its Python twin (count the call in the
region, a round of its own if nobody writes, then the writer task until the record is there).
"""

from __future__ import annotations

from ..errors import LockTimeout
from ..region.mutex import BUSY, Busy
from . import direct
from .writer import LogWriter

__all__ = ["LogFlushing"]


class LogFlushing(LogWriter):
    """The waits of :class:`~aiodbenv.log.log.Log`'s flush, write-through and commit calls."""

    async def _flush_word(self, word: int) -> None:
        """Make everything up to the record at ``word`` durable."""
        c = self._c
        if word < c.word("s_lsn"):
            return
        if not c.inmemory:
            await self._reach(True, word)
            return
        try:
            old, new = c.mem_flush()
        except LockTimeout:
            old, new = await self._locked(c.mem_flush)
        if self._listeners and new > old:
            for start, end, data in self._mem_ranges(old, new):
                self._durable(start, end, data)

    async def _write_through(self, word: int) -> None:
        """Make sure the record at ``word`` is written to its file (no fsync)."""
        if not self._c.inmemory:
            await self._reach(False, word)

    async def _reach(self, sync: bool, word: int) -> None:
        """Until the record at ``word`` of a file log is durable (``sync``) or written."""
        c = self._c
        mark = "s_lsn" if sync else "w_lsn"
        seq = c.word("flush_seq")
        done = direct.start(self, sync, word)
        if done == direct.STARTED:
            await self._settle_behind()
            self._check()
        elif done == direct.REGISTERED:
            await direct.wait_other(self, sync, word, seq)
        else:
            # Counted in the region first: whichever process writes next serves it.
            fn, args = (c.register_commit, ()) if sync else (c.register_write, (word,))
            if self._attempt(fn, *args) is BUSY:
                await self._locked(fn, *args)
            await self._direct_round(sync)
        if c.word(mark) > word:
            return
        self._want.need(sync, word)
        while c.word(mark) <= word:
            await self._wait_progress()
            self._check()

    def _mem_ranges(self, old: int, new: int) -> list[tuple[int, int, bytes]]:
        """In memory: the ring's bytes of [old, new), split per "file"."""
        r = self._attempt(self._c.mem_ranges, old, new)
        return r if not isinstance(r, Busy) else []
