"""Running blocking work in worker threads without leaking it when the caller is cancelled.

``anyio.to_thread.run_sync`` cannot stop a thread that has started, and a plain asyncio
cancellation of the awaiting task (``task.cancel()``, as ``asyncio.gather`` and
``asyncio.run``'s teardown do) ends the await at once while the thread runs on. Two answers:

- :func:`run_owned` lets the cancellation through at once and lets the thread finish; whatever
  the thread produced (an open environment, say) is then handed to an ``undo`` function, itself
  run in a worker thread, so nothing is left open behind the caller's back.
- :func:`run_to_end` holds the cancellation back until the thread's call has returned, so the
  awaiting task ends only after its thread: the pool's I/O tasks use it, because closing the
  pool waits for them and then closes descriptors and unmaps the regions those threads use.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

__all__ = ["run_owned", "run_to_end"]

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


# The states of a call of run_to_end, under its lock: queued, running in its thread, given up
# before it started (it will not run), running with its cancelled caller waiting, returned.
_QUEUED, _RUNNING, _DROPPED, _AWAITED, _ENDED = range(5)


async def run_to_end(
    fn: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None
) -> T:
    """``fn(*args)`` in a worker thread (``anyio.to_thread.run_sync`` with ``limiter``), its
    return value or exception returned or raised here.

    Cancellation: before the thread has started the call, the call is dropped (it never runs)
    and ``CancelledError`` propagates at once. Once it has started, ``CancelledError`` is held
    back until the call returns (further cancellations are absorbed meanwhile), then raised;
    the call's result is lost. A call costs no extra wake-up of the loop unless it was
    cancelled while running.
    """
    loop = asyncio.get_running_loop()
    lock = threading.Lock()
    state = [_QUEUED]
    ended: asyncio.Future[None] = loop.create_future()

    @functools.wraps(fn)  # its name, for tracebacks and for tests that count the calls
    def call() -> T:
        with lock:
            if state[0] == _DROPPED:
                return None  # type: ignore[return-value]  # its caller has gone: nobody reads it
            state[0] = _RUNNING
        try:
            return fn(*args)
        finally:
            with lock:
                awaited, state[0] = state[0] == _AWAITED, _ENDED
            if awaited:
                try:
                    loop.call_soon_threadsafe(_settle, ended)
                except RuntimeError:  # the loop is closed: nobody is left to wake
                    pass

    try:
        return await anyio.to_thread.run_sync(call, limiter=limiter)
    except asyncio.CancelledError:
        with lock:
            if state[0] == _QUEUED:
                state[0] = _DROPPED
            elif state[0] == _RUNNING:
                state[0] = _AWAITED
        while state[0] == _AWAITED and not ended.done():
            try:
                await asyncio.shield(ended)  # a plain future: only its end wakes this
            except asyncio.CancelledError:
                pass  # cancelled again: still held back until the thread returns
        raise


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
