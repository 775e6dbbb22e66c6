"""Creating an environment: making its regions and laying out region 1 (Berkeley DB's
``env_region.c``, ``__env_attach`` with ``DB_CREATE``).

Every region of the plan (region 1, then one per :class:`RegionSpec` a subsystem asked for) is
made in its kind of memory (:mod:`aiodbenv.region.backing`), given its region header and an
empty allocator arena; region 1 then gets the environment header and the region table, each
row's id written last so a row is whole or absent. Subsystems lay out their regions through the
``formatter`` before the environment's magic is written, and the magic goes in last of all: a
joiner that sees it sees a complete environment. A system-memory environment finally records
region 1's segment in ``__db.001`` (:mod:`aiodbenv.region.shm_ref`). If any step fails, every
region made so far is removed again.

Blocking (file creation, preallocation, mapping): called from a worker thread.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._config import DEFAULT_CACHE_SIZE, DEFAULT_MMAP_SIZE, DEFAULT_PAGE_SIZE, Settings
from ..errors import ConfigError
from .alloc import Allocator
from .backing import (
    Region,
    create_file_region,
    create_private_region,
    create_system_region,
    region_file_name,
    remove_created_segment,
)
from .layout import (
    ENV_HEADER,
    ENV_HEADERS_END,
    ENV_MAGIC,
    ENV_MUTEX_OFFSET,
    ENV_WORD,
    KIND_FILE,
    KIND_PRIVATE,
    KIND_SYSTEM,
    LAYOUT_VERSION,
    MAX_REGIONS,
    REGION_ENTRY,
    REGION_ENTRY_WORDS,
    REGION_HEADER,
    REGION_MAGIC,
    REGION_TYPE_ENV,
    REGIONS_WORD,
)
from .mutex import SharedMutex
from .shm_ref import write_shm_ref

__all__ = ["ENV_REGION_SIZE", "Formatter", "RegionSpec", "create_private", "create_shared"]

logger = logging.getLogger("aiodbenv")

#: Size of region 1: headers plus a small arena for shared structures of other subsystems.
ENV_REGION_SIZE = 64 * 1024
#: Region sizes are rounded up to this (as Berkeley DB's 8 KiB).
REGION_ROUND = 8 * 1024


def _round_region(size: int) -> int:
    return (size + REGION_ROUND - 1) // REGION_ROUND * REGION_ROUND


@dataclass(frozen=True)
class RegionSpec:
    """A region a subsystem needs: its type (``REGION_TYPE_*``) and size in bytes."""

    region_type: int
    size: int


def _init_region(region: Region, env_id: int, region_type: int, arena_start: int) -> None:
    w = region.words
    w[REGION_HEADER.word.version] = LAYOUT_VERSION
    w[REGION_HEADER.word.env_id] = env_id
    w[REGION_HEADER.word.region_id] = region.region_id
    w[REGION_HEADER.word.region_type] = region_type
    w[REGION_HEADER.word.size] = region.size
    Allocator.format(w, arena_start, region.size)
    w[REGION_HEADER.word.magic] = REGION_MAGIC


def _region_plan(extra: list[RegionSpec]) -> list[RegionSpec]:
    plan = [RegionSpec(REGION_TYPE_ENV, ENV_REGION_SIZE)] + [
        RegionSpec(spec.region_type, _round_region(spec.size + REGION_HEADER.size))
        for spec in extra
    ]
    if len(plan) > MAX_REGIONS:
        raise ConfigError(f"an environment holds at most {MAX_REGIONS} regions")
    return plan


Formatter = Callable[[list[Region]], None]


def _build(
    home: str,
    kind: int,
    settings: Settings,
    plan: list[RegionSpec],
    make_region: Callable[[int, int], Region],
    formatter: Formatter | None = None,
) -> tuple[list[Region], int, list[int]]:
    """Make every region of ``plan`` and fill in region 1; the magic is not yet written.

    Returns the regions, the new env id and the shm ids (system memory) for ``__db.001``.
    """
    env_id = secrets.randbits(63) or 1
    regions: list[Region] = []
    try:
        for region_id, spec in enumerate(plan, start=1):
            regions.append(make_region(region_id, spec.size))
        r1 = regions[0]
        w = r1.words
        e = ENV_WORD
        for region, spec in zip(regions, plan):
            start = ENV_HEADERS_END if region.region_id == 1 else REGION_HEADER.size
            _init_region(region, env_id, spec.region_type, start)
            if kind != KIND_PRIVATE:
                SharedMutex(
                    region.base, region.words, REGION_HEADER.offset("alloc_mutex"), "alloc"
                ).initialize()
        w[e + ENV_HEADER.word.version] = LAYOUT_VERSION
        w[e + ENV_HEADER.word.panic] = 0
        w[e + ENV_HEADER.word.panic_pid] = 0  # (no cause recorded: region/panic.py)
        w[e + ENV_HEADER.word.env_id] = env_id
        w[e + ENV_HEADER.word.created_ns] = time.time_ns()
        w[e + ENV_HEADER.word.creator_pid] = os.getpid()
        w[e + ENV_HEADER.word.kind] = kind
        w[e + ENV_HEADER.word.refcnt] = 0
        w[e + ENV_HEADER.word.opens] = 0
        w[e + ENV_HEADER.word.nregions] = len(regions)
        w[e + ENV_HEADER.word.cache_size] = settings.cache_size or DEFAULT_CACHE_SIZE
        w[e + ENV_HEADER.word.ncache] = settings.ncache
        w[e + ENV_HEADER.word.page_size] = settings.page_size or DEFAULT_PAGE_SIZE
        w[e + ENV_HEADER.word.mmap_size] = (
            settings.mmap_size if settings.mmap_size is not None else DEFAULT_MMAP_SIZE
        )
        w[e + ENV_HEADER.word.shm_key] = settings.shm_key or 0
        w[e + ENV_HEADER.word.mode] = settings.mode
        w[e + ENV_HEADER.word.flags] = settings.flag_bits()
        if kind != KIND_PRIVATE:
            SharedMutex(r1.base, w, ENV_MUTEX_OFFSET, "env").initialize()
        shm_ids = []
        for i, (region, spec) in enumerate(zip(regions, plan)):
            row = REGIONS_WORD + i * REGION_ENTRY_WORDS
            shm_id = _shm_id_of(region)
            shm_ids.append(shm_id)
            w[row + REGION_ENTRY.word.region_type] = spec.region_type
            w[row + REGION_ENTRY.word.size] = region.size
            w[row + REGION_ENTRY.word.shm_key] = (
                (settings.shm_key or 0) + region.region_id - 1 if kind == KIND_SYSTEM else 0
            )
            w[row + REGION_ENTRY.word.shm_id] = shm_id
            w[row + REGION_ENTRY.word.region_id] = (
                region.region_id
            )  # the row's id last: rows are whole
        if formatter is not None:
            formatter(regions)  # subsystems lay out their regions before the magic goes in
        return regions, env_id, shm_ids
    except BaseException:
        _destroy_all(regions, home)
        raise


def _shm_id_of(region: Region) -> int:
    if region.kind != KIND_SYSTEM:
        return 0
    # backing is "shm key 0x... id N"
    return int(region.backing.rsplit(" ", 1)[1])


def _destroy(region: Region, home: str) -> None:
    """Detach a region this process just created and remove its file or segment."""
    shm_id = _shm_id_of(region)
    if region.kind == KIND_SYSTEM:
        # We made it, so it is ours whatever its header says yet (the header is filled in
        # only once every region exists). Removed while still attached, so its id cannot
        # have been reused by a segment of someone else.
        if not remove_created_segment(shm_id):
            logger.warning("could not remove segment %d while undoing a create", shm_id)
    region.close()
    if region.kind == KIND_FILE:
        if region.region_id != 1:  # region 1's file belongs to the caller's cleanup
            try:
                os.unlink(region.backing)
            except OSError:
                pass


def _destroy_all(regions: list[Region], home: str) -> None:
    """Undo a create: every region made so far, last first."""
    for region in reversed(regions):
        _destroy(region, home)


def _turn_on(region1: Region) -> None:
    region1.words[ENV_WORD + ENV_HEADER.word.magic] = ENV_MAGIC


def create_private(
    home: str, settings: Settings, extra: list[RegionSpec], formatter: Formatter | None
) -> list[Region]:
    """Build a new private environment: every region in this process's memory."""
    regions, _, _ = _build(
        home, KIND_PRIVATE, settings, _region_plan(extra), create_private_region, formatter
    )
    _turn_on(regions[0])
    return regions


