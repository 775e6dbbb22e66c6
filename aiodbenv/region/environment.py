"""The environment region: create, join, validate, close and remove an environment.

This is the synchronous core under :class:`aiodbenv.Env`. Every function here blocks (file
creation, preallocation, mapping, flock) and is run in a worker thread by the async shell.

Layout: region 1 starts with a ``REGION_HEADER`` and the ``ENV_HEADER`` (settings, handle
count, panic flag, region table), followed by its allocator arena. File-backed environments keep
region N in ``__db.N``; system-memory ones keep it in the segment ``shm_key + N - 1`` and put
only a small ``SHM_REF`` record in ``__db.001`` so that other processes can find region 1;
private ones keep everything in this process.

Creation is serialised by creating ``__db.001`` with ``O_EXCL``. The creator holds an
exclusive ``flock`` on it while it builds, and writes the environment magic last; a joiner that
finds no magic yet waits while that lock is held, and reports a corrupt environment if nobody is
building. Liveness of handles is judged by a shared ``flock`` on the home directory that every
open handle holds (an exclusive one for private environments), not by the handle count, which a
killed process cannot decrement.

Lock order: the environment mutex, then a region's allocator mutex. Neither is ever held
across an ``await``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .. import _io
from .._config import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_MMAP_SIZE,
    DEFAULT_PAGE_SIZE,
    FLAG_BITS,
    MAX_CACHE_SIZE,
    MAX_MMAP_SIZE,
    MAX_NCACHE,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    Settings,
)
from ..errors import (
    AiodbenvError,
    Busy,
    ConfigError,
    CorruptRegion,
    EnvNotFound,
    InvalidArgument,
    PermissionDenied,
    RunRecovery,
    TryAgain,
    VersionMismatch,
)
from .alloc import Allocator, AllocStats
from .backing import (
    Region,
    attach_file_region,
    attach_system_region,
    create_file_region,
    create_private_region,
    create_system_region,
    open_region_fd,
    region_file_name,
    remove_created_segment,
    remove_system_segment,
    remove_system_segments_by_key,
)
from .layout import (
    ENV_HEADER,
    ENV_MAGIC,
    KIND_FILE,
    KIND_NAMES,
    KIND_PRIVATE,
    KIND_SYSTEM,
    LAYOUT_VERSION,
    MAX_REGIONS,
    MUTEX_SLOT,
    REGION_ENTRY,
    REGION_HEADER,
    REGION_MAGIC,
    REGION_TYPE_ENV,
    REGION_TYPE_LOG,
    REGION_TYPE_MPOOL,
    REGION_TYPE_NAMES,
    SHM_REF,
    SHM_REF_MAGIC,
    WORD,
)
from .mutex import BACKEND, NullMutex, SharedMutex
from .registry import LOCK_FILE, ProcInfo, Registry

__all__ = [
    "EnvCore",
    "EnvStat",
    "RegionSpec",
    "RegionStat",
    "open_environment",
    "remove_environment",
]

logger = logging.getLogger("aiodbenv")

#: Size of region 1: headers plus a small arena for shared structures of other subsystems.
ENV_REGION_SIZE = 64 * 1024
#: Region sizes are rounded up to this (as Berkeley DB's 8 KiB).
REGION_ROUND = 8 * 1024
#: How long a joiner waits for a creator that is still building the environment.
BUILD_WAIT = 30.0
#: How long a joiner keeps retrying an incomplete ``__db.001`` that nobody is building: covers
#: the instant between the creator's O_EXCL create and its flock.
INCOMPLETE_GRACE = 0.25
#: How long an open retries when the home is locked by a remove or a private handle.
HOME_LOCK_WAIT = 0.5
_POLL = 0.005

_E = {name: ENV_HEADER.offset(name) // WORD for name in ENV_HEADER.fields()}
_ENV_BASE = REGION_HEADER.size // WORD  # ENV_HEADER starts right after region 1's header
_R = {name: REGION_HEADER.offset(name) // WORD for name in REGION_HEADER.fields()}
_S = {name: SHM_REF.offset(name) // WORD for name in SHM_REF.fields()}
_T = {name: REGION_ENTRY.offset(name) // WORD for name in REGION_ENTRY.fields()}


def _round_region(size: int) -> int:
    return (size + REGION_ROUND - 1) // REGION_ROUND * REGION_ROUND


@dataclass(frozen=True)
class RegionSpec:
    """A region a subsystem needs: its type (``REGION_TYPE_*``) and size in bytes."""

    region_type: int
    size: int


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


# -- home directory lock ----------------------------------------------------------------------


_home_locks: weakref.WeakSet[HomeLock] = weakref.WeakSet()


def _forget_home_locks_in_child() -> None:
    # A forked child inherits the locked descriptors; it cannot use the parent's handles, and
    # holding the locks would keep the environment "in use" after the parent closes it.
    for lock in list(_home_locks):
        lock.release()


os.register_at_fork(after_in_child=_forget_home_locks_in_child)


class HomeLock:
    """A ``flock`` on the home directory: shared per handle, exclusive for private handles and
    for remove. Released by the kernel when a process dies, so it tells the live from the dead.
    """

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, home: str, *, exclusive: bool, wait: float) -> None:
        try:
            self._fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise _home_error(err, home) from err
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, op)
                _home_locks.add(self)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self._fd)
                    raise
                time.sleep(_POLL)

    def release(self) -> None:
        """Unlock and close (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def _home_error(err: OSError, home: str) -> AiodbenvError | OSError:
    if err.errno == errno.ENOENT:
        return EnvNotFound(f"environment home {home} does not exist")
    if err.errno == errno.ENOTDIR:
        return InvalidArgument(f"environment home {home} is not a directory", errno=errno.ENOTDIR)
    if err.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"environment home {home}: permission denied")
    return err


