"""What an operator sees: pinned pages and pin ages in the statistics, and the health of the
background workers of the whole environment, whichever process runs them."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import time

import aiodbenv
from aiodbenv import CheckpointSettings, _io

from .conftest import REPO, spawn

PS = 4096

# Opens the environment, checkpoints every 50 ms with every write failing (ENOSPC), prints
# FAILING once two attempts failed, and waits for a line on stdin.
FAILING_CHECKPOINT_CHILD = """
import asyncio, errno, sys, time
import aiodbenv
from aiodbenv import CheckpointSettings, _io

async def main(home):
    async with aiodbenv.Env.open(home) as env:
        f = await env.pool.open_file("h.db")
        for i in range(4):
            async with f.get(i) as p:
                p.data[0] = 1
                p.mark_dirty()
        with _io.inject("pwrite", errno.ENOSPC):
            w = env.start_checkpoint(CheckpointSettings(interval=0.05, completion_target=0))
            deadline = time.monotonic() + 20
            while w.status().failures < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            print("FAILING", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await env.stop_workers()
        await f.close()
        await env.close(nosync=True)

asyncio.run(main(sys.argv[1]))
"""

# Pins page 3 of p.db, prints PINNED, and holds it until a line arrives on stdin.
HOLD_PIN_CHILD = """
import asyncio, sys
import aiodbenv

async def main(home):
    async with aiodbenv.Env.open(home) as env:
        async with env.pool.open_file("p.db") as f:
            async with f.get(3):
                print("PINNED", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main(sys.argv[1]))
"""


async def _line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 60)
    return line.strip()


async def test_a_checkpoint_failing_in_another_process_shows_in_health(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    with open(os.path.join(home, "h.db"), "wb") as raw:
        raw.write(bytes(8 * PS))
    env = await aiodbenv.Env.open(home, create=True)
    try:
        before = env.health()
        assert before.ok and [s.kind for s in before.shared] == ["trickle", "checkpoint"]
        assert all(s.healthy and s.last_error is None for s in before.shared)
        child = spawn(FAILING_CHECKPOINT_CHILD, home)
        procs.append(child)
        assert await _line(child) == "FAILING", child.stderr.read() if child.stderr else ""
        health = env.health()  # this handle runs no worker at all
        assert health.workers == ()
        assert not health.ok
        ck = health.shared[1]
        assert ck.kind == "checkpoint" and not ck.healthy
        assert ck.consecutive_failures >= 2 and ck.failed_pid == child.pid
        assert ck.holder_pid == child.pid
        assert "no space left" in (ck.last_error or ""), ck
        assert ck.last_failure is not None and abs(ck.last_failure - time.time()) < 60
        assert health.shared[0].healthy  # trickle never ran
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0, child.stderr.read() if child.stderr else ""
        # The failing process is gone but its pages were never written: still reported...
        after = env.health()
        assert not after.ok and after.shared[1].holder_pid is None
        # ...until a checkpoint succeeds, in any process.
        result = await env.checkpoint()
        assert result.written == 4
        healed = env.health()
        assert healed.ok and healed.shared[1].consecutive_failures == 0
        assert healed.shared[1].last_success is not None
        assert healed.shared[1].last_error is not None  # the history stays readable
    finally:
        await env.close(nosync=True)
        for p in procs:  # a failed assertion must not leave the environment open
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        await aiodbenv.Env.remove(home)


async def test_pins_of_another_process_show_in_stat(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    try:
        async with env.pool.open_file("p.db", create=True) as f:
            for i in range(6):
                async with f.get(i, create=True) as p:
                    p.mark_dirty()
            await env.pool.sync()
            st = env.pool.stat()
            assert st.page_pinned == 0 and st.oldest_pin_age is None
            child = spawn(HOLD_PIN_CHILD, home)
            procs.append(child)
            assert await _line(child) == "PINNED", child.stderr.read() if child.stderr else ""
            await asyncio.sleep(0.1)
            async with f.get(5):
                st = env.pool.stat()
                assert st.page_pinned == 2
                (fs,) = st.files
                assert fs.pinned == 2
                # The child's pin (page 3) is the older one: at least the 0.1 s slept.
                assert st.oldest_pin_age is not None and 0.05 <= st.oldest_pin_age < 120
                assert fs.oldest_pin_age == st.oldest_pin_age
            assert env.pool.stat().page_pinned == 1
            assert child.stdin is not None
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(timeout=60) == 0
            st = env.pool.stat()
            assert st.page_pinned == 0 and st.oldest_pin_age is None
            assert f.stat().pinned == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        await env.close()
        await aiodbenv.Env.remove(home)
    os.remove(os.path.join(home, "p.db"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiodbenv", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_stat_and_watch_show_pins_and_failing_workers(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True) as env:
        async with env.pool.open_file("w.db", create=True) as f:
            async with f.get(0, create=True), f.get(1, create=True):
                text = await asyncio.to_thread(run_cli, "stat", "-m", "-h", home)
                js = await asyncio.to_thread(run_cli, "stat", "-m", "--json", "-h", home)
            assert text.returncode == 0, text.stderr
            assert "2           Current pinned page count (all processes)" in text.stdout
            assert "2           Pages pinned now (all processes)" in text.stdout
            assert "Age of the oldest pin now held" in text.stdout
            data = json.loads(js.stdout)
            assert data["page_pinned"] == 2 and data["files"][0]["pinned"] == 2
            assert 0 <= data["oldest_pin_age"] < 120

            with _io.inject("pwrite", errno.ENOSPC):
                worker = env.start_checkpoint(
                    CheckpointSettings(interval=0.05, completion_target=0)
                )
                deadline = time.monotonic() + 20
                while worker.status().failures < 1:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                watch = await asyncio.to_thread(run_cli, "watch", "-c", "1", "-h", home)
            await env.stop_workers()
            assert watch.returncode == 0, watch.stderr
            assert "0 pages pinned, oldest pin -" in watch.stdout
            assert "checkpoint FAILING: " in watch.stdout
            assert f"(process {os.getpid()}): NoSpace" in watch.stdout, watch.stdout
            await env.checkpoint()  # a success clears it
            watch = await asyncio.to_thread(run_cli, "watch", "-c", "1", "-h", home)
            assert "FAILING" not in watch.stdout
    await aiodbenv.Env.remove(home)
