"""Opening and closing files in the pool (Berkeley DB's mp_fopen.c, the per-process half).

``pool.open_file(...)`` checks its arguments, opens (or creates) and identifies the file in a
worker thread, maps it when a read-only open may, and takes or shares its entry in the shared
file table (:mod:`~aiodbenv.mpool.ftable`); closing gives the entry back and closes the
descriptors once no I/O of the pool uses them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import mmap
import os
import stat as stat_mod
from collections.abc import Generator
from types import TracebackType
from typing import Any

from .. import _io, _tasks
from .._config import MAX_PAGE_SIZE, MIN_PAGE_SIZE
from .._threads import run_to_end
from ..errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from .alloc import PoolCore
from .bh import close_fds
from .bhread import PoolReads
from .core import new_fileid
from .file import PoolFile
from .hotpath import attach
from .layout import (
    FF_CHECKSUM,
    FF_NO_MMAP,
    FF_NOFILE,
    FF_TEMP,
    FILE_ENTRY,
)

__all__ = ["FileOpener", "PoolFiles"]


class FileOpener:
    """What :meth:`Pool.open_file` returns: ``await`` it for a :class:`PoolFile`, or use
    ``async with`` to have the file closed at the end of the block."""

    __slots__ = ("_args", "_file", "_pool")

    def __init__(self, pool: PoolFiles, args: dict[str, Any]) -> None:
        self._pool = pool
        self._args = args
        self._file: PoolFile | None = None

    def __await__(self) -> Generator[Any, None, PoolFile]:
        return self._pool._open(self._args).__await__()

    async def __aenter__(self) -> PoolFile:
        self._file = await self._pool._open(self._args)
        return self._file

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._file is not None
        await self._file.close()


class PoolFiles(PoolReads):
    """A pool handle's files: open and close."""

    async def _open(self, args: dict[str, Any]) -> PoolFile:
        """:meth:`_open_file` as a task that finishes even if the caller is cancelled: a
        descriptor opened or a file-table entry taken is never lost. A file whose opener was
        cancelled is closed again as soon as its open ends."""
        self._check()
        if self._no_opens:
            raise InvalidArgument("the environment is closing")
        self._busy += 1
        self._opening += 1
        task = _tasks.start(self._open_file(**args))
        task.add_done_callback(self._opened)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._close_unwanted)
            raise

    def _opened(self, task: asyncio.Task[PoolFile]) -> None:
        self._opening -= 1
        self._leave()

    def _close_unwanted(self, task: asyncio.Task[PoolFile]) -> None:
        """The open in ``task`` ended after its caller was cancelled: close what it opened."""
        if task.cancelled() or task.exception() is not None:
            return  # nothing was opened (and the failure had no caller to go to)
        f = task.result()
        self._busy += 1  # closing the pool waits for this close
        closing = _tasks.start(f.close())
        closing.add_done_callback(lambda _t: self._leave())
        self._io.orphan(closing, "closing a file whose opener was cancelled")

    async def _open_file(
        self,
        path: str | os.PathLike[str] | None,
        *,
        page_size: int | None,
        create: bool,
        readonly: bool,
        nommap: bool,
        ftype: int,
        lsn_offset: int,
        pgcookie: bytes,
        fileid: bytes | None,
        nofile: bool,
        max_pages: int | None,
        mode: int,
        checksum: bool,
    ) -> PoolFile:
        self._check()
        if not isinstance(checksum, bool):
            raise InvalidArgument(f"checksum must be True or False, not {checksum!r}")
        ps = self._core.header("page_size") if page_size is None else page_size
        if type(ps) is not int or not MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE or ps & (ps - 1):
            raise InvalidArgument(
                f"page_size must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}, "
                f"not {page_size!r}"
            )
        if type(ftype) is not int or ftype < 0:
            raise InvalidArgument(f"ftype must be a non-negative int, not {ftype!r}")
        if type(lsn_offset) is not int or not -1 <= lsn_offset <= ps - 8:
            raise InvalidArgument(f"lsn_offset must be -1 or 0..{ps - 8}, not {lsn_offset!r}")
        if not isinstance(pgcookie, (bytes, bytearray)):
            raise InvalidArgument("pgcookie must be bytes")
        if fileid is not None and (not isinstance(fileid, bytes) or len(fileid) != 20):
            raise InvalidArgument("fileid must be 20 bytes")
        if max_pages is not None and (type(max_pages) is not int or max_pages <= 0):
            raise InvalidArgument(f"max_pages must be a positive int, not {max_pages!r}")
        if type(mode) is not int or not 0 <= mode <= 0o777:
            raise InvalidArgument(f"mode must be 0o000..0o777, not {mode!r}")
        temp = path is None and not nofile
        if path is None and readonly:
            raise InvalidArgument("a temporary file (path=None) cannot be read-only")
        if readonly and create:
            raise InvalidArgument("create and readonly exclude each other")
        name = None if path is None else self._env_resolve(path)
        flags = (FF_TEMP if temp else 0) | (FF_NOFILE if nofile else 0)
        flags |= FF_CHECKSUM if checksum else 0

        fd: int | None = None
        mapped: mmap.mmap | None = None
        pages = 0
        if name is not None and not nofile:
            want_map = (
                readonly
                and not checksum  # mapped pages would skip the check
                and not nommap
                and not self._core.header("nommap")
                and not (ftype and ftype in self._io.registry)
            )
            fd, pages, fid, mapped = await run_to_end(
                _open_data_file,
                name,
                ps,
                readonly,
                create,
                mode,
                want_map,
                self._core.header("mmap_size"),
                limiter=self._io.limiter,
            )
            if fileid is None:
                fileid = fid
        elif fileid is None:
            # A named nofile file is shared by name; a temporary file by nobody.
            fileid = _name_fileid(name) if name is not None else new_fileid()
        core = self._core
        # The file table's and the file's mutexes are taken with bounded waits and an async
        # back-off (a stopped holder must not freeze the loop): LockTimeout naming the holder
        # after wait_timeout, with everything this open took given back.
        try:
            fidx, _created = await self._locked(
                functools.partial(
                    core.open_entry,
                    fileid,
                    page_size=ps,
                    lsn_offset=lsn_offset,
                    clear_len=ps,
                    ftype=ftype,
                    flags=flags,
                    pages=pages,
                    max_pages=max_pages or 0,
                    writable=not readonly,
                    name=name,
                    cookie=bytes(pgcookie),
                )
            )
            try:
                await self._locked(_note_open, core, fidx, pages, readonly)
                fs = await self._locked(core.file_stats_block, fidx)
            except BaseException:
                # The handle count taken above goes back (now, or in a task of the pool).
                self._settle(core.close_entry, fidx, not readonly, False)
                raise
        except BaseException:
            if mapped is not None:
                mapped.close()
            if fd is not None:
                os.close(fd)
            raise
        e = core.entry(fidx)
        w0 = core.meta_words
        if mapped is not None and w0[e + FILE_ENTRY.word.flags] & FF_NO_MMAP:
            mapped.close()  # a writer has it open: pages must go through the cache
            mapped = None
        f = PoolFile(
            self,
            fidx,
            fd=fd,
            path=name,
            page_size=ps,
            readonly=readonly,
            temp=temp,
            nofile=nofile,
            ftype=ftype,
            cookie=bytes(pgcookie),
            mapped=mapped,
            checksum=checksum,
            fs=fs,
        )
        attach(f)  # the compiled get(), when it is installed and applies
        self._io.files.add(f)
        return f

    def _env_resolve(self, path: str | os.PathLike[str]) -> str:
        p: object
        try:
            p = os.fspath(path)
        except TypeError:
            p = path  # not a path at all
        if not isinstance(p, str):  # bytes: "Can't mix strings and bytes" from deep inside
            raise InvalidArgument(f"a file's path must be a str path, not {type(p).__name__}")
        return os.path.join(self._env_core.home, p)

    async def _close_file(self, f: PoolFile) -> None:
        self._io.files.discard(f)  # new writes no longer use its descriptor
        # Reads and writes already under way may still use it: let them finish first.
        while self._io.tasks:
            await asyncio.wait(list(self._io.tasks))  # never cancels them (gather would)
        core = self._core
        fidx = f._fidx
        # Each step takes its mutexes with bounded waits and an async back-off (a stopped
        # holder must not freeze the loop); each locks first and changes nothing when it
        # times out, so it is simply tried again. A close must finish: no closing check.
        await self._locked(core.release_file_stats_block, fidx, f._fs, check=False)
        dead = f.temp or (f.nofile and f.name is None)
        left = await self._locked(core.close_entry, fidx, not f.readonly, dead, check=False)
        if left == 0 and dead:
            await self._locked(core.drop_file_buffers, fidx, check=False)
            await self._locked(core.free_unused_entry, fidx, check=False)
        fds = [
            fd for fd in (f._fd, self._io.close_wfd(fidx) if left == 0 else None) if fd is not None
        ]
        if f._map_view is not None:
            f._map_view.release()
        mapped = f._map
        if fds or mapped is not None:
            await run_to_end(close_fds, fds, mapped, limiter=self._io.limiter)


