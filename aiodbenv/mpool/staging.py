"""Scratch memory for the compiled write-back: staging buffers and entry arrays.

The compiled sync, trickle and victim batches copy pages into a staging buffer under their
bucket locks and write from it, and collect dirty buffers into C arrays of entries. Both are
megabytes, touched only by C code in a worker thread, and used for one write-back (the
victim batches keep theirs for the next batch: ``batchcall``).
"""

from __future__ import annotations

import mmap

__all__ = ["zeroed"]


def zeroed(nbytes: int) -> mmap.mmap:
    """``nbytes`` of private anonymous memory, zero pages mapped lazily by the kernel as the
    C code (GIL released) first touches them; a bytearray of 16 MiB would be zeroed on the
    spot, milliseconds on the event loop.

    Private, not ``mmap``'s default shared mapping: shared anonymous memory is shmem, whose
    every first touch and unmap goes through a page cache (locks, insert, remove); a third
    of a compiled sync's worker-thread time went there (perf). Not advised for huge pages:
    they were a little faster here, but a buffer's first touch happens under a bucket mutex
    (the copy), and a huge page's fault may stop there to compact memory."""
    return mmap.mmap(-1, max(nbytes, mmap.PAGESIZE), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