def check_home(home: str, *, create: bool) -> None:
    """Typed errors for a home that does not exist, is not a directory, or is not writable."""
    try:
        st = os.stat(home)
    except OSError as err:
        raise _home_error(err, home) from err
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"environment home {home} is not a directory", errno=errno.ENOTDIR)
    if not os.access(home, os.R_OK | os.X_OK | (os.W_OK if create else 0)):
        raise PermissionDenied(
            f"environment home {home} is not " + ("writable" if create else "readable")
        )


def home_mode(mode: int) -> int:
    """The permission a home created by ``Env.open(create=True)`` gets, from the region ``mode``.

    Whoever may read or write the region files must be able to enter the directory, so each of
    the owner, group and other classes that has any bit of ``mode`` gets read and search (and
    write, if ``mode`` grants it) on the directory; the owner always gets all three, since the
    creating process must make files in it. 0o600 gives 0o700, 0o660 gives 0o770.
    """
    out = 0o700
    for shift in (3, 0):
        bits = (mode >> shift) & 0o7
        if bits:
            out |= (0o5 | (bits & 0o2)) << shift
    return out


def make_home(home: str, mode: int) -> None:
    """Create a missing ``home`` like ``mkdir -p``: missing parents get the default permission
    (0o777 less the umask), the home itself exactly :func:`home_mode` of ``mode``. An existing
    home is left exactly as it is. Typed errors as :func:`check_home`."""
    if os.path.lexists(home):
        return  # an existing path (or a dangling link) is judged by check_home, never changed
    parent = os.path.dirname(home)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        os.mkdir(home, 0o700)
    except FileExistsError:
        return  # another process made it first: its permission stands
    except OSError as err:
        raise _home_error(err, home) from err
    os.chmod(home, home_mode(mode))  # exact, as for region files: the umask does not apply


# -- private environments of this process ------------------------------------------------------

_private_lock = threading.Lock()
_private_envs: dict[str, list[EnvCore]] = {}


# -- the open environment -----------------------------------------------------------------------


