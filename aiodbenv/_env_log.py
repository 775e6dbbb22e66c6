"""The log side of an environment handle: :attr:`Env.log`, :attr:`Env.has_log` and
:attr:`Env.durability` (a base class of :class:`aiodbenv.Env`, kept apart so the handle's
module stays one concept and within the size limit)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .errors import InvalidArgument
from .log.log import Log
from .region.environment import EnvCore

__all__ = ["EnvLog"]


class EnvLog:
    """What :class:`aiodbenv.Env` offers about its log."""

    _log: Log | None

    if TYPE_CHECKING:  # supplied by Env: declared for the type checker only, no runtime stub

        def _check(self) -> EnvCore:
            """Env's own: the fork, closed and panic checks."""

    @property
    def has_log(self) -> bool:
        """True if the environment keeps a log (its creator opened it with one)."""
        return self._log is not None

    @property
    def log(self) -> Log:
        """The environment's log (``log_*``); InvalidArgument if it has none."""
        self._check()
        if self._log is None:
            raise InvalidArgument("this environment has no log (open it with log=True)")
        return self._log

    @property
    def durability(self) -> Literal["sync", "write_nosync", "nosync"]:
        """A commit's default durability (``"sync"``, or as ``txn_[write_]nosync`` set it)."""
        return self._check().settings().durability
