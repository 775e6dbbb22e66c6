"""Transaction statistics: :class:`TxnStat`, counted in shared memory per handle and summed over
the environment (see :mod:`aiodbenv.region.slotstat`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..region.layout import PROC_SLOT, PROC_SLOT_WORDS, PROCS_WORD, TXN_STAT
from ..region.slotstat import sum_txn_stat

__all__ = ["TxnStat", "TxnStats"]

#: Word index of each counter in a set (``TXN_STAT.word.aborts`` ...).
W = TXN_STAT.word


@dataclass(frozen=True)
class TxnStat:
    """Transaction statistics: transactions begun, commits by durability (and those that
    changed nothing), aborts (explicit, by an exception, by a Deadlock or a failed commit),
    pages logged and how many as full images, latches taken at once or after a wait,
    ``deadlocks`` refused by the order rule, latch waits timed out.

    ``env.txn_stat()`` gives the environment's (every process and handle since the regions
    were made, closed and dead ones included); ``env.txn_stat(handle=True)`` this handle's."""

    begins: int
    commits_sync: int
    commits_write_nosync: int
    commits_nosync: int
    readonly_commits: int
    aborts: int
    pages_logged: int
    full_images: int
    latch_nowait: int
    latch_waits: int
    deadlocks: int
    latch_timeouts: int


assert [f for f in TxnStat.__dataclass_fields__] == TXN_STAT.fields()

#: The counter of commits of each durability.
COMMIT_WORD = {
    "sync": W.commits_sync,
    "write_nosync": W.commits_write_nosync,
    "nosync": W.commits_nosync,
}


class TxnStats:
    """One handle's counters: the ``TXN_STAT`` words of its registry slot in region 1
    ``words``. Only this handle writes them (plain stores from its event loop thread)."""

    __slots__ = ("_base", "_w")

    def __init__(self, words: memoryview, slot: int) -> None:
        self._w = words
        self._base = PROCS_WORD + slot * PROC_SLOT_WORDS + PROC_SLOT.word.txn_stat

    def add(self, word: int, n: int = 1) -> None:
        """Add ``n`` to counter ``word`` (an index of ``TXN_STAT.word``)."""
        self._w[self._base + word] += n

    def handle(self) -> TxnStat:
        """This handle's counts now."""
        b = self._base
        return TxnStat(*self._w[b : b + len(TXN_STAT.fields())])

    def environment(self) -> TxnStat:
        """The environment's counts now."""
        return TxnStat(*sum_txn_stat(self._w))