class EnvCore:
    """An open handle's view of an environment: its regions and the environment header.

    Made by :func:`open_environment`; closed by :meth:`close`.
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
                REGION_HEADER.size + ENV_HEADER.offset("mutex"),
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

    def env_field(self, name: str) -> int:
        """A field of the environment header."""
        return int(self._w[_ENV_BASE + _E[name]])

    def _set_env_field(self, name: str, value: int) -> None:
        self._w[_ENV_BASE + _E[name]] = value

    @property
    def panicked(self) -> bool:
        """True once the environment is panicked (by force remove or a dead mutex holder)."""
        return bool(self._w[_ENV_BASE + _E["panic"]]) if not self.closed else False

    def panic_word(self) -> tuple[memoryview, int]:
        """Where the panic flag lives, for hot paths that read it directly."""
        return self._w, _ENV_BASE + _E["panic"]

    def check_panic(self) -> None:
        """Raise :class:`RunRecovery` if the environment is panicked."""
        if self.panicked:
            raise RunRecovery(
                f"PANIC: environment {self.home} is panicked; run recovery "
                "(close every handle, remove the environment and open it again)"
            )

    def panic(self, reason: str) -> None:
        """Panic the environment: every handle's next call raises :class:`RunRecovery`."""
        logger.error("PANIC: %s (environment %s)", reason, self.home)
        self._w[_ENV_BASE + _E["panic"]] = 1

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

    def region_table(self) -> list[tuple[int, int, int, int, int]]:
        """Rows ``(region_id, type, size, shm_key, shm_id)`` of the region table."""
        return _read_region_table(self._w)

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
                f"PANIC: environment {self.home} was panicked while this handle was open; "
                "run recovery (remove the environment and open it again)"
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


def _read_region_table(w: memoryview) -> list[tuple[int, int, int, int, int]]:
    rows = []
    base = _ENV_BASE + _E["regions"]
    step = REGION_ENTRY.size // WORD
    for i in range(MAX_REGIONS):
        row = base + i * step
        rid = w[row + _T["region_id"]]
        if rid:
            rows.append(
                (
                    rid,
                    w[row + _T["region_type"]],
                    w[row + _T["size"]],
                    w[row + _T["shm_key"]],
                    w[row + _T["shm_id"]],
                )
            )
    return rows


# -- creating ---------------------------------------------------------------------------------


def _init_region(region: Region, env_id: int, region_type: int, arena_start: int) -> None:
    w = region.words
    w[_R["version"]] = LAYOUT_VERSION
    w[_R["env_id"]] = env_id
    w[_R["region_id"]] = region.region_id
    w[_R["region_type"]] = region_type
    w[_R["size"]] = region.size
    Allocator.format(w, arena_start, region.size)
    w[_R["magic"]] = REGION_MAGIC


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
        e = _ENV_BASE
        arena1 = REGION_HEADER.size + ENV_HEADER.size
        for region, spec in zip(regions, plan):
            start = arena1 if region.region_id == 1 else REGION_HEADER.size
            _init_region(region, env_id, spec.region_type, start)
            if kind != KIND_PRIVATE:
                SharedMutex(
                    region.base, region.words, REGION_HEADER.offset("alloc_mutex"), "alloc"
                ).initialize()
        w[e + _E["version"]] = LAYOUT_VERSION
        w[e + _E["panic"]] = 0
        w[e + _E["env_id"]] = env_id
        w[e + _E["created_ns"]] = time.time_ns()
        w[e + _E["creator_pid"]] = os.getpid()
        w[e + _E["kind"]] = kind
        w[e + _E["refcnt"]] = 0
        w[e + _E["opens"]] = 0
        w[e + _E["nregions"]] = len(regions)
        w[e + _E["cache_size"]] = settings.cache_size or DEFAULT_CACHE_SIZE
        w[e + _E["ncache"]] = settings.ncache
        w[e + _E["page_size"]] = settings.page_size or DEFAULT_PAGE_SIZE
        w[e + _E["mmap_size"]] = (
            settings.mmap_size if settings.mmap_size is not None else DEFAULT_MMAP_SIZE
        )
        w[e + _E["shm_key"]] = settings.shm_key or 0
        w[e + _E["mode"]] = settings.mode
        w[e + _E["flags"]] = settings.flag_bits()
        if kind != KIND_PRIVATE:
            SharedMutex(
                r1.base, w, REGION_HEADER.size + ENV_HEADER.offset("mutex"), "env"
            ).initialize()
        step = REGION_ENTRY.size // WORD
        shm_ids = []
        for i, (region, spec) in enumerate(zip(regions, plan)):
            row = e + _E["regions"] + i * step
            shm_id = _shm_id_of(region)
            shm_ids.append(shm_id)
            w[row + _T["region_type"]] = spec.region_type
            w[row + _T["size"]] = region.size
            w[row + _T["shm_key"]] = (
                (settings.shm_key or 0) + region.region_id - 1 if kind == KIND_SYSTEM else 0
            )
            w[row + _T["shm_id"]] = shm_id
            w[row + _T["region_id"]] = region.region_id  # the row's id last: rows are whole
        if formatter is not None:
            formatter(regions)  # subsystems lay out their regions before the magic goes in
        return regions, env_id, shm_ids
    except BaseException:
        for region in reversed(regions):
            _destroy(region, home)
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


