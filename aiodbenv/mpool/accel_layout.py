"""The layout values handed to the compiled accelerator: one tuple of names, read by both sides.

The build script (aiodbenv/_speedups_build.py) generates the C enum from :data:`NAMES` (``L_``
plus each name, then ``L_COUNT``); :mod:`aiodbenv.mpool.accel` hands ``aiodb_set_layout`` the
value of each name in this order, and the C side refuses a list whose length is not
``L_COUNT``. A name is added here and nowhere else on the list side. This module imports
nothing, so that the build script can load it without importing aiodbenv.
"""

__all__ = ["NAMES", "c_enum"]

#: Word indexes (``H_`` buffer header, ``B_`` bucket, ``C_`` cache header), flag bits and sizes
#: the C functions read, in the order of the C enum.
NAMES = (
    "H_NEXT",
    "H_FILE",
    "H_PGNO",
    "H_REF",
    "H_FLAGS",
    "H_PRIO",
    "B_HEAD",
    "B_DIRTY",
    "C_LRU",
    "C_BUFFERS",
    "BH_READING",
    "BH_DIRTY",
    "PAGE_DIRTY",
    "PAGE_CLEAN",
    "PAGE_DISCARD",
    "BH_WRITING",
    "H_IOPID",
    "H_SIZE",
    "BH_DATA",
    "WAITS_FROM_NOWAITS",
    "BH_REDIRTIED",
    "H_PINAT",
    "H_PINS",
    # The compiled miss (aiodbenv/_csrc/40_miss.c).
    "CACHE_HDR",
    "C_HAND",
    "C_PAGE_BYTES",
    "C_PAGE_BYTES_USED",
    "B_COUNT",
    "H_LATCH",
    "CHUNK_TAG",
    "MAX_PROCS",
    "SEARCH_BUCKETS",
    # Write-back of a buffer pinned only by its transaction's latch (layout.quiet_latch).
    "LATCH_COMMITTING",
    "LATCH_READER",
)


def c_enum() -> str:
    """The C enum of :data:`NAMES`: ``enum { L_H_NEXT, ..., L_COUNT };``."""
    return "enum { " + ", ".join(f"L_{n}" for n in NAMES) + ", L_COUNT };"
