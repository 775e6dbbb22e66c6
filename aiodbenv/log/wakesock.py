"""Waking another process's flush waiters straight on their event loop: a datagram socket.

Each log handle of a shared environment has a Unix datagram socket bound to a name in the
abstract namespace (``aiodbenv-logwake-<nonce>``, a random 64-bit nonce: nothing is created
in the file system, and the name goes away with the socket, however the process ends). A
handle that waits for another process's writer writes, in its registry slot's words of the
log header, the nonce and the LSN word it waits for (``wake_want``: that word + 2; 1: any
progress), then waits for its socket to be readable (``loop.add_reader``), bounded: the
re-check on a timeout is the fallback, also when a wake-up is lost. The writer, after each
round it publishes, sends one byte without blocking to every registered waiter whose LSN is
durable now (every waiter when it lets the writer role go) and clears the registration (the
one who clears it sends: one byte per registration). A full socket (a stopped waiter) or an
absent one (a dead waiter) makes the send fail at once; it is ignored. The compiled writer's
round (aiodbenv/_csrc/65_logflush.c) does the same in C; :func:`wake_waiters` is its Python
twin. For the waiting side it replaces a futex wait in a worker thread followed by a wake
of the loop: one wake-up instead of two.

This is the default. ``AIODBENV_LOG_WAKE=futex`` has a handle wait on the futex in a worker
thread instead, ``poll`` has it poll (see :mod:`aiodbenv.log.wake`); every shared handle sends
wake-ups through its socket whatever its own mode, and any other value is refused when an
environment with a log opens, before anything is created. Measured with 8 processes flushing
every record, in interleaved pairs (log_quick.py's 8-process row, 3 s each): 4,967-7,800
records/s by socket against 2,858-4,131 by futex, the loop thread's CPU per record 182-263 us
against 324-423. (An earlier measurement had the socket slower: its wait then went through
``asyncio.wait_for`` over a shield, two more turns of the loop per wake-up.)
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from .._config import log_wake_mode
from ..errors import InvalidArgument
from ..region.layout import MAX_PROCS
from .layout import LOG_HEADER

__all__ = [
    "WakeSocket",
    "make_socket",
    "resolve",
    "sock_wait",
    "socket_name",
    "wake_waiters",
    "wakesock_available",
]

_W = LOG_HEADER.word


def resolve(fut: asyncio.Future[None]) -> None:
    """Resolve ``fut`` unless it is done already (a wait's timer, or its wake-up)."""
    if not fut.done():
        fut.set_result(None)


def wakesock_available() -> bool:
    """True if waiters are to be woken through sockets: the default, unless
    ``AIODBENV_LOG_WAKE`` says ``futex`` or ``poll`` (or Unix sockets are missing)."""
    return log_wake_mode() in ("", "socket") and hasattr(socket, "AF_UNIX")


def socket_name(nonce: int) -> bytes:
    """The abstract socket address of the waiter ``nonce`` (as the C side makes it)."""
    return b"\0aiodbenv-logwake-%016x" % nonce


class WakeSocket:
    """A log handle's wake-up socket: it receives wake-ups and sends them. Several tasks of
    the handle may wait on it at once (the writer task, callers waiting for another
    process's round: :mod:`aiodbenv.log.direct`); each waits on a future of its own, so that
    cancelling one wait cancels no other."""

    __slots__ = ("_loop", "_waiters", "nonce", "received", "sock")

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            while True:
                nonce = int.from_bytes(os.urandom(8), "little") | 1
                try:
                    self.sock.bind(socket_name(nonce))
                    break
                except OSError as err:  # EADDRINUSE: another handle drew the same nonce
                    if err.errno != 98:
                        raise
        except BaseException:
            self.sock.close()
            raise
        self.nonce = nonce
        #: Wake-ups received (for tests and statistics).
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def waiting(self) -> int:
        """Tasks waiting on it now."""
        return len(self._waiters)

    def fileno(self) -> int:
        """The socket's descriptor."""
        return self.sock.fileno()

    def _readable(self) -> None:
        self._drain()
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    def _drain(self) -> None:
        try:
            while True:
                self.sock.recv(64)
                self.received += 1
        except OSError:
            pass  # empty (EAGAIN)

    async def wait(self, timeout: float) -> None:
        """Until a wake-up arrives, or ``timeout`` seconds. Cancellation: nothing is left
        waiting (the reader stays registered for the next wait, until :meth:`close`)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(self.sock.fileno())
                except (RuntimeError, ValueError):
                    pass
            loop.add_reader(self.sock.fileno(), self._readable)
            self._loop = loop
        # A future of this wait's own (a shared one, cancelled with one waiter's task,
        # raised CancelledError in every other waiter), with a timer that resolves it:
        # asyncio.wait_for over a shield cost two more turns of the loop per wake-up.
        fut = loop.create_future()
        self._waiters.add(fut)
        timer = loop.call_later(timeout, resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiters.discard(fut)

    def close(self) -> None:
        """Stop reading and close the socket (its name goes with it)."""
        self.stop_reading()
        self.sock.close()

    def stop_reading(self) -> None:
        """Stop reading (the socket stays open: its owner closes it)."""
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.sock.fileno())
            except (RuntimeError, ValueError):
                pass  # the loop is closed already
            self._loop = None
        for fut in self._waiters:
            if not fut.done():  # an error of the close, not a cancellation nobody asked for
                fut.set_exception(InvalidArgument("the environment is closed"))


def register(w: Any, h: int, slot: int, nonce: int, want: int) -> None:
    """Register the waiter of registry slot ``slot`` (``want``: see the module's words)."""
    if 0 <= slot < MAX_PROCS:
        w[h + _W.wake_name + slot] = nonce
        w[h + _W.wake_want + slot] = want


def unregister(w: Any, h: int, slot: int, *, name: bool = False) -> None:
    """Clear the wait of slot ``slot`` (and its socket's nonce if ``name``: closing, or the
    reaper dropping a dead process's slot)."""
    if 0 <= slot < MAX_PROCS:
        w[h + _W.wake_want + slot] = 0
        if name:
            w[h + _W.wake_name + slot] = 0


def wake_waiters(w: Any, h: int, sock: socket.socket | None, everyone: bool) -> int:
    """Send a wake-up to every registered waiter whose LSN is durable now (every one if
    ``everyone``), clearing its registration; the number sent. Never blocks."""
    s_lsn = int(w[h + _W.s_lsn])
    base_want, base_name = h + _W.wake_want, h + _W.wake_name
    sent = 0
    for i in range(MAX_PROCS):
        v = int(w[base_want + i])
        if not v or not (everyone or v == 1 or s_lsn > v - 2):
            continue
        # Not atomic against another writer clearing it too: at worst two bytes are sent.
        w[base_want + i] = 0
        nonce = int(w[base_name + i])
        if not nonce or sock is None:
            continue
        try:
            sock.sendto(b"\1", socket.MSG_DONTWAIT, socket_name(nonce))
            sent += 1
        except OSError:
            pass  # full (a stopped waiter) or gone (a dead one): its re-check covers it
    return sent


def make_socket(shared: bool = True) -> WakeSocket | None:
    """A handle's wake-up socket if the environment is ``shared`` between processes and the
    socket can be made, else None. Made whatever ``AIODBENV_LOG_WAKE`` says: a handle that
    waits on the futex (or polls) still sends wake-ups to the other processes' socket
    waiters when it writes; it waits on its socket only if :func:`wakesock_available`."""
    if not shared or not hasattr(socket, "AF_UNIX"):
        return None
    try:
        return WakeSocket()
    except OSError:
        return None


async def sock_wait(c: Any, want: Any, ws: WakeSocket, seq: int, timeout: float) -> None:
    """A log handle (its :class:`~aiodbenv.log.core.LogCore` ``c`` and demand ``want``)
    waits for another process's writer to progress: registered in its slot, woken on its
    loop by the writer's byte, re-checked after ``timeout`` all the same. ``seq`` is the
    ``flush_seq`` it read before looking at the state. Cancellation: the registration is
    cleared."""
    s_lsn = int(c.w[c.h + _W.s_lsn])
    # Only a flush: woken when its LSN is durable; anything else: on any progress.
    only_sync = want.sync >= s_lsn and not (
        want.direct or want.switch or want.space or want.write >= int(c.w[c.h + _W.w_lsn])
    )
    slot = c.rsv_slot
    # The slot is the handle's, shared by its waiting tasks: with others waiting (they may
    # want earlier records than want.sync), woken on any progress; cleared by the last.
    register(c.w, c.h, slot, ws.nonce, want.sync + 2 if only_sync and not ws.waiting else 1)
    try:
        if int(c.w[c.h + _W.flush_seq]) != seq:
            return  # it progressed since the caller looked: look again
        await ws.wait(timeout)
    finally:
        if not ws.waiting:
            unregister(c.w, c.h, slot)
