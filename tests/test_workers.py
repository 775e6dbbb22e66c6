"""Background trickle and checkpoint workers, and the checkpoint command."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

import aiodbenv
from aiodbenv import CheckpointSettings, TrickleSettings, _io
from aiodbenv.errors import InvalidArgument

from .conftest import REPO

PS = 4096


@pytest.fixture
async def env(home: str):  # type: ignore[no-untyped-def]
    """A 256-page cache and a data file of 200 pages, all cached clean."""
    e = await aiodbenv.Env.open(home, create=True, cache_size=256 * PS)
    with open(os.path.join(home, "w.db"), "wb") as f:
        f.write(bytes(200 * PS))
    yield e
    if not e.closed:
        await e.close(nosync=True)
    await aiodbenv.Env.remove(home, force=True)  # dirty pages may be left: discard them
    os.remove(os.path.join(home, "w.db"))


async def dirty(f: aiodbenv.PoolFile, pages: range) -> None:
    for i in pages:
        async with f.get(i) as p:
            p.data[0:4] = i.to_bytes(4, "little")
            p.mark_dirty()


def clean_share(env: aiodbenv.Env) -> float:
    st = env.pool.stat()
    return st.page_clean / st.pages if st.pages else 1.0


async def test_trickle_keeps_the_clean_share_under_a_steady_writer(env: aiodbenv.Env) -> None:
    f = await env.pool.open_file("w.db")
    await dirty(f, range(200))
    await env.pool.sync()
    worker = env.start_trickle(TrickleSettings(percent=60, interval=0.05, wake_pages=8))
    samples = []
    for round_ in range(40):  # a steady writer: 10 pages dirtied every 10 ms
        base = (round_ * 10) % 200
        await dirty(f, range(base, base + 10))
        await asyncio.sleep(0.01)
        if round_ >= 5:
            samples.append(clean_share(env))
    await asyncio.sleep(0.2)
    samples.sort()
    assert samples[len(samples) // 2] >= 0.6, samples  # at or above target most of the time
    assert samples[0] >= 0.45, samples  # and never far below it
    assert clean_share(env) >= 0.6
    st = worker.status()
    assert st.running and st.active and st.runs > 0 and st.pages > 0 and st.failures == 0
    assert env.pool.stat().trickle_pages == st.pages
    await f.close()


async def test_only_one_trickle_worker_acts_per_environment(env: aiodbenv.Env, home: str) -> None:
    other = await aiodbenv.Env.open(home)
    try:
        a = env.start_trickle(TrickleSettings(percent=50, interval=0.02))
        b = other.start_trickle(TrickleSettings(percent=50, interval=0.02))
        await asyncio.sleep(0.2)
        assert a.status().active != b.status().active  # exactly one holds the lease
        with pytest.raises(InvalidArgument):
            env.start_trickle(50)
        active, passive = (a, b) if a.status().active else (b, a)
        await active.stop()  # releasing the lease lets the other one take over
        await asyncio.sleep(0.2)
        assert passive.status().active
    finally:
        await other.close(nosync=True)


async def test_a_cancelled_stop_passes_its_cancellation_on(env: aiodbenv.Env) -> None:
    """``stop()`` waits for the worker's task to end; cancelled meanwhile, it raises
    CancelledError (it swallowed it, with the task's own, so its caller went on as if
    nothing had happened), and the worker still ends."""
    worker = env.start_trickle(TrickleSettings(percent=50, interval=0.02))
    await asyncio.sleep(0.05)
    real = worker._task
    assert real is not None
    real.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await real

    async def slow_to_end() -> None:  # as a worker finishing a write batch
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
            raise

    worker._task = asyncio.ensure_future(slow_to_end())
    await asyncio.sleep(0)
    stopper = asyncio.ensure_future(worker.stop())
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await worker.stop()  # idempotent; it ends
    assert worker._task is None or worker._task.done()


async def test_checkpoint_writes_every_page_dirty_at_its_start_and_fsyncs(
    env: aiodbenv.Env, home: str
) -> None:
    f = await env.pool.open_file("w.db")
    g = await env.pool.open_file("x.db", create=True)
    await dirty(f, range(0, 150, 3))
    async with g.get(9, create=True) as p:
        p.data[0] = 1
    assert env.pool.stat().page_dirty == 51
    with _io.inject("fsync", None) as fsyncs:
        result = await env.checkpoint(spread=0.1)
    assert result.written == 51 and env.pool.stat().page_dirty == 0
    assert fsyncs.calls == 2  # each written file once, at the end
    health = env.health()
    assert health.ok and health.last_checkpoint is not None
    assert abs(health.last_checkpoint - time.time()) < 5
    with open(os.path.join(home, "w.db"), "rb") as raw:
        data = raw.read()
    assert all(data[i * PS : i * PS + 4] == i.to_bytes(4, "little") for i in range(0, 150, 3))
    await f.close()
    await g.close()
    os.remove(os.path.join(home, "x.db"))


async def test_checkpoint_waits_for_a_briefly_pinned_page(env: aiodbenv.Env) -> None:
    f = await env.pool.open_file("w.db")
    await dirty(f, range(5))
    page = await f.get(2)

    async def unpin_soon() -> None:
        await asyncio.sleep(0.03)
        await f.unpin(page)

    releaser = asyncio.ensure_future(unpin_soon())
    result = await env.checkpoint()
    await releaser
    assert result.written == 5 and env.pool.stat().page_dirty == 0
    await f.close()


async def test_checkpoint_worker_by_time_and_by_kbytes(env: aiodbenv.Env) -> None:
    f = await env.pool.open_file("w.db")
    worker = env.start_checkpoint(CheckpointSettings(interval=0.2, completion_target=0.5))
    await dirty(f, range(20))
    await asyncio.sleep(0.6)
    assert worker.status().runs >= 1 and env.pool.stat().page_dirty == 0
    await env.stop_workers()
    worker = env.start_checkpoint(CheckpointSettings(interval=3600, kbytes=16 * PS // 1024))
    await asyncio.sleep(0.05)
    await dirty(f, range(40, 60))  # 20 pages > 16 pages' worth: triggers long before an hour
    deadline = time.monotonic() + 5
    while worker.status().runs == 0:
        assert time.monotonic() < deadline, "the kbytes trigger never fired"
        await asyncio.sleep(0.02)
    assert env.pool.stat().checkpoint_runs >= 2
    await f.close()


async def test_write_failure_is_reported_retried_and_pages_stay_dirty(
    env: aiodbenv.Env, home: str, caplog: pytest.LogCaptureFixture
) -> None:
    f = await env.pool.open_file("w.db")
    await dirty(f, range(10))
    with caplog.at_level(logging.ERROR, logger="aiodbenv"):
        with _io.inject("pwrite", errno.ENOSPC) as fault:
            worker = env.start_checkpoint(CheckpointSettings(interval=0.05, completion_target=0))
            deadline = time.monotonic() + 5
            while worker.status().failures < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert fault.fired >= 2
            st = worker.status()
            assert st.consecutive_failures >= 2 and "no space left" in (st.last_error or "")
            health = env.health()
            assert not health.ok and not health.workers[0].healthy
            assert env.pool.stat().page_dirty == 10  # nothing marked clean that is not on disk
            assert env.pool.stat().checkpoint_failures >= 2
        assert "checkpoint failed" in caplog.text
    deadline = time.monotonic() + 10  # the fault is gone: the back-off ends, the pages go out
    while env.pool.stat().page_dirty or not env.health().ok:
        assert time.monotonic() < deadline, worker.status()
        await asyncio.sleep(0.05)
    assert env.health().ok
    with open(os.path.join(home, "w.db"), "rb") as raw:
        assert raw.read(4) == (0).to_bytes(4, "little")
        raw.seek(9 * PS)
        assert raw.read(4) == (9).to_bytes(4, "little")
    await f.close()


async def test_close_stops_workers_and_takes_a_final_checkpoint(home: str) -> None:
    async def opener() -> aiodbenv.Env:
        return await aiodbenv.Env.open(
            home, create=True, trickle=30, checkpoint=CheckpointSettings(interval=3600)
        )

    env = await asyncio.ensure_future(opener())  # opened in one task...
    async with env.pool.open_file("c.db", create=True) as f:
        for i in range(8):
            async with f.get(i, create=True) as p:
                p.data[0] = 7
    assert env.pool.stat().page_dirty == 8
    await asyncio.ensure_future(env.close())  # ...closed in another
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("aiodbenv-")]
    async with aiodbenv.Env.open(home) as again:
        assert again.pool.stat().page_dirty == 0  # the final checkpoint wrote them
        assert again.health().last_checkpoint is not None
    with open(os.path.join(home, "c.db"), "rb") as raw:
        assert raw.read(1) == b"\x07"
    # nosync skips it
    env = await aiodbenv.Env.open(home, checkpoint=3600)
    async with env.pool.open_file("c.db") as f:
        async with f.get(0) as p:
            p.data[0] = 8
            p.mark_dirty()
    await env.close(nosync=True)
    with open(os.path.join(home, "c.db"), "rb") as raw:
        assert raw.read(1) == b"\x07"
    # The change is only in the cache now: remove refuses to drop it unless forced.
    with pytest.raises(aiodbenv.Busy, match=r"1 dirty page\(s\) in its cache"):
        await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home) as again:
        assert again.pool.stat().page_dirty == 1  # the refused remove changed nothing
    await aiodbenv.Env.remove(home, force=True)
    os.remove(os.path.join(home, "c.db"))


async def test_cancelled_checkpoint_leaves_pages_dirty_or_written(env: aiodbenv.Env) -> None:
    f = await env.pool.open_file("w.db")
    await dirty(f, range(200))
    with _io.inject("pwrite", None, delay=0.05):
        task = asyncio.ensure_future(env.checkpoint(spread=1.0))
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.sleep(0.2)  # the batch under way finishes in the background
    st = env.pool.stat()
    assert 0 < st.page_dirty < 200 and st.page_out == 200 - st.page_dirty
    await env.checkpoint()  # idempotent: the rest goes out
    assert env.pool.stat().page_dirty == 0
    await f.close()


def test_settings_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        TrickleSettings(percent=0).check()
    with pytest.raises(InvalidArgument):
        CheckpointSettings(interval=0).check()
    with pytest.raises(InvalidArgument):
        CheckpointSettings(completion_target=1.5).check()


CHECKPOINT_CMD = [sys.executable, "-m", "aiodbenv", "checkpoint"]


async def test_checkpoint_command_joins_and_keeps_the_environment_clean(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    f = await env.pool.open_file("d.db", create=True)
    proc = subprocess.Popen(
        CHECKPOINT_CMD + ["-h", home, "-p", "0.005"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await asyncio.sleep(1.0)  # the worker process joins
        for round_ in range(3):
            for i in range(20):
                async with f.get(i, create=True) as p:
                    p.data[0] = round_ + 1
                    p.mark_dirty()
            deadline = time.monotonic() + 10
            while env.pool.stat().page_dirty:
                assert time.monotonic() < deadline, "the checkpoint process never wrote them"
                await asyncio.sleep(0.05)
        assert env.pool.stat().checkpoint_runs >= 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "checkpoint worker stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    with open(os.path.join(home, "d.db"), "rb") as raw:
        assert raw.read(1) == b"\x03"
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home)
    os.remove(os.path.join(home, "d.db"))


async def test_checkpoint_command_takes_a_final_checkpoint_when_stopped(home: str) -> None:
    """Pages dirtied after the last round (here: before the first, 10 minutes away) are
    written when the command is stopped, so a remove afterwards loses nothing."""
    env = await aiodbenv.Env.open(home, create=True)
    f = await env.pool.open_file("d.db", create=True)
    proc = subprocess.Popen(
        CHECKPOINT_CMD + ["-h", home, "-p", "10"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while env.stat().handles < 2:  # the command has joined
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the checkpoint command never joined"
            await asyncio.sleep(0.05)
        async with f.get(3, create=True) as p:
            p.data[0:4] = b"last"
            p.mark_dirty()
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err
        assert "final checkpoint" in out
        assert env.pool.stat().page_dirty == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    with open(os.path.join(home, "d.db"), "rb") as raw:
        raw.seek(3 * 4096)
        assert raw.read(4) == b"last"
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home)
    os.remove(os.path.join(home, "d.db"))


async def test_checkpoint_once_and_errors(home: str) -> None:
    r = subprocess.run(
        CHECKPOINT_CMD + ["-h", home, "-1"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "no environment" in r.stderr and r.stderr.count("\n") == 1
    async with aiodbenv.Env.open(home, create=True) as env:
        async with env.pool.open_file("o.db", create=True) as f:
            async with f.get(3, create=True):
                pass
            r = subprocess.run(
                CHECKPOINT_CMD + ["-h", home, "-1"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            assert "1 pages written" in r.stdout
            assert env.pool.stat().page_dirty == 0
    await aiodbenv.Env.remove(home)
    os.remove(os.path.join(home, "o.db"))


async def test_watch_refreshes_statistics(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True):
        r = subprocess.run(
            [sys.executable, "-m", "aiodbenv", "watch", "-h", home, "-i", "0.1", "-c", "3"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("hit ratio") == 3
    await aiodbenv.Env.remove(home)
