"""The ``recover`` command (``db_recover``): rebuild an environment's regions and replay the
committed transactions of its log into the data files, then remove the regions again.

The regions a recovery rebuilds are made with the defaults (and ``DB_CONFIG``): left in
place, the service started next would join them and silently get, say, a 256 KiB cache
instead of the size it asks for. Recovery writes every page and appends a checkpoint, so
removing them loses nothing; the next open creates them with its own settings.

The log is found where the service keeps it: ``-l LOGDIR`` (relative to the home, as
``Env.open(log_dir=...)``), which ``DB_CONFIG``'s ``set_lg_dir`` overrides (as it overrides
``Env.open``'s), else the home. A directory without log files is refused (exit status 1):
recovering "nothing" there would start an empty log beside the real one and report no
transactions, while the real one still held them."""

from __future__ import annotations

import argparse
import os

import anyio

from .._config import Settings
from .._env import Env
from .._resolve import resolve_home, resolve_settings
from ..errors import Busy, EnvNotFound, InvalidArgument
from ..log.files import list_log_files
from ..log.region import log_directory

__all__ = ["recover_command"]


async def recover_command(args: argparse.Namespace) -> int:
    """Run recovery on ``-h HOME`` (no other process may be using it) and say what it did."""
    home = resolve_home(args.h)
    if not await anyio.to_thread.run_sync(os.path.isdir, home):
        # Worded as every other command words it.
        missing = not await anyio.to_thread.run_sync(os.path.lexists, home)
        raise EnvNotFound(
            f"environment home {home} {'does not exist' if missing else 'is not a directory'}"
        )
    if args.l == "":
        raise InvalidArgument("-l needs a directory (relative to the home)")
    settings = await resolve_settings(home, Settings(log=True, log_dir=args.l))
    if settings.log_inmemory:
        raise InvalidArgument(
            "DB_CONFIG keeps the log in memory (db_log_inmemory): there is no log on disk to "
            "recover from"
        )
    directory = log_directory(home, settings)
    if not await anyio.to_thread.run_sync(list_log_files, directory):
        if args.l is not None and settings.log_dir != args.l:
            where = f"DB_CONFIG's set_lg_dir {settings.log_dir} overrides -l {args.l}"
        else:
            where = (
                "if the service keeps its log elsewhere, name that directory with -l LOGDIR "
                "(relative to the home, as its log_dir) or set_lg_dir in DB_CONFIG"
            )
        raise InvalidArgument(
            f"no log files in {directory}: there is nothing to recover from there ({where})"
        )
    async with Env.open(home, create=True, log=True, recover=True, log_dir=args.l) as env:
        st = env.recovered
        assert st is not None
        print(
            f"recover: read the log in {directory} from {st.start} to {st.end}: "
            f"{st.batches} committed transaction(s); {st.applied} page change(s) applied "
            f"({st.full_images} full image(s)), {st.skipped} already in the data files"
            + (f"; {st.repaired} torn page(s) repaired" if st.repaired else "")
        )
    try:
        await Env.remove(home)
    except Busy as err:  # another process joined meanwhile: its regions stay
        print(f"recover: the regions were kept: {err}")
    else:
        print("recover: regions removed; the next open creates them with its own settings")
    return 0
