"""The three kinds of memory a region can live in, behind one :class:`Region` type.

- **file** (the default): ``__db.NNN`` in the environment home, preallocated with
  ``posix_fallocate`` (a full disk is an ``ENOSPC`` error at creation, never a ``SIGBUS`` on
  first touch) and mapped ``MAP_SHARED``;
- **system**: a System V shared memory segment with key ``shm_key + region_id - 1``; joiners
  attach by the segment id the creator recorded;
- **private**: anonymous memory of this process only.

All three give the same thing: ``buf`` (the region's bytes), ``words`` (the same memory as
8-byte words) and ``base`` (a cffi pointer for the mutexes). Nothing here knows what the region
holds; the header is written by :mod:`aiodbenv.region.create` and checked by
:mod:`aiodbenv.region.join`.

Every function here is blocking and runs in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import weakref
from collections.abc import Callable
from typing import Any

import sysv_ipc

from .. import _io
from ..errors import (
    Busy,
    CacheFull,
    CorruptRegion,
    EnvNotFound,
    NoSpace,
    PermissionDenied,
    ShmKeyInUse,
)
from .layout import KIND_FILE, KIND_PRIVATE, KIND_SYSTEM, REGION_HEADER, REGION_MAGIC, WORD
from .mutex import ffi, speedups

__all__ = [
    "Region",
    "attach_file_region",
    "attach_system_region",
    "create_file_region",
    "create_private_region",
    "create_system_region",
    "open_region_fd",
    "region_file_name",
    "remove_created_segment",
    "remove_system_segment",
    "remove_system_segments_by_key",
]

logger = logging.getLogger("aiodbenv")

_O_OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


#: System V keys and ids are C ints: anything outside 0..2**31-1 was read from corrupt bytes.
_SHM_LIMIT = 1 << 31


def region_file_name(region_id: int) -> str:
    """``__db.001`` for region 1, and so on."""
    return f"__db.{region_id:03d}"


class Region:
    """One attached region: its bytes, its words and a pointer, whatever backs it."""

    __slots__ = (
        "_closer",
        "backing",
        "base",
        "buf",
        "halves",
        "kind",
        "region_id",
        "size",
        "words",
    )

    def __init__(
        self,
        region_id: int,
        kind: int,
        exporter: Any,
        size: int,
        backing: str,
        closer: Callable[[], None],
    ) -> None:
        self.region_id = region_id
        self.kind = kind
        self.size = size
        #: Where the region lives, for statistics: a path, "shm key 0x... id N", or "heap".
        self.backing = backing
        # Checked before any view is made, so a bad size is an error, not a TypeError or a
        # view past the memory. On an error the caller still owns (and closes) the exporter.
        with memoryview(exporter) as whole:
            have = whole.nbytes
        if size % WORD or size < REGION_HEADER.size or have < size:
            raise CorruptRegion(
                f"{backing}: region {region_id} is {size} bytes: not a whole number of words, "
                f"shorter than its header, or more than its {have} bytes of memory"
            )
        self.buf = memoryview(exporter)[:size]
        self.words = self.buf.cast("Q")
        #: The region as 16-bit words: the per-slot pin counts of buffer headers.
        self.halves = self.buf.cast("H")
        self.base = ffi.from_buffer(exporter, require_writable=True)
        self._closer = closer
        # The compiled helpers check every offset they read from the region against this.
        if speedups is not None and not speedups.aiodb_set_region(
            ffi.cast("uint64_t *", self.base), size
        ):
            ffi.release(self.base)
            self.words.release()
            self.buf.release()
            raise CacheFull("too many regions attached in this process")

    def close(self) -> None:
        """Detach: release the views, then unmap or detach the memory and close descriptors.

        If a view into the region is still alive (a slice of ``page.data`` kept by the caller
        past its pin, or a compiled write behind of the log still running), the memory is not
        unmapped or detached yet: that happens with the last such view, and a warning is
        logged; descriptors are closed either way. This holds for all three kinds of memory.
        """
        if speedups is not None:
            speedups.aiodb_forget_region(ffi.cast("uint64_t *", self.base))
        ffi.release(self.base)
        self.words.release()
        self.halves.release()
        self.buf.release()
        self._closer()

    def header(self, field: str) -> int:
        """A field of this region's ``REGION_HEADER``."""
        return int(self.words[getattr(REGION_HEADER.word, field)])

    def __repr__(self) -> str:
        return f"<Region {self.region_id} {self.size} bytes at {self.backing}>"


