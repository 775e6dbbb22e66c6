"""The reference record a system-memory environment keeps in ``__db.001``.

Region 1 of a system-memory environment is a System V segment, which another process can find
only by its id. ``__db.001`` therefore holds just a :data:`~aiodbenv.region.layout.SHM_REF`
record (magic, layout version, environment id, key, segment id, size of region 1), read and
written here and nowhere else. The creator writes the body first and the magic last, as a
separate write, so a half-written record never looks valid.

Blocking (``pread``/``pwritev``): called from the worker thread that opens or removes.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from .. import _io
from .backing import Region, attach_system_region
from .layout import LAYOUT_VERSION, SHM_REF, SHM_REF_MAGIC, WORD

__all__ = ["ShmRef", "read_shm_ref", "write_shm_ref"]


@dataclass(frozen=True)
class ShmRef:
    """An ``SHM_REF`` record as read, unchecked: :attr:`magic` is 0 while the creator has not
    finished writing it, and anything else but ``SHM_REF_MAGIC`` if the file is not one."""

    magic: int
    version: int
    env_id: int
    shm_key: int
    shm_id: int
    size: int

    @property
    def complete(self) -> bool:
        """The record's magic is in place (it is written last)."""
        return self.magic == SHM_REF_MAGIC

    def attach(self) -> Region:
        """Attach region 1 by the segment id recorded (checked against the environment id
        and key: :func:`~aiodbenv.region.backing.attach_system_region`)."""
        return attach_system_region(self.shm_id, 1, self.size, self.env_id, self.shm_key)


def read_shm_ref(fd: int, size: int | None = None) -> ShmRef | None:
    """The record in ``__db.001`` (open as ``fd``), or None if the file is not the size of
    one (so it is a file-backed region 1, or nothing aiodbenv wrote). ``size`` is the file's
    size if the caller has it already."""
    if size is None:
        size = os.fstat(fd).st_size
    if size != SHM_REF.size:
        return None
    data = _io.pread(fd, SHM_REF.size, 0)
    # A short read (the file shrank meanwhile) leaves the missing words 0: incomplete.
    words = [int.from_bytes(data[i : i + WORD], "little") for i in range(0, SHM_REF.size, WORD)]
    return ShmRef(**{name: words[getattr(SHM_REF.word, name)] for name in SHM_REF.fields()})


def write_shm_ref(fd: int, *, env_id: int, shm_key: int, shm_id: int, size: int) -> None:
    """Write the record for region 1 (segment ``shm_id`` of ``size`` bytes) to ``fd``: the
    body, then the magic in a separate write. Raises ``OSError`` on a short write."""
    rec = [0] * len(SHM_REF.fields())
    rec[SHM_REF.word.version] = LAYOUT_VERSION
    rec[SHM_REF.word.env_id] = env_id
    rec[SHM_REF.word.shm_key] = shm_key
    rec[SHM_REF.word.shm_id] = shm_id
    rec[SHM_REF.word.size] = size
    body = b"".join(v.to_bytes(WORD, "little") for v in rec)
    if _io.pwritev(fd, [body], 0) != len(body):
        raise OSError(errno.EIO, "short write of the shm reference record")
    magic = SHM_REF_MAGIC.to_bytes(WORD, "little")
    if _io.pwritev(fd, [magic], SHM_REF.offset("magic")) != WORD:
        raise OSError(errno.EIO, "short write of the shm reference record")
