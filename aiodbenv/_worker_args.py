"""The background-worker arguments of :class:`aiodbenv.Env`: ``trickle=`` and ``checkpoint=``
of :meth:`~aiodbenv.Env.open`, and the first argument of ``start_trickle`` and
``start_checkpoint``, each a plain number or the settings object, checked at the call so a bad
value fails there and not later in a background task."""

from __future__ import annotations

from ._workers import CheckpointSettings, TrickleSettings
from .errors import InvalidArgument

__all__ = ["checkpoint_settings", "trickle_settings"]


def trickle_settings(value: int | TrickleSettings | None) -> TrickleSettings | None:
    """A percentage of the cache to keep clean (or the settings themselves), checked; None
    stays None. Raises :class:`~aiodbenv.errors.InvalidArgument` for anything else."""
    if value is None or isinstance(value, TrickleSettings):
        return value.check() if value is not None else None
    if type(value) is not int:
        raise InvalidArgument(f"trickle must be a percentage or TrickleSettings, not {value!r}")
    return TrickleSettings(percent=value).check()


def checkpoint_settings(value: float | CheckpointSettings | None) -> CheckpointSettings | None:
    """An interval in seconds (or the settings themselves), checked; None stays None. Raises
    :class:`~aiodbenv.errors.InvalidArgument` for anything else (``True`` included)."""
    if value is None or isinstance(value, CheckpointSettings):
        return value.check() if value is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(
            f"checkpoint must be an interval in seconds or CheckpointSettings, not {value!r}"
        )
    return CheckpointSettings(interval=float(value)).check()
