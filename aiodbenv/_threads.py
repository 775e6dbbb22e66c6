"""Running blocking work in worker threads without leaking it when the caller is cancelled.

``anyio.to_thread.run_sync`` cannot stop a thread that has started. If the awaiting task is
cancelled, :func:`run_owned` lets the cancellation through at once and lets the thread finish;
whatever the thread produced (an open environment, say) is then handed to an ``undo`` function,
itself run in a worker thread, so nothing is left open behind the caller's back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

__all__ = ["run_owned"]

T = TypeVar("T")
logger = logging.getLogger("aiodbenv")

# Tasks whose caller went away; referenced here until they finish so they are not collected.
_orphans: set[asyncio.Future[Any]] = set()


async def run_owned(
    fn: Callable[[], T],
    *,
    undo: Callable[[T], object] | None = None,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """Run ``fn()`` in a worker thread and return its result.

    On cancellation the ``CancelledError`` propagates immediately; ``fn`` runs to completion in
    its thread and, if it succeeded, ``undo(result)`` runs in a worker thread afterwards.
    """
    loop = asyncio.get_running_loop()
    inner: asyncio.Future[T] = loop.create_task(anyio.to_thread.run_sync(fn, limiter=limiter))
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        if inner.done():
            _undo_finished(inner, undo)
        else:
            _orphans.add(inner)
            inner.add_done_callback(lambda fut: _undo_finished(fut, undo))
        raise


def _undo_finished(fut: asyncio.Future[T], undo: Callable[[T], object] | None) -> None:
    _orphans.discard(fut)
    if fut.cancelled():
        return
    err = fut.exception()
    if err is not None or undo is None:
        return
    result = fut.result()
    asyncio.get_running_loop().run_in_executor(None, _run_undo, undo, result)


def _run_undo(undo: Callable[[T], object], result: T) -> None:
    try:
        undo(result)
    except Exception:  # nobody is left to raise to
        logger.exception("undoing the work of a cancelled call failed")
