"""Tasks of the library's own bookkeeping, which nothing may stop half-way.

A write-back batch, a log writer round, a commit finishing for a cancelled caller, an open or
a close of a file, an environment's closing: each leaves shared state half-changed if it stops
at an arbitrary ``await`` (claims taken and not released, a writer role let go while its thread
still writes, a failed fsync not yet recorded, a descriptor opened and not handed over, a
region unmapped under a worker thread). Their callers are shielded from them, so a caller's
cancellation never reaches them; but a plain ``task.cancel()`` on the task itself does, and
``asyncio.run``'s teardown, or a server's shutdown that cancels every task, does exactly that.

:func:`start` runs such work as a task whose :meth:`~asyncio.Task.cancel` is refused (it
returns False, as for a task that is already done): the task runs to its end, which is
bounded (every wait in it has a timeout). ``asyncio.run``'s teardown then waits for it, as it
waits for every task it has cancelled. Never use it for work that loops until told to stop
(the background workers, the reaper): those are cancelled to stop them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["RunsToEnd", "retrieve", "start"]

T = TypeVar("T")


class RunsToEnd(asyncio.Task[T]):
    """An :class:`asyncio.Task` that refuses to be cancelled (see the module docstring)."""

    def cancel(self, msg: Any = None) -> bool:
        return False


def start(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run ``coro`` as a :class:`RunsToEnd` task of the running loop."""
    return RunsToEnd(coro, loop=asyncio.get_running_loop())


def retrieve(task: asyncio.Future[Any]) -> None:
    """A done callback for a task whose failure nobody else will receive (or that is received
    elsewhere first): mark it retrieved, so asyncio does not log "Task exception was never
    retrieved" for it."""
    if not task.cancelled():
        task.exception()
