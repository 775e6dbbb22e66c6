"""Transactions over the buffer pool: page latches between processes, commits logged as one
batch, and recovery from the log (see docs/durable.md).

Internal package; the public names are re-exported from :mod:`aiodbenv`. This ``__init__``
imports nothing, so that the pool's reaper can use :mod:`aiodbenv.txn.latch` without a cycle.
"""

__all__: list[str] = []