def _close_exported(close: Callable[[], None], what: str) -> None:
    try:
        close()
    except BufferError:
        logger.warning(
            "%s: a view of its memory outlived the region; it is unmapped with the last such view",
            what,
        )


def _os_error(err: OSError, what: str) -> Exception:
    """Map an OSError from a region operation to the typed error a user should see."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: no space left on device")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"{what}: {os.strerror(err.errno)}")
    if err.errno == errno.ENOENT:
        return EnvNotFound(f"{what}: no such file or directory")
    if err.errno == errno.ELOOP:
        return CorruptRegion(f"{what}: is a symbolic link, not a region file")
    if err.errno == errno.ENOMEM:
        return CacheFull(f"{what}: not enough memory")
    if err.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP, errno.ETXTBSY):
        return CorruptRegion(f"{what}: not a regular file")
    return err


# -- file-backed ------------------------------------------------------------------------------


def open_region_fd(path: str, *, create: bool, mode: int) -> int:
    """Open a region file: ``create`` makes it exclusively (``O_EXCL``) with exactly ``mode``.

    Symbolic links are refused (``O_NOFOLLOW``); raises ``FileExistsError`` when creating a file
    that exists, and typed errors for everything else.
    """
    flags = _O_OPEN | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = _io.open_file(path, flags, mode)
    except FileExistsError:
        raise
    except OSError as err:
        raise _os_error(err, path) from err
    if create:
        try:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        except OSError as err:
            os.close(fd)
            raise _os_error(err, path) from err
    return fd


def _map_fd(fd: int, path: str, region_id: int, size: int) -> Region:
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        raise _os_error(err, f"mapping {path}") from err

    def closer() -> None:
        try:
            _close_exported(mm.close, path)
        finally:
            os.close(fd)

    try:
        return Region(region_id, KIND_FILE, mm, size, path, closer)
    except BaseException:
        mm.close()  # the caller closes fd
        raise


def create_file_region(
    path: str, region_id: int, size: int, mode: int, fd: int | None = None
) -> Region:
    """Create region file ``path`` of ``size`` bytes and map it.

    Given ``fd`` (an already created file, e.g. ``__db.001`` made with ``O_EXCL``), the region
    uses a duplicate of it and the caller keeps ``fd``. The file is preallocated before it is
    mapped, so a full disk fails here with :class:`~aiodbenv.errors.NoSpace`. On failure a file
    this call created is removed.
    """
    own_file = fd is None
    if fd is None:
        try:
            fd = open_region_fd(path, create=True, mode=mode)
        except FileExistsError as err:
            raise CorruptRegion(
                f"{path} already exists without an environment: a stale region file "
                "(remove the environment with force)"
            ) from err
    else:
        fd = os.dup(fd)
    try:
        try:
            _io.fallocate(fd, 0, size)
        except OSError as err:
            raise _os_error(err, f"preallocating {size} bytes for {path}") from err
        return _map_fd(fd, path, region_id, size)
    except BaseException:
        os.close(fd)
        if own_file:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def attach_file_region(path: str, region_id: int, size: int, fd: int | None = None) -> Region:
    """Map an existing region file, checking that it is a regular file of exactly ``size``.

    Given ``fd``, the region uses a duplicate of it and the caller keeps ``fd``.
    """
    fd = open_region_fd(path, create=False, mode=0) if fd is None else os.dup(fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptRegion(f"{path} is not a regular file")
        if st.st_size != size:
            raise CorruptRegion(
                f"{path} is {st.st_size} bytes, the environment says {size}: truncated or foreign"
            )
        return _map_fd(fd, path, region_id, size)
    except BaseException:
        os.close(fd)
        raise


# -- System V shared memory -------------------------------------------------------------------


def _segment_is_ours(shm: Any) -> bool:
    if shm.size < REGION_HEADER.size:
        return False
    magic = int.from_bytes(shm.read(WORD, REGION_HEADER.offset("magic")), "little")
    return magic == REGION_MAGIC


def _system_region(shm: Any, region_id: int, size: int, key: int) -> Region:
    # shm.key is only right for segments found by key; attach() by id does not know it.
    backing = f"shm key {key:#x} id {shm.id}"
    # sysv_ipc detaches a segment whatever views of it are still alive, and a view used after
    # that reads unmapped memory (a crash). So the region's views are taken from a buffer over
    # a pointer that detaches the segment when the last of them is gone, as an mmap is
    # unmapped with its last view: a page view kept past its pin, or a compiled write behind
    # still running after its log closed (aiodbenv.log.orphan), keeps the memory mapped.

    def detach(_ptr: Any) -> None:
        try:
            shm.detach()
        except sysv_ipc.Error:
            pass  # already detached: the caller's error path

    ptr = ffi.gc(ffi.cast("char *", shm.address), detach)
    alive = weakref.ref(ptr)
    exporter = ffi.buffer(ptr, shm.size)
    del ptr

    def closer() -> None:
        if alive() is not None:
            logger.warning(
                "%s: a view of its memory outlived the region; it is detached with the last "
                "such view",
                backing,
            )

    # On an error the caller detaches.
    return Region(region_id, KIND_SYSTEM, exporter, size, backing, closer)


def create_system_region(key: int, region_id: int, size: int, mode: int) -> Region:
    """Create the System V segment ``key`` of ``size`` bytes with exactly ``mode``.

    A segment already using ``key`` is examined, never written: if it carries our region magic
    and nobody else is attached, it is the leftover of a dead environment and is removed; if
    ours and attached, :class:`~aiodbenv.errors.Busy`; if foreign,
    :class:`~aiodbenv.errors.ShmKeyInUse`.
    """
    for _ in range(3):
        try:
            # sysv_ipc fills new segments with spaces by default; regions start zeroed.
            shm = sysv_ipc.SharedMemory(
                key, sysv_ipc.IPC_CREX, mode=mode, size=size, init_character=b"\0"
            )
        except sysv_ipc.ExistentialError:
            _clear_stale_segment(key)
            continue
        except sysv_ipc.PermissionsError as err:
            raise PermissionDenied(f"shm key {key:#x}: {err}") from err
        except (sysv_ipc.Error, OSError, ValueError, MemoryError) as err:
            # sysv_ipc raises MemoryError for shmget's ENOMEM: more than the system can give.
            raise _shm_error(err, key, size) from err
        try:
            return _system_region(shm, region_id, size, key)
        except BaseException:
            shm.detach()
            shm.remove()
            raise
    raise Busy(f"shm key {key:#x} keeps being recreated by another process")


def _shm_error(err: BaseException, key: int, size: int) -> Exception:
    # shmget refuses sizes over SHMMAX and totals over SHMALL: the system's memory limits.
    return CacheFull(f"shm key {key:#x}: cannot create a {size}-byte segment: {err}")


def _clear_stale_segment(key: int) -> None:
    try:
        old = sysv_ipc.SharedMemory(key, 0, mode=0)
    except sysv_ipc.ExistentialError:
        return  # gone meanwhile: retry the create
    except sysv_ipc.PermissionsError as err:
        raise ShmKeyInUse(
            f"shm key {key:#x} is used by a segment we may not read; choose another shm_key"
        ) from err
    try:
        if not _segment_is_ours(old):
            raise ShmKeyInUse(
                f"shm key {key:#x} is used by another program's segment (id {old.id}); "
                "choose another shm_key"
            )
        attached = old.number_attached - 1  # ourselves
        if attached > 0:
            raise Busy(
                f"shm key {key:#x} belongs to a live aiodbenv environment "
                f"({attached} processes attached)"
            )
        old.remove()  # a dead environment's leftover (Berkeley DB removes these on create too)
    finally:
        try:
            old.detach()
        except sysv_ipc.Error:
            pass


def attach_system_region(shm_id: int, region_id: int, size: int, env_id: int, key: int) -> Region:
    """Attach segment ``shm_id`` and check it is region ``region_id`` of environment ``env_id``.

    ``key`` is the segment's key as the environment recorded it (for statistics).
    """
    if not 0 <= shm_id < _SHM_LIMIT or size >= 1 << 62:
        # Read from a region or a reference record: out of range means corrupt.
        raise CorruptRegion(f"shm id {shm_id} or size {size} is out of range")
    try:
        shm = sysv_ipc.attach(shm_id)
    except sysv_ipc.PermissionsError as err:
        raise PermissionDenied(f"shm id {shm_id}: {err}") from err
    except (sysv_ipc.Error, OSError, ValueError) as err:  # ValueError: no such id
        raise EnvNotFound(
            f"the environment's shared memory segment (id {shm_id}) is gone; "
            "remove the environment and create it again"
        ) from err
    try:
        if not _segment_is_ours(shm) or shm.size < size:
            raise CorruptRegion(f"shm id {shm_id} is not region {region_id} of this environment")
        owner = int.from_bytes(shm.read(WORD, REGION_HEADER.offset("env_id")), "little")
        rid = int.from_bytes(shm.read(WORD, REGION_HEADER.offset("region_id")), "little")
        if owner != env_id or rid != region_id:
            raise CorruptRegion(f"shm id {shm_id} belongs to another environment")
        return _system_region(shm, region_id, size, key)
    except BaseException:
        shm.detach()
        raise


def remove_created_segment(shm_id: int) -> bool:
    """Remove segment ``shm_id`` that this process created and is still attached to (undoing
    a create); True if removed."""
    try:
        sysv_ipc.remove_shared_memory(shm_id)
    except (sysv_ipc.Error, OSError, ValueError):
        return False
    return True


def remove_system_segment(shm_id: int, env_id: int) -> bool:
    """Remove segment ``shm_id`` if it is one of environment ``env_id``'s; True if removed."""
    if not 0 <= shm_id < _SHM_LIMIT:
        return False  # read from a corrupt record: no such segment can exist
    try:
        shm = sysv_ipc.attach(shm_id)
    except (sysv_ipc.Error, OSError, ValueError):
        return False
    try:
        if not _segment_is_ours(shm):
            return False
        owner = int.from_bytes(shm.read(WORD, REGION_HEADER.offset("env_id")), "little")
        if owner != env_id:
            return False
        shm.remove()
        return True
    finally:
        shm.detach()


