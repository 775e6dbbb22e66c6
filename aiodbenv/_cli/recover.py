"""The ``recover`` command (``db_recover``): rebuild an environment's regions and replay the
committed transactions of its log into the data files, then remove the regions again.

The regions a recovery rebuilds are made with the defaults (and ``DB_CONFIG``): left in
place, the service started next would join them and silently get, say, a 256 KiB cache
instead of the size it asks for. Recovery writes every page and appends a checkpoint, so
removing them loses nothing; the next open creates them with its own settings."""

from __future__ import annotations

import argparse

from .._env import Env
from ..errors import Busy

__all__ = ["recover_command"]


async def recover_command(args: argparse.Namespace) -> int:
    """Run recovery on ``-h HOME`` (no other process may be using it) and say what it did."""
    async with Env.open(args.h, create=True, log=True, recover=True) as env:
        st = env.recovered
        assert st is not None
        print(
            f"recover: read the log from {st.start} to {st.end}: {st.batches} committed "
            f"transaction(s); {st.applied} page change(s) applied ({st.full_images} full "
            f"image(s)), {st.skipped} already in the data files"
            + (f"; {st.repaired} torn page(s) repaired" if st.repaired else "")
        )
    try:
        await Env.remove(args.h)
    except Busy as err:  # another process joined meanwhile: its regions stay
        print(f"recover: the regions were kept: {err}")
    else:
        print("recover: regions removed; the next open creates them with its own settings")
    return 0
