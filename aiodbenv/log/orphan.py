"""Compiled writes behind that outlive their handle's close.

Closing a log handle waits ``wait_timeout`` for its write behind; a disk slower than that (or
a log mutex held that long by another process) leaves the compiled call running in the
writer's thread after the handle is gone. That call still writes to the log file, locks the
log mutex and publishes in the log region, and adds to the handle's eventfd. So the round
keeps what it uses until its thread is done with it: the descriptors, and a view of the log
region, which makes the region's detach leave the memory mapped
(:meth:`aiodbenv.region.backing.Region.close`) instead of unmapping it under the thread.
When the thread ends, the view and the descriptors go, and the memory is unmapped with the
last reference to its mapping.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from typing import Any

__all__ = ["keep_running", "running"]

logger = logging.getLogger("aiodbenv")

#: Rounds still running after their handle closed, with what they keep.
_KEPT: dict[int, tuple[Any, memoryview, list[int]]] = {}


def keep_running(r: Any, cf: Future[None], view: memoryview, fds: list[int], waited: float) -> None:
    """Keep ``view`` (of the log region) and ``fds`` for round ``r`` until ``cf`` (its call in
    the writer's thread) is done, then release and close them."""
    _KEPT[id(r)] = (r, view, fds)
    logger.warning(
        "closing the log: its write behind is still running after %g s (a slow disk, or the "
        "log mutex held elsewhere); the log region stays mapped until it ends",
        waited,
    )

    def done(_f: Future[None]) -> None:
        _r, v, kept = _KEPT.pop(id(r))
        v.release()
        for fd in kept:
            try:
                os.close(fd)
            except OSError:
                pass

    cf.add_done_callback(done)  # at once if it ended meanwhile


def running() -> int:
    """How many closed handles' writes behind are still running (for tests)."""
    return len(_KEPT)
