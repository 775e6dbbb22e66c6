"""Removing an environment: its segments and region files, ``__db.001`` last (Berkeley DB's
``env_region.c``, ``__env_remove_env``, under ``DB_ENV->remove``).

The home is locked exclusively first (:mod:`aiodbenv.region.home`): without ``force`` a home
another handle holds is :class:`~aiodbenv.errors.Busy`; with ``force`` region 1 is panicked so
every handle still attached fails its next call with :class:`~aiodbenv.errors.RunRecovery`.
An environment that cannot be fully attached (its memory gone after a reboot, a corrupt
``__db.001``) is removed as far as it can be found: by region 1's table if it can be attached,
else by the System V keys its ``SHM_REF`` record names.

Blocking (mapping, ``shmctl``, ``unlink``): called from a worker thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .. import _io
from ..errors import AiodbenvError, Busy, CorruptRegion, EnvNotFound, RunRecovery
from . import panic
from .backing import (
    Region,
    attach_file_region,
    open_region_fd,
    region_file_name,
    remove_system_segment,
    remove_system_segments_by_key,
)
from .environment import RegionRow, private_handles, read_region_table
from .home import HomeLock, check_home
from .join import Incomplete, attach_rest, join_once
from .layout import (
    ENV_HEADER,
    ENV_HEADERS_END,
    ENV_WORD,
    KIND_FILE,
    KIND_SYSTEM,
    MAX_REGIONS,
    REGION_MAGIC,
)
from .registry import LOCK_FILE
from .shm_ref import read_shm_ref

__all__ = ["Inspect", "remove_environment"]

logger = logging.getLogger("aiodbenv")

#: ``inspect(regions, region_table, force)``: a last look before anything is removed.
Inspect = Callable[[list[Region], list[RegionRow], bool], None]


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
    inspect: Inspect | None = None,
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
    private = private_handles(home)
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
    inspect: Inspect | None = None,
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
        except (Incomplete, AiodbenvError) as err:
            if not force:
                if isinstance(err, Incomplete):
                    raise CorruptRegion(
                        f"{path1} holds no complete environment; remove with force"
                    ) from None
                raise
            reason = str(err) or "no complete environment"
            logger.warning("removing unreadable environment %s: %s", home, reason)
            _panic_what_remains(home, fd)
        finally:
            os.close(fd)
    table: list[RegionRow] = []
    env_id = 0
    if regions and inspect is not None and not regions[0].words[ENV_WORD + ENV_HEADER.word.panic]:
        try:
            inspect(regions, read_region_table(regions[0].words), force)
        except BaseException:
            for region in reversed(regions):
                region.close()
            raise
    if regions:
        r1 = regions[0]
        # Every handle still attached sees this, and why.
        panic.record(r1.words, os.getpid(), f"the environment was removed with force ({home})")
        table = read_region_table(r1.words)
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
        ref = read_shm_ref(fd, size)
        if ref is not None:
            if not ref.complete:
                return
            env_id = ref.env_id
            r1 = ref.attach()
        elif size >= ENV_HEADERS_END:
            r1 = attach_file_region(os.path.join(home, region_file_name(1)), 1, size, fd=fd)
            env_id = r1.header("env_id")
        else:
            return  # too short to hold anything: nothing to panic
    except (AiodbenvError, OSError):
        _remove_orphan_segments(fd)
        return
    try:
        if r1.header("magic") == REGION_MAGIC and r1.header("env_id") == env_id:
            panic.record(r1.words, os.getpid(), f"the environment was removed with force ({home})")
            table = read_region_table(r1.words)
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
        ref = read_shm_ref(fd)
    except OSError:
        return
    if ref is None or not ref.complete:
        return
    # From region 1: whichever segment is missing, the others are found by key (and only
    # removed if they carry this environment's id).
    remove_system_segments_by_key(ref.shm_key, ref.env_id, 1, MAX_REGIONS)


def _join_for_remove(home: str, fd: int) -> list[Region]:
    """Attach an environment to remove it: like a join, but a panicked one is fine too."""
    try:
        return join_once(home, fd)
    except RunRecovery:
        pass
    path1 = os.path.join(home, region_file_name(1))
    size = os.fstat(fd).st_size
    ref = read_shm_ref(fd, size)
    if ref is not None:
        return attach_rest(home, KIND_SYSTEM, ref.attach(), ref.env_id)
    r1 = attach_file_region(path1, 1, size, fd=fd)
    return attach_rest(home, KIND_FILE, r1, r1.header("env_id"))
