"""The log's flush round as one compiled call (aiodbenv/_csrc/65_logflush.c) and the wake of
other processes' flush waiters through their datagram sockets (aiodbenv/log/wakesock.py): a
lone flush is one round in the writer's thread; a failed fdatasync there panics the
environment and is never taken for success; a waiter is woken on its loop by a byte on its
socket; a waiter that does not read (stopped) or is gone (dead) never stalls the writer; the
registration is cleared on close and when the reaper drops a dead process's slot."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import subprocess
import time

import pytest

import aiodbenv
from aiodbenv import RunRecovery
from aiodbenv.log import accel
from aiodbenv.log.layout import LOG_HEADER
from aiodbenv.log.wakesock import WakeSocket, register, wakesock_available
from aiodbenv.region.layout import MAX_PROCS
from tests.conftest import spawn

_W = LOG_HEADER.word

compiled_round = pytest.mark.skipif(
    not accel.ROUND_COMPILED, reason="the compiled accelerator is off (AIODBENV_MUTEX=abi)"
)


@pytest.fixture
def sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Handles opened in the test wake their waiters by socket (the default, set all the
    same so that a CI run with another AIODBENV_LOG_WAKE still tests the socket here)."""
    monkeypatch.setenv("AIODBENV_LOG_WAKE", "socket")
    assert wakesock_available()


with_sockets = pytest.mark.usefixtures("sockets")


def wake_words(log: aiodbenv.Log, slot: int) -> tuple[int, int]:
    c = log._c
    return int(c.w[c.h + _W.wake_want + slot]), int(c.w[c.h + _W.wake_name + slot])


@compiled_round
async def test_a_lone_flush_is_one_compiled_round(home: str) -> None:
    try:
        async with aiodbenv.Env.open(home, create=True, log=True) as env:
            log = env.log
            assert log._bjob is not None
            await log.put(b"first", flush=True)  # opens the log file in this process
            await asyncio.sleep(0.01)  # the writer task that did it ends
            st0 = log.stat()
            for i in range(20):
                lsn = await log.put(b"r%d" % i, flush=True)
                assert log.flushed_lsn > lsn
                # The round ran in the thread and let the role go there: nothing to settle.
                assert log._bjob.state() == accel.JOB_DONE
                assert log._bjob.rounds()[0] >= 1
                assert log._c.role_holder() == (0, 0)
            st = log.stat()
            assert st.scount - st0.scount == 20  # one fdatasync per lone flush
            assert st.wcount - st0.wcount == 20
            assert st.disk_offset == st.cur_offset
    finally:
        await aiodbenv.Env.remove(home)


@compiled_round
async def test_a_failed_fdatasync_in_the_compiled_round_panics(home: str) -> None:
    """fdatasync of /dev/null fails (EINVAL) where its pwrite succeeds: the compiled round's
    fsync fails, the environment panics, and the record is never reported durable, then or
    by a later flush."""
    try:
        env = await aiodbenv.Env.open(home, create=True, log=True)
        log = env.log
        before = await log.put(b"durable", flush=True)
        file = log._c.word("f_lsn") >> 32
        real = log._fds[file]
        null = os.open(os.devnull, os.O_WRONLY)
        log._fds[file] = null
        try:
            lsn = await log.put(b"lost", write_nosync=True)  # a write alone succeeds
            with pytest.raises(RunRecovery, match=r"errno 22|EINVAL|Invalid argument"):
                await log.put(b"never durable", flush=True)
            assert log._c.word("failed_errno") == errno.EINVAL
            assert log.flushed_lsn <= lsn and log.flushed_lsn > before
            with pytest.raises(RunRecovery):
                await log.flush()  # never retried as if it had succeeded
            assert log.flushed_lsn <= lsn
        finally:
            log._fds[file] = real
            os.close(null)
            with pytest.raises(RunRecovery):
                await env.close()
    finally:
        await aiodbenv.Env.remove(home)


