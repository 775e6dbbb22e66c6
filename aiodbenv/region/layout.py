"""Every shared structure's binary layout, defined once.

A region is addressed by byte offsets; structures in it are sequences of 8-byte native words
(``memoryview.cast('Q')`` reads one in ~30 ns, three times faster than ``struct`` per field).
A :class:`Layout` names the words of one structure and fixes their offsets at import time; the
code that reads or writes a structure looks up the offset here and nowhere else.

Changing any layout below, or the meaning of a field, requires bumping :data:`LAYOUT_VERSION`,
so that a process of another version refuses the environment with ``VersionMismatch`` instead of
misreading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ALLOC_CHUNK",
    "ENV_HEADER",
    "ENV_HEADERS_END",
    "ENV_HEADER_OFFSET",
    "ENV_MAGIC",
    "ENV_MUTEX_OFFSET",
    "ENV_WORD",
    "KIND_FILE",
    "KIND_NAMES",
    "KIND_PRIVATE",
    "KIND_SYSTEM",
    "LAYOUT_VERSION",
    "MAX_PROCS",
    "MAX_REGIONS",
    "MUTEX_SLOT",
    "MUTEX_STORAGE_BYTES",
    "PANIC_REASON_BYTES",
    "PROCS_WORD",
    "PROC_SLOT",
    "PROC_SLOT_WORDS",
    "REGIONS_WORD",
    "REGION_ENTRY",
    "REGION_ENTRY_WORDS",
    "REGION_HEADER",
    "REGION_MAGIC",
    "REGION_TYPE_ENV",
    "REGION_TYPE_LOG",
    "REGION_TYPE_MPOOL",
    "REGION_TYPE_NAMES",
    "SHM_REF",
    "SHM_REF_MAGIC",
    "TXN_STAT",
    "WORD",
    "Layout",
    "WordIndex",
]

WORD = 8

#: Bumped whenever a layout or a field's meaning changes.
LAYOUT_VERSION = 11

# The magics spell "aiodbreg", "aiodbenv" and "aiodbshm" in little-endian ASCII, which makes
# them easy to spot in a hex dump of a region file or segment.
REGION_MAGIC = int.from_bytes(b"aiodbreg", "little")
ENV_MAGIC = int.from_bytes(b"aiodbenv", "little")
SHM_REF_MAGIC = int.from_bytes(b"aiodbshm", "little")

KIND_FILE = 1
KIND_SYSTEM = 2
KIND_PRIVATE = 3
KIND_NAMES = {KIND_FILE: "file", KIND_SYSTEM: "system", KIND_PRIVATE: "private"}

REGION_TYPE_ENV = 1
REGION_TYPE_MPOOL = 2
REGION_TYPE_LOG = 3
REGION_TYPE_NAMES = {REGION_TYPE_ENV: "env", REGION_TYPE_MPOOL: "mpool", REGION_TYPE_LOG: "log"}

#: Room for the region table; an array, not a list, so a walker after a crash cannot loop.
MAX_REGIONS = 32

#: Opaque storage for one pthread mutex. glibc's pthread_mutex_t is 40 bytes on x86-64 and
#: 48 on some other 64-bit targets; 64 leaves room without hard-coding the struct.
MUTEX_STORAGE_BYTES = 64

#: Slots of the registry of live processes (handles, in fact: each open handle of a shared
#: environment takes one). Every buffer header keeps a 16-bit pin count per slot, so this is
#: also the width of that array: 64 slots cost 128 bytes per buffer.
MAX_PROCS = 64


class WordIndex:
    """The word index of every field of one layout, as attributes (``BH.word.ref``).

    A plain instance on purpose: reading an attribute of one is about as fast as reading a
    global (Python specialises it), some four times faster than of a ``SimpleNamespace``, and
    the pool reads these on every page access.
    """

    def __init__(self, indexes: dict[str, int]) -> None:
        self.__dict__.update(indexes)

    def __repr__(self) -> str:
        return f"WordIndex({self.__dict__})"


class Layout:
    """The layout of one shared structure: named fields, each a whole number of words.

    ``Layout("name", [("field", 1), ("blob", 3)])`` puts ``field`` at byte 0 and the 24-byte
    ``blob`` at byte 8. ``offset(name)`` is a field's byte offset from the structure's start,
    ``size`` the structure's size in bytes (a multiple of 8, so structures stay word-aligned),
    and ``word`` names every field's word index: ``BH.word.ref`` is the index of ``ref`` in a
    ``memoryview.cast("Q")`` of one buffer header. Code that reads the region uses these names,
    never a table of its own.
    """

    __slots__ = ("_offsets", "name", "size", "word")

    name: str
    size: int
    _offsets: dict[str, int]
    #: Word index of each field, by attribute (a :class:`WordIndex`; typed ``Any`` because its
    #: attributes are the layout's fields).
    word: Any

    def __init__(self, name: str, fields: Sequence[tuple[str, int | Layout]]) -> None:
        self.name = name
        self._offsets = {}
        pos = 0
        for field, width in fields:
            if field in self._offsets:
                raise ValueError(f"{name}: field {field!r} defined twice")
            words = width.size // WORD if isinstance(width, Layout) else width
            if words < 1:
                raise ValueError(f"{name}.{field}: width must be at least one word")
            self._offsets[field] = pos
            pos += words * WORD
        self.size = pos
        self.word = WordIndex({f: off // WORD for f, off in self._offsets.items()})

    def offset(self, field: str) -> int:
        """Byte offset of ``field`` from the start of the structure."""
        return self._offsets[field]

    def fields(self) -> list[str]:
        """The field names in layout order."""
        return list(self._offsets)

    def __repr__(self) -> str:
        return f"Layout({self.name!r}, size={self.size})"


#: A process-shared mutex: opaque pthread storage plus its statistics.
MUTEX_SLOT = Layout(
    "mutex",
    [
        ("storage", MUTEX_STORAGE_BYTES // WORD),
        ("waits", 1),  # lock calls that found it held and had to block
        ("nowaits", 1),  # lock calls that got it at once
        ("owner_died", 1),  # times a locker found the holder dead (EOWNERDEAD)
        ("holder_pid", 1),  # pid of the current holder, 0 when free (diagnostics only)
    ],
)

#: The start of every region: who it belongs to, and the state of its allocator.
REGION_HEADER = Layout(
    "region_header",
    [
        ("magic", 1),  # REGION_MAGIC once initialised
        ("version", 1),  # LAYOUT_VERSION
        ("env_id", 1),  # random id of the environment that owns the region
        ("region_id", 1),  # 1-based; region 1 is the environment region
        ("region_type", 1),  # REGION_TYPE_*
        ("size", 1),  # bytes, including this header
        ("arena_start", 1),  # offset of the allocator's first chunk
        ("arena_end", 1),  # offset one past the allocator's last chunk
        ("free_head", 1),  # offset of the first free chunk, 0 when none (address order)
        ("bytes_used", 1),  # bytes in allocated chunks, headers included
        ("allocs", 1),
        ("frees", 1),
        ("failures", 1),
        ("alloc_mutex", MUTEX_SLOT),
    ],
)

#: One chunk of a region's allocator; the caller's bytes follow the header.
ALLOC_CHUNK = Layout(
    "alloc_chunk",
    [
        ("size", 1),  # bytes in the chunk, header included; a multiple of ALIGN
        ("next_free", 1),  # free chunks: offset of the next free chunk, 0 at the end
        ("in_use", 1),  # 1 while allocated
        ("tag", 1),  # the allocation's purpose, for stat and debugging
    ],
)

#: Transaction counters (:class:`aiodbenv.TxnStat`'s fields, in its order): one set in every
#: registry slot, written only by the slot's owner (plain stores, no mutex), and one set of
#: the counts of slots since reused (see :mod:`aiodbenv.txn.stat`).
TXN_STAT = Layout(
    "txn_stat",
    [
        ("begins", 1),
        ("commits_sync", 1),
        ("commits_write_nosync", 1),
        ("commits_nosync", 1),
        ("readonly_commits", 1),
        ("aborts", 1),
        ("pages_logged", 1),
        ("full_images", 1),
        ("latch_nowait", 1),
        ("latch_waits", 1),
        ("deadlocks", 1),
        ("latch_timeouts", 1),
    ],
)

#: One slot of the registry of live processes (see :mod:`aiodbenv.region.registry`). The
#: owner holds an OFD byte lock on byte ``slot`` of the home's ``__db.procs`` while it is open.
PROC_SLOT = Layout(
    "proc_slot",
    [
        ("state", 1),  # 0 free, 1 in use, 2 being reaped (by the process in "reaper")
        ("pid", 1),
        ("start_time", 1),  # /proc/PID/stat field 22: tells a recycled pid from the owner
        ("opened_ns", 1),  # time.time_ns() when the slot was taken
        ("reaper", 1),  # state 2: pid of the process reaping it
        ("reaper_start", 1),  # and that process's start time
        ("txn_stat", TXN_STAT),  # this slot's handle's (or its last one's) counts
    ],
)

#: One row of the environment's region table.
REGION_ENTRY = Layout(
    "region_entry",
    [
        ("region_id", 1),  # 0: unused row
        ("region_type", 1),
        ("size", 1),
        ("shm_key", 1),  # system memory: the segment's key
        ("shm_id", 1),  # system memory: the segment's id (joiners attach by id)
    ],
)

#: Bytes of the environment header kept for the reason of a panic (longer ones are cut).
PANIC_REASON_BYTES = 256

#: The environment header, right after region 1's region header.
ENV_HEADER = Layout(
    "env_header",
    [
        ("magic", 1),  # ENV_MAGIC, written last by the creator
        ("version", 1),
        ("panic", 1),  # non-zero: every handle's next call raises RunRecovery
        ("env_id", 1),
        ("created_ns", 1),  # time.time_ns() at creation
        ("creator_pid", 1),
        ("kind", 1),  # KIND_*
        ("refcnt", 1),  # open handles (not repaired after a crash; see Env.remove)
        ("opens", 1),  # handles ever opened
        ("nregions", 1),
        ("cache_size", 1),
        ("ncache", 1),
        ("page_size", 1),
        ("mmap_size", 1),
        ("shm_key", 1),
        ("mode", 1),
        ("flags", 1),  # FLAG_BITS of aiodbenv._config
        ("mutex", MUTEX_SLOT),  # protects refcnt, opens and the region table
        ("regions", REGION_ENTRY.size // WORD * MAX_REGIONS),
        # The registry of live processes (under "mutex") and what its reaper did.
        ("procs_reaped", 1),  # dead processes' slots reaped
        ("pins_reclaimed", 1),  # pins those processes held, dropped
        ("dirty_inherited", 1),  # pages they held pinned and flagged dirty (kept dirty)
        # Transaction counts of slots since reused, and a sequence number that is odd while
        # a slot's counts are being moved into them (readers retry; see txn/stat.py).
        ("txn_stat_retired", TXN_STAT),
        ("txn_stat_seq", 1),
        ("procs", PROC_SLOT.size // WORD * MAX_PROCS),
        # Why the environment was panicked, by the first process that did it (region/panic.py):
        # its pid, when (time.time_ns()), and the reason as UTF-8, NUL-padded.
        ("panic_pid", 1),
        ("panic_ns", 1),
        ("panic_reason", PANIC_REASON_BYTES // WORD),
    ],
)

#: What ``__db.001`` holds for a system-memory environment: just enough to find region 1.
SHM_REF = Layout(
    "shm_ref",
    [
        ("magic", 1),  # SHM_REF_MAGIC, written last
        ("version", 1),
        ("env_id", 1),
        ("shm_key", 1),
        ("shm_id", 1),
        ("size", 1),
    ],
)

# -- fixed positions in region 1 -------------------------------------------------------------
# Region 1 is laid out as REGION_HEADER, ENV_HEADER, then its allocator's arena. These say where,
# so that no module re-derives them.

#: Byte offset of the environment header in region 1: right after the region header.
ENV_HEADER_OFFSET = REGION_HEADER.size
#: Byte offset of the environment mutex in region 1 (mutexes are addressed by byte offset).
ENV_MUTEX_OFFSET = ENV_HEADER_OFFSET + ENV_HEADER.offset("mutex")
#: Word index of the environment header in region 1: ``ENV_WORD + ENV_HEADER.word.panic`` is the
#: panic flag in ``region1.words``.
ENV_WORD = ENV_HEADER_OFFSET // WORD
#: Byte offset where region 1's two headers end: the least a region 1 can be, and where its
#: allocator arena starts (other regions' arenas start right after ``REGION_HEADER``).
ENV_HEADERS_END = ENV_HEADER_OFFSET + ENV_HEADER.size
#: Word index of row 0 of the region table in region 1; row N is ``REGION_ENTRY_WORDS`` further.
REGIONS_WORD = ENV_WORD + ENV_HEADER.word.regions
REGION_ENTRY_WORDS = REGION_ENTRY.size // WORD
#: Word index of slot 0 of the registry of live processes in region 1; slot N is
#: ``PROC_SLOT_WORDS * N`` further.
PROCS_WORD = ENV_WORD + ENV_HEADER.word.procs
PROC_SLOT_WORDS = PROC_SLOT.size // WORD
