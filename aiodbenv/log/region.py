"""The environment's side of the log: the region it asks for, formatting it (finding the end
of a log already on disk), and attaching a :class:`~aiodbenv.log.Log` to an open environment.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .._config import Settings, log_sizes
from ..errors import ConfigError, InvalidArgument
from ..region.backing import Region
from ..region.create import RegionSpec
from ..region.home import home_mode
from ..region.layout import KIND_PRIVATE, REGION_TYPE_LOG
from .files import find_end
from .layout import region_size
from .log import Log
from .state import format_log_region

__all__ = ["attach_log", "format_log", "log_directory", "log_settings", "log_spec"]


def log_spec(settings: Settings) -> RegionSpec | None:
    """The log region ``settings`` ask for, or None without a log."""
    if not settings.has_log:
        return None
    bsize, _ = log_sizes(settings)
    return RegionSpec(REGION_TYPE_LOG, region_size(bsize))


def log_directory(home: str, settings: Settings) -> str:
    """The absolute directory of the log files: ``log_dir`` (relative to the home), else the
    home."""
    if settings.log_dir is None:
        return home
    return os.path.abspath(os.path.join(home, settings.log_dir))


def format_log(region: Region, settings: Settings, home: str, shared: bool) -> None:
    """Lay out the log region (creator, worker thread): for a file log, find the log already
    in the directory (cutting off a torn tail) or start ``log.0000000001``."""
    bsize, fsize = log_sizes(settings)
    directory = "" if settings.log_inmemory else log_directory(home, settings)
    end = None
    if not settings.log_inmemory:
        try:
            os.makedirs(directory, mode=home_mode(settings.mode), exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(
                f"the log directory {directory} (log_dir) is not a directory"
            ) from None
        end = find_end(directory, fsize, settings.mode)
    format_log_region(
        region,
        inmemory=settings.log_inmemory,
        bsize=bsize,
        file_size=fsize,
        directory=directory,
        mode=settings.mode,
        shared=shared,
        end=end,
    )


def attach_log(core: Any, asked: Settings) -> Log | None:
    """The :class:`Log` of the open environment ``core`` (None if it has no log). Raises
    InvalidArgument if ``asked`` wants a log the environment was created without."""
    types = {row[0]: row[1] for row in core.region_table()}
    regions = [r for r in core.regions if types.get(r.region_id) == REGION_TYPE_LOG]
    if not regions:
        if asked.has_log:
            raise InvalidArgument(
                f"environment {core.home} was created without a log; log=True (or "
                "log_inmemory) can only be given when creating it"
            )
        return None
    return Log(core, regions[0], shared=core.kind != KIND_PRIVATE)


def log_settings(settings: Settings, log: Log | None) -> Settings:
    """``settings`` with the log's own settings (what the creator made) filled in."""
    if log is None:
        return settings
    return dataclasses.replace(
        settings,
        log=not log.inmemory,
        log_inmemory=log.inmemory,
        log_dir=None if log.inmemory else log.directory,
        log_buffer_size=log.buffer_size,
        log_file_size=log.file_size,
    )
