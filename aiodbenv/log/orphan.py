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

The same holds for the work of the handle's one I/O thread (:class:`WriterThread`): a write
there that outlives the close keeps the descriptors it may use until it ends, so that a file
opened meanwhile cannot get a descriptor's number and the write's bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from ..errors import AiodbenvError, InvalidArgument
from ..region.mutex import BUSY

__all__ = [
    "ClosedFds",
    "WriterThread",
    "close_when_idle",
    "closed_error",
    "keep_running",
    "late_work",
    "on_loop",
    "release_later",
    "running",
]

P = ParamSpec("P")
T = TypeVar("T")

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
        _r, v, kept = _KEPT[id(r)]
        v.release()
        for fd in kept:
            try:
                os.close(fd)
            except OSError:
                pass
        del _KEPT[id(r)]  # last: running() says 0 only once all of it is let go

    cf.add_done_callback(done)  # at once if it ended meanwhile


def running() -> int:
    """How many closed handles' writes behind are still running (for tests)."""
    return len(_KEPT)


class WriterThread(ThreadPoolExecutor):
    """A log handle's one I/O thread: its jobs run one at a time, in the order given. Once
    :meth:`bar` is called it takes no more (:class:`~aiodbenv.InvalidArgument`: the
    environment is closed), so no write can start after the close gave its descriptors up."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="aiodbenv-log")
        self._barred = False
        self._pending: set[Future[Any]] = set()  # given and not ended

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._barred:
            raise InvalidArgument("the environment is closed")
        fut = super().submit(fn, *args, **kwargs)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)  # in the thread; set ops are atomic
        return fut

    def bar(self) -> Future[None] | None:
        """Take no more jobs. None if every job given has ended, else a future done when they
        have (an idle thread could not have run a last job yet: the loop holds the GIL)."""
        busy = bool(self._pending)
        last: Future[None] = super().submit(lambda: None)  # runs after them: one thread
        self._barred = True
        self.shutdown(wait=False)
        return last if busy else None


def close_when_idle(last: Future[None] | None, fds: list[int], buf: Any, waited: float) -> None:
    """Close ``fds`` now if ``last`` (:meth:`WriterThread.bar`) is None or done, else keep
    them and a view of the log region ``buf`` until it is: a write still running uses them."""
    if last is None or last.done():
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    else:
        keep_running(last, last, buf[0:1], fds, waited)


def closed_error(err: BaseException) -> BaseException:
    """What a waiter gets when the writer task failed after the close: an error of the
    library as it was, anything else (a released view of the region, say) as the close."""
    if isinstance(err, AiodbenvError) or not isinstance(err, Exception):
        return err
    closed = InvalidArgument("the environment was closed while this write or flush waited")
    closed.__cause__ = err
    return closed


class ClosedFds(dict[int, int]):
    """A closed log handle's descriptors: none. One that a job still running at the close
    opens (the next log file, say) is closed at once, and the job fails."""

    def __setitem__(self, file: int, fd: int) -> None:
        os.close(fd)
        raise InvalidArgument("the environment is closed")


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """``fn(*args)`` on ``loop``, from any thread; nothing if the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


#: How often a closed handle tries again to let the writer role go.
_RELEASE_POLL = 0.005


def release_later(w: Any) -> None:
    """After the close, with the log's views kept for late work: let log writer ``w``'s role
    go once the log mutex is free (a bounded wait gave up on it, and no later round of the
    closed handle would take the role back: other processes would wait on a live holder)."""
    if w._attempt(w._c.release_role) is BUSY:
        w._releasing = True
        asyncio.get_running_loop().call_later(_RELEASE_POLL, release_later, w)
    else:
        w._releasing = False
        w._wake_others()


def late_work(w: Any) -> bool:
    """Whether work of closed log handle ``w`` still runs: a job of its thread, its writer
    task, a round not yet published, or a release of the role retried on the loop. Until it
    ends the environment handle stays counted (:func:`aiodbenv._env_pool.close_core`)."""
    r, task = w._inflight, w._task
    return (
        bool(w._thread._pending)
        or (task is not None and not task.done())
        or (r is not None and not r.finished)
        or getattr(w, "_releasing", False)
    )
