"""The buffer pool's shared structures, defined once (see :mod:`aiodbenv.region.layout`).

A pool is ``ncache`` mpool regions ("caches"). Each starts with the ``REGION_HEADER`` and a
``CACHE_HEADER``, then its array of hash ``BUCKET`` s; the rest is the region's allocator arena,
from which buffers (a ``BH`` header followed by the page) are carved. The first cache also holds
the ``POOL_HEADER`` (configuration, the file index, the list of handle statistics) right after
its cache header; file entries and statistics blocks are allocated from its arena.

All offsets are byte offsets within the region that holds the structure; 0 means "none".
"""

from __future__ import annotations

from ..region.layout import ALLOC_CHUNK, MAX_PROCS, MUTEX_SLOT, REGION_HEADER, WORD, Layout

__all__ = [
    "BH",
    "BH_DIRTY",
    "BH_FAILED",
    "BH_READING",
    "BH_REDIRTIED",
    "BH_WRITING",
    "BUCKET",
    "CACHE_HEADER",
    "CACHE_HEADER_AT",
    "CHUNK_TAG_BEFORE_BH",
    "FF_CHECKSUM",
    "FF_DEAD",
    "FF_NOFILE",
    "FF_NO_MMAP",
    "FF_TEMP",
    "FILE_ENTRY",
    "FILE_STATS",
    "FSTAT_FIELDS",
    "GSTAT_FIELDS",
    "HANDLE_STATS",
    "LATCH_COMMITTING",
    "LATCH_READER",
    "MAX_FILES",
    "MAX_PGNO",
    "PINS_HALF",
    "PIN_CLOCK",
    "POOL_HEADER",
    "POOL_HEADER_AT",
    "WORKER_ERROR_WORDS",
    "WORKER_STATE_FIELDS",
    "quiet_latch",
]

#: Files a pool can hold at once (open, or with pages still cached).
MAX_FILES = 256

#: Page numbers are below this (write-back packs a file slot and a page number in one int;
#: 2**40 pages is a petabyte of 1 KiB pages, far past Berkeley DB's 32-bit page numbers).
MAX_PGNO = 1 << 40

# Buffer flags.
BH_DIRTY = 1  # must be written before the frame is reused
BH_READING = 2  # being read in: contents invalid; waiters poll until it clears
# A copy is being written by process io_pid (the claim): the frame may not be reused until it
# clears. DIRTY stays set while the write is in flight, so a writer that dies or stops never
# leaves a page looking clean; a survivor takes over the claim of a dead writer.
BH_WRITING = 4
BH_FAILED = 8  # its read failed: unlinked; the last pin holder frees it
# Dirtied again while WRITING: the copy in flight is stale, so its completion leaves DIRTY set.
BH_REDIRTIED = 16

# File entry flags.
FF_TEMP = 1  # path=None: private to its owner, backing file made on demand
FF_NOFILE = 2  # never written; pages live only in the cache
FF_DEAD = 4  # closed for good: its buffers are dropped, not written
FF_NO_MMAP = 8  # a writer has it open: mapped readers go through the cache
FF_CHECKSUM = 16  # pages carry a checksum trailer (open_file(checksum=True))

CACHE_HEADER = Layout(
    "cache_header",
    [
        ("cache_index", 1),
        ("nbuckets", 1),
        ("buckets_off", 1),  # offset of the first BUCKET
        ("lru_counter", 1),  # bumped on every unpin; a buffer's priority is a stamp of it
        ("hand", 1),  # next bucket the victim search looks at
        ("buffers", 1),  # buffers in this cache
        ("page_bytes", 1),  # bytes of page data this cache may hold (its share of cache_size)
        ("page_bytes_used", 1),  # bytes of page data in its buffers (under the allocator mutex)
    ],
)

BUCKET = Layout(
    "bucket",
    [
        ("mutex", MUTEX_SLOT),
        ("head", 1),  # offset of the first BH in the chain
        ("dirty", 1),  # buffers flagged DIRTY in the chain: write-back skips buckets at zero
        ("count", 1),  # buffers in the chain
        ("pad", 1),
    ],
)

