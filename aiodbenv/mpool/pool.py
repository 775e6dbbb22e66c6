"""``Pool``: an environment's shared buffer pool, as one ``Env`` handle sees it.

The pool's state is in the mpool regions (:mod:`aiodbenv.mpool.alloc`'s ``PoolCore``); this
object adds what is per process: the pgin/pgout registry, the open files, descriptors for
writing other processes' files, and the async machinery: frames, reads, waits. I/O never runs
on the event loop except a read of a page that is already in the OS page cache (``RWF_NOWAIT``).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import mmap
import os
import stat as stat_mod
import time
from collections.abc import Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from .. import _io
from .._config import MAX_PAGE_SIZE, MIN_PAGE_SIZE
from .._process import is_alive
from ..errors import (
    CacheFull,
    InvalidArgument,
    LockTimeout,
    NoSpace,
    NotFound,
    PageCorrupt,
    PageNotFound,
    PermissionDenied,
    RunRecovery,
    TryAgain,
)
from ..region.backing import Region
from ..region.layout import MAX_PROCS
from ..region.mutex import BUSY, Busy, _wait_bound, step_waits
from ..region.mutex import STEP_WAIT as _STEP_WAIT
from .alloc import PoolCore
from .bh import BufferIO, PageIn, PageOut, SyncResult, close_fds, write_items
from .cache import BufRef, Cache
from .checksum import verify as verify_checksum
from .core import new_fileid
from .file import MODE_GET, MODE_LAST, MODE_NEW, PoolFile
from .layout import (
    BH,
    BH_DIRTY,
    BH_FAILED,
    BH_READING,
    BH_WRITING,
    BUCKET,
    FF_CHECKSUM,
    FF_NO_MMAP,
    FF_NOFILE,
    FF_TEMP,
    FILE_ENTRY,
    FILE_STATS,
    HANDLE_STATS,
    PINS_HALF,
    POOL_HEADER,
)
from .reaper import REAP_INTERVAL, Reaped, reap
from .stat import PoolStat, pool_stat
from .sync import take_over_claim, write_back
from .trickle import trickle

if TYPE_CHECKING:
    from ..region.environment import EnvCore

__all__ = ["FileOpener", "PageIn", "PageOut", "Pool"]

T = TypeVar("T")


logger = logging.getLogger("aiodbenv")

_ZEROS: dict[int, bytes] = {}
#: The frame-waiter poll (for frames released by other processes): first and longest step.
_POLL_MIN = 0.0002
_POLL_MAX = 0.005
#: Back-off between failed writes of dirty victims (a full or failing disk): first, longest.
_WRITE_RETRY_MIN = 0.001
_WRITE_RETRY_MAX = 0.1


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z


class FileOpener:
    """What :meth:`Pool.open_file` returns: ``await`` it for a :class:`PoolFile`, or use
    ``async with`` to have the file closed at the end of the block."""

    __slots__ = ("_args", "_file", "_pool")

    def __init__(self, pool: Pool, args: dict[str, Any]) -> None:
        self._pool = pool
        self._args = args
        self._file: PoolFile | None = None

    def __await__(self) -> Generator[Any, None, PoolFile]:
        return self._pool._open_file(**self._args).__await__()

    async def __aenter__(self) -> PoolFile:
        self._file = await self._pool._open_file(**self._args)
        return self._file

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._file is not None
        await self._file.close()


class Pool:
    """The shared buffer pool of an environment (Berkeley DB's mpool), through one handle.

    Get it as ``env.pool``. ``fail_fast`` (default False) makes a pin that finds every frame
    pinned raise :class:`~aiodbenv.errors.CacheFull` at once instead of waiting up to
    ``wait_timeout`` seconds (default 30) for another pin to be released.
    """

    def __init__(self, env: EnvCore, regions: list[Region], shared: bool) -> None:
        self._env_core = env
        core = PoolCore(regions, shared, env.panic)
        self._core = core
        self._panic_words, self._panic_index = env.panic_word()
        self._hs = core.attach_handle()
        self._pid = os.getpid()
        #: The I/O: descriptors, page transforms, worker threads, I/O tasks, write counters.
        self._io = BufferIO(
            core,
            self._hs,
            self._pid,
            settle=self._settle,
            notify=self._notify,
            closing=lambda: self._closing,
        )
        self._claims_swept = 0.0  # when _get_frame last looked for dead writers' claims
        #: This handle's registry slot: the per-buffer pin counts it changes (0: private).
        self._slot = env.registry.slot if env.registry is not None else 0
        self._reaped_at = 0.0  # when the reaper last looked, from a frame or sync wait
        self._reaper_task: asyncio.Task[None] | None = None
        self._reaped_at_open: list[Reaped] = []  # for failchk: what opening this handle reaped
        self._changed: asyncio.Event | None = None
        self._waiters = 0
        # Coroutines waiting for a frame, first come first served: each released frame wakes
        # the first one (one wake-up per frame, not a stampede). Frames freed by other
        # processes are only seen by polling, which one timer does for the whole queue.
        self._frame_queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._frame_poll: asyncio.TimerHandle | None = None
        self._frame_poll_delay = _POLL_MIN
        #: Wake-ups handed to frame waiters: by a released frame, and by the poll timer.
        self.frame_wakeups = 0
        self.frame_polls = 0
        self._frame_waiting = 0  # coroutines inside _wait_frame_turn
        self._reclaimed_at: dict[int, float] = {}  # cache index -> last look for lost frames
        self._closed = False
        # Closing waits for all of this: coroutines inside a slow path (a miss, a sync) and the
        # tasks the pool spawned for I/O (fills, read batches, write batches, fsyncs), so that
        # no descriptor is closed and no region detached under a read or write in flight.
        self._closing = False
        self._last_yield = time.monotonic()
        self._since_yield = 0
        self._busy = 0
        # Dirty unpins in this process since a worker last looked, and who to wake.
        self._dirtied_w = self._hs + HANDLE_STATS.word.dirtied_bytes
        self._dirty_pages = 0
        self._dirty_wake_at = 0  # 0: nobody is listening
        self._dirty_event: asyncio.Event | None = None
        #: Raise CacheFull at once when every frame is pinned, instead of waiting.
        self.fail_fast = False
        #: Seconds a pin waits for a frame before raising CacheFull.
        self.wait_timeout = 30.0

    # -- basics -------------------------------------------------------------------------------

    def _check(self) -> None:
        if os.getpid() != self._pid:
            from ..errors import ForkedProcessError

            raise ForkedProcessError(
                "this pool handle belongs to another process; open the environment again"
            )
        if self._closed or self._closing:
            raise InvalidArgument(
                "the environment is closed" if self._closed else "the environment is closing"
            )
        if self._env_core.panicked:
            self._check_panic()

    def _check_panic(self) -> None:
        """Raise RunRecovery if the environment is panicked, saying why if it was a failed
        fsync (in any process)."""
        fsync_err = self._fsync_failure() if self._env_core.panicked else None
        if fsync_err:
            raise RunRecovery(
                f"PANIC: environment {self._env_core.home} is panicked: {fsync_err}; run "
                "recovery (close every handle, remove the environment and open it again)"
            )
        self._env_core.check_panic()

    def _fsync_failure(self) -> str | None:
        """What failed, if the environment panicked because an fsync failed (any process)."""

        core = self._core
        w0 = core.meta_words
        code = int(w0[core.pool_hdr + POOL_HEADER.word.fsync_errno])
        if not code:
            return None
        off, n = (
            int(w0[core.pool_hdr + POOL_HEADER.word.fsync_name_off]),
            int(w0[core.pool_hdr + POOL_HEADER.word.fsync_name_len]),
        )
        name = core.meta_bytes(off, n).decode("utf-8", "surrogateescape") if off else "a file"
        return (
            f"fsync of {name} failed with errno {code} ({errno.errorcode.get(code, '?')}: "
            f"{os.strerror(code)}); pages written to it may be lost"
        )

    def _fsync_failed(self, name: str, err: OSError) -> None:
        """An fsync failed: panic the environment and raise RunRecovery (never returns).

        After a failed fsync the kernel may have dropped the dirty pages it could not write
        and marked them clean, so a second fsync can succeed with the data gone (PostgreSQL's
        "fsyncgate"). No page of the pool can be trusted to be on disk any more: every process
        must stop and recover, and no later call may report success.
        """

        core = self._core
        w0 = core.meta_words
        code = err.errno or errno.EIO
        if not w0[
            core.pool_hdr + POOL_HEADER.word.fsync_errno
        ]:  # the first failure is the one reported
            raw = name.encode("utf-8", "surrogateescape")[:4096]
            try:
                off = core.meta_store(raw)
            except Exception:  # no room to keep the name: the errno alone still says it
                off, raw = 0, b""
            w0[core.pool_hdr + POOL_HEADER.word.fsync_name_off] = off
            w0[core.pool_hdr + POOL_HEADER.word.fsync_name_len] = len(raw)
            w0[core.pool_hdr + POOL_HEADER.word.fsync_errno] = code
        reason = f"fsync of {name} failed: {os.strerror(code)} (errno {code})"
        self._env_core.panic(reason)
        raise RunRecovery(
            f"PANIC: {reason}; pages written to it may be lost. Run recovery (close every "
            "handle, remove the environment and open it again)"
        ) from err

    def _enter(self) -> None:
        """A slow path begins (closing waits for it to end); raises if the pool is closing."""
        self._check()
        self._busy += 1

    def _leave(self) -> None:
        self._busy -= 1
        if self._closing:
            self._notify()

    async def _breathe(self) -> None:
        """Let other tasks run now and then during a run of slow-path pins.

        A miss served from the OS page cache completes without awaiting anything (~20 µs); a
        loop of them would otherwise hold the event loop for as long as it runs. The budget
        is for the whole pool, shared by the coroutines in a slow path: about 48 misses, or a
        millisecond, then whoever is running yields. With many coroutines missing at once,
        each gets a share, so one turn of the event loop stays about a millisecond long.
        """
        self._since_yield += 1
        now = time.monotonic()
        if self._since_yield >= 48 // max(1, self._busy) or now - self._last_yield > 0.001:
            self._since_yield = 0
            self._last_yield = now
            await asyncio.sleep(0)

    async def _quiesce(self) -> None:
        """Wait until no slow path runs and no I/O task of the pool is left.

        Pins and syncs under way notice the close at their next step and leave; one whose task
        is never resumed again would be waited for forever (detaching the regions under it is
        not safe), so the wait says what it waits for every few seconds.
        """
        since = time.monotonic()
        while self._busy or self._io.tasks:
            if self._io.tasks:
                await asyncio.gather(*list(self._io.tasks), return_exceptions=True)
            else:
                await self._wait_change(0.01)
            if time.monotonic() - since > 5:
                since = time.monotonic()
                logger.warning(
                    "closing the pool waits for %d pin(s) or sync(s) under way to "
                    "notice the close; is a task holding one never resumed?",
                    self._busy,
                )

    def _panic_unpinned(self, pgno: int) -> None:
        self._env_core.panic(f"page {pgno} returned to the pool more often than it was pinned")
        raise RunRecovery(f"PANIC: page {pgno} was unpinned more often than pinned; run recovery")

    @property
    def cache_size(self) -> int:
        """The cache size in bytes (``st_cachesize``)."""
        return self._core.header("cache_size")

    @property
    def page_size(self) -> int:
        """The environment's default page size."""
        return self._core.header("page_size")

    @property
    def ncache(self) -> int:
        """The number of caches (mpool regions)."""
        return self._core.ncache

    def register(self, ftype: int, pgin: PageIn | None, pgout: PageOut | None) -> None:
        """Register page transforms for files of type ``ftype`` in this process
        (memp_register; the newest registration wins).

        ``pgin(pgno, page, cookie)`` runs after a page of such a file is read (and for pages
        made with ``create``), ``pgout`` before one is written, on a copy; ``cookie`` is the
        file's ``pgcookie``. They may run on the event loop thread or a worker thread: keep them
        quick and thread-safe. A process that has not registered a type cannot write (so
        cannot evict) dirty pages of such files; register every type in every process.
        """
        if type(ftype) is not int or ftype <= 0:
            raise InvalidArgument(f"ftype must be a positive int, not {ftype!r}")
        for fn in (pgin, pgout):
            if fn is not None and not callable(fn):
                raise InvalidArgument(f"{fn!r} is not callable")
        self._io.registry[ftype] = (pgin, pgout)

    # -- opening files ------------------------------------------------------------------------

    def open_file(
        self,
        path: str | os.PathLike[str] | None,
        *,
        page_size: int | None = None,
        create: bool = False,
        readonly: bool = False,
        nommap: bool = False,
        ftype: int = 0,
        lsn_offset: int = -1,
        pgcookie: bytes = b"",
        fileid: bytes | None = None,
        nofile: bool = False,
        max_pages: int | None = None,
        mode: int = 0o600,
        checksum: bool = False,
    ) -> FileOpener:
        """Open ``path`` (relative to the home) in the pool (memp_fopen).

        ``page_size`` (a power of two, default the environment's) must match any other open of
        the same file. Two opens of one file, through any path or hard link and from any
        process, share one set of pages: files are identified by device and inode, or by
        ``fileid`` (20 bytes) when given. ``create`` creates a missing file with ``mode``;
        ``readonly`` opens it read-only and, without pgin/pgout, ``nommap`` or a size over the
        environment's ``mmap_size``, maps it and serves pages from the map. ``ftype`` selects
        registered pgin/pgout, called with ``pgcookie``. ``lsn_offset`` is where the page LSN
        lives (-1: none). ``path=None`` is a private temporary file whose backing file is made
        only when one of its dirty pages must be written, and removed at close. ``nofile``
        keeps the pages in the cache only, never written; ``max_pages`` limits the file
        (set_maxsize: creating past it raises NoSpace).

        ``checksum`` (Berkeley DB's ``DB_CHKSUM``) keeps a checksum in the last 8 bytes of
        every page: ``page.data`` is ``page_size - 8`` bytes, the trailer is set when the page
        is written and checked when it is read back (a mismatch raises
        :class:`~aiodbenv.errors.PageCorrupt` naming the file and page; an all-zero page,
        never written, is accepted). Every open of the file must agree (InvalidArgument
        otherwise); such a file is never memory-mapped (see the pool guide for the layout).

        ``await pool.open_file(...)`` or ``async with pool.open_file(...) as f``. Raises
        :class:`~aiodbenv.errors.NotFound` (missing without ``create``),
        :class:`~aiodbenv.errors.InvalidArgument` (bad page size, a size that is not a whole
        number of pages, another page size or LSN offset than an earlier open, ...).
        """
        return FileOpener(
            self,
            dict(
                path=path,
                page_size=page_size,
                create=create,
                readonly=readonly,
                nommap=nommap,
                ftype=ftype,
                lsn_offset=lsn_offset,
                pgcookie=pgcookie,
                fileid=fileid,
                nofile=nofile,
                max_pages=max_pages,
                mode=mode,
                checksum=checksum,
            ),
        )

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
        ps = self.page_size if page_size is None else page_size
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
            fd, pages, fid, mapped = await anyio.to_thread.run_sync(
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
        try:
            fidx, _created = self._core.open_entry(
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
        except BaseException:
            if mapped is not None:
                mapped.close()
            if fd is not None:
                os.close(fd)
            raise
        core = self._core
        e = core.entry(fidx)
        w0 = core.meta_words
        with core.file_mutex(fidx):
            if pages > w0[e + FILE_ENTRY.word.pages]:
                w0[e + FILE_ENTRY.word.pages] = pages  # the file grew outside the pool
            if not readonly:
                w0[e + FILE_ENTRY.word.flags] |= FF_NO_MMAP
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
        )
        self._io.files.add(f)
        return f

    def _env_resolve(self, path: str | os.PathLike[str]) -> str:
        return os.path.join(self._env_core.home, os.fspath(path))

    async def _close_file(self, f: PoolFile) -> None:
        self._io.files.discard(f)  # new writes no longer use its descriptor
        # Reads and writes already under way may still use it: let them finish first.
        while self._io.tasks:
            await asyncio.gather(*list(self._io.tasks), return_exceptions=True)
        core = self._core
        fidx = f._fidx
        core.release_file_stats_block(fidx, f._fs)
        dead = f.temp or (f.nofile and f.name is None)
        left = core.close_entry(fidx, writable=not f.readonly, discard=dead)
        if left == 0 and dead:
            core.drop_file_buffers(fidx)
            if not core.any_buffers(fidx):
                with core.mutex:
                    core._free_entry(fidx)
        fds = [
            fd for fd in (f._fd, self._io.close_wfd(fidx) if left == 0 else None) if fd is not None
        ]
        if f._map_view is not None:
            f._map_view.release()
        mapped = f._map
        if fds or mapped is not None:
            await anyio.to_thread.run_sync(close_fds, fds, mapped, limiter=self._io.limiter)

    # -- frames -------------------------------------------------------------------------------

    @staticmethod
    def _attempt(fn: Callable[..., T], *args: Any) -> T | Busy:
        """``fn(*args)`` with a lock wait of a few milliseconds at most, or ``BUSY`` (nothing
        done) if a mutex stayed held: the slow paths' usual case, without making a coroutine;
        on ``BUSY`` they go on with :meth:`_locked`."""
        token = _wait_bound.set(_STEP_WAIT)
        try:
            return fn(*args)
        except LockTimeout:
            return BUSY
        finally:
            _wait_bound.reset(token)

    async def _locked(self, fn: Callable[..., T], *args: Any, check: bool = True) -> T:
        """``fn(*args)``, a synchronous critical section, with bounded lock waits: each
        attempt waits at most a few milliseconds for a held mutex; on
        :class:`~aiodbenv.errors.LockTimeout` the call backs off asynchronously (the event
        loop keeps running) and tries again, up to ``wait_timeout`` seconds, then raises
        LockTimeout naming the holder. ``fn`` must change nothing when a lock times out (each
        of its critical sections locks first), so that it can simply be called again.

        ``check``: stop between attempts if the pool is closing (not for bookkeeping that
        must be finished, such as a deferred release). Cancellation: between attempts;
        nothing is held.
        """
        deadline: float | None = None
        delay = 0.0005
        while True:
            token = _wait_bound.set(_STEP_WAIT)
            try:
                return fn(*args)
            except LockTimeout as err:
                last = err
            finally:
                _wait_bound.reset(token)
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.wait_timeout
            if now >= deadline:
                who = f"process {last.pid}" if last.pid else "another process"
                final = LockTimeout(
                    f"mutex {last.mutex} is held by {who} and was not released within "
                    f"{self.wait_timeout:g} s (is that process stopped or stuck?)"
                )
                final.pid, final.mutex = last.pid, last.mutex
                raise final from last
            await asyncio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, _POLL_MAX)
            if check:
                self._check()

    def _later(self, fn: Callable[..., object], *args: Any) -> asyncio.Task[Any]:
        """Run ``fn(*args)`` through :meth:`_locked` in a task of the pool, for a synchronous
        caller whose critical section found its mutex held; a final failure is logged."""
        task = self._io.spawn(self._locked(fn, *args, check=False))
        task.add_done_callback(_log_failure)
        return task

    def _notify(self) -> None:
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.set()

    def _note_dirty(self, page_size: int) -> None:
        """A page was unpinned (or set) dirty: count its bytes, and wake the background
        workers when enough pages were dirtied here since they last looked."""
        self._core.meta_words[self._dirtied_w] += page_size
        self._dirty_pages += 1
        if self._dirty_wake_at and self._dirty_pages >= self._dirty_wake_at:
            self._dirty_pages = 0
            if self._dirty_event is not None:
                self._dirty_event.set()

    def _listen_dirty(self, every: int) -> asyncio.Event:
        """An event set whenever ``every`` more pages are dirtied in this process (the lowest
        ``every`` of all listeners applies)."""
        if self._dirty_event is None:
            self._dirty_event = asyncio.Event()
        every = max(1, every)
        self._dirty_wake_at = every if not self._dirty_wake_at else min(self._dirty_wake_at, every)
        return self._dirty_event

    def dirty_share(self) -> float:
        """The fraction (0..1) of cached pages that are dirty, read from the buckets."""
        caches = self._core.caches
        total = sum(cache.buffers() for cache in caches)
        return sum(cache.dirty() for cache in caches) / total if total else 0.0

    # -- dead processes -------------------------------------------------------------------------

    def reap(self) -> list[Reaped]:
        """Reclaim what dead processes held (their pins, reads and write claims; see "A worker
        that dies" in the pool documentation) and return what was done, one ``Reaped`` per dead
        handle. Runs by itself (at open, every second, and when a pin or a sync finds pages
        held); call it to reap at once. Nothing to do for a private environment. Synchronous:
        never awaits, never blocks on a busy mutex (a slot it cannot finish is left for the
        next look)."""
        self._check()
        self._reaped_at = time.monotonic()
        return reap(self)

    def _pin_holders_text(self) -> str:
        """``"; pins held by process(es) [pid (n pins), ...]"``, from the registry (empty for a
        private environment): who a wait for a frame waited on."""
        reg = self._env_core.registry
        if reg is None:
            return ""
        pins = self.slot_pins()
        held = [
            f"{p.pid}{' (this process)' if p.pid == self._pid else ''} ({pins[p.slot]} pins)"
            for p in reg.live()
            if pins.get(p.slot)
        ]
        return f"; pins held by process(es) {', '.join(held)}" if held else ""

    def _reap_due(self, gap: float = 0.05) -> bool:
        """Reap now, before a wait or an error, unless the reaper looked less than ``gap``
        seconds ago; True if something was reclaimed. The first look of a wait or a sync
        passes ``gap=0``: a look made just before the holder died would hide its death.
        Looking is cheap when nobody died (one ``fcntl`` per open handle)."""
        if self._env_core.registry is None or time.monotonic() - self._reaped_at < gap:
            return False
        return bool(self.reap())

    def _start_reaper(self) -> None:
        """Start the background look for dead processes (a shared environment's handle)."""
        if self._env_core.registry is not None and self._reaper_task is None:
            self._reaper_task = asyncio.get_running_loop().create_task(
                self._reaper_loop(), name="aiodbenv reaper"
            )

    async def _reaper_loop(self) -> None:
        while not self._closing:
            try:
                if not self._env_core.panicked:
                    self.reap()
            except Exception:  # reported, and looked at again next time
                logger.exception("the reaper of dead processes failed")
            await asyncio.sleep(REAP_INTERVAL)

    def _frame_released(self) -> None:
        """A frame may be free or evictable now: wake the first frame waiter (only one)."""
        q = self._frame_queue
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(None)
                self.frame_wakeups += 1
                return

    def _wake_all_frames(self) -> None:
        """Wake every frame waiter (the pool is closing: they leave)."""
        q = self._frame_queue
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(None)

    def _arm_frame_poll(self) -> None:
        if self._frame_poll is None and self._frame_queue:
            self._frame_poll = asyncio.get_running_loop().call_later(
                self._frame_poll_delay, self._poll_frames
            )

    def _poll_frames(self) -> None:
        # Frames released in other processes wake nobody here: wake the first waiter now and
        # then to look (backing off while nothing turns up; a frame found resets the step).
        self._frame_poll = None
        q = self._frame_queue
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(None)
                self.frame_polls += 1
                break
        self._frame_poll_delay = min(self._frame_poll_delay * 2, _POLL_MAX)
        self._arm_frame_poll()

    async def _wait_frame_turn(self, first: bool, timeout: float) -> None:
        """Queue for a frame and wait to be woken (or ``timeout`` seconds). ``first`` keeps
        the front of the queue for a waiter whose turn just came to nothing.

        Cancellation: the waiter leaves the queue; a wake-up it had already received is
        passed on to the next waiter, so that no released frame goes unnoticed.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            self._frame_queue.appendleft(fut)
        else:
            self._frame_queue.append(fut)
        self._arm_frame_poll()
        self._frame_waiting += 1
        try:
            await asyncio.wait((fut,), timeout=timeout)
        except BaseException:
            if fut.done():
                self._frame_released()  # hand the wake-up on
            raise
        finally:
            self._frame_waiting -= 1
            if not fut.done():
                fut.cancel()
                try:
                    self._frame_queue.remove(fut)
                except ValueError:
                    pass

    async def _wait_change(self, timeout: float) -> None:
        """Wait for a frame release or I/O completion in this process, or ``timeout``
        seconds (other processes' changes are only seen by polling)."""
        ev = self._changed
        if ev is None:
            ev = self._changed = asyncio.Event()
        self._waiters += 1
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters -= 1

    def _can_write(self, tag: int) -> bool:
        """Whether this process may write a dirty page of the file with tag ``tag``."""
        return self._core.can_write(tag, self._io.registry)

    async def _get_frame(self, cache: Cache, page_size: int) -> int:
        """A buffer of ``page_size`` bytes in ``cache``: free space, else an evicted victim
        (written first if dirty), else wait for an unpin (or CacheFull if ``fail_fast``).

        Waiters are served in order: a newcomer queues behind those already waiting, and
        each released frame wakes one of them. Gives up after ``wait_timeout`` seconds with
        :class:`CacheFull`, or :class:`NoSpace` if the victims' writes kept failing with a
        full disk (failed writes are retried with a back-off, not in a spin).
        """
        core = self._core
        deadline: float | None = None
        turn = not self._frame_queue  # somebody queued first: wait behind them
        write_delay = _WRITE_RETRY_MIN
        write_error: BaseException | None = None
        registered = self._io.registry  # what victim choice needs to know of this process
        while True:
            if turn:
                off = self._attempt(core.alloc_buffer, cache, page_size)
                if off is BUSY:
                    off = await self._locked(core.alloc_buffer, cache, page_size)
                if off:
                    self._got_frame()
                    return off
                victim = self._attempt(core.find_victim, cache, registered, False)
                if victim is BUSY:
                    victim = await self._locked(core.find_victim, cache, registered, False)
                if victim is None:
                    victim = self._attempt(core.find_victim, cache, registered, True)
                    if victim is BUSY:
                        victim = await self._locked(core.find_victim, cache, registered, True)
                if victim is not None:
                    written = False
                    if victim.dirty:
                        written, err = await self._write_victim(victim)
                        self._check()
                        if not written:
                            # The disk refuses the write (the page stays dirty): back off and
                            # try again, until wait_timeout.
                            write_error = err or write_error
                            now = time.monotonic()
                            if deadline is None:
                                deadline = now + self.wait_timeout
                            elif now >= deadline:
                                self._give_up_writing(write_error)
                            await asyncio.sleep(min(write_delay, max(0.0, deadline - now)))
                            write_delay = min(write_delay * 2, _WRITE_RETRY_MAX)
                            self._check()
                            continue
                    unlinked = self._attempt(core.unlink_victim, victim)
                    if unlinked is BUSY:
                        unlinked = await self._locked(core.unlink_victim, victim)
                    if unlinked:
                        w0 = core.meta_words
                        w0[
                            self._hs
                            + getattr(HANDLE_STATS.word, "rw_evict" if written else "ro_evict")
                        ] += 1
                        self._got_frame()
                        if victim.page_size == page_size:
                            return victim.bh
                        await self._free_frame(cache, victim.bh)
                    continue
                if time.monotonic() - self._claims_swept > 0.5:
                    # No victim: perhaps frames are held by claims of writers that died.
                    self._claims_swept = time.monotonic()
                    if await self._take_over_dead_claims():
                        continue
                if self._reclaim(cache):
                    reclaimed: int = await self._locked(core.reclaim_lost_buffers, cache)
                    if reclaimed:
                        continue  # frames came back
                if self._reap_due(0.0 if deadline is None else 0.05):
                    continue  # a dead process's pins were dropped: look again
                if self.fail_fast:
                    raise CacheFull(
                        "unable to allocate space from the buffer cache: every frame is pinned"
                    )
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.wait_timeout
                self._core.meta_words[self._hs + HANDLE_STATS.word.alloc_waits] += 1
            elif now >= deadline:
                if write_error is not None:
                    self._give_up_writing(write_error)
                raise CacheFull(
                    f"unable to allocate space from the buffer cache: every frame stayed "
                    f"pinned for {self.wait_timeout} s{self._pin_holders_text()}"
                )
            await self._wait_frame_turn(turn, deadline - now)
            turn = True
            self._check()

    async def _free_frame(self, cache: Cache, bh: int) -> None:
        """Give an unlinked buffer back to the cache, even if cancelled meanwhile (a frame
        must never be lost): the free runs in a task of the pool."""
        try:
            with step_waits():
                self._core.free_buffer(cache, bh)  # the usual case: at once
        except LockTimeout:
            await asyncio.shield(self._later(self._core.free_buffer, cache, bh))

    def _reclaim(self, cache: Cache) -> bool:
        """Whether to look for frames that killed processes left outside every chain (see
        :meth:`PoolCore.reclaim_lost_buffers`): when no victim is found, at most once a second
        per cache in this process (the look walks every allocation of the region)."""
        now = time.monotonic()
        if now - self._reclaimed_at.get(cache.index, 0.0) < 1.0:
            return False
        self._reclaimed_at[cache.index] = now
        return True

    def _got_frame(self) -> None:
        # Frames are coming free again: the poll restarts at its shortest step.
        self._frame_poll_delay = _POLL_MIN

    def _give_up_writing(self, err: BaseException | None) -> None:
        code = getattr(err, "errno", None)
        if isinstance(err, NoSpace) or code in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(
                f"no frame for a page after {self.wait_timeout} s: every dirty page that could "
                f"be evicted failed to write ({err}); the disk is full"
            ) from err
        raise CacheFull(
            f"no frame for a page after {self.wait_timeout} s: every dirty page that could be "
            f"evicted failed to write ({err})"
        ) from err

    async def _take_over_dead_claims(self) -> int:
        """Release every write claim held by a dead process (their pages stay dirty and
        become evictable after a write); returns how many. Walks every bucket."""
        core = self._core
        found: list[tuple[Cache, int, int, int]] = []
        since = time.monotonic()
        for cache in core.caches:
            w = cache.words
            for b, bw in enumerate(cache.bucket_words):
                if not b & 255 and time.monotonic() - since > 0.001:
                    await asyncio.sleep(0)  # a large cache: let the loop run meanwhile
                    since = time.monotonic()
                if not w[bw + BUCKET.word.count]:
                    continue
                try:
                    with step_waits(), cache.mutexes[b]:
                        for off in cache.chain(b):  # offsets checked, the walk bounded
                            x = off >> 3
                            if w[x + BH.word.flags] & BH_WRITING:
                                found.append((cache, b, off, int(w[x + BH.word.io_pid])))
                except LockTimeout:
                    continue  # held elsewhere (a stopped process?): a later sweep looks
        alive: dict[int, bool] = {self._pid: True}
        taken = 0
        for cache, b, off, pid in found:
            if pid not in alive:
                alive[pid] = is_alive(pid)
            if not alive[pid] and take_over_claim(cache, b, off, pid):
                taken += 1
        if taken:
            logger.warning("took over %d page write(s) left by dead process(es)", taken)
        return taken

    async def _write_victim(self, v: BufRef) -> tuple[bool, BaseException | None]:
        """Write a dirty victim; ``(True, None)`` if it is clean now (or dropped), else
        ``(False, the error if any)``."""
        try:
            result = await write_items(self._io, [v])
        except OSError as err:
            return False, err
        if result.written == 1 or result.dropped == 1:
            return True, None
        return False, result.errors[0] if result.errors else None

    # -- reading ------------------------------------------------------------------------------

    async def _fill(self, f: PoolFile, cache: Cache, b: int, bh: int, pgno: int, mode: int) -> None:
        """Read (or zero) the freshly inserted buffer ``bh`` of page ``pgno``, then publish it.

        A new page, or one the OS page cache holds, is done at once, without an await. A read
        that must go to the disk runs as its own task: if the caller is cancelled, the read
        still completes (other waiters may want the page) and the caller's pin is dropped
        afterwards.
        """
        try:
            done = self._attempt(self._fill_now, f, cache, b, bh, pgno, mode)
            if done is BUSY:
                done = await self._locked(self._fill_now, f, cache, b, bh, pgno, mode)
            if done:
                return
        except (LockTimeout, asyncio.CancelledError):
            # Out of lock attempts (or cancelled between them): the buffer was neither
            # published nor failed. Fail it, so that its waiters try again.
            self._settle(self._fail_read, cache, b, bh)
            raise
        job = self._io.spawn(self._fill_job(f, cache, b, bh, pgno, mode))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            if job.done():
                self._drop_abandoned_pin(job, f, cache, b, bh)
            else:
                job.add_done_callback(lambda j: self._drop_abandoned_pin(j, f, cache, b, bh))
            raise

    def _fill_now(self, f: PoolFile, cache: Cache, b: int, bh: int, pgno: int, mode: int) -> bool:
        """Fill the buffer without waiting if possible; False if the disk must be read."""
        ps = f.page_size
        fd = f._fd
        new = mode == MODE_NEW or fd is None
        if not new and (fd is None or fd in self._io.no_nowait):
            return False
        start = bh + BH.size
        view = cache.buf[start : start + ps]
        try:
            if new:
                view[:] = _zeros(ps)
                created = True
            else:
                assert fd is not None
                try:
                    n = int(_io.preadv(fd, [view], pgno * ps, os.RWF_NOWAIT))
                except BlockingIOError:
                    return False  # not in the OS page cache
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._io.no_nowait.add(fd)  # this filesystem refuses RWF_NOWAIT
                    return False
                if 0 < n < ps:
                    # Only part of a large page is cached: RWF_NOWAIT stops short of the rest,
                    # which is not the end of the file. The thread reads it whole.
                    return False
                if n == 0:  # past the end of the file: a page the pool knows of, never written
                    self._check_short_read(f, pgno, n, mode)
                    view[:] = _zeros(ps)
                elif f.checksum:
                    _verify(f, pgno, view)
                created = n == 0
            self._apply_pgin(f, pgno, view, mode)
        except BaseException:
            self._fail_read(cache, b, bh)
            raise
        finally:
            view.release()
        self._publish(f, cache, b, bh, created)
        return True

    def _check_short_read(self, f: PoolFile, pgno: int, n: int, mode: int) -> None:
        """A read of page ``pgno`` stopped at the end of the file after ``n`` bytes.

        Zeros are right for a page the pool made (create or new) that was never written: it
        lies past the pages the file had when the pool first opened it. A page the file had
        then, or part of a page, means the file was truncated behind the pool's back: a
        ``get`` without create raises :class:`PageNotFound` rather than hand out zeros as
        data (with create, the page is made again, zero-filled, as Berkeley DB does).
        """
        if mode not in (MODE_GET, MODE_LAST):
            return
        orig = int(f._w0[f._entry + FILE_ENTRY.word.orig_pages])
        if n or pgno < orig:
            raise PageNotFound(
                f"page {pgno} of {f.name!r} is past the end of the file on disk (the file had "
                f"{orig} pages when the pool opened it and was truncated since); use create=True "
                "to make it again"
            )

    def _apply_pgin(self, f: PoolFile, pgno: int, view: memoryview, mode: int) -> None:
        if mode != MODE_NEW and f.ftype:
            pgin = self._io.registry.get(f.ftype, (None, None))[0]
            if pgin is not None:
                pgin(pgno, view, f.cookie)

    def _publish(self, f: PoolFile, cache: Cache, b: int, bh: int, created: bool) -> None:
        """The buffer holds its page: clear READING (a created page is dirty) and wake waiters."""
        w = cache.words
        x = bh >> 3
        bw = cache.bucket_words[b]
        with cache.mutexes[b]:
            flags = w[x + BH.word.flags] & ~BH_READING
            if created and not flags & BH_DIRTY:
                flags |= BH_DIRTY  # a created page exists nowhere else: it must be written
                w[bw + BUCKET.word.dirty] += 1
            w[x + BH.word.flags] = flags
            _io.step("read.publish")  # crash tests: killed with the page read, mutex held
            w[x + BH.word.io_pid] = 0
        self._core.meta_words[
            f._fs + getattr(FILE_STATS.word, "page_create" if created else "page_in")
        ] += 1
        if self._waiters:
            self._notify()

    def _drop_abandoned_pin(
        self, job: asyncio.Task[None], f: PoolFile, cache: Cache, b: int, bh: int
    ) -> None:
        if job.cancelled() or job.exception() is not None:
            return  # the failure path already dropped the pin
        self._settle(self._release_pin, cache, b, bh)

    def _release_pin(self, cache: Cache, b: int, bh: int) -> None:
        w = cache.words
        x = bh >> 3
        with cache.mutexes[b]:
            if w[x + BH.word.ref] and self._drop_slot_pin(cache, bh):
                w[x + BH.word.ref] -= 1
        self._frame_released()

    def _drop_slot_pin(self, cache: Cache, bh: int) -> bool:
        """Take one pin off this handle's count in buffer ``bh`` (bucket mutex held); False if
        it had none."""
        p = (bh >> 1) + PINS_HALF + self._slot
        halves = cache.halves
        if not halves[p]:
            return False
        halves[p] -= 1
        return True

    async def _fill_job(
        self, f: PoolFile, cache: Cache, b: int, bh: int, pgno: int, mode: int
    ) -> None:
        """Read the page in a worker thread (batched with other reads), then publish it."""
        ps = f.page_size
        start = bh + BH.size
        view = cache.buf[start : start + ps]
        try:
            assert f._fd is not None
            n = await self._io.reader.read(f._fd, view, pgno * ps)
            if n < ps:  # a blocking read stops short only at the end of the file
                self._check_short_read(f, pgno, n, mode)
                view[n:] = _zeros(ps - n)
            elif f.checksum:
                _verify(f, pgno, view)
            created = n == 0
            self._apply_pgin(f, pgno, view, mode)
        except BaseException:
            self._settle(self._fail_read, cache, b, bh)
            raise
        finally:
            view.release()
        try:
            await self._locked(self._publish, f, cache, b, bh, created)
        except BaseException:
            self._settle(self._fail_read, cache, b, bh)
            raise

    def _settle(self, fn: Callable[..., object], *args: Any) -> None:
        """Run the bookkeeping ``fn(*args)`` now if its mutex is free within a few
        milliseconds, else in a task of the pool that keeps trying (see :meth:`_locked`):
        for steps that must happen (releasing a pin, failing a read) on paths that cannot
        wait, such as callbacks and cancellations. ``fn`` changes nothing when it times out."""
        try:
            with step_waits():
                fn(*args)
        except LockTimeout:
            self._later(fn, *args)

    def _fail_read(self, cache: Cache, b: int, bh: int) -> None:
        """A read failed: unlink the buffer, flag it failed for waiters, drop our pin."""
        w = cache.words
        x = bh >> 3
        with cache.mutexes[b]:
            cache.unlink(b, bh)
            w[x + BH.word.flags] = BH_FAILED
            if self._drop_slot_pin(cache, bh):
                w[x + BH.word.ref] -= 1
            last = w[x + BH.word.ref] == 0
        if last:
            self._settle(self._core.free_buffer, cache, bh)
            self._frame_released()
        self._notify()

    async def _await_read(self, cache: Cache, b: int, bh: int, f: PoolFile) -> bool:
        """Wait (holding a pin) until another reader finishes ``bh``. False if its read failed
        (our pin is then dropped and the buffer freed by the last one out)."""
        w = cache.words
        x = bh >> 3
        delay = 0.00005
        checked = time.monotonic()
        deadline = checked + self.wait_timeout
        try:
            while w[x + BH.word.flags] & BH_READING:
                await self._wait_change(delay)
                self._check()  # closing: give the pin back (below) and leave
                delay = min(delay * 2, 0.002)
                now = time.monotonic()
                if now - checked > 0.5:
                    checked = now
                    await self._locked(self._adopt_dead_read, cache, b, bh, f)
                if now >= deadline and w[x + BH.word.flags] & BH_READING:
                    pid = int(w[x + BH.word.io_pid])
                    who = "this process" if pid == self._pid else f"process {pid}"
                    raise TryAgain(
                        f"page {int(w[x + BH.word.pgno])} of {f.name!r} has been being read by "
                        f"{who} for over {self.wait_timeout} s (alive, but not finishing: "
                        "stopped or stuck in I/O?); try again later"
                    )
        except BaseException:
            self._settle(self._release_failed_or_pin, cache, b, bh)
            raise
        if w[x + BH.word.flags] & BH_FAILED:
            self._settle(self._release_failed_or_pin, cache, b, bh)
            return False
        return True

    def _release_failed_or_pin(self, cache: Cache, b: int, bh: int) -> None:
        w = cache.words
        x = bh >> 3
        with cache.mutexes[b]:
            if self._drop_slot_pin(cache, bh):
                w[x + BH.word.ref] -= 1
            last = w[x + BH.word.ref] == 0 and w[x + BH.word.flags] & BH_FAILED
        if last:
            self._settle(self._core.free_buffer, cache, bh)
        self._frame_released()

    def _adopt_dead_read(self, cache: Cache, b: int, bh: int, f: PoolFile) -> None:
        """If the process reading ``bh`` died, fail its read so that the waiters retry."""
        w = cache.words
        x = bh >> 3
        pid = int(w[x + BH.word.io_pid])
        if not pid or pid == self._pid or is_alive(pid):
            return
        if self._env_core.registry is not None:
            self.reap()  # fails the dead reader's read and drops its pin, by its slot
            return
        with cache.mutexes[b]:
            if not (w[x + BH.word.flags] & BH_READING and w[x + BH.word.io_pid] == pid):
                return
            cache.unlink(b, bh)
            w[x + BH.word.flags] = BH_FAILED
            w[x + BH.word.ref] -= 1  # the dead reader's pin

    # -- write-back, statistics, closing ------------------------------------------------------

    async def sync(self, lsn: object = None) -> SyncResult:
        """Write every dirty page in the pool, then fsync every file with page writes no fsync
        has covered yet, by any process (memp_sync).

        ``lsn`` needs a log, which this environment does not have yet: passing one raises
        :class:`~aiodbenv.errors.InvalidArgument`. Pages pinned while dirty cannot be written:
        the call writes everything else, then raises :class:`~aiodbenv.errors.Incomplete`
        (``DB_INCOMPLETE``; retry after they are unpinned). Pages another process is writing
        are waited for up to ``wait_timeout`` seconds (a dead writer's are taken over and
        written here), then reported the same way, naming the writer's pid. A failed write
        leaves its page dirty and raises (:class:`~aiodbenv.errors.NoSpace` on a full disk); a
        failed fsync panics the environment and raises
        :class:`~aiodbenv.errors.RunRecovery`. Pages of other processes' temporary files and
        of nofile files are not written. Cancellation: writes and fsyncs already under way
        finish; untouched pages stay dirty.
        """
        self._check()
        if lsn is not None:
            raise InvalidArgument(
                "sync(lsn) needs a log, and this environment has none: call sync() without one"
            )
        self._core.meta_words[self._hs + HANDLE_STATS.word.sync_calls] += 1
        return await write_back(self, files=None, fsync=True, reason="sync")

    async def trickle(self, pct: int) -> int:
        """Write just enough dirty pages that ``pct`` percent of the cache's pages are clean
        (memp_trickle); returns how many were written. ``pct`` must be 1..100.

        Cancellation: pages already handed to a write finish it; the call returns nothing.
        """
        self._check()
        if type(pct) is not int or not 1 <= pct <= 100:
            raise InvalidArgument(f"trickle percentage must be 1..100, not {pct!r}")
        return await trickle(self, pct)

    def stat(self) -> PoolStat:
        """The pool's statistics (memp_stat): DB_MPOOL_STAT with per-file DB_MPOOL_FSTAT,
        summed over every process."""
        self._check()
        env = self._env_core
        reaper = tuple(
            env.env_field(name) for name in ("procs_reaped", "pins_reclaimed", "dirty_inherited")
        )
        return pool_stat(self._core, reaper)  # type: ignore[arg-type]

    def slot_pins(self) -> dict[int, int]:
        """Pins held per registry slot, summed over every buffer (for statistics; reads the
        counts without locking, so a figure may be a pin off while pins change)."""
        out: dict[int, int] = {}
        for cache in self._core.caches:
            w = cache.words
            halves = cache.halves
            for bw in cache.bucket_words:
                off = int(w[bw + BUCKET.word.head])
                n = 0
                # Unlocked: an offset that fails its check (a chain changing under us, or a
                # corrupt one) ends this bucket's walk; the mutexed paths report corruption.
                while off and n < cache.max_chain:
                    if not cache.bh_ok(off):
                        break
                    p = (off >> 1) + PINS_HALF
                    for s, c in enumerate(halves[p : p + MAX_PROCS]):
                        if c:
                            out[s] = out.get(s, 0) + c
                    off = int(w[(off >> 3) + BH.word.next])
                    n += 1
        return out

    async def _close(self) -> None:
        """Close every file this handle opened and detach (at Env close). New calls fail with
        InvalidArgument from here on; waiting pins are woken and give up; reads and writes
        under way finish first."""
        if self._closed:
            return
        self._closing = True
        self._notify()
        task, self._reaper_task = self._reaper_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._wake_all_frames()
        if self._frame_poll is not None:
            self._frame_poll.cancel()
            self._frame_poll = None
        await self._quiesce()
        try:
            for f in list(self._io.files):
                await f.close()
            await self._io.close_all()
        finally:
            self._closed = True
            if not self._env_core.panicked:
                self._core.detach_handle(self._hs)


def _verify(f: PoolFile, pgno: int, view: memoryview) -> None:
    """Check a page just read from a checksummed file (before pgin)."""
    if not verify_checksum(pgno, view):
        raise PageCorrupt(
            f"page {pgno} of {f.name!r} fails its checksum: the page on disk is torn or corrupt",
            path=f.name,
            pgno=pgno,
        )


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("deferred pool bookkeeping failed: %s", task.exception())


def _name_fileid(name: str) -> bytes:
    import hashlib

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
