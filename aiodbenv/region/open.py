"""Opening an environment: create it or join it, whichever the home calls for (Berkeley DB's
``env_open.c``, ``__env_open``).

Creation is serialised by creating ``__db.001`` with ``O_EXCL``. The creator holds an
exclusive ``flock`` on it while it builds (:mod:`aiodbenv.region.create`) and writes the
environment magic last; a joiner (:mod:`aiodbenv.region.join`) that finds no magic yet waits
while that lock is held, and reports a corrupt environment if nobody is building. Every open
handle holds the home lock (:mod:`aiodbenv.region.home`) and, in a shared environment, a slot
of the registry of live processes (:mod:`aiodbenv.region.registry`).

This is the synchronous core under :class:`aiodbenv.Env`: everything here blocks and is run
in a worker thread by the async shell.
"""

from __future__ import annotations

import fcntl
import os
import time

from .._config import Settings
from ..errors import Busy, CorruptRegion, EnvNotFound, InvalidArgument, TryAgain
from .backing import Region, open_region_fd, region_file_name
from .create import Formatter, RegionSpec, create_private, create_shared
from .environment import EnvCore, add_private
from .home import POLL, HomeLock, check_home, make_home
from .join import Incomplete, join_once
from .layout import KIND_NAMES, KIND_PRIVATE
from .registry import Registry

__all__ = ["BUILD_WAIT", "open_environment"]

#: How long a joiner waits for a creator that is still building the environment.
BUILD_WAIT = 30.0
#: How long a joiner keeps retrying an incomplete ``__db.001`` that nobody is building: covers
#: the instant between the creator's O_EXCL create and its flock.
INCOMPLETE_GRACE = 0.25
#: How long an open retries when the home is locked by a remove or a private handle.
HOME_LOCK_WAIT = 0.5


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
            except _LostRace:
                continue  # another creator won the race: join its environment
        try:
            return join_once(home, fd)
        except Incomplete:
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
        time.sleep(POLL)


class _LostRace(Exception):
    """Another process created ``__db.001`` first."""


def _create_exclusive(
    home: str,
    path1: str,
    settings: Settings,
    extra: list[RegionSpec],
    formatter: Formatter | None,
) -> list[Region]:
    """Create ``__db.001`` with O_EXCL and build the environment under its flock.

    Raises :class:`_LostRace` if another process created ``__db.001`` first. Only that
    ``O_EXCL`` open means a lost race: a ``FileExistsError`` while building (a ``log_dir``
    that is a file, say) is an error of this create, raised as it is, not retried.
    """
    if settings.region == "system" and settings.shm_key is None:
        raise InvalidArgument(
            "a system-memory environment needs a shm_key (set_shm_key in DB_CONFIG)"
        )
    check_home(home, create=True)
    try:
        fd = open_region_fd(path1, create=True, mode=settings.mode)
    except FileExistsError:
        raise _LostRace from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # joiners wait while we build
        try:
            return create_shared(home, fd, settings, extra, formatter)
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
            regions = create_private(home, settings, extra, formatter)
            core = EnvCore(home, KIND_PRIVATE, regions, home_lock)
            add_private(core)
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
            core.registry = Registry(home, core.words, core.mutex, core.env_field("mode"))
    except BaseException:
        core.release()
        raise
    return core
