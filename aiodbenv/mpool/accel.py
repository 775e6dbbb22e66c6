"""The compiled accelerator's pool functions, loaded and configured in one place.

:mod:`aiodbenv.region.mutex` loads the compiled module (or the ABI fallback); this module hands
its pool functions the layout once, at import, and names them for the pool's modules. When the
accelerator is not in use (no compiler at install time, or ``AIODBENV_MUTEX=abi``) every
function here is None and the callers run their Python twins.
"""

from __future__ import annotations

from typing import Any

from ..region.layout import MAX_PROCS, MUTEX_SLOT, WORD
from ..region.mutex import ffi, speedups
from .accel_layout import NAMES
from .alloc import SEARCH_BUCKETS
from .layout import (
    BH,
    BH_DIRTY,
    BH_READING,
    BH_REDIRTIED,
    BH_WRITING,
    BUCKET,
    CACHE_HEADER,
    CACHE_HEADER_AT,
    CHUNK_TAG_BEFORE_BH,
    LATCH_COMMITTING,
    LATCH_READER,
)
from .page import PAGE_CLEAN, PAGE_DIRTY, PAGE_DISCARD

__all__ = ["COMPILED", "CORRUPT", "collect", "pin_hit", "pin_one_cache", "snapshot", "unpin_at"]
__all__ += ["MISS_FALLBACK", "MISS_FILL", "MISS_FILL_DISK", "MISS_FREE_FRAME", "miss"]
__all__ += ["MISS_DIRTY_MET"]
__all__ += ["layout_values", "stat_walk", "write_done"]


def layout_values() -> list[int]:
    """The value of every name of :data:`~aiodbenv.mpool.accel_layout.NAMES`, in its order."""
    h, b, c = BH.word, BUCKET.word, CACHE_HEADER.word
    values = {
        "H_NEXT": h.next,
        "H_FILE": h.file,
        "H_PGNO": h.pgno,
        "H_REF": h.ref,
        "H_FLAGS": h.flags,
        "H_PRIO": h.priority,
        "H_IOPID": h.io_pid,
        "H_SIZE": h.page_size,
        "H_PINAT": h.pinned_at,
        "H_PINS": h.pins,
        "B_HEAD": b.head,
        "B_DIRTY": b.dirty,
        "C_LRU": c.lru_counter,
        "C_BUFFERS": c.buffers,
        "BH_READING": BH_READING,
        "BH_DIRTY": BH_DIRTY,
        "BH_WRITING": BH_WRITING,
        "BH_REDIRTIED": BH_REDIRTIED,
        "PAGE_DIRTY": PAGE_DIRTY,
        "PAGE_CLEAN": PAGE_CLEAN,
        "PAGE_DISCARD": PAGE_DISCARD,
        "BH_DATA": BH.size,
        # The C lock helper counts an uncontended lock at ``nowaits`` and finds ``waits`` this
        # many words before it.
        "WAITS_FROM_NOWAITS": MUTEX_SLOT.word.nowaits - MUTEX_SLOT.word.waits,
        "CACHE_HDR": CACHE_HEADER_AT // WORD,
        "C_HAND": c.hand,
        "C_PAGE_BYTES": c.page_bytes,
        "C_PAGE_BYTES_USED": c.page_bytes_used,
        "B_COUNT": b.count,
        "H_LATCH": h.latch,
        # Words before a buffer header where its allocator chunk keeps its limbo tag.
        "CHUNK_TAG": CHUNK_TAG_BEFORE_BH,
        "MAX_PROCS": MAX_PROCS,
        # The victim search's breadth: the compiled miss follows alloc.find_victim.
        "SEARCH_BUCKETS": SEARCH_BUCKETS,
        "LATCH_COMMITTING": LATCH_COMMITTING,
        "LATCH_READER": LATCH_READER,
    }
    return [values[n] for n in NAMES]


#: True when the compiled functions below are in use.
COMPILED = speedups is not None
# The functions are cffi builtins (untyped); None when the Python twins run instead.
pin_hit: Any = None
pin_one_cache: Any = None
unpin_at: Any = None
snapshot: Any = None
write_done: Any = None
collect: Any = None
miss: Any = None
miss_publish: Any = None
stat_walk: Any = None
slot_pins: Any = None
#: What ``miss`` hands back to Python (out[0]; see aiodbenv/_csrc/40_miss.c).
MISS_FALLBACK, MISS_FREE_FRAME, MISS_FILL, MISS_FILL_DISK = 0, 1, 2, 3
#: out[0] of a miss done whole that passed a dirty best over for a clean frame.
MISS_DIRTY_MET = 4
#: What the compiled functions return for an offset that fails its check (0: never returned).
CORRUPT = 0

if speedups is not None:
    _values = layout_values()
    if not speedups.aiodb_set_layout(ffi.new("uint64_t[]", _values), len(_values)):
        # Built from another list of names than this tree's: its offsets would be wrong.
        raise ImportError(
            "aiodbenv._speedups was built from another layout list; rebuild it "
            "(pip install -e . or python aiodbenv/_speedups_build.py) or set AIODBENV_MUTEX=abi"
        )
    pin_hit = speedups.aiodb_pin_hit
    pin_one_cache = speedups.aiodb_pin_one_cache
    unpin_at = speedups.aiodb_unpin_at
    snapshot = speedups.aiodb_snapshot
    write_done = speedups.aiodb_write_done
    collect = speedups.aiodb_collect
    CORRUPT = speedups.AIODB_CORRUPT
    miss = speedups.aiodb_miss
    miss_publish = speedups.aiodb_miss_publish
    stat_walk = speedups.aiodb_stat_walk
    slot_pins = speedups.aiodb_slot_pins
    assert (MISS_FALLBACK, MISS_FREE_FRAME, MISS_FILL, MISS_FILL_DISK) == (
        speedups.AIODB_MISS_FALLBACK,
        speedups.AIODB_MISS_FREE_FRAME,
        speedups.AIODB_MISS_FILL,
        speedups.AIODB_MISS_FILL_DISK,
    )
    assert MISS_DIRTY_MET == speedups.AIODB_MISS_DIRTY_MET
