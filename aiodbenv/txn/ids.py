"""Latch owner ids: unique within a process, never 0 (a free latch)."""

from __future__ import annotations

import itertools

__all__ = ["next_owner_id"]

_ids = itertools.count(1)


def next_owner_id() -> int:
    """A process-unique 32-bit id (never 0) for a latch owner: a transaction or a reader."""
    return (next(_ids) & 0xFFFFFFFF) or next(_ids)