BH = Layout(
    "bh",
    [
        ("next", 1),  # next BH in the bucket chain
        ("file", 1),  # the file's tag: its slot number + 1 (0: no file)
        ("pgno", 1),
        ("ref", 1),  # pins, in every process
        ("flags", 1),  # BH_*
        ("priority", 1),  # lru_counter stamp at the last unpin (0: evict first)
        ("page_size", 1),
        ("io_pid", 1),  # process doing the read or write (diagnostics, dead-reader cleanup)
        # CLOCK_MONOTONIC_COARSE (ns) when its pin count last went from 0 to 1: the age of the
        # oldest pin in the statistics. The clock is system-wide, so every process can compare.
        ("pinned_at", 1),
        # Pins per registry slot, 16 bits each (native order): ref is always their sum, so the
        # reaper can drop exactly what a dead process held. Changed with ref, under the bucket
        # mutex; a buffer newly linked zeroes them.
        ("pins", MAX_PROCS * 2 // WORD),
        # The page latch of transactions (aiodbenv.txn.latch): 0 when free, else its owner,
        # (registry slot + 1) << 32 | the owner's txn id, with LATCH_COMMITTING set while the
        # owner is inside a commit. Taken under the bucket mutex; only its owner (or the
        # reaper, once the owner is dead) clears it. A latched buffer stays pinned by its owner.
        ("latch", 1),
    ],
)

#: Per-file counters; one block per (handle, file) so each process updates only its own.
FSTAT_FIELDS = (
    "cache_hit",
    "cache_miss",
    "map",
    "page_create",
    "page_in",
    "page_out",
    "write_calls",
    "bytes_out",
)
FILE_STATS = Layout("file_stats", [("next", 1), *[(f, 1) for f in FSTAT_FIELDS]])

#: Per-handle counters that are not per file.
#: ``hash_examined_extra`` counts chain entries looked at beyond the first of each search:
#: searches (hits + misses) and the examined total are derived from it, which keeps a hit's
#: bookkeeping to one increment.
GSTAT_FIELDS = (
    "hash_examined_extra",
    "hash_longest",
    "ro_evict",
    "rw_evict",
    "page_trickle",
    "alloc_waits",
    "write_failures",
    "sync_calls",
    "dirtied_bytes",  # bytes of pages unpinned dirty: what a checkpoint's K trigger watches
    # what the background workers did (a flash budget): runs, pages, write calls, bytes
    "trickle_runs",
    "trickle_pages",
    "trickle_write_calls",
    "trickle_bytes",
    "trickle_failures",
    "checkpoint_runs",
    "checkpoint_pages",
    "checkpoint_write_calls",
    "checkpoint_bytes",
    "checkpoint_failures",
)
HANDLE_STATS = Layout("handle_stats", [("next", 1), ("pid", 1), *[(f, 1) for f in GSTAT_FIELDS]])

#: The shared state of one kind of background worker (see POOL_HEADER).
WORKER_ERROR_WORDS = 32
WORKER_STATE_FIELDS = (
    ("in_row", 1),
    ("failed_pid", 1),
    ("success_ns", 1),
    ("failure_ns", 1),
    ("error", WORKER_ERROR_WORDS),
)

POOL_HEADER = Layout(
    "pool_header",
    [
        ("ncache", 1),
        ("cache_size", 1),
        ("page_size", 1),  # the environment's default page size
        ("mmap_size", 1),
        ("nommap", 1),
        ("temp_serial", 1),  # makes file ids of temporary files unique
        ("handles_head", 1),  # first HANDLE_STATS block (a list through "next")
        ("retired", 1),  # offset of the HANDLE_STATS that closed handles fold into
        ("retired_files", FILE_STATS),  # counters of file entries that were freed
        # Background workers: one of each kind acts at a time, across processes. A lease is
        # its holder (pid << 32 | a token of the worker) and a CLOCK_MONOTONIC deadline (ns)
        # it must renew before.
        ("trickle_owner", 1),
        ("trickle_until", 1),
        ("checkpoint_owner", 1),
        ("checkpoint_until", 1),
        ("last_checkpoint_ns", 1),  # wall clock of the last complete checkpoint
        ("last_checkpoint_lsn", 1),  # its LSN once the environment has a log; 0 until then
        # How the acting worker of each kind fares, for Env.health in every process: failures
        # in a row (0: its latest attempt succeeded), the pid that saw the latest failure, the
        # wall-clock ns of the latest success and failure, and the latest error's message
        # (UTF-8, length-prefixed, truncated to fit). Written under the pool mutex.
        *[
            (f"{kind}_{field}", size)
            for kind in ("trickle", "checkpoint")
            for field, size in WORKER_STATE_FIELDS
        ],
        # A failed fsync panics the environment (see sync.py); what failed, for every process's
        # RunRecovery message: the errno and the file's name (region-0 offset and length).
        ("fsync_errno", 1),
        ("fsync_name_off", 1),
        ("fsync_name_len", 1),
        ("mutex", MUTEX_SLOT),  # the file index, file refcounts, the handle list
        ("files", MAX_FILES),  # offsets of FILE_ENTRY, 0 for a free slot
    ],
)

FILE_ENTRY = Layout(
    "file_entry",
    [
        ("refcnt", 1),  # open handles in all processes
        ("fileid", 3),  # 20 bytes used
        ("page_size", 1),
        ("lsn_offset", 1),  # + 1; 0 = none
        ("clear_len", 1),
        ("ftype", 1),
        ("flags", 1),  # FF_*
        ("pages", 1),  # pages the pool knows of: last_pgno + 1
        ("orig_pages", 1),  # pages in the file when first opened (the mapped extent)
        ("max_pages", 1),  # set_maxsize; 0 = unlimited
        ("rw_opens", 1),  # handles open for writing
        ("owner_pid", 1),  # temporary files: the only process that may use it
        ("name_off", 1),  # offset of the UTF-8 path (region 0)
        ("name_len", 1),
        ("cookie_off", 1),  # offset of pgcookie bytes (region 0)
        ("cookie_len", 1),
        ("buffers", 1),  # buffers of this file in all caches
        # Durability across processes: bumped (under the file mutex) after every successful
        # page write by any process; synced_gen is the written_gen an fsync that returned
        # covered. A file with written_gen > synced_gen has pages that are clean in the cache
        # but maybe not yet on disk: every sync fsyncs it, whoever wrote them.
        ("written_gen", 1),
        ("synced_gen", 1),
        ("stats_head", 1),  # FILE_STATS blocks of the handles that have it open
        ("retired", FILE_STATS),  # counters of handles that closed it
        ("mutex", MUTEX_SLOT),  # pages (NEW/CREATE extension)
    ],
)

# Fixed positions (byte offsets from the start of a cache's region).
#: Every cache's CACHE_HEADER follows its region header.
CACHE_HEADER_AT = REGION_HEADER.size
#: The POOL_HEADER follows the cache header, in cache 0 only.
POOL_HEADER_AT = CACHE_HEADER_AT + CACHE_HEADER.size

#: Offset of a buffer's per-slot pin counts in 16-bit units: ``halves[bh // 2 + PINS_HALF + s]``
#: is the pins of registry slot ``s`` in the buffer at byte offset ``bh``.
PINS_HALF = BH.offset("pins") // 2

#: Set in a latch word while its owner is inside a commit (between deciding to log the batch
#: and releasing the latch): the buffer's bytes may be changing, and a dead owner found with it
#: may have a batch in the log that is not in the buffers (see aiodbenv.txn.latch).
LATCH_COMMITTING = 1 << 62
#: Set in the latch word of a latched read (``PoolFile.get(latch=True)``), whose holder works
#: on the buffer itself, unlike a transaction, which works on a private copy until its commit.
LATCH_READER = 1 << 61


def quiet_latch(w: memoryview, bh: int) -> int:
    """The latch word of pinned buffer ``bh`` if a transaction holds its latch outside a
    commit, else 0 (read under the bucket mutex).

    Such a buffer holds the last commit's bytes, whatever other pins it has: nobody may change
    a buffer under a transaction's latch (the commit diffs its copy against the buffer), and
    the transaction itself changes it only in its commit, which first flags the latch
    committing and then marks the buffer dirty under its bucket mutex (so a claim made before
    the flag is seen by the mark, which sets ``BH_REDIRTIED``: the write leaves the page
    dirty for the commit's bytes). So write-back may copy it,
    under the bucket mutex, and keeps the copy only if the latch word still reads the same
    after it; otherwise transactions that keep hot pages latched would keep them out of every
    checkpoint. A latched read (whose holder works on the buffer itself), a commit under way
    or pins without a transaction's latch leave the buffer busy.
    """
    cur = int(w[(bh >> 3) + BH.word.latch])
    return 0 if cur & (LATCH_COMMITTING | LATCH_READER) else cur


#: The clock a buffer's first pin is stamped with: Linux's CLOCK_MONOTONIC_COARSE (the time
#: module does not name it). System-wide, so stamps compare across processes, and cheap: a
#: few ns in C, so the hit path barely notices it. The compiled accelerator reads the same.
PIN_CLOCK = 6

#: A buffer's allocator-chunk tag word, in words before the buffer header: the pid of a
#: process that holds the buffer outside any bucket (just allocated, or unlinked as a victim),
#: else 0 (see PoolCore.reclaim_lost_buffers).
CHUNK_TAG_BEFORE_BH = (ALLOC_CHUNK.size - ALLOC_CHUNK.offset("tag")) // WORD
