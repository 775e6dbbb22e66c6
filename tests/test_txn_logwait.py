"""A commit whose log append waits for another process's writer, which is stopped: before its
record is appended, the wait ends as an abort (LockTimeout), with nothing logged and nothing
panicked; after (the fsync or write), CommitNotDurable. And a record written straight to the
file that cannot be published panics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import aiodbenv
from aiodbenv import _io
from tests.conftest import end_stopped, wait_stopped

_STOPPED_WRITER = r"""
import asyncio, sys, aiodbenv
async def main():
    env = await aiodbenv.Env.open(sys.argv[1], log=True)
    f = await env.pool.open_file(sys.argv[2], page_size=4096, lsn_offset=0)
    while True:  # sync commits: it becomes the log writer, and stops itself in a round
        async with env.txn(durability="sync") as tx:
            p = await tx.page(f, 20)
            p.data[100:4000] = bytes([p.data[100] + 1 & 255]) * 3900
asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def _stopped_writer(
    home: str,
) -> AsyncIterator[tuple[aiodbenv.Env, aiodbenv.PoolFile, subprocess.Popen[str]]]:
    """An environment with 21 pages, and another process that took the log writer role and
    stopped itself (SIGSTOP) before its fdatasync; the log's ``wait_timeout`` is 1 s. The
    process is ended and the environment removed at the end."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    child = None
    try:
        path = env.resolve("s.db")
        f = await env.pool.open_file(path, create=True, lsn_offset=0)
        async with env.txn() as tx:
            for pg in range(21):
                (await tx.page(f, pg, create=True)).data[100:101] = b"a"
        child = subprocess.Popen(
            [sys.executable, "-c", _STOPPED_WRITER, home, path],
            env=dict(os.environ, AIODBENV_TEST_SIGNAL="fdatasync:before:5:SIGSTOP"),
        )
        await wait_stopped(child)
        env.log.wait_timeout = 1.0
        yield env, f, child
    finally:
        if child is not None:
            end_stopped(child)
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


async def test_a_commit_whose_log_writer_is_stopped_aborts_without_a_panic(home: str) -> None:
    """Another process holds the writer role and is stopped (SIGSTOP) before its fdatasync:
    commits that need buffer space get LockTimeout naming it after the log's
    ``wait_timeout``, each an abort (nothing appended, latches and pins released); the
    environment is not panicked, and goes on once the stopped process is gone. Before, such a
    commit panicked the environment."""
    async with _stopped_writer(home) as (env, f, child):
        with pytest.raises(aiodbenv.LockTimeout, match=str(child.pid)):
            for i in range(50):  # 8 full pages each: the buffer fills, the writer is stopped
                async with env.txn(durability="nosync") as tx:
                    for pg in range(8):
                        (await tx.page(f, pg)).data[200:4000] = bytes([i + 1]) * 3800
        assert not env._core.panicked
        assert env.pool.stat().page_pinned == 0
        end_stopped(child)
        env.log.wait_timeout = 30.0
        async with env.txn(latch_timeout=10) as tx:  # the writer role is taken over
            (await tx.page(f, 0)).data[100:101] = b"z"
        await env.log.flush()
        await f.close()


@pytest.mark.parametrize("durability", ["write_nosync", "sync"])
async def test_a_commit_whose_durability_wait_times_out_says_it_is_committed(
    home: str, durability: str
) -> None:
    """The record fits the buffer and is appended, the images land, the latches are
    released; then the write (or fsync) waits for another process's writer, which is stopped:
    CommitNotDurable, not LockTimeout (which means nothing changed: a caller retrying on it
    would apply the change twice). The commit is there, no panic."""
    async with _stopped_writer(home) as (env, f, child):
        tx = await env.txn(durability=durability)
        (await tx.page(f, 5)).data[200:204] = b"once"
        with pytest.raises(aiodbenv.CommitNotDurable, match="committed") as caught:
            await tx.commit()
        assert not isinstance(caught.value, aiodbenv.LockTimeout)
        assert tx.result is not None
        assert caught.value.pid == child.pid and caught.value.lsn == tx.result.lsn
        assert not env._core.panicked
        async with f.get(5, latch=True) as pg:
            assert bytes(pg.data[200:204]) == b"once"
        end_stopped(child)
        env.log.wait_timeout = 30.0
        await env.log.flush(tx.result.lsn)
        await f.close()


async def test_a_timeout_after_a_direct_record_was_written_panics(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record larger than the log buffer is written to the file by the writer before the
    append is published; a LockTimeout then (the log mutex held past ``wait_timeout``, as by a
    stopped process) may come after the record is in the file, so it is not an abort: the
    environment is panicked, and recovery applies the commit whole."""
    env = await aiodbenv.Env.open(home, create=True, log=True)  # a 32000-byte log buffer
    f = await env.pool.open_file(env.resolve("d.db"), create=True, lsn_offset=0)
    async with env.txn() as tx:
        for pg in range(10):
            (await tx.page(f, pg, create=True)).data[100:101] = b"a"
    await env.checkpoint()
    await env.checkpoint(force=True)  # the next change of each page is a full image
    env.log.wait_timeout = 1.0
    real, held = _io.pwritev, threading.Event()

    def hold() -> None:
        with env.log._c.mutex:
            held.set()
            time.sleep(2.5)

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        n = real(fd, buffers, offset)
        if sum(len(b) for b in buffers) > env.log.buffer_size and not held.is_set():
            threading.Thread(target=hold, daemon=True).start()
            held.wait(5)
        return n

    monkeypatch.setattr(_io, "pwritev", pwritev)
    with pytest.raises(aiodbenv.RunRecovery):
        async with env.txn(durability="sync") as tx:
            for pg in range(10):
                (await tx.page(f, pg)).data[16:4000] = bytes([pg + 1]) * 3984
    assert env._core.panicked
    monkeypatch.undo()
    await asyncio.sleep(2)  # the mutex is free again
    with pytest.raises(aiodbenv.RunRecovery):
        await env.close()
    await aiodbenv.Env.remove(home, force=True)
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    try:
        assert env.recovered is not None and env.recovered.batches >= 1
        f = await env.pool.open_file(env.resolve("d.db"), lsn_offset=0)
        for pg in range(10):
            async with f.get(pg) as p:
                assert bytes(p.data[16:20]) == bytes([pg + 1]) * 4
        await f.close()
    finally:
        await env.close()
        await aiodbenv.Env.remove(home, force=True)
