"""``Env``: the async handle of an environment.

A thin async shell over :class:`aiodbenv.region.environment.EnvCore` and the pool: opening,
closing and removing run in worker threads (they create, preallocate, map and unlink files;
:mod:`aiodbenv._env_pool`), everything else is a few word reads on the event loop. What an open
resolves first (home, ``DB_CONFIG``) is :mod:`aiodbenv._resolve`; the worker arguments are
checked by :mod:`aiodbenv._worker_args`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import warnings
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Literal

from ._config import Settings, check_log_arguments, check_log_settings, check_settings
from ._env_log import EnvLog
from ._env_pool import (
    Closing,
    close_core,
    close_files_then_write,
    close_log_and_pool,
    close_quietly,
    open_with_pool,
    pool_plan,
    refuse_dirty_pages,
    settle_commits,
)
from ._env_txn import EnvTxn, noting_creation, prepare_recovery
from ._resolve import note_inherited, require_asyncio, require_bool, resolve_home, resolve_settings
from ._threads import run_owned
from ._worker_args import checkpoint_settings, trickle_settings
from ._workers import (
    CheckpointSettings,
    CheckpointWorker,
    Health,
    ProgressCallback,
    TrickleSettings,
    TrickleWorker,
    last_checkpoint,
    run_checkpoint,
    shared_status,
)
from .errors import ForkedProcessError, InvalidArgument
from .log.log import Log
from .log.region import log_settings
from .mpool.handle import _forks
from .mpool.pool import Pool
from .mpool.sync import SyncResult
from .region.environment import EnvCore, EnvStat
from .region.layout import KIND_PRIVATE
from .region.remove import remove_environment

__all__ = ["Env", "EnvOpener", "RegionKind"]

#: Where an environment's regions live (``Env.open(region=...)``).
RegionKind = Literal["file", "system", "private"]


class EnvOpener:
    """What :meth:`Env.open` returns: ``await`` it for an :class:`Env`, or use it with
    ``async with`` to have the environment closed when the block exits."""

    __slots__ = ("_args", "_env")

    def __init__(self, args: dict[str, Any]) -> None:
        self._args = args
        self._env: Env | None = None

    def __await__(self) -> Generator[Any, None, Env]:
        return Env._open(**self._args).__await__()

    async def __aenter__(self) -> Env:
        self._env = await Env._open(**self._args)
        return self._env

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._env is not None
        await self._env.close()


class Env(EnvLog, EnvTxn):
    """An open environment handle.

    Create one with :meth:`Env.open`. Handles of the same environment may be open in many
    processes at once (and several in one process for file and system memory); each process
    opens its own, never one inherited through ``fork``.
    """

    def __init__(self, core: EnvCore, pool: Pool, log: Log | None = None) -> None:
        """Internal: use :meth:`Env.open`."""
        self._core = core
        self._pool = pool
        self._log = log
        self._init_txn()
        self._pid, self._fork_gen = os.getpid(), _forks[0]  # _check: no getpid() syscall
        self._closing = Closing()
        self._gone = False  # closed for the caller (its regions may go later: close_core)
        self._trickle: TrickleWorker | None = None
        self._checkpoint: CheckpointWorker | None = None

    # -- opening ------------------------------------------------------------------------------

    @staticmethod
    def open(
        home: str | os.PathLike[str] | None = None,
        *,
        create: bool = False,
        region: RegionKind | None = None,
        cache_size: int | None = None,
        ncache: int = 1,
        shm_key: int | None = None,
        page_size: int | None = None,
        mmap_size: int | None = None,
        mode: int = 0o600,
        nommap: bool = False,
        txn_nosync: bool = False,
        txn_write_nosync: bool = False,
        log_inmemory: bool = False,
        log: bool = False,
        log_dir: str | None = None,
        log_buffer_size: int | None = None,
        log_file_size: int | None = None,
        trickle: int | TrickleSettings | None = None,
        checkpoint: float | CheckpointSettings | None = None,
        recover: bool = False,
    ) -> EnvOpener:
        """Open the environment in ``home``, creating it if ``create`` and it does not exist.

        ``home`` defaults to ``$DB_HOME``, then the current directory. With ``create``, a
        missing home is made like ``mkdir -p``; the home itself gets read, write and search
        permission for its owner, plus read and search for the group and others where
        ``mode`` gives them any access (0o600: 0o700, 0o660: 0o770). ``region`` picks where
        the regions live when creating: ``"file"`` (the default; ``__db.NNN`` files in the
        home), ``"system"`` (System V shared memory, which needs ``shm_key``) or ``"private"``
        (this process only; a second open of the home fails while this one is open). When
        joining, ``None`` accepts whatever exists and any other value must match it.

        ``cache_size`` (default 256 KiB, in ``ncache`` caches), ``page_size`` (default 4096),
        ``mmap_size`` (default 10 MiB), ``shm_key`` and the flags are the creator's settings; a
        joiner inherits the existing environment's and its own are ignored. A ``DB_CONFIG`` file
        in the home overrides these arguments line by line. ``mode`` is the exact permission of
        every region file and segment (the umask does not apply).

        ``log=True`` (files in the home or ``log_dir``) or ``log_inmemory=True`` (a ring) give
        it a log, ``env.log`` (docs/log.md has the sizes); the NOSYNC flags set
        ``env.durability``.

        ``trickle`` starts a :class:`~aiodbenv.TrickleWorker` keeping that percentage of the
        cache clean (or give :class:`~aiodbenv.TrickleSettings`); ``checkpoint`` starts a
        :class:`~aiodbenv.CheckpointWorker` checkpointing every that many seconds (or give
        :class:`~aiodbenv.CheckpointSettings`). Both belong to this handle and stop when it
        closes.

        ``await Env.open(...)`` returns the :class:`Env`; ``async with Env.open(...) as env``
        also closes it at the end of the block.

        Raises :class:`~aiodbenv.errors.EnvNotFound` (no home or no environment, and no
        ``create``), :class:`~aiodbenv.errors.ConfigError` (a bad argument or ``DB_CONFIG``
        line), :class:`~aiodbenv.errors.InvalidArgument` (joining with another ``region``,
        a home that is not a directory), :class:`~aiodbenv.errors.CorruptRegion`,
        :class:`~aiodbenv.errors.VersionMismatch`, :class:`~aiodbenv.errors.RunRecovery`
        (panicked environment), :class:`~aiodbenv.errors.Busy`,
        :class:`~aiodbenv.errors.TryAgain` (a creator still building after 30 s),
        :class:`~aiodbenv.errors.PermissionDenied`, :class:`~aiodbenv.errors.NoSpace`,
        :class:`~aiodbenv.errors.CacheFull` (no memory for the regions) or
        :class:`~aiodbenv.errors.ShmKeyInUse`. ``recover=True``: ``DB_RECOVER`` (docs/durable.md).

        Cancellation: the open is abandoned at once; the worker thread that creates or maps the
        regions finishes and its handle is then closed, so nothing stays open or counted.
        """
        return EnvOpener(
            dict(
                home=home,
                create=create,
                trickle=trickle_settings(trickle),
                checkpoint=checkpoint_settings(checkpoint),
                recover=recover,
                settings=Settings(
                    region=region,
                    cache_size=cache_size,
                    ncache=ncache,
                    shm_key=shm_key,
                    page_size=page_size,
                    mmap_size=mmap_size,
                    mode=mode,
                    nommap=nommap,
                    txn_nosync=txn_nosync,
                    txn_write_nosync=txn_write_nosync,
                    log_inmemory=log_inmemory,
                    log=log,
                    log_dir=log_dir,
                    log_buffer_size=log_buffer_size,
                    log_file_size=log_file_size,
                ),
            )
        )

    @classmethod
    async def _open(
        cls,
        home: str | os.PathLike[str] | None,
        create: bool,
        settings: Settings,
        trickle: TrickleSettings | None = None,
        checkpoint: CheckpointSettings | None = None,
        recover: bool = False,
    ) -> Env:
        require_asyncio()
        require_bool("create", create)
        require_bool("recover", recover)
        check_log_arguments(check_settings(settings))
        path = resolve_home(home)
        settings = check_log_settings(await resolve_settings(path, settings))
        await prepare_recovery(path, settings, create, recover)
        specs, format_regions, created = noting_creation(*pool_plan(settings, path))
        core, pool, log = await run_owned(
            lambda: open_with_pool(path, settings, create, specs, format_regions),
            undo=lambda opened: close_quietly(opened[0]),
        )
        note_inherited(core, settings)
        pool._core.loop_thread = threading.get_ident()  # (see statwalk: private regions)
        env = cls(core, pool, log)
        if core.registry is not None:
            # What processes that died with the environment open left is reclaimed now, and
            # from then on by a small task of the pool (every REAP_INTERVAL seconds).
            try:
                pool._reaped_at_open = pool.reap()
            except Exception:
                await env.close(nosync=True)
                raise
            pool._start_reaper()
        await env._recover_or_check(recover, bool(created) and not settings.log_inmemory)
        if trickle is not None:
            env.start_trickle(trickle)
        if checkpoint is not None:
            env.start_checkpoint(checkpoint)
        return env

    # -- the handle ---------------------------------------------------------------------------

    def _check(self) -> EnvCore:
        if _forks[0] != self._fork_gen:
            raise ForkedProcessError(
                f"this environment handle was opened by process {self._pid} and cannot be used "
                f"in forked process {os.getpid()}; open the environment again in this process"
            )
        core = self._core
        if core.closed or self._gone:
            raise InvalidArgument("the environment handle is closed")
        if core.panicked:  # a property: read once, on the way through every call
            if self._log is not None:
                self._log._check()  # says why, if a write or fsync of the log failed
            if self._pool is not None:
                self._pool._check_panic()  # says why, if the pool knows (a failed fsync)
            core.check_panic()  # else the environment's panic itself
        return core

    @property
    def home(self) -> str:
        """The absolute path of the environment home."""
        return self._core.home

    @property
    def kind(self) -> str:
        """Where the regions live: ``"file"``, ``"system"`` or ``"private"``."""
        return self.settings.region or "file"

    @property
    def settings(self) -> Settings:
        """The environment's settings, as its creator made it (after ``DB_CONFIG``)."""
        return log_settings(self._check().settings(), self._log)

    @property
    def pool(self) -> Pool:
        """The environment's shared buffer pool (memp_*), as seen by this handle."""
        self._check()
        return self._pool

    # -- background workers -------------------------------------------------------------------

    def start_trickle(
        self, settings: int | TrickleSettings = 20, *, interval: float | None = None
    ) -> TrickleWorker:
        """Start this handle's trickle worker: keep ``settings`` percent (or
        :class:`~aiodbenv.TrickleSettings`) of the cache clean. One per handle; across
        processes one acts at a time. Stopped by :meth:`close` or :meth:`stop_workers`."""
        self._check()
        if self._trickle is not None and self._trickle.running:
            raise InvalidArgument("this handle already runs a trickle worker")
        s = trickle_settings(settings)
        assert s is not None
        if interval is not None:
            s = TrickleSettings(s.percent, interval, s.wake_pages)
        self._trickle = TrickleWorker(self._pool, s)
        self._trickle.start()
        return self._trickle

    def start_checkpoint(
        self,
        settings: float | CheckpointSettings = 60.0,
        *,
        kbytes: int | None = None,
        completion_target: float | None = None,
        progress: ProgressCallback | None = None,
    ) -> CheckpointWorker:
        """Start this handle's checkpoint worker: every ``settings`` seconds (or
        :class:`~aiodbenv.CheckpointSettings`), or after ``kbytes`` KiB were dirtied, write
        every dirty page and fsync, spread over ``completion_target`` of the interval.
        ``progress(done, total)`` is called after each batch of a checkpoint. When the handle
        closes, the worker stops and one final checkpoint runs (unless ``close(nosync=True)``).
        """
        self._check()
        if self._checkpoint is not None and self._checkpoint.running:
            raise InvalidArgument("this handle already runs a checkpoint worker")
        s = checkpoint_settings(settings)
        assert s is not None
        if kbytes is not None or completion_target is not None:
            s = CheckpointSettings(
                s.interval,
                kbytes if kbytes is not None else s.kbytes,
                completion_target if completion_target is not None else s.completion_target,
            )
        self._checkpoint = CheckpointWorker(self._pool, s, progress)
        self._checkpoint.start()
        return self._checkpoint

    async def stop_workers(self) -> None:
        """Stop this handle's background workers (a write under way finishes first)."""
        for worker in (self._trickle, self._checkpoint):
            if worker is not None:
                await worker.stop()

    async def checkpoint(self, *, spread: float = 0.0, force: bool = False) -> SyncResult:
        """Checkpoint now: write every dirty page and fsync the files written, spreading the
        writes over ``spread`` seconds; record it as the last complete checkpoint. With a log,
        then append and flush a checkpoint record whose LSN (the log's end when it began) is
        the result's ``lsn`` (without ``force``, none if nothing was logged since the last one,
        as ``txn_checkpoint`` without ``DB_FORCE``; ``lsn`` is then the last checkpoint's).
        Raises Incomplete if dirty pages stayed pinned. Cancelled: written pages are clean."""
        self._check()
        return await run_checkpoint(self._pool, spread=spread, force=force)

    def health(self) -> Health:
        """Is this environment well? Not panicked, and no background worker's latest attempt
        failed, in this process or any other (the region records how each kind of worker
        fares); with this handle's workers' :class:`~aiodbenv.WorkerStatus`, the environment's
        :class:`~aiodbenv.SharedWorkerStatus` per kind and the last complete checkpoint's time."""
        if os.getpid() != self._pid:
            raise ForkedProcessError("this environment handle belongs to another process")
        panicked = self._core.panicked
        workers = tuple(w.status() for w in (self._trickle, self._checkpoint) if w is not None)
        usable = not self.closed and not panicked
        shared = (
            tuple(shared_status(self._pool, kind) for kind in ("trickle", "checkpoint"))
            if usable
            else ()
        )
        return Health(
            ok=usable and all(w.healthy for w in workers) and all(s.healthy for s in shared),
            panicked=panicked,
            last_checkpoint=last_checkpoint(self._pool) if usable else None,
            workers=workers,
            shared=shared,
            panic_cause=self._core.panic_cause() if panicked else None,
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._core.closed or self._gone

    def resolve(self, name: str | os.PathLike[str]) -> str:
        """The absolute path of ``name``: relative names are taken from the home."""
        self._check()
        return os.path.join(self._core.home, os.fspath(name))

    def stat(self) -> EnvStat:
        """Region statistics (``db_stat -e``): regions, kinds, sizes, ids, handles, mutex waits.

        ``mutex_owner_died`` counts every mutex of the environment, the pool's bucket and file
        mutexes and the log's included. ``processes`` lists the live processes' handles (pid,
        open since, pins held).

        Raises :class:`~aiodbenv.errors.RunRecovery` if the environment is panicked.
        """
        core = self._check()
        st = core.stat()
        died = st.mutex_owner_died + self._pool._core.owner_died()
        died += self._log._c.mutex.stats()[2] if self._log is not None else 0
        st = dataclasses.replace(st, mutex_owner_died=died)
        if core.registry is None:
            return st
        pins = self._pool.slot_pins()
        procs = tuple(
            dataclasses.replace(p, pins=pins.get(p.slot, 0)) for p in core.registry.live()
        )
        return dataclasses.replace(st, processes=procs)

    async def close(self, *, nosync: bool = False) -> None:
        """Close the handle: uncount it, detach every region, release the home.

        Background workers are stopped first, then every pool file this handle opened is
        closed (no implied sync). If a checkpoint worker ran, one final checkpoint is taken,
        and a private environment's dirty pages are written (no other process could ever
        write them), and a file log's buffered records are flushed, unless ``nosync``
        (``DB_NOSYNC``: none of the three; see docs/workers.md). A failed final write is raised
        after the handle is closed. Closing from two tasks at once is harmless (the second
        waits for the first, and shares its outcome); closing a closed handle does nothing,
        unless the caller of the first close was cancelled: it raises that close's error. A
        handle may be closed by another task than the one that opened it.
        Raises :class:`~aiodbenv.errors.RunRecovery` (after releasing everything) if the
        environment was panicked while the handle was open, e.g. removed with force.

        Cancellation: the handle is closed all the same; the closing goes on in the background
        after the ``CancelledError`` is raised.
        """
        if os.getpid() != self._pid:
            raise ForkedProcessError(
                f"environment handle of process {self._pid} closed in forked process "
                f"{os.getpid()}; the child must not close the parent's handle"
            )
        await self._closing.run(lambda: self._close(nosync))

    async def _close(self, nosync: bool) -> None:
        core = self._core
        if core.closed:
            return
        try:
            ran_checkpoints = self._checkpoint is not None
            await self.stop_workers()
            await settle_commits(self._pool)  # commits under way end before anything closes
            write = not core.panicked and not nosync
            await close_files_then_write(
                self._pool, core.kind == KIND_PRIVATE, ran_checkpoints, write
            )
        finally:
            try:
                await close_log_and_pool(self._log, self._pool, flush=not nosync)
            finally:
                self._gone = True
                await close_core(self._log, core)

    async def __aenter__(self) -> Env:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # As asyncio does for unclosed transports: a handle dropped while open stays mapped and
        # counted until the process exits (docs/environment.md), so `remove` says Busy.
        core = getattr(self, "_core", None)
        if core is None or core.closed or getattr(self, "_gone", 0) or os.getpid() != self._pid:
            return
        _warn(
            f"unclosed environment handle {core.home!r}: close it with 'await env.close()' "
            "or open it with 'async with Env.open(...)'",
            ResourceWarning,
            source=self,
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<aiodbenv.Env {self._core.home!r} {state}>"

    # -- removing -----------------------------------------------------------------------------

    @staticmethod
    async def remove(home: str | os.PathLike[str] | None = None, *, force: bool = False) -> None:
        """Remove the environment in ``home``: its region files and segments (DB_ENV->remove).

        Without ``force``, raises :class:`~aiodbenv.errors.Busy` (``EBUSY``) and changes
        nothing while any handle is open in any process, or while the cache holds dirty pages
        (changes not yet written to their files, which removing would discard: the error says
        how many; checkpoint first). With ``force`` the environment is removed anyway: dirty
        pages are discarded (a warning says how many), and every handle still open is panicked
        and fails its next call with :class:`~aiodbenv.errors.RunRecovery`. The home directory
        and any other file in it (``DB_CONFIG``, data files) stay. A home without an
        environment is not an error.

        Cancellation: a removal that has started in its worker thread finishes.
        """
        require_bool("force", force)
        path = resolve_home(home)
        await run_owned(
            lambda: remove_environment(
                path, force=force, inspect=functools.partial(refuse_dirty_pages, path)
            )
        )