def create_shared(
    home: str, fd: int, settings: Settings, extra: list[RegionSpec], formatter: Formatter | None
) -> list[Region]:
    """Build a new file-backed or system-memory environment; ``fd`` is the freshly
    O_EXCL-created ``__db.001``, flocked by the caller (joiners wait while it is held).
    Whatever was made is removed again if building fails, except ``__db.001`` itself."""
    kind = {"file": KIND_FILE, "system": KIND_SYSTEM, "private": KIND_PRIVATE}[
        settings.region or "file"
    ]
    plan = _region_plan(extra)
    path1 = os.path.join(home, region_file_name(1))
    if kind == KIND_FILE:

        def make(region_id: int, size: int) -> Region:
            if region_id == 1:
                return create_file_region(path1, 1, size, settings.mode, fd=fd)
            path = os.path.join(home, region_file_name(region_id))
            return create_file_region(path, region_id, size, settings.mode)

        regions, _, _ = _build(home, kind, settings, plan, make, formatter)
        _turn_on(regions[0])
        return regions
    assert kind == KIND_SYSTEM and settings.shm_key is not None
    key = settings.shm_key

    def make_shm(region_id: int, size: int) -> Region:
        return create_system_region(key + region_id - 1, region_id, size, settings.mode)

    regions, env_id, shm_ids = _build(home, kind, settings, plan, make_shm, formatter)
    try:
        _turn_on(regions[0])
        write_shm_ref(fd, env_id=env_id, shm_key=key, shm_id=shm_ids[0], size=regions[0].size)
    except BaseException:
        _destroy_all(regions, home)
        raise
    return regions
