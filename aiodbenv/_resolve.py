"""What :meth:`aiodbenv.Env.open` resolves before it opens anything: the home's path and the
settings in effect once the home's ``DB_CONFIG`` is applied over the arguments.

The home is the argument, else ``$DB_HOME``, else the current directory (Berkeley DB's
``__db_appname`` order). ``DB_CONFIG`` is read with aiofiles, so a slow file system never
stalls the event loop; its lines are parsed and applied by :mod:`aiodbenv._config`. A joiner
inherits the creator's settings: :func:`note_inherited` says so when it asked for others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys

import aiofiles
import aiofiles.os

from ._config import Settings, apply_db_config
from .errors import ConfigError, InvalidArgument, PermissionDenied
from .region.environment import EnvCore

__all__ = [
    "MAX_DB_CONFIG",
    "note_inherited",
    "read_db_config",
    "require_asyncio",
    "require_bool",
    "resolve_home",
    "resolve_settings",
]

logger = logging.getLogger("aiodbenv")

#: Largest DB_CONFIG aiodbenv reads; anything bigger is not a configuration file.
MAX_DB_CONFIG = 1 << 20


def resolve_home(home: str | os.PathLike[str] | None) -> str:
    """The environment home: ``home``, else ``$DB_HOME``, else the current directory."""
    if home is None:
        home = os.environ.get("DB_HOME") or os.getcwd()
    try:
        path = os.fspath(home)
    except TypeError:
        raise InvalidArgument(f"home must be a path (str or os.PathLike), not {home!r}") from None
    if not isinstance(path, str):
        # A bytes path failed later with "Can't mix strings and bytes in path components".
        raise InvalidArgument(f"home must be a str path, not {type(path).__name__}")
    return os.path.abspath(path)


async def read_db_config(home: str) -> tuple[str, str] | None:
    """``(path, text)`` of the home's ``DB_CONFIG``, or None if there is none.

    Raises :class:`~aiodbenv.errors.ConfigError` for a ``DB_CONFIG`` that is not a regular
    UTF-8 file of at most :data:`MAX_DB_CONFIG` bytes, and
    :class:`~aiodbenv.errors.PermissionDenied` if it cannot be looked for or read.
    Cancellation: the read is abandoned; nothing was changed.
    """
    path = os.path.join(home, "DB_CONFIG")
    try:
        st = await aiofiles.os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None  # the home itself is not a directory: open reports that
    except PermissionError:
        raise PermissionDenied(
            f"environment home {home}: permission denied (cannot look for {path})"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file")
    if st.st_size > MAX_DB_CONFIG:
        raise ConfigError(f"{path} is larger than {MAX_DB_CONFIG} bytes")
    try:
        async with aiofiles.open(path, encoding="utf-8") as f:
            return path, await f.read()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text: {err}") from None
    except PermissionError:
        raise PermissionDenied(f"{path}: permission denied") from None


async def resolve_settings(home: str, settings: Settings) -> Settings:
    """``settings`` with the lines of ``home``'s ``DB_CONFIG`` applied, if it has one.

    Raises as :func:`read_db_config`, and :class:`~aiodbenv.errors.ConfigError` for a bad
    line. Cancellation: abandoned at once; nothing was changed.
    """
    config = await read_db_config(home)
    if config is None:
        return settings
    return apply_db_config(settings, config[1], config[0])


def note_inherited(core: EnvCore, asked: Settings) -> None:
    """A joiner inherits the creator's sizes: say so (once per open, at INFO) when the caller
    asked for others, since its own are silently not in effect."""
    have = core.settings()
    differ = [
        f"{name}={getattr(have, name)} (asked for {getattr(asked, name)})"
        for name in ("cache_size", "page_size")
        if getattr(asked, name) is not None and getattr(asked, name) != getattr(have, name)
    ]
    if differ:
        logger.info(
            "aiodbenv: joined the existing environment in %s with its creator's settings: %s",
            core.home,
            ", ".join(differ),
        )


def require_bool(name: str, value: object) -> None:
    """Refuse a flag that is not a real bool with InvalidArgument: "0" or 2 would be taken as
    True, silently."""
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be True or False, not {value!r}")


def require_asyncio() -> None:
    """Refuse at once to run under another event loop than asyncio's (trio, say): the pool's
    waits, tasks and worker threads are asyncio's, and would fail later and obscurely."""
    try:
        asyncio.get_running_loop()
        return
    except RuntimeError:
        pass
    where = "outside an asyncio event loop"
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
            where = "under trio"
        except RuntimeError:
            pass
    raise InvalidArgument(
        f"aiodbenv is asyncio only: Env.open was awaited {where}; run it with asyncio.run, "
        "uvloop, or anyio's asyncio backend"
    )