def _note_open(core: PoolCore, fidx: int, pages: int, readonly: bool) -> None:
    """Record an open in file slot ``fidx``'s entry: a file that grew outside the pool, and
    that a writer has it open (no mmap for anyone). Under its file mutex, taken first."""
    e = core.entry(fidx)
    w0 = core.meta_words
    with core.file_mutex(fidx):
        if pages > w0[e + FILE_ENTRY.word.pages]:
            w0[e + FILE_ENTRY.word.pages] = pages  # the file grew outside the pool
        if not readonly:
            w0[e + FILE_ENTRY.word.flags] |= FF_NO_MMAP


def _name_fileid(name: str) -> bytes:
    return (
        b"\xfe" + hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=19).digest()
    )


def _open_data_file(
    name: str,
    page_size: int,
    readonly: bool,
    create: bool,
    mode: int,
    want_map: bool,
    mmap_size: int,
) -> tuple[int, int, bytes, mmap.mmap | None]:
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd, created = _open_or_create(name, flags, create, mode)
    except FileNotFoundError:
        raise NotFound(f"no such file: {name} (open it with create=True)") from None
    except PermissionError as err:
        raise PermissionDenied(f"{name}: {err.strerror}") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{name} is a directory") from None
    try:
        if created:
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask (as region files)
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{name} is not a regular file")
        if st.st_size % page_size:
            raise InvalidArgument(
                f"{name} is {st.st_size} bytes, not a whole number of {page_size}-byte pages"
            )
        fid = (st.st_ino.to_bytes(8, "little") + st.st_dev.to_bytes(8, "little")).ljust(20, b"\0")
        mapped = None
        if want_map and 0 < st.st_size < mmap_size:
            try:
                mapped = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
            except OSError:
                mapped = None  # mapping is an optimisation: fall back to the cache
        return fd, st.st_size // page_size, fid, mapped
    except BaseException:
        os.close(fd)
        raise


def _open_or_create(name: str, flags: int, create: bool, mode: int) -> tuple[int, bool]:
    """Open ``name``; with ``create``, make it if missing. Returns ``(fd, created)``: only a
    file this call made gets its mode set (an existing file keeps its own)."""
    if not create:
        return _io.open_file(name, flags, mode), False
    for _ in range(3):
        try:
            return _io.open_file(name, flags | os.O_CREAT | os.O_EXCL, mode), True
        except FileExistsError:
            pass
        try:
            return _io.open_file(name, flags, mode), False
        except FileNotFoundError:
            continue  # removed between the two opens: try to create it again
    raise InvalidArgument(f"{name} keeps appearing and disappearing while it is opened")
