"""The log across processes: group commit shares fsyncs between 8 processes, statistics are
exact across them, a dead writer or a dead mutex holder is replaced, a stopped writer makes
the others fail with LockTimeout naming it instead of waiting for ever."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

import aiodbenv
from aiodbenv import LSN, LockTimeout
from tests.conftest import spawn

WRITER = """
import asyncio, os, sys, time
import aiodbenv

async def main():
    home, tag, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    env = await aiodbenv.Env.open(home)
    print("ready", flush=True)
    while not os.path.exists(go):
        await asyncio.sleep(0.001)
    for i in range(n):
        await env.log.put(b"%d:%d" % (tag, i), flush=True)
    await env.close()
    print("done", flush=True)

asyncio.run(main())
"""


def wait_line(p: subprocess.Popen[str], want: str) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    assert line == want, (line, p.stderr.read() if p.stderr else "")


@pytest.mark.parametrize("wake", ["socket", "futex", "poll"])
async def test_eight_processes_share_fsyncs_and_stats_are_exact(
    home: str, procs: list[subprocess.Popen[str]], wake: str
) -> None:
    """Group commit, with the waiters woken on their loops by their sockets (the default),
    sleeping on the futex (``AIODBENV_LOG_WAKE=futex``), or polling."""
    nproc, each = 8, 25
    env = await aiodbenv.Env.open(home, create=True, log=True)
    st0 = env.log.stat()
    go = os.path.join(home, "go")
    for tag in range(nproc):
        procs.append(spawn(WRITER, home, str(tag), str(each), go, env={"AIODBENV_LOG_WAKE": wake}))
    for p in procs:
        wait_line(p, "ready")
    open(go, "w").close()
    for p in procs:
        wait_line(p, "done")
        assert p.wait(timeout=60) == 0
    st = env.log.stat()
    total = nproc * each
    assert st.records - st0.records == total  # exact: no increment lost between processes
    payload = sum(len(b"%d:%d" % (t, i)) for t in range(nproc) for i in range(each))
    assert st.bytes - st0.bytes == payload + 16 * total
    # Group commit: fewer fsyncs than flush calls, and some fsync served several processes.
    assert st.scount - st0.scount < total
    assert st.maxcommitperflush > 1
    assert st.disk_offset == st.cur_offset
    records = [d async for _, d in env.log.cursor()]
    assert sorted(records) == sorted(b"%d:%d" % (t, i) for t in range(nproc) for i in range(each))
    for t in range(nproc):  # each process's records in the order it put them
        mine = [r for r in records if r.startswith(b"%d:" % t)]
        assert mine == [b"%d:%d" % (t, i) for i in range(each)]
    await env.close()
    await aiodbenv.Env.remove(home)


HOLDER = """
import asyncio, os, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    lsn = await env.log.put(b"from the child")
    print(lsn.file, lsn.offset, flush=True)
    if sys.argv[2] == "mutex":
        env.log._c.mutex.__enter__()  # dies holding the log mutex
        print("locked", flush=True)
        await asyncio.sleep(60)
    await env.log.flush(lsn)  # its writer is stopped or killed at the fsync