@pytest.mark.parametrize("mode", ["", "socket", "futex", "poll", "Socket", "pipe"])
async def test_the_wake_mode_is_the_socket_by_default_and_checked(
    home: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A shared environment's log handle wakes by socket unless AIODBENV_LOG_WAKE says
    futex or poll; a value it does not name is refused when an environment with a log opens,
    before anything is created."""
    monkeypatch.setenv("AIODBENV_LOG_WAKE", mode)
    if mode == "pipe":
        with pytest.raises(aiodbenv.ConfigError, match="AIODBENV_LOG_WAKE"):
            await aiodbenv.Env.open(home, create=True, log=True)
        assert os.listdir(home) == []  # refused before anything was created
        async with aiodbenv.Env.open(home, create=True) as env:  # no log: not read
            assert env.pool.stat().cache_size > 0
        await aiodbenv.Env.remove(home)
        return
    try:
        async with aiodbenv.Env.open(home, create=True, log=True) as env:
            # Every mode sends wake-ups to socket waiters; only the socket mode waits on it.
            assert env.log._wsock is not None
            assert env.log._sock_wait == (mode.lower() in ("", "socket")), mode
    finally:
        await aiodbenv.Env.remove(home)


@with_sockets
@pytest.mark.parametrize("writer_mode", ["socket", "futex", "poll"])
async def test_a_waiter_is_woken_by_its_socket(
    home: str, monkeypatch: pytest.MonkeyPatch, writer_mode: str
) -> None:
    """Handle B's flush waits for A, the writer (two handles are two registry slots, as two
    processes are): B registers in its slot and sleeps on its socket; A lets the role go
    and B is woken by one byte, takes the role and flushes. A writer that itself waits on
    the futex or polls (AIODBENV_LOG_WAKE) still sends that byte."""
    try:
        monkeypatch.setenv("AIODBENV_LOG_WAKE", writer_mode)
        async with aiodbenv.Env.open(home, create=True, log=True) as a:
            monkeypatch.setenv("AIODBENV_LOG_WAKE", "socket")
            async with aiodbenv.Env.open(home) as b:
                ws = b.log._wsock
                assert ws is not None
                slot = b.log._c.rsv_slot
                assert a.log._c.take_role() is True  # A writes (nothing, for now)
                task = asyncio.ensure_future(b.log.put(b"from B", flush=True))
                deadline = time.monotonic() + 10
                while wake_words(b.log, slot) == (0, 0) or wake_words(b.log, slot)[0] == 0:
                    assert time.monotonic() < deadline, "B never registered its wait"
                    await asyncio.sleep(0.001)
                assert wake_words(b.log, slot)[1] == ws.nonce
                received = ws.received
                a.log._c.release_role()
                a.log._wake_others()
                lsn = await asyncio.wait_for(task, 10)
                assert b.log.flushed_lsn > lsn
                assert ws.received > received  # the byte, not the timeout, woke it
                assert wake_words(b.log, slot)[0] == 0  # cleared by the sender or B
            # B closed: its slot names no socket any more.
            assert wake_words(a.log, slot) == (0, 0)
    finally:
        await aiodbenv.Env.remove(home)


@with_sockets
async def test_a_waiter_that_does_not_read_or_is_gone_never_stalls_the_writer(
    home: str,
) -> None:
    """A registered waiter whose socket is full (a stopped process: nobody reads it) or
    absent (a dead one) costs the writer a failed non-blocking send, nothing more."""
    try:
        async with aiodbenv.Env.open(home, create=True, log=True) as env:
            log = env.log
            c = log._c
            stopped = WakeSocket()
            stopped.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the minimum
            gone = WakeSocket()
            gone_nonce = gone.nonce
            gone.close()  # its name is free: sends to it fail (ECONNREFUSED)
            s1, s2 = MAX_PROCS - 1, MAX_PROCS - 2  # slots nobody else uses in this test
            try:
                n = 300
                for i in range(n):
                    register(c.w, c.h, s1, stopped.nonce, 1)
                    register(c.w, c.h, s2, gone_nonce, 1)
                    await log.put(b"%d" % i, flush=True)
                    # Each flush sent to both and cleared both registrations.
                    assert wake_words(log, s1)[0] == 0 and wake_words(log, s2)[0] == 0
                got = 0
                try:
                    while True:
                        stopped.sock.recv(8)
                        got += 1
                except BlockingIOError:
                    pass
                assert 0 < got < n  # its queue filled; later bytes were dropped, not waited
            finally:
                c.w[c.h + _W.wake_name + s1] = c.w[c.h + _W.wake_name + s2] = 0
                c.w[c.h + _W.wake_want + s1] = c.w[c.h + _W.wake_want + s2] = 0
                stopped.close()
    finally:
        await aiodbenv.Env.remove(home)


WAITER = """
import asyncio, os, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    print(env.log._c.rsv_slot, flush=True)
    await env.log.put(b"from the child", flush=True)  # waits: the parent holds the role
    print("done", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@with_sockets
async def test_stopped_and_killed_waiting_processes(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """A real waiting process, SIGSTOPped while registered, does not stall the writer's
    flushes; SIGKILLed, its registration is dropped by the reaper with its slot."""
    try:
        env = await aiodbenv.Env.open(home, create=True, log=True)
        log = env.log
        try:
            assert log._c.take_role() is True
            p = spawn(WAITER, home, env={"AIODBENV_LOG_WAKE": "socket"})
            procs.append(p)
            assert p.stdout is not None
            slot = int(p.stdout.readline())
            deadline = time.monotonic() + 10
            while wake_words(log, slot)[0] == 0:
                assert time.monotonic() < deadline, "the child never registered its wait"
                await asyncio.sleep(0.001)
            nonce = wake_words(log, slot)[1]
            assert nonce
            os.kill(p.pid, signal.SIGSTOP)
            log._c.release_role()
            for i in range(50):  # it is registered, stopped: the flushes go on
                await asyncio.wait_for(log.put(b"%d" % i, flush=True), 10)
            os.kill(p.pid, signal.SIGCONT)
            assert p.stdout.readline().strip() == "done"
            # Registered once more (a wait of its own), then killed: the reaper clears it.
            register(log._c.w, log._c.h, slot, nonce, 1)
            p.kill()
            p.wait(10)
            deadline = time.monotonic() + 10
            while wake_words(log, slot) != (0, 0):
                assert time.monotonic() < deadline, "the dead slot's registration stayed"
                env.pool.reap()
                await asyncio.sleep(0.01)
            await log.put(b"after", flush=True)
        finally:
            await env.close()
    finally:
        await aiodbenv.Env.remove(home)


@pytest.mark.parametrize("seam", [False, True])
async def test_a_round_run_in_the_writers_thread_makes_nothing_durable_behind_listeners(
    home: str, seam: bool
) -> None:
    """Durable-log listeners get the bytes that become durable, on the loop. A write-only
    round in the writer's thread (compiled, or Python when the I/O seam is armed) must not go
    on into an fsync round for a flush another process registered meanwhile: the listener
    would never hear of those bytes. The writer task serves that flush on the loop instead."""
    from aiodbenv import _io
    from aiodbenv.log import threadrounds

    try:
        async with aiodbenv.Env.open(home, create=True, log=True) as env:
            log = env.log
            c = log._c
            ranges: list[tuple[aiodbenv.LSN, aiodbenv.LSN]] = []
            log.add_durable_listener(lambda s, e, d: ranges.append((s, e)))
            await log.put(b"a" * 100, flush=True)
            real = log._round_start
            handed = 0

            def start(
                sync: bool, fill: bool, behind: bool = False, compiled: bool = False
            ) -> object:
                nonlocal handed
                r = real(sync, fill, behind, compiled)
                if behind and isinstance(r, (threadrounds.CRound, threadrounds.Round)):
                    handed += 1
                    c.register_commit()  # a flush call of another process arrives meanwhile
                return r

            log._round_start = start  # type: ignore[method-assign]
            # An armed seam (a fault that does nothing) sends the rounds the Python way.
            armed = _io.inject("fdatasync", None) if seam else contextlib.nullcontext()
            with armed:
                lsn = await log.put(b"b" * 100)
                word = c.end_word() - 1
                # What put(write_nosync=True) does when the writer task is running:
                log._want.write = max(log._want.write, word)
                while c.word("w_lsn") <= word:
                    await log._wait_progress()
                await asyncio.sleep(0.05)
                await log.flush()
            assert handed >= 1
            assert log.flushed_lsn > lsn
            # Every durable byte reached the listener, in order and without a gap.
            assert ranges and ranges[-1][1] == log.flushed_lsn
            for (_, e1), (s2, _) in zip(ranges, ranges[1:], strict=False):
                assert e1 == s2, ranges
    finally:
        await aiodbenv.Env.remove(home)
