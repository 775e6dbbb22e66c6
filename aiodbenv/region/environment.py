"""The shared core of an open environment: region 1's headers, the handle count, the panic
flag, and the statistics of the regions (Berkeley DB's ``REGENV`` and ``env_region.c``'s
region table, as one handle sees them).

An :class:`EnvCore` is made by :func:`aiodbenv.region.open.open_environment` once every region
is attached and checked; :mod:`aiodbenv.region.create` lays region 1 out and
:mod:`aiodbenv.region.join` validates it. Layout: region 1 starts with a ``REGION_HEADER`` and
the ``ENV_HEADER`` (settings, handle count, panic flag, region table, registry of live
processes), followed by its allocator arena (:mod:`aiodbenv.region.layout`).

Lock order: the environment mutex, then a region's allocator mutex. Neither is ever held
across an ``await``. Closing blocks (unmapping, unlocking): it runs in a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from .._config import FLAG_BITS, Settings
from ..errors import RunRecovery
from . import panic
from .alloc import Allocator, AllocStats
from .backing import Region
from .home import HomeLock
from .layout import (
    ENV_HEADER,
    ENV_MUTEX_OFFSET,
    ENV_WORD,
    KIND_NAMES,
    KIND_PRIVATE,
    MAX_REGIONS,
    REGION_ENTRY,
    REGION_ENTRY_WORDS,
    REGION_HEADER,
    REGION_TYPE_NAMES,
    REGIONS_WORD,
)
from .mutex import BACKEND, NullMutex, SharedMutex
from .registry import ProcInfo, Registry

__all__ = [
    "EnvCore",
    "EnvStat",
    "RegionRow",
    "RegionStat",
    "add_private",
    "private_handles",
    "read_region_table",
]

logger = logging.getLogger("aiodbenv")

#: A row of the region table: ``(region_id, type, size, shm_key, shm_id)``.
RegionRow = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class RegionStat:
    """One region of an environment, as ``db_stat -e`` shows it."""

    region_id: int
    type: str
    size: int
    backing: str
    alloc: AllocStats


@dataclass(frozen=True)
class EnvStat:
    """Region statistics of an environment (what ``db_stat -e`` shows).

    ``handles`` is the number of open handles in all processes as the environment counts them;
    ``mutex_waits``/``mutex_nowaits`` count lock calls that had to block or did not, summed over
    the environment's mutexes, and ``mutex_owner_died`` the times a locker found the previous
    holder dead. ``processes`` lists the registry's slots in use (shared environments): each
    open handle's pid, when it opened, and the pins it holds.
    """

    home: str
    kind: str
    version: int
    env_id: int
    created: float
    creator_pid: int
    handles: int
    opens: int
    panicked: bool
    cache_size: int
    ncache: int
    page_size: int
    mmap_size: int
    shm_key: int | None
    mode: int
    flags: frozenset[str]
    regions: tuple[RegionStat, ...]
    mutex_backend: str
    mutex_waits: int
    mutex_nowaits: int
    mutex_owner_died: int
    processes: tuple[ProcInfo, ...] = ()


# -- private environments of this process ------------------------------------------------------

_private_lock = threading.Lock()
_private_envs: dict[str, list[EnvCore]] = {}


def add_private(core: EnvCore) -> None:
    """Note an open handle of a private environment, so that a remove of its home finds it
    (nothing outside this process can)."""
    with _private_lock:
        _private_envs.setdefault(core.home, []).append(core)


def private_handles(home: str) -> list[EnvCore]:
    """The open handles of the private environment in ``home``, if this process has one."""
    with _private_lock:
        return list(_private_envs.get(home, []))


# -- the open environment -----------------------------------------------------------------------


class EnvCore:
    """An open handle's view of an environment: its regions and the environment header.

    Made by :func:`aiodbenv.region.open.open_environment`; closed by :meth:`close`.
    """

    def __init__(self, home: str, kind: int, regions: list[Region], home_lock: HomeLock) -> None:
        self.home = home
        self.kind = kind
        self.regions = regions
        self._home_lock = home_lock
        self.closed = False
        #: This handle's slot in the registry of live processes (shared environments only).
        self.registry: Registry | None = None
        r1 = regions[0]
        self._w = r1.words
        if kind == KIND_PRIVATE:
            self.mutex: SharedMutex | NullMutex = NullMutex("env")
        else:
            self.mutex = SharedMutex(
                r1.base,
                r1.words,
                ENV_MUTEX_OFFSET,
                "env",
                repair=self._repair_env_header,
                panic=self.panic,
            )
        self.allocators = [Allocator(r.buf, r.words, f"region {r.region_id}") for r in regions]
        self.alloc_mutexes = [self._alloc_mutex(r, a) for r, a in zip(regions, self.allocators)]

    def _alloc_mutex(self, region: Region, allocator: Allocator) -> SharedMutex | NullMutex:
        name = f"region {region.region_id} allocator"
        if self.kind == KIND_PRIVATE:
            return NullMutex(name)
        return SharedMutex(
            region.base,
            region.words,
            REGION_HEADER.offset("alloc_mutex"),
            name,
            repair=allocator.repair,
            panic=self.panic,
        )

    @staticmethod
    def _repair_env_header() -> None:
        # The environment mutex guards single-word counters and table rows written one word
        # at a time, each row's id last; a dead holder cannot leave them torn.
        logger.warning("a process died holding the environment mutex; header is consistent")

    # -- header access

    @property
    def words(self) -> memoryview:
        """Region 1 as 8-byte words (its headers are at the fixed places of
        :mod:`aiodbenv.region.layout`)."""
        return self._w

    def env_field(self, name: str) -> int:
        """A field of the environment header."""
        return int(self._w[ENV_WORD + getattr(ENV_HEADER.word, name)])

    def _set_env_field(self, name: str, value: int) -> None:
        self._w[ENV_WORD + getattr(ENV_HEADER.word, name)] = value

    @property
    def panicked(self) -> bool:
        """True once the environment is panicked (by force remove or a dead mutex holder)."""
        return bool(self._w[ENV_WORD + ENV_HEADER.word.panic]) if not self.closed else False

    def panic_word(self) -> tuple[memoryview, int]:
        """Where the panic flag lives, for hot paths that read it directly."""
        return self._w, ENV_WORD + ENV_HEADER.word.panic

    def check_panic(self) -> None:
        """Raise :class:`RunRecovery` if the environment is panicked, with its recorded cause."""
        if self.panicked:
            why = self.panic_cause()
            raise RunRecovery(
                f"PANIC: environment {self.home} is panicked{panic.note(why)}; {RunRecovery.ADVICE}"
            )

    def panic_cause(self) -> str | None:
        """Who panicked the environment, when and why (``"by process PID at TIME: REASON"``),
        if it is panicked and the cause was recorded (see :mod:`aiodbenv.region.panic`)."""
        return None if self.closed else panic.cause(self._w)

    def panic(self, reason: str) -> None:
        """Panic the environment: every handle's next call raises :class:`RunRecovery`. The
        first panic's cause is kept in the environment header for every process to tell."""
        logger.error("PANIC: %s (environment %s)", reason, self.home)
        panic.record(self._w, os.getpid(), reason)

    def settings(self) -> Settings:
        """The settings the environment was created with."""
        flags = self.env_field("flags")
        key = self.env_field("shm_key")
        return Settings(
            region=KIND_NAMES[self.kind],
            cache_size=self.env_field("cache_size"),
            ncache=self.env_field("ncache"),
            shm_key=key or None,
            page_size=self.env_field("page_size"),
            mmap_size=self.env_field("mmap_size"),
            mode=self.env_field("mode"),
            **{name: bool(flags & bit) for name, bit in FLAG_BITS.items()},  # type: ignore[arg-type]
        )

    def region_table(self) -> list[RegionRow]:
        """Rows ``(region_id, type, size, shm_key, shm_id)`` of the region table."""
        return read_region_table(self._w)

    # -- handle count

    def add_handle(self) -> None:
        """Count this handle as open (under the environment mutex)."""
        with self.mutex:
            self._set_env_field("refcnt", self.env_field("refcnt") + 1)
            self._set_env_field("opens", self.env_field("opens") + 1)

    def close(self) -> None:
        """Drop this handle: uncount it (unless panicked), detach every region, unlock home.

        Raises :class:`RunRecovery` after releasing everything if the environment is panicked.
        """
        if self.closed:
            return
        panicked = self.panicked
        why = self.panic_cause() if panicked else None  # (read before the regions go)
        try:
            if panicked:
                pass
            elif self.registry is not None:
                self.registry.leave()  # frees the slot and uncounts the handle, at once
            else:
                with self.mutex:
                    n = self.env_field("refcnt")
                    self._set_env_field("refcnt", n - 1 if n > 0 else 0)
        finally:
            self.release()
        if panicked:
            raise RunRecovery(
                f"PANIC: environment {self.home} was panicked while this handle was open"
                f"{panic.note(why)}; {RunRecovery.ADVICE}"
            )

    def release(self) -> None:
        """Detach every region and unlock the home without touching the handle count."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.registry is not None:
                self.registry._drop_fd()  # the kernel drops our slot's lock with it
            for region in reversed(self.regions):
                region.close()
        finally:
            self._home_lock.release()
            if self.kind == KIND_PRIVATE:
                with _private_lock:
                    peers = _private_envs.get(self.home, [])
                    if self in peers:
                        peers.remove(self)
                    if not peers:
                        _private_envs.pop(self.home, None)

    # -- statistics

    def stat(self) -> EnvStat:
        """The environment's region statistics."""
        waits = nowaits = died = 0
        mutexes: list[SharedMutex | NullMutex] = [self.mutex, *self.alloc_mutexes]
        for m in mutexes:
            w, n, d = m.stats()
            waits, nowaits, died = waits + w, nowaits + n, died + d
        types = {row[0]: row[1] for row in self.region_table()}
        regions = tuple(
            RegionStat(
                region_id=r.region_id,
                type=REGION_TYPE_NAMES.get(types.get(r.region_id, 0), "unknown"),
                size=r.size,
                backing=r.backing,
                alloc=a.stats(),
            )
            for r, a in zip(self.regions, self.allocators)
        )
        s = self.settings()
        return EnvStat(
            home=self.home,
            kind=KIND_NAMES[self.kind],
            version=self.env_field("version"),
            env_id=self.env_field("env_id"),
            created=self.env_field("created_ns") / 1e9,
            creator_pid=self.env_field("creator_pid"),
            handles=self.env_field("refcnt"),
            opens=self.env_field("opens"),
            panicked=self.panicked,
            cache_size=s.cache_size or 0,
            ncache=s.ncache,
            page_size=s.page_size or 0,
            mmap_size=s.mmap_size if s.mmap_size is not None else 0,
            shm_key=s.shm_key,
            mode=s.mode,
            flags=s.flag_names(),
            regions=regions,
            mutex_backend="none" if self.kind == KIND_PRIVATE else BACKEND,
            mutex_waits=waits,
            mutex_nowaits=nowaits,
            mutex_owner_died=died,
        )


def read_region_table(w: memoryview) -> list[RegionRow]:
    """Rows ``(region_id, type, size, shm_key, shm_id)`` of the region table of region 1
    (``w``: its words); unused rows are left out."""
    rows = []
    for i in range(MAX_REGIONS):
        row = REGIONS_WORD + i * REGION_ENTRY_WORDS
        rid = w[row + REGION_ENTRY.word.region_id]
        if rid:
            rows.append(
                (
                    rid,
                    w[row + REGION_ENTRY.word.region_type],
                    w[row + REGION_ENTRY.word.size],
                    w[row + REGION_ENTRY.word.shm_key],
                    w[row + REGION_ENTRY.word.shm_id],
                )
            )
    return rows
