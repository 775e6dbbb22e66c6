"""Joining an environment: validating region 1 and attaching every region it lists (Berkeley
DB's ``env_region.c``, ``__env_attach`` without ``DB_CREATE``).

A joiner trusts nothing it reads before checking it: the region header's magic and layout
version, the environment header's magic and panic flag, then every setting and every row of
the region table against the ranges a creator can write (:func:`_check_env_values`), so that a
corrupt or foreign ``__db.001`` is :class:`~aiodbenv.errors.CorruptRegion` or
:class:`~aiodbenv.errors.VersionMismatch`, never an exception from deep inside. A region 1
whose magic is not written yet is :class:`Incomplete`: its creator may still be building it
(:mod:`aiodbenv.region.open` decides whether to wait).

Blocking (``pread``, mapping, ``shmat``): called from a worker thread.
"""

from __future__ import annotations

import os
import stat

from .. import _io
from .._config import (
    FLAG_BITS,
    MAX_CACHE_SIZE,
    MAX_MMAP_SIZE,
    MAX_NCACHE,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
)
from ..errors import CorruptRegion, RunRecovery, VersionMismatch
from . import panic
from .backing import Region, attach_file_region, attach_system_region, region_file_name
from .environment import read_region_table
from .layout import (
    ENV_HEADER,
    ENV_HEADERS_END,
    ENV_MAGIC,
    ENV_WORD,
    KIND_FILE,
    KIND_SYSTEM,
    LAYOUT_VERSION,
    MAX_REGIONS,
    MUTEX_SLOT,
    REGION_HEADER,
    REGION_MAGIC,
    REGION_TYPE_ENV,
    REGION_TYPE_LOG,
    REGION_TYPE_MPOOL,
    WORD,
)
from .shm_ref import read_shm_ref

__all__ = ["Incomplete", "attach_rest", "join_once"]


class Incomplete(Exception):
    """``__db.001`` exists but holds no complete environment (yet)."""


def _word(data: bytes, index: int) -> int:
    return int.from_bytes(data[index * WORD : (index + 1) * WORD], "little")


def _check_header(path: str, data: bytes) -> tuple[int, int]:
    """Validate region 1's headers read from ``data``; returns ``(kind, region1 size)``."""
    magic = _word(data, REGION_HEADER.word.magic)
    if magic == 0:
        raise Incomplete
    if magic != REGION_MAGIC:
        raise CorruptRegion(f"{path} is not an aiodbenv environment (bad magic)")
    version = _word(data, REGION_HEADER.word.version)
    if version != LAYOUT_VERSION:
        raise VersionMismatch(
            f"{path}: environment layout version {version} does not match this aiodbenv's "
            f"version {LAYOUT_VERSION}; remove the environment or use a matching aiodbenv"
        )
    if _word(data, ENV_WORD + ENV_HEADER.word.magic) == 0:
        raise Incomplete
    if _word(data, ENV_WORD + ENV_HEADER.word.magic) != ENV_MAGIC:
        raise CorruptRegion(f"{path} is not an aiodbenv environment (bad environment magic)")
    if _word(data, ENV_WORD + ENV_HEADER.word.panic):
        why = panic.note(panic.cause_in(data))
        raise RunRecovery(
            f"PANIC: environment {os.path.dirname(path)} is panicked{why}; {RunRecovery.ADVICE}"
        )
    kind = _word(data, ENV_WORD + ENV_HEADER.word.kind)
    size = _word(data, REGION_HEADER.word.size)
    if kind not in (KIND_FILE, KIND_SYSTEM) or size < ENV_HEADERS_END:
        raise CorruptRegion(f"{path}: environment header is corrupt")
    return kind, size


