"""The transaction side of an environment handle: :meth:`Env.txn`, :meth:`Env.txn_stat`,
:attr:`Env.recovered`, and recovery (or the check that none is needed) at open (a base class
of :class:`aiodbenv.Env`, kept apart so the handle's module stays one concept and within the
size limit)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Literal

from ._config import Settings
from ._wal import log_hooks
from .errors import Busy, EnvNotFound, InvalidArgument, RunRecovery
from .log.log import Log
from .mpool.pool import Pool
from .region.backing import Region
from .region.create import Formatter, RegionSpec
from .region.environment import EnvCore, private_handles
from .region.home import HomeLock
from .region.remove import remove_environment
from .txn.recover import RecoveryStat, stale_pages
from .txn.recover import recover as recover_log
from .txn.stat import TxnStat, TxnStats
from .txn.txn import LATCH_TIMEOUT, Txn

__all__ = ["EnvTxn", "noting_creation", "prepare_recovery"]


async def prepare_recovery(home: str, settings: Settings, create: bool, recover: bool) -> None:
    """Before an open with ``recover=True`` (else nothing): check it may recover, and remove
    the regions (recovery rebuilds them). Cancellation: the removal finishes in its thread."""
    if not recover:
        return
    if not (create and settings.has_log and not settings.log_inmemory):
        raise InvalidArgument("recover=True needs create=True and a log in files")
    try:
        await asyncio.to_thread(_remove_unused, home)
    except EnvNotFound:
        pass


def _remove_unused(home: str) -> None:
    """Remove the regions with force, but only if no handle has the environment open: recovery
    under a live process would panic it and rebuild the cache under its feet (Berkeley DB's
    DB_RECOVER leaves that check to the caller). The exclusive lock on the home is held through
    the removal, so no process can open the environment between the check and the removal."""
    busy = Busy(
        f"environment {home} has open handles (in this process or another): recovery "
        "rebuilds its regions, which would panic them; close every handle (stop every "
        "process using it) first"
    )
    if private_handles(home):
        raise busy
    try:
        lock = HomeLock(home, exclusive=True, wait=0)
    except BlockingIOError:
        raise busy from None
    try:
        # (Its own try for the lock fails on ours: with force it goes on, under ours.)
        remove_environment(home, force=True)
    finally:
        lock.release()


def noting_creation(
    specs: list[RegionSpec], fmt: Formatter
) -> tuple[list[RegionSpec], Formatter, list[bool]]:
    """``specs``, ``fmt``, and a list that ``fmt`` makes non-empty when called: the regions
    were made anew (so the data files may miss committed work the log holds)."""
    created: list[bool] = []

    def format_regions(regions: list[Region]) -> None:
        created.append(True)
        fmt(regions)

    return specs, format_regions, created


class EnvTxn:
    """What :class:`aiodbenv.Env` offers about transactions."""

    _log: Log | None
    _pool: Pool
    _txn_stats: TxnStats
    _txn_durability: Literal["sync", "write_nosync", "nosync"]
    #: What ``recover=True`` did at open (None without it).
    recovered: RecoveryStat | None

    def _init_txn(self) -> None:
        """Part of the handle's construction: the write-ahead rule's hooks and the counters."""
        if self._log is not None:
            # Every page write of a file with an lsn_offset flushes the log first, through
            # these hooks (the pool never imports the log).
            self._pool._io.log = log_hooks(self._log, self._pool)
        # Counted in this handle's registry slot, summed over the environment on demand.
        self._txn_stats = TxnStats(self._pool._env_core.words, self._pool._slot)
        self.recovered = None
        # The default durability, from flags set when the regions were made (they never
        # change): read once, not rebuilt from the header on every begin.
        self._txn_durability = self._pool._env_core.settings().durability

    if TYPE_CHECKING:  # supplied by Env and EnvLog: declared for the type checker only

        def _check(self) -> EnvCore:
            """Env's own: the fork, closed and panic checks."""

        @property
        def durability(self) -> Literal["sync", "write_nosync", "nosync"]:
            """EnvLog's."""

    def txn(
        self,
        *,
        durability: Literal["sync", "write_nosync", "nosync"] | None = None,
        latch_timeout: float = LATCH_TIMEOUT,
    ) -> Txn:
        """Begin a transaction (see :class:`~aiodbenv.Txn` and docs/durable.md):
        ``async with env.txn() as tx`` commits at the end of the block and aborts on an
        exception; ``tx = await env.txn()`` leaves it to ``tx.commit()`` / ``tx.abort()``.
        ``durability`` defaults to :attr:`durability`; ``latch_timeout`` bounds each wait for a
        page latch. The transaction belongs to the calling task. Needs a log (InvalidArgument
        otherwise). Beginning never waits, so there is nothing to cancel.
        """
        self._check()
        if self._log is None:
            raise InvalidArgument("transactions need a log: open the environment with log=True")
        return Txn(
            self._pool,
            self._log,
            self._txn_durability if durability is None else durability,
            self._txn_stats,
            latch_timeout,
        )

    def txn_stat(self, *, handle: bool = False) -> TxnStat:
        """The environment's transaction statistics (:class:`~aiodbenv.TxnStat`): every
        process's and handle's since the regions were made, those closed or dead included
        (kept in shared memory, so exact across processes); ``handle=True``: this handle's
        only."""
        self._check()
        return self._txn_stats.handle() if handle else self._txn_stats.environment()

    async def _recover_or_check(self, recover: bool, created: bool) -> None:
        """At an open that made the regions anew over a log in files: with ``recover``
        (``DB_RECOVER``), replay the committed transactions of the log into the data files
        (:attr:`recovered` says what it did); without it, raise
        :class:`~aiodbenv.errors.RunRecovery` (and remove the regions just made) if the log
        holds committed transactions the data files miss, instead of serving stale pages.
        On failure the handle is closed. Cancellation: the handle is closed. Does nothing
        without a log, or unless ``recover`` or ``created`` (regions made by this open, over a
        log in files)."""
        if self._log is None or not (recover or created):
            return
        env = self
        try:
            if recover:
                self.recovered = await recover_log(env)  # type: ignore[arg-type]
                return
            stale = await stale_pages(env)  # type: ignore[arg-type]
        except BaseException:
            await self.close(nosync=True)
            raise
        if stale:
            home = self._check().home
            await self.close(nosync=True)
            # Made anew by this open and now closed: removing them makes the next open check
            # again instead of joining regions that serve stale pages.
            await asyncio.to_thread(remove_environment, home, force=True)
            path, pgno, lsn, what = stale[0]
            why = {
                "older": "is older than",
                "missing": "is missing, though changed by",
                "torn": "fails its checksum (torn), though changed by",
            }[what]
            raise RunRecovery(
                f"environment {home} needs recovery: page {pgno} of {path} {why} the "
                f"transaction committed at {lsn} in the log (the regions were lost before it "
                "was written whole); open it with "
                "Env.open(home, create=True, log=True, recover=True)"
            )

    if TYPE_CHECKING:

        async def close(self, *, nosync: bool = False) -> None:
            """Env's own."""