def _turn_on(region1: Region) -> None:
    region1.words[_ENV_BASE + _E["magic"]] = ENV_MAGIC


def _create(
    home: str, fd: int, settings: Settings, extra: list[RegionSpec], formatter: Formatter | None
) -> list[Region]:
    """Build a new environment; ``fd`` is the freshly O_EXCL-created ``__db.001``, flocked."""
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
        rec = [0] * (SHM_REF.size // WORD)
        rec[_S["version"]] = LAYOUT_VERSION
        rec[_S["env_id"]] = env_id
        rec[_S["shm_key"]] = key
        rec[_S["shm_id"]] = shm_ids[0]
        rec[_S["size"]] = regions[0].size
        body = b"".join(v.to_bytes(WORD, "little") for v in rec)
        # The record's magic goes in last, as a separate write, so a half-written record
        # never looks valid.
        if _io.pwritev(fd, [body], 0) != len(body):
            raise OSError(errno.EIO, "short write of the shm reference record")
        magic = SHM_REF_MAGIC.to_bytes(WORD, "little")
        if _io.pwritev(fd, [magic], SHM_REF.offset("magic")) != WORD:
            raise OSError(errno.EIO, "short write of the shm reference record")
    except BaseException:
        for region in reversed(regions):
            _destroy(region, home)
        raise
    return regions


# -- joining ----------------------------------------------------------------------------------


class _Incomplete(Exception):
    """``__db.001`` exists but holds no complete environment (yet)."""


def _word(data: bytes, index: int) -> int:
    return int.from_bytes(data[index * WORD : (index + 1) * WORD], "little")


def _check_header(path: str, data: bytes) -> tuple[int, int]:
    """Validate region 1's headers read from ``data``; returns ``(kind, region1 size)``."""
    magic = _word(data, _R["magic"])
    if magic == 0:
        raise _Incomplete
    if magic != REGION_MAGIC:
        raise CorruptRegion(f"{path} is not an aiodbenv environment (bad magic)")
    version = _word(data, _R["version"])
    if version != LAYOUT_VERSION:
        raise VersionMismatch(
            f"{path}: environment layout version {version} does not match this aiodbenv's "
            f"version {LAYOUT_VERSION}; remove the environment or use a matching aiodbenv"
        )
    if _word(data, _ENV_BASE + _E["magic"]) == 0:
        raise _Incomplete
    if _word(data, _ENV_BASE + _E["magic"]) != ENV_MAGIC:
        raise CorruptRegion(f"{path} is not an aiodbenv environment (bad environment magic)")
    if _word(data, _ENV_BASE + _E["panic"]):
        raise RunRecovery(
            f"PANIC: environment {os.path.dirname(path)} is panicked; run recovery "
            "(remove the environment and open it again)"
        )
    kind = _word(data, _ENV_BASE + _E["kind"])
    size = _word(data, _R["size"])
    if kind not in (KIND_FILE, KIND_SYSTEM) or size < REGION_HEADER.size + ENV_HEADER.size:
        raise CorruptRegion(f"{path}: environment header is corrupt")
    return kind, size


def _check_env_values(path: str, w: memoryview) -> None:
    """Range-check what a joiner takes from region 1 before it uses any of it: the settings
    and the region table (ids, types, sizes). A value a creator cannot have written is
    :class:`CorruptRegion`, never an exception from deep inside, nor a 440 GiB cache."""

    def bad(what: str) -> CorruptRegion:
        return CorruptRegion(f"{path}: the environment header is corrupt: {what}")

    field = {name: int(w[_ENV_BASE + _E[name]]) for name in ENV_HEADER.fields()}
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
    mutex = _ENV_BASE + _E["mutex"]
    alloc_mutex = REGION_HEADER.offset("alloc_mutex") // WORD
    counters = [_ENV_BASE + _E["refcnt"], _ENV_BASE + _E["opens"]]
    counters += [_R[f] for f in ("bytes_used", "allocs", "frees", "failures")]
    for f in ("waits", "nowaits", "owner_died"):
        counters += [
            mutex + MUTEX_SLOT.offset(f) // WORD,
            alloc_mutex + MUTEX_SLOT.offset(f) // WORD,
        ]
    for i in counters:
        if w[i] >= 1 << 62:
            raise bad(f"count {int(w[i])} at word {i}")
    rows = _read_region_table(w)
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


def _attach_rest(home: str, kind: int, r1: Region, env_id: int) -> list[Region]:
    regions = [r1]
    try:
        _check_env_values(os.path.join(home, region_file_name(1)), r1.words)
        for rid, _rtype, size, key, shm_id in _read_region_table(r1.words):
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


def _join_once(home: str, fd: int) -> list[Region]:
    """Try to join the environment whose ``__db.001`` is open as ``fd``; may raise _Incomplete.

    The caller keeps (and closes) ``fd``.
    """
    path1 = os.path.join(home, region_file_name(1))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CorruptRegion(f"{path1} is not a regular file")
    size = st.st_size
    if size == SHM_REF.size:
        rec = _io.pread(fd, SHM_REF.size, 0)
        magic = _word(rec, _S["magic"])
        if magic == 0:
            raise _Incomplete
        if magic != SHM_REF_MAGIC:
            raise CorruptRegion(f"{path1} is not an aiodbenv environment (bad magic)")
        if _word(rec, _S["version"]) != LAYOUT_VERSION:
            raise VersionMismatch(
                f"{path1}: environment layout version {_word(rec, _S['version'])} does not "
                f"match this aiodbenv's version {LAYOUT_VERSION}"
            )
        env_id = _word(rec, _S["env_id"])
        if not 0 < _word(rec, _S["shm_key"]) < 1 << 31:
            raise CorruptRegion(f"{path1}: shm key {_word(rec, _S['shm_key'])} is out of range")
        r1 = attach_system_region(
            _word(rec, _S["shm_id"]), 1, _word(rec, _S["size"]), env_id, _word(rec, _S["shm_key"])
        )
        try:
            data = bytes(r1.buf[: REGION_HEADER.size + ENV_HEADER.size])
            kind, _ = _check_header(path1, data)
            if kind != KIND_SYSTEM:
                raise CorruptRegion(f"{path1}: environment kind does not match its record")
        except BaseException:
            r1.close()
            raise
        return _attach_rest(home, KIND_SYSTEM, r1, env_id)
    if size < REGION_HEADER.size + ENV_HEADER.size:
        raise _Incomplete
    data = _io.pread(fd, REGION_HEADER.size + ENV_HEADER.size, 0)
    kind, size1 = _check_header(path1, data)
    if kind != KIND_FILE or size1 != size:
        raise CorruptRegion(f"{path1} is {size} bytes but its header says {size1}: truncated")
    r1 = attach_file_region(path1, 1, size1, fd=fd)
    return _attach_rest(home, KIND_FILE, r1, _word(data, _R["env_id"]))


def _creator_is_building(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _open_shared(
    home: str,
    settings: Settings,
    create: bool,
    extra: list[RegionSpec],
    formatter: Formatter | None,
) -> list[Region]:
    path1 = os.path.join(home, region_file_name(1))
    deadline = time.monotonic() + BUILD_WAIT
    unlocked_since: float | None = None
    while True:
        try:
            fd = open_region_fd(path1, create=False, mode=0)
        except EnvNotFound:
            if not create:
                raise EnvNotFound(
                    f"no environment in {home} (no {region_file_name(1)}); open with create=True"
                ) from None
            try:
                return _create_exclusive(home, path1, settings, extra, formatter)
            except FileExistsError:
                continue  # another creator won the race: join its environment
        try:
            return _join_once(home, fd)
        except _Incomplete:
            building = _creator_is_building(fd)
        finally:
            os.close(fd)
        now = time.monotonic()
        if building:
            unlocked_since = None
            if now >= deadline:
                raise TryAgain(
                    f"unable to join the environment in {home}: its creator has been "
                    f"building it for over {BUILD_WAIT:.0f} s"
                )
        else:
            unlocked_since = unlocked_since or now
            if now - unlocked_since >= INCOMPLETE_GRACE:
                raise CorruptRegion(
                    f"{path1} is empty, truncated or not an aiodbenv region, and no process "
                    "is building it (a creator may have died): remove the environment "
                    "with force and create it again"
                )
        time.sleep(_POLL)


def _create_exclusive(
    home: str,
    path1: str,
    settings: Settings,
    extra: list[RegionSpec],
    formatter: Formatter | None,
) -> list[Region]:
    """Create ``__db.001`` with O_EXCL and build the environment under its flock.

    Raises ``FileExistsError`` if another process created ``__db.001`` first.
    """
    if settings.region == "system" and settings.shm_key is None:
        raise InvalidArgument(
            "a system-memory environment needs a shm_key (set_shm_key in DB_CONFIG)"
        )
    check_home(home, create=True)
    fd = open_region_fd(path1, create=True, mode=settings.mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # joiners wait while we build
        try:
            return _create(home, fd, settings, extra, formatter)
        except BaseException:
            try:
                os.unlink(path1)  # unlink before unlocking: joiners then find no file
            except OSError:
                pass
            raise
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)  # region 1 may hold a dup of fd: unlock explicitly
        os.close(fd)


def open_environment(
    home: str,
    settings: Settings,
    *,
    create: bool,
    extra: list[RegionSpec] | None = None,
    formatter: Formatter | None = None,
) -> EnvCore:
    """Create or join the environment in ``home`` (blocking; run it in a worker thread).

    ``settings.region`` picks the kind when creating; when joining, a kind that differs from
    the existing environment's is an error. ``extra`` lists the regions subsystems need beyond
    region 1, and ``formatter`` lays them out (it is given every region, creator only, before
    the environment's magic is written). Raises the typed errors of :mod:`aiodbenv.errors`.
    """
    extra = list(extra or [])
    if create:
        make_home(home, settings.mode)
    # Writability matters only when creating, which is decided once __db.001 is found missing.
    check_home(home, create=False)
    private = settings.region == "private"
    try:
        home_lock = HomeLock(home, exclusive=private, wait=HOME_LOCK_WAIT)
    except BlockingIOError:
        raise Busy(
            f"environment {home} is in use: "
            + (
                "a private environment admits one handle, and another is open"
                if private
                else "it is open privately by another handle, or being removed"
            )
        ) from None
    try:
        if private:
            if not create:
                raise EnvNotFound(f"a private environment in {home} must be created (create=True)")
            regions, _, _ = _build(
                home, KIND_PRIVATE, settings, _region_plan(extra), create_private_region, formatter
            )
            _turn_on(regions[0])
            core = EnvCore(home, KIND_PRIVATE, regions, home_lock)
            with _private_lock:
                _private_envs.setdefault(home, []).append(core)
        else:
            regions = _open_shared(home, settings, create, extra, formatter)
            kind = regions[0].kind
            core = EnvCore(home, kind, regions, home_lock)
            if settings.region is not None and KIND_NAMES[kind] != settings.region:
                core.release()
                raise InvalidArgument(
                    f"environment {home} exists with {KIND_NAMES[kind]} regions; "
                    f"it cannot be joined as {settings.region!r}"
                )
    except BaseException:
        home_lock.release()
        raise
    try:
        if core.kind == KIND_PRIVATE:
            core.add_handle()
        else:
            # Takes a slot in the registry of live processes and counts the handle, together.
            core.registry = Registry(home, core._w, core.mutex, core.env_field("mode"))
    except BaseException:
        core.release()
        raise
    return core


# -- removing ---------------------------------------------------------------------------------


def _region_files(home: str) -> list[str]:
    names = []
    for name in os.listdir(home):
        if name.startswith("__db.") and len(name) == 8 and name[5:].isdigit():
            names.append(name)
    return sorted(names, reverse=True)  # __db.001 last


def remove_environment(
    home: str,
    *,
    force: bool,
    inspect: Callable[[list[Region], list[tuple[int, int, int, int, int]], bool], None]
    | None = None,
) -> None:
    """Remove the environment in ``home``: segments and region files, ``__db.001`` last.

    Without ``force`` an environment that has open handles (in any process) is not touched and
    :class:`Busy` is raised. With ``force`` it is panicked first, so every open handle's next
    call raises :class:`RunRecovery`. A home without an environment is not an error.

    ``inspect(regions, region_table, force)``, when given, is called with the attached regions
    of a complete, unpanicked environment while the home is locked for removal, before anything
    is changed; an exception from it leaves the environment as it was.
    """
    check_home(home, create=True)
    with _private_lock:
        private = list(_private_envs.get(home, []))
    if private:
        if not force:
            raise Busy(f"environment {home} is open privately by {len(private)} handle(s)")
        for core in private:
            core.panic("removed with force while open")
    try:
        lock: HomeLock | None = HomeLock(home, exclusive=True, wait=0)
    except BlockingIOError:
        lock = None
        if not force:
            raise Busy(
                f"environment {home} has open handles; close them or remove with force"
            ) from None
    try:
        _remove_locked(home, force, inspect)
    finally:
        if lock is not None:
            lock.release()


def _remove_locked(
    home: str,
    force: bool,
    inspect: Callable[[list[Region], list[tuple[int, int, int, int, int]], bool], None]
    | None = None,
) -> None:
    path1 = os.path.join(home, region_file_name(1))
    try:
        fd = open_region_fd(path1, create=False, mode=0)
    except EnvNotFound:
        fd = -1
    except CorruptRegion:  # a symlink named __db.001: not ours to follow
        if not force:
            raise
        fd = -1
    regions: list[Region] = []
    if fd >= 0:
        try:
            regions = _join_for_remove(home, fd)
        except EnvNotFound as err:
            # Region 1's segment is gone (a reboot, ipcrm): its table of segment ids went with
            # it, so find the other regions by key, then drop the files.
            logger.warning("removing environment %s whose memory is gone: %s", home, err)
            _remove_orphan_segments(fd)
        except (_Incomplete, AiodbenvError) as err:
            if not force:
                if isinstance(err, _Incomplete):
                    raise CorruptRegion(
                        f"{path1} holds no complete environment; remove with force"
                    ) from None
                raise
            reason = str(err) or "no complete environment"
            logger.warning("removing unreadable environment %s: %s", home, reason)
            _panic_what_remains(home, fd)
        finally:
            os.close(fd)
    table: list[tuple[int, int, int, int, int]] = []
    env_id = 0
    if regions and inspect is not None and not regions[0].words[_ENV_BASE + _E["panic"]]:
        try:
            inspect(regions, _read_region_table(regions[0].words), force)
        except BaseException:
            for region in reversed(regions):
                region.close()
            raise
    if regions:
        r1 = regions[0]
        r1.words[_ENV_BASE + _E["panic"]] = 1  # every handle still attached sees this
        table = _read_region_table(r1.words)
        env_id = r1.header("env_id")
        kind = r1.kind
        for region in reversed(regions):
            region.close()
        if kind == KIND_SYSTEM:
            for _rid, _t, _size, _key, shm_id in table:
                remove_system_segment(shm_id, env_id)
    procs = os.path.join(home, LOCK_FILE)
    if os.path.isfile(procs) and not os.path.islink(procs):
        try:
            _io.unlink(procs)  # before __db.001: a joiner racing us sees no half-removed env
        except FileNotFoundError:
            pass
    for name in _region_files(home):
        path = os.path.join(home, name)
        if not os.path.isfile(path) or os.path.islink(path):
            # Not a region file we made (a directory, a FIFO, a symlink): not ours to delete.
            if os.path.islink(path) and force:
                _io.unlink(path)  # a link is removed, never what it points at
            else:
                logger.warning("left %s in place: not a regular region file", path)
            continue
        try:
            _io.unlink(path)
        except FileNotFoundError:
            pass


def _panic_what_remains(home: str, fd: int) -> None:
    """Force-removing an environment that cannot be fully attached: if region 1 still can be,
    panic it (so open handles learn) and remove the segments its table lists."""
    try:
        size = os.fstat(fd).st_size
        if size == SHM_REF.size:
            rec = _io.pread(fd, SHM_REF.size, 0)
            if _word(rec, _S["magic"]) != SHM_REF_MAGIC:
                return
            env_id = _word(rec, _S["env_id"])
            r1 = attach_system_region(
                _word(rec, _S["shm_id"]),
                1,
                _word(rec, _S["size"]),
                env_id,
                _word(rec, _S["shm_key"]),
            )
        elif size >= REGION_HEADER.size + ENV_HEADER.size:
            r1 = attach_file_region(os.path.join(home, region_file_name(1)), 1, size, fd=fd)
            env_id = r1.header("env_id")
        else:
            return  # too short to hold anything: nothing to panic
    except (AiodbenvError, OSError):
        _remove_orphan_segments(fd)
        return
    try:
        if r1.header("magic") == REGION_MAGIC and r1.header("env_id") == env_id:
            r1.words[_ENV_BASE + _E["panic"]] = 1
            table = _read_region_table(r1.words)
        else:
            table = []
        kind = r1.kind
    finally:
        r1.close()
    if kind == KIND_SYSTEM:
        for _rid, _t, _size, _key, shm_id in table:
            remove_system_segment(shm_id, env_id)
        _remove_orphan_segments(fd)


def _remove_orphan_segments(fd: int) -> None:
    try:
        if os.fstat(fd).st_size != SHM_REF.size:
            return
        rec = _io.pread(fd, SHM_REF.size, 0)
    except OSError:
        return
    if _word(rec, _S["magic"]) != SHM_REF_MAGIC:
        return
    # From region 1: whichever segment is missing, the others are found by key (and only
    # removed if they carry this environment's id).
    remove_system_segments_by_key(
        _word(rec, _S["shm_key"]), _word(rec, _S["env_id"]), 1, MAX_REGIONS
    )


def _join_for_remove(home: str, fd: int) -> list[Region]:
    """Attach an environment to remove it: like a join, but a panicked one is fine too."""
    try:
        return _join_once(home, fd)
    except RunRecovery:
        pass
    path1 = os.path.join(home, region_file_name(1))
    size = os.fstat(fd).st_size
    if size == SHM_REF.size:
        rec = _io.pread(fd, SHM_REF.size, 0)
        env_id = _word(rec, _S["env_id"])
        r1 = attach_system_region(
            _word(rec, _S["shm_id"]), 1, _word(rec, _S["size"]), env_id, _word(rec, _S["shm_key"])
        )
        return _attach_rest(home, KIND_SYSTEM, r1, env_id)
    r1 = attach_file_region(path1, 1, size, fd=fd)
    return _attach_rest(home, KIND_FILE, r1, r1.header("env_id"))