def _check_env_values(path: str, w: memoryview) -> None:
    """Range-check what a joiner takes from region 1 before it uses any of it: the settings
    and the region table (ids, types, sizes). A value a creator cannot have written is
    :class:`CorruptRegion`, never an exception from deep inside, nor a 440 GiB cache."""

    def bad(what: str) -> CorruptRegion:
        return CorruptRegion(f"{path}: the environment header is corrupt: {what}")

    field = {name: int(w[ENV_WORD + i]) for name, i in vars(ENV_HEADER.word).items()}
    ncache, cache_size, page_size = field["ncache"], field["cache_size"], field["page_size"]
    if not 1 <= ncache <= MAX_NCACHE:
        raise bad(f"ncache {ncache}")
    if not 0 < cache_size <= MAX_CACHE_SIZE:
        raise bad(f"cache size {cache_size}")
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise bad(f"page size {page_size}")
    if field["mmap_size"] > MAX_MMAP_SIZE:
        raise bad(f"mmap size {field['mmap_size']}")
    if field["shm_key"] >= 1 << 31:
        raise bad(f"shm key {field['shm_key']}")
    if field["flags"] & ~sum(FLAG_BITS.values()):
        raise bad(f"flags {field['flags']:#x}")
    # Counts that are incremented in place: one near 2**64 is corrupt (and would overflow).
    mutex = ENV_WORD + ENV_HEADER.word.mutex
    alloc_mutex = REGION_HEADER.word.alloc_mutex
    counters = [ENV_WORD + ENV_HEADER.word.refcnt, ENV_WORD + ENV_HEADER.word.opens]
    counters += [
        getattr(REGION_HEADER.word, f) for f in ("bytes_used", "allocs", "frees", "failures")
    ]
    for f in ("waits", "nowaits", "owner_died"):
        counters += [
            mutex + getattr(MUTEX_SLOT.word, f),
            alloc_mutex + getattr(MUTEX_SLOT.word, f),
        ]
    for i in counters:
        if w[i] >= 1 << 62:
            raise bad(f"count {int(w[i])} at word {i}")
    rows = read_region_table(w)
    if len(rows) != field["nregions"] or not 1 <= len(rows) <= MAX_REGIONS:
        raise bad(f"{len(rows)} regions in the table, {field['nregions']} in the header")
    ids = sorted(int(r[0]) for r in rows)
    if ids != list(range(1, len(rows) + 1)):
        raise bad(f"region ids {ids}")
    mpool = logs = 0
    for rid, rtype, size, _key, shm_id in rows:
        if rtype not in (REGION_TYPE_ENV, REGION_TYPE_MPOOL, REGION_TYPE_LOG) or (rid == 1) != (
            rtype == REGION_TYPE_ENV
        ):
            raise bad(f"region {rid} has type {rtype}")
        if size % WORD or not REGION_HEADER.size < size <= 2 * MAX_CACHE_SIZE:
            raise bad(f"region {rid} has size {size}")
        if shm_id >= 1 << 31:
            raise bad(f"region {rid} has shm id {shm_id}")
        mpool += rtype == REGION_TYPE_MPOOL
        logs += rtype == REGION_TYPE_LOG
    if logs > 1:
        raise bad(f"{logs} log regions")
    if mpool != ncache:
        raise bad(f"{mpool} pool regions for {ncache} caches")


def attach_rest(home: str, kind: int, r1: Region, env_id: int) -> list[Region]:
    """Check region 1's settings and region table (:func:`_check_env_values`), then attach
    every other region it lists; returns them all, region 1 first. On failure every region,
    ``r1`` included, is detached again."""
    regions = [r1]
    try:
        _check_env_values(os.path.join(home, region_file_name(1)), r1.words)
        for rid, _rtype, size, key, shm_id in read_region_table(r1.words):
            if rid == 1:
                continue
            if kind == KIND_FILE:
                path = os.path.join(home, region_file_name(rid))
                regions.append(attach_file_region(path, rid, size))
            else:
                regions.append(attach_system_region(shm_id, rid, size, env_id, key))
        return regions
    except BaseException:
        for region in reversed(regions):
            region.close()
        raise


def join_once(home: str, fd: int) -> list[Region]:
    """Try to join the environment whose ``__db.001`` is open as ``fd``; may raise Incomplete.

    The caller keeps (and closes) ``fd``.
    """
    path1 = os.path.join(home, region_file_name(1))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CorruptRegion(f"{path1} is not a regular file")
    size = st.st_size
    ref = read_shm_ref(fd, size)
    if ref is not None:
        if ref.magic == 0:
            raise Incomplete
        if not ref.complete:
            raise CorruptRegion(f"{path1} is not an aiodbenv environment (bad magic)")
        if ref.version != LAYOUT_VERSION:
            raise VersionMismatch(
                f"{path1}: environment layout version {ref.version} does not "
                f"match this aiodbenv's version {LAYOUT_VERSION}"
            )
        if not 0 < ref.shm_key < 1 << 31:
            raise CorruptRegion(f"{path1}: shm key {ref.shm_key} is out of range")
        r1 = ref.attach()
        try:
            data = bytes(r1.buf[:ENV_HEADERS_END])
            kind, _ = _check_header(path1, data)
            if kind != KIND_SYSTEM:
                raise CorruptRegion(f"{path1}: environment kind does not match its record")
        except BaseException:
            r1.close()
            raise
        return attach_rest(home, KIND_SYSTEM, r1, ref.env_id)
    if size < ENV_HEADERS_END:
        raise Incomplete
    data = _io.pread(fd, ENV_HEADERS_END, 0)
    kind, size1 = _check_header(path1, data)
    if kind != KIND_FILE or size1 != size:
        raise CorruptRegion(f"{path1} is {size} bytes but its header says {size1}: truncated")
    r1 = attach_file_region(path1, 1, size1, fd=fd)
    return attach_rest(home, KIND_FILE, r1, _word(data, REGION_HEADER.word.env_id))
