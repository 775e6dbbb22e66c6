"""The ``recover`` command (``db_recover``): rebuild an environment's regions and replay the
committed transactions of its log into the data files."""

from __future__ import annotations

import argparse

from .._env import Env

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
    return 0
