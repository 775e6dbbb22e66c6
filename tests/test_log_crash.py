"""The log survives crashes: a process SIGKILLed after its flush returned, a power loss that
drops or tears every write since the last fsync (simulated through the I/O seam), a torn or
corrupt tail found at open; and a failed write or fsync of the log panics the environment.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal

import pytest

import aiodbenv
from aiodbenv import LSN, RunRecovery, _io
from tests.conftest import python, spawn
from tests.powerloss import Disk, record, replay

CHILD_PUTS = """
import asyncio, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1], create=True, log=True, log_file_size=4096)
    for i in range(int(sys.argv[2])):
        lsn = await env.log.put(b"record %d".ljust(200, b".") % i, flush=True)
        print(lsn.file, lsn.offset, i, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def records(home: str) -> list[tuple[LSN, bytes]]:
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        got = [item async for item in env.log.cursor()]
    await aiodbenv.Env.remove(home)
    return got


async def test_flushed_record_survives_sigkill_and_loss_of_the_regions(
    home: str, procs: list[object]
) -> None:
    child = spawn(CHILD_PUTS, home, "40")
    procs.append(child)
    assert child.stdout is not None
    acked = []
    for _ in range(40):
        file, off, i = map(int, child.stdout.readline().split())
        acked.append((LSN(file, off), b"record %d".ljust(200, b".") % i))
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    await aiodbenv.Env.remove(home, force=True)  # the regions are lost, the log files stay
    assert not [n for n in os.listdir(home) if n.startswith("__db.0")]
    got = await records(home)
    assert got == acked
    assert acked[-1][0].file > 1  # it switched files on the way


async def test_killed_right_after_the_fsync_loses_nothing_acknowledged(home: str) -> None:
    # Killed at the 10th fsync of the log, before its flush call could return.
    out = python(
        CHILD_PUTS,
        home,
        "30",
        env={"AIODBENV_TEST_SIGNAL": "log_fsynced:at:10:SIGKILL"},
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    acked = [line.split() for line in out.stdout.splitlines()]
    assert len(acked) == 9
    await aiodbenv.Env.remove(home, force=True)
    got = await records(home)
    # The 10th record was fsynced though not acknowledged: it is there too.
    assert [d for _, d in got] == [b"record %d".ljust(200, b".") % i for i in range(10)]


# -- a simulated power loss -----------------------------------------------------------------------


async def power_loss_round(home: str, seed: int) -> None:
    rng = random.Random(seed)
    env = await aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=2048, log_file_size=8192
    )
    base = Disk.snapshot(home)
    journal = os.path.join(home, "journal")
    with record(journal):
        log = env.log
        start = log.end_lsn
        put: list[tuple[LSN, bytes]] = []
        acked = 0  # records [0, acked) were durable when some flush returned
        for _ in range(rng.randint(20, 120)):
            data = rng.randbytes(rng.choice([1, 50, 300, 900, 2500]))
            mode = rng.random()
            lsn = await log.put(data, flush=mode < 0.2, write_nosync=0.2 <= mode < 0.35)
            put.append((lsn, data))
            if mode < 0.2:
                acked = len(put)
        await env.close(nosync=True)  # the buffer is not flushed: the "crash"
    await aiodbenv.Env.remove(home, force=True)
    disk, _, _ = replay(journal, base, 0)
    disk.lose_power(rng, home)
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        got = [item async for item in env.log.cursor(start=start)] if put else []
        assert got[:acked] == put[:acked], f"seed {seed}: a flushed record was lost"
        assert got == put[: len(got)], f"seed {seed}: the log holds something never put"
        # It ends cleanly at the last good record and goes on from there.
        assert (
            env.log.end_lsn
            == (LSN(got[-1][0].file, got[-1][0].offset + 16 + len(got[-1][1])) if got else start)
            or env.log.end_lsn.offset == 32
        )
        after = await env.log.put(b"after the power loss", flush=True)
        tail = [item async for item in env.log.cursor(start=start)]
        assert tail == got + [(after, b"after the power loss")]
    await aiodbenv.Env.remove(home)
    for name in os.listdir(home):
        os.unlink(os.path.join(home, name))


async def test_power_loss_loses_no_flushed_record(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiodbenv")
    for seed in range(25):
        await power_loss_round(home, seed)


@pytest.mark.slow
async def test_power_loss_many_seeds(home: str) -> None:
    for seed in range(25, 500):
        await power_loss_round(home, seed)


# -- a torn or corrupt tail at open ---------------------------------------------------------------


async def test_torn_tail_is_cut_off_with_a_warning(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        lsns = [await env.log.put(b"%d" % i * 20, flush=True) for i in range(10)]
        end = env.log.end_lsn
    await aiodbenv.Env.remove(home)
    path = os.path.join(home, "log.0000000001")
    with open(path, "r+b") as f:  # the last record torn: its second half never written
        f.seek(lsns[-1].offset + 20)
        f.write(bytes(30))
        f.seek(end.offset + 100)
        f.write(b"garbage" * 10)  # and junk further on
    caplog.set_level(logging.WARNING, "aiodbenv")
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert env.log.end_lsn == lsns[-1]
        dropped = end.offset + 170 - lsns[-1].offset
        assert f"{dropped} byte(s) dropped" in caplog.text
        got = [lsn async for lsn, _ in env.log.cursor()]
        assert got == lsns[:-1]
        new = await env.log.put(b"new", flush=True)
        assert new == lsns[-1]
    with open(path, "rb") as f:
        f.seek(end.offset + 100)
        assert f.read(70) == bytes(70)  # the junk is gone for good
    await aiodbenv.Env.remove(home)
    caplog.clear()
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert "dropped" not in caplog.text
        assert [lsn async for lsn, _ in env.log.cursor()][-1] == new
    await aiodbenv.Env.remove(home)


async def test_new_file_without_its_header_is_started_again(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True, log_file_size=4096) as env:
        for i in range(12):
            await env.log.put(bytes([i]) * 500, flush=True)
        last_file = env.log.end_lsn.file
    await aiodbenv.Env.remove(home)
    # A crash right after the next file was created, before its header reached the disk.
    with open(os.path.join(home, f"log.{last_file + 1:010d}"), "wb") as f:
        f.write(bytes(4096))
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert env.log.end_lsn == LSN(last_file + 1, 32)
        items = [x async for x in env.log.cursor()]
        assert len(items) == 12
        back = []
        async with env.log.cursor() as c:
            item = await c.last()
            while item is not None:
                back.append(item)
                item = await c.prev()
        assert back == items[::-1]
    await aiodbenv.Env.remove(home)


# -- failures panic -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["fdatasync", "pwrite"])
async def test_failed_log_write_or_fsync_panics_every_handle(home: str, op: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    other = await aiodbenv.Env.open(home)
    await env.log.put(b"before")
    with _io.inject(op, errno.EIO, times=1):
        with pytest.raises(RunRecovery, match="log file"):
            await env.log.put(b"x", flush=True)
    # Never retried as if it had worked: every later call, in every handle, says why.
    with pytest.raises(RunRecovery, match="log file"):
        await env.log.flush()
    with pytest.raises(RunRecovery, match=f"errno {errno.EIO}"):
        await other.log.put(b"y")
    out = python(
        """
        import asyncio, sys, aiodbenv
        async def main():
            try:
                await aiodbenv.Env.open(sys.argv[1])
            except aiodbenv.RunRecovery as err:
                print("RunRecovery")
        asyncio.run(main())
        """,
        home,
    )
    assert out.stdout.strip() == "RunRecovery", out.stderr
    for e in (env, other):
        with pytest.raises(RunRecovery):
            await e.close()
    await aiodbenv.Env.remove(home, force=True)


CHILD_MODE = """
import asyncio, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    lsn = await env.log.put(b"child record", write_nosync=sys.argv[2] == "write_nosync")
    print(lsn.file, lsn.offset, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["write_nosync", "nosync"])
async def test_process_crash_with_write_nosync_and_nosync(
    home: str, procs: list[object], mode: str
) -> None:
    """``write_nosync``: the record is in the file (the OS's cache) when put returns, so it
    survives the process and the loss of the regions. Without it (NOSYNC), it is only in the
    shared buffer: it survives the process while the environment stays, and another process
    makes it durable."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    child = spawn(CHILD_MODE, home, mode)
    procs.append(child)
    assert child.stdout is not None
    lsn = LSN(*map(int, child.stdout.readline().split()))
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    if mode == "write_nosync":
        assert env.log.written_lsn > lsn
        await aiodbenv.Env.remove(home, force=True)  # the regions are lost, buffer and all
        with pytest.raises(RunRecovery):
            await env.close()
    else:
        assert env.log.written_lsn <= lsn  # nowhere but in the shared buffer
        await env.log.flush()  # this process writes what the dead one appended
        await env.close()
        await aiodbenv.Env.remove(home)
    assert await records(home) == [(lsn, b"child record")]