def remove_system_segments_by_key(key: int, env_id: int, first_region: int, count: int) -> int:
    """Remove the segments of environment ``env_id`` found by key (``key + region_id - 1``)
    for regions ``first_region`` onward; used when region 1, which records their ids, is gone.
    Segments that are not ours are left alone. Returns how many were removed."""
    removed = 0
    for region_id in range(first_region, first_region + count):
        if not 0 <= key + region_id - 1 < _SHM_LIMIT:
            break  # read from a corrupt record: no such key
        try:
            shm = sysv_ipc.SharedMemory(key + region_id - 1, 0, mode=0)
        except (sysv_ipc.Error, OSError, ValueError):
            continue
        try:
            if not _segment_is_ours(shm):
                continue
            owner = int.from_bytes(shm.read(WORD, REGION_HEADER.offset("env_id")), "little")
            if owner == env_id:
                shm.remove()
                removed += 1
        finally:
            shm.detach()
    return removed


# -- private ----------------------------------------------------------------------------------


def create_private_region(region_id: int, size: int) -> Region:
    """Anonymous memory of this process only."""
    try:
        mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as err:
        raise _os_error(err, f"allocating a {size}-byte private region") from err
    return Region(
        region_id,
        KIND_PRIVATE,
        mm,
        size,
        "heap",
        lambda: _close_exported(mm.close, "private region"),
    )