asyncio.run(main())
"""


async def test_dead_writer_is_replaced_and_its_buffer_is_not_lost(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    child = spawn(HOLDER, home, "flush", env={"AIODBENV_TEST_SIGNAL": "fdatasync:before:1:SIGKILL"})
    procs.append(child)
    assert child.stdout is not None
    file, off = map(int, child.stdout.readline().split())
    assert child.wait(timeout=30) == -signal.SIGKILL
    # It died holding the writer role (its pid is still in the region).
    assert env.log._c.role_holder()[0] == child.pid
    mine = await env.log.put(b"from the parent", flush=True)
    assert env.log._c.role_holder() == (0, 0)
    assert env.log.flushed_lsn > mine > LSN(file, off)
    assert [d async for _, d in env.log.cursor()] == [b"from the child", b"from the parent"]
    await env.close()
    await aiodbenv.Env.remove(home)


def kill_holding_the_log_mutex(home: str, procs: list[subprocess.Popen[str]]) -> None:
    """A child appends a record, locks the log mutex and is killed (SIGKILL) holding it."""
    child = spawn(HOLDER, home, "mutex")
    procs.append(child)
    assert child.stdout is not None
    child.stdout.readline()
    assert child.stdout.readline().strip() == "locked"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)


async def test_dead_holder_of_the_log_mutex(
    home: str, procs: list[subprocess.Popen[str]], caplog: pytest.LogCaptureFixture
) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    kill_holding_the_log_mutex(home, procs)
    lsn = await env.log.put(b"after", flush=True)
    assert "died holding the log mutex" in caplog.text
    assert env.stat().mutex_owner_died == 1
    assert [d async for _, d in env.log.cursor()] == [b"from the child", b"after"]
    assert env.log.flushed_lsn > lsn
    await env.close()
    await aiodbenv.Env.remove(home)


async def test_dead_holder_of_the_log_mutex_met_by_a_compiled_flush(
    home: str, procs: list[subprocess.Popen[str]], caplog: pytest.LogCaptureFixture
) -> None:
    # A commit's flush (Txn._make_durable) goes straight to _flush_word, whose one compiled
    # call (register, take the role, start the round) is the first to meet the mutex its
    # holder left held when it died: it must repair it, then serve the flush.
    env = await aiodbenv.Env.open(home, create=True, log=True)
    log = env.log
    for _ in range(2):  # the round thread is running from the second on
        await log.put(b"first", flush=True)
    if log._bjob is None or not log._bjob.thread:
        await env.close()
        await aiodbenv.Env.remove(home)
        pytest.skip("the compiled log round is not in use (AIODBENV_MUTEX=abi)")
    lsn = await log.put(b"mine")
    kill_holding_the_log_mutex(home, procs)
    assert log.flushed_lsn <= lsn
    await log._flush_word((lsn.file << 32) | lsn.offset)
    assert "died holding the log mutex" in caplog.text
    assert env.stat().mutex_owner_died == 1
    assert log.flushed_lsn > lsn
    assert [d async for _, d in log.cursor()] == [b"first", b"first", b"mine", b"from the child"]
    await log.put(b"after", flush=True)
    await env.close()
    await aiodbenv.Env.remove(home)


def _stopped(pid: int) -> bool:
    """Is process ``pid`` stopped (state T in /proc/PID/stat)?"""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


async def test_stopped_writer_makes_flush_fail_with_lock_timeout(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    child = spawn(HOLDER, home, "flush", env={"AIODBENV_TEST_SIGNAL": "fdatasync:before:1:SIGSTOP"})
    procs.append(child)
    assert child.stdout is not None
    child.stdout.readline()
    deadline = time.monotonic() + 30
    # Stopped at its fsync, holding the role (the role alone is not enough: a process may
    # hold it for a moment and let it go before the round that stops).
    while env.log._c.role_holder()[0] != child.pid or not _stopped(child.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    env.log.wait_timeout = 0.5
    lsn = await env.log.put(b"parent")  # appending goes on while the writer is stopped
    t0 = time.monotonic()
    with pytest.raises(LockTimeout, match=f"process {child.pid}") as err:
        await env.log.flush(lsn)
    assert err.value.pid == child.pid
    assert time.monotonic() - t0 < 20
    os.kill(child.pid, signal.SIGCONT)
    assert child.wait(timeout=30) == 0
    await env.log.flush(lsn)  # it finished its round and let go
    assert env.log.flushed_lsn > lsn
    await env.close()
    await aiodbenv.Env.remove(home)


BIG = """
import asyncio, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    print("ready", flush=True)
    await env.log.put(b"B" * 5000)  # larger than the buffer: written straight to the file

asyncio.run(main())
"""


async def test_writer_killed_in_a_direct_write_leaves_a_padded_gap(
    home: str, procs: list[subprocess.Popen[str]], caplog: pytest.LogCaptureFixture
) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=1024)
    before = await env.log.put(b"before", flush=True)
    child = spawn(BIG, home, env={"AIODBENV_TEST_SIGNAL": "pwrite:before:1:SIGKILL"})
    procs.append(child)
    wait_line(child, "ready")
    assert child.wait(timeout=30) == -signal.SIGKILL
    # Its record's place was reserved, never written: the next writer pads it.
    assert env.log.end_lsn.offset == before.offset + 16 + 6 + 16 + 5000
    after = await env.log.put(b"after", flush=True)
    assert "padded" in caplog.text
    assert [x async for x in env.log.cursor()] == [(before, b"before"), (after, b"after")]
    await env.close()
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert [lsn async for lsn, _ in env.log.cursor()] == [before, after]
    await aiodbenv.Env.remove(home)


async def test_flush_waiters_of_other_processes_sleep_on_a_futex(home: str) -> None:
    import platform
    import threading

    from aiodbenv.log.wake import futex_available

    if os.environ.get("AIODBENV_LOG_WAKE") == "poll" or platform.machine() not in (
        "x86_64",
        "aarch64",
    ):
        pytest.skip("the futex is off here: waiters poll (tested by the tests above)")
    assert futex_available()
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        log = env.log
        assert log._futex is not None
        seq = log._c.word("flush_seq")
        woke = threading.Event()

        def waiter() -> None:
            log._futex.wait(seq, 10.0)  # type: ignore[union-attr]
            woke.set()

        t0 = time.monotonic()
        th = threading.Thread(target=waiter)
        th.start()
        time.sleep(0.05)
        assert not woke.is_set()
        await log.put(b"x", flush=True)  # the round bumps the word and wakes it
        th.join(5)
        assert woke.is_set() and time.monotonic() - t0 < 5
        assert log._c.word("flush_seq") > seq
    await aiodbenv.Env.remove(home)


async def test_a_writer_found_alive_is_looked_at_again_after_a_short_while(home: str) -> None:
    """The live-writer check remembers a process found alive for a moment only: once it has
    died, the check says so within that moment (a waiter then takes over its role)."""
    from aiodbenv.log import rounds
    from aiodbenv.region.registry import process_start_time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        async with aiodbenv.Env.open(home, create=True, log=True) as env:
            c = env.log._c
            start = process_start_time(child.pid)
            assert not c.holder_alive(child.pid, start + 1)  # a recycled pid is not it
            assert start and c.holder_alive(child.pid, start)
            child.kill()
            child.wait(10)
            assert c.holder_alive(child.pid, start)  # remembered, for a moment
            await asyncio.sleep(rounds._ALIVE_TTL * 1.5)
            assert not c.holder_alive(child.pid, start)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        await aiodbenv.Env.remove(home)
