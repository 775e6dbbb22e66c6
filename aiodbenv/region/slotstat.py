"""Counters kept per registry slot and summed over the environment (the transaction
statistics, :data:`~aiodbenv.region.layout.TXN_STAT`).

Each handle counts into its own slot with plain stores: only the slot's owner writes it, so
no mutex or atomic add is needed on the hot path. A slot keeps its counts after its handle
closes or dies, until the slot is taken again: the new owner first moves them into the
environment's ``txn_stat_retired`` (under the registry mutex) and zeroes them, so no count is
ever lost. The environment's figure is ``retired + every slot``; a reader that sums while a
move is under way would count the moved numbers twice, so the move makes ``txn_stat_seq`` odd
around it and readers retry (a seqlock).
"""

from __future__ import annotations

from .layout import (
    ENV_HEADER,
    ENV_WORD,
    MAX_PROCS,
    PROC_SLOT,
    PROC_SLOT_WORDS,
    PROCS_WORD,
    TXN_STAT,
)

__all__ = ["retire_txn_stat", "sum_txn_stat"]

_N = TXN_STAT.size // 8
_RETIRED = ENV_WORD + ENV_HEADER.word.txn_stat_retired
_SEQ = ENV_WORD + ENV_HEADER.word.txn_stat_seq
_SLOT0 = PROCS_WORD + PROC_SLOT.word.txn_stat

#: Sums a reader tries before it returns one taken while a move was under way (a mover
#: killed inside its critical section leaves the sequence odd for good).
_TRIES = 1000


def retire_txn_stat(w: memoryview, at: int) -> None:
    """Move the counts at word ``at`` (a slot being taken) into the retired counts. The caller
    holds the registry mutex (movers exclude each other)."""
    if not any(w[at : at + _N]):
        return
    w[_SEQ] += 1
    for i in range(_N):
        w[_RETIRED + i] += w[at + i]
        w[at + i] = 0
    w[_SEQ] += 1


def sum_txn_stat(w: memoryview) -> list[int]:
    """The environment's counts: the retired ones plus every slot's."""
    out: list[int] = []
    for _ in range(_TRIES):
        seq = int(w[_SEQ])
        out = list(w[_RETIRED : _RETIRED + _N])
        for s in range(MAX_PROCS):
            base = _SLOT0 + s * PROC_SLOT_WORDS
            for i, v in enumerate(w[base : base + _N]):
                out[i] += v
        if not seq & 1 and int(w[_SEQ]) == seq:
            break
    return out
