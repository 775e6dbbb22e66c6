"""The exceptions aiodbenv raises.

Every error derives from :class:`AiodbenvError` and carries an ``errno`` with Berkeley DB's
meaning (``EINVAL``, ``ENOMEM``, ``EAGAIN``, ``EBUSY``, ``EACCES``, ``ENOSPC``, ``ENOENT``...).
Where a built-in Python exception means the same thing, the error also subclasses it, so
``except FileNotFoundError`` catches :class:`EnvNotFound` and ``except ValueError`` catches
:class:`InvalidArgument`.

Berkeley DB's special return codes keep their names: :class:`RunRecovery` (``DB_RUNRECOVERY``,
the environment is panicked), :class:`VersionMismatch` (``DB_VERSION_MISMATCH``),
:class:`PageNotFound` (``DB_PAGE_NOTFOUND``) and :class:`Incomplete` (``DB_INCOMPLETE``). Their
Berkeley DB code is in ``db_code``.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .mpool.sync import SyncResult

__all__ = [
    "AiodbenvError",
    "Busy",
    "CacheFull",
    "CommitNotDurable",
    "ConfigError",
    "CorruptRegion",
    "Deadlock",
    "EnvNotFound",
    "ForkedProcessError",
    "Incomplete",
    "InvalidArgument",
    "LockTimeout",
    "LogBufferFull",
    "LogCorrupt",
    "NoSpace",
    "NotFound",
    "PageCorrupt",
    "PageNotFound",
    "PermissionDenied",
    "RunRecovery",
    "ShmKeyInUse",
    "TryAgain",
    "TxnTooLarge",
    "VersionMismatch",
]


class AiodbenvError(Exception):
    """Base class of every error aiodbenv raises.

    ``errno`` is the POSIX error number with Berkeley DB's meaning for this error; ``db_code``
    is Berkeley DB's own negative return code where it has one (else ``None``).
    """

    default_errno: int = _errno.EINVAL
    db_code: int | None = None
    errno: int | None  # set by __init__ (OSError subclasses keep it in OSError's own slot)

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        code = self.default_errno if errno is None else errno
        if isinstance(self, OSError):
            # OSError keeps errno and strerror in its own slots; str() shows "[Errno N] msg".
            OSError.__init__(self, code, message)
        else:
            super().__init__(message)
            self.errno = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries in tests and workers; keep errno on the way.
        return (_rebuild, (type(self), self.message, self.errno))


def _rebuild(cls: type[AiodbenvError], message: str, code: int) -> AiodbenvError:
    return cls(message, errno=code)


class InvalidArgument(AiodbenvError, ValueError):
    """A bad argument or flag combination (``EINVAL``)."""


class ConfigError(InvalidArgument):
    """A malformed ``DB_CONFIG`` line, or a setting the environment cannot accept (``EINVAL``).

    ``path`` and ``lineno`` name the offending line when the error comes from a ``DB_CONFIG``
    file (both ``None`` for a bad argument).
    """

    def __init__(self, message: str, *, path: str | None = None, lineno: int | None = None) -> None:
        where = f"{path}:{lineno}: " if path is not None and lineno is not None else ""
        super().__init__(where + message)
        self.path = path
        self.lineno = lineno

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_config, (self.message, self.path, self.lineno))


def _rebuild_config(message: str, path: str | None, lineno: int | None) -> ConfigError:
    err = ConfigError(message)
    err.path, err.lineno = path, lineno
    return err


class ForkedProcessError(InvalidArgument):
    """An environment handle was used in a process forked from the one that opened it.

    Each process must open the environment itself: a handle never crosses a fork.
    """


class NotFound(AiodbenvError, FileNotFoundError):
    """Something asked for does not exist (``ENOENT``): a data file opened without
    ``create``, and the base of :class:`EnvNotFound` and :class:`PageNotFound`."""

    default_errno = _errno.ENOENT


class EnvNotFound(NotFound):
    """The home or environment does not exist and ``create`` was not given (``ENOENT``)."""


class PageNotFound(NotFound):
    """The requested page is past the end of the file and no create flag was given
    (``DB_PAGE_NOTFOUND``)."""

    db_code = -30986


class PermissionDenied(AiodbenvError, PermissionError):
    """The process may not read or write what it needs to (``EACCES``)."""

    default_errno = _errno.EACCES


class Busy(AiodbenvError):
    """The environment or resource is in use (``EBUSY``), e.g. remove while handles are open."""

    default_errno = _errno.EBUSY


class ShmKeyInUse(Busy):
    """The System V shared memory key is used by a segment that is not ours (``EEXIST``).

    aiodbenv never touches such a segment; choose another ``shm_key``.
    """

    default_errno = _errno.EEXIST


class TryAgain(AiodbenvError):
    """A resource stayed unavailable for too long (``EAGAIN``)."""

    default_errno = _errno.EAGAIN


class LockTimeout(TryAgain):
    """A region mutex stayed held by another process for longer than the wait allowed (that
    process is stopped or stuck); ``pid`` names it (0 if unknown). Nothing was changed: retry
    later, or find out what the holder is doing."""

    pid: int = 0
    mutex: str = ""


class CommitNotDurable(AiodbenvError):
    """A transaction committed, but the wait for it to become as durable as asked timed out
    (the fsync of ``sync``, the write of ``write_nosync``): the log writer, another process
    named by ``pid``, made no progress (stopped or stuck).

    The commit happened: its record is in the log at ``lsn`` and its pages changed, and other
    transactions see them. Do **not** retry it. It becomes durable when the writer goes on, or
    when ``await env.log.flush(lsn)`` succeeds later. Not a :class:`LockTimeout` (which means
    nothing was changed), so that code retrying on that does not apply it twice.
    """

    default_errno = _errno.ETIMEDOUT
    lsn: object = None
    pid: int = 0


class Deadlock(TryAgain):
    """A transaction asked for a page latch that could close a cycle of waits
    (``DB_LOCK_DEADLOCK``).

    Transactions wait for a busy latch only in ascending (file, page) order; a busy latch below
    one the transaction already holds raises this at once, and the transaction is aborted
    (nothing it changed reaches shared memory). Retry the whole transaction.
    """

    db_code = -30993


class TxnTooLarge(InvalidArgument):
    """A transaction would hold more pages, or log more bytes, than one commit may: see
    ``aiodbenv.txn.txn.MAX_PAGES`` (64) and the log's record size. The transaction is still usable
    (the page that did not fit was not taken)."""


class NoSpace(AiodbenvError, OSError):
    """Out of disk or file space (``ENOSPC``), e.g. preallocating a region file."""

    default_errno = _errno.ENOSPC


class CacheFull(AiodbenvError, MemoryError):
    """No memory left in a region or cache (``ENOMEM``)."""

    default_errno = _errno.ENOMEM


class LogBufferFull(CacheFull):
    """The in-memory log's ring is full: the next record would overwrite a log "file" that
    the last checkpoint still needs (``DB_LOG_BUFFER_FULL``). Nothing was appended; take a
    checkpoint (or configure a larger ``log_buffer_size``) and try again."""

    db_code = -30991


class LogCorrupt(AiodbenvError):
    """A log file holds a record that fails its checksum before the end of the log, or is not
    an aiodbenv log file (``EIO``): the log cannot be read past that point."""

    default_errno = _errno.EIO


class CorruptRegion(AiodbenvError):
    """A region file or segment is not a valid aiodbenv region: empty, truncated, foreign,
    a special file, or left half-built by a creator that died (``EINVAL``).
    """


class PageCorrupt(AiodbenvError):
    """A page read from a file opened with ``checksum=True`` does not match its checksum: the
    page on disk is torn or corrupt (``EIO``). ``path`` and ``pgno`` name it. The page is not
    cached; nothing else is affected.
    """

    default_errno = _errno.EIO

    def __init__(
        self,
        message: str,
        *,
        errno: int | None = None,
        path: str | None = None,
        pgno: int = -1,
    ) -> None:
        super().__init__(message, errno=errno)
        #: The file, or None for a temporary file.
        self.path = path
        #: The page number.
        self.pgno = pgno


class VersionMismatch(AiodbenvError):
    """The environment was made by an incompatible layout version (``DB_VERSION_MISMATCH``)."""

    db_code = -30969


class RunRecovery(AiodbenvError):
    """The environment is panicked: it was removed with force, or a process died while it was
    changing shared state that cannot be repaired (``DB_RUNRECOVERY``).

    Run recovery: close every handle, then, with a log, open the environment once with
    ``recover=True`` (or run ``python -m aiodbenv recover -h HOME``), which replays the
    committed transactions into the data files; without a log, remove the environment and open
    it again (the data files hold what was written).
    """

    #: What to do about it, as every RunRecovery message says.
    ADVICE: ClassVar[str] = (
        "run recovery: close every handle, then open it with recover=True (python -m aiodbenv "
        "recover -h HOME) if it has a log, else remove it and open it again"
    )

    db_code = -30973
    default_errno = _errno.EIO


class Incomplete(AiodbenvError):
    """Some dirty pages could not be written because they are pinned (``DB_INCOMPLETE``).

    ``result`` is the :class:`~aiodbenv.SyncResult` of what the sync or checkpoint did write
    (``result.incomplete`` counts the pages left dirty); None when raised by other code.
    """

    db_code = -30999
    default_errno = _errno.EAGAIN

    result: SyncResult | None = None

    def __init__(
        self, message: str, *, errno: int | None = None, result: SyncResult | None = None
    ) -> None:
        super().__init__(message, errno=errno)
        self.result = result
