"""Transactions between processes: no lost update on a shared counter, a deadlock between two
processes ends with Deadlock in one and a commit in the other, a SIGKILLed latch holder is
released by the reaper with its changes gone, and a process killed inside a commit either
panics the environment (batch possibly in the log, not all in the buffers) or, once its
latches are released, leaves its commit whole."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess

import pytest

import aiodbenv
from aiodbenv import Deadlock
from tests.conftest import spawn

PS = 4096

COUNTER = """
import asyncio, os, struct, sys
import aiodbenv

async def main():
    home, n, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    print("ready", flush=True)
    while not os.path.exists(go):
        await asyncio.sleep(0.001)
    for _ in range(n):
        async with env.txn(durability="nosync") as tx:
            p = await tx.page(f, 0)
            (v,) = struct.unpack_from("<Q", p.data, 64)
            p.data[64:72] = struct.pack("<Q", v + 1)
    st = env.txn_stat(handle=True)
    await f.close()
    await env.close()
    print("done", st.commits_nosync, flush=True)

asyncio.run(main())
"""


def line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    out = p.stdout.readline().strip()
    if not out:
        assert p.stderr is not None
        raise AssertionError(p.stderr.read())
    return out


async def aline(p: subprocess.Popen[str]) -> str:
    return await asyncio.to_thread(line, p)


async def open_env(home: str) -> tuple[aiodbenv.Env, aiodbenv.PoolFile]:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    async with env.txn() as tx:
        for i in range(4):
            await tx.page(f, i, create=True)
    return env, f


async def close_env(home: str, env: aiodbenv.Env, f: aiodbenv.PoolFile) -> None:
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)


async def value(f: aiodbenv.PoolFile, pgno: int, off: int = 64) -> int:
    async with f.get(pgno, latch=True) as p:
        return int(struct.unpack_from("<Q", p.data, off)[0])


@pytest.mark.parametrize("n", [pytest.param(1000, marks=pytest.mark.slow), 300])
async def test_two_processes_add_to_one_counter(
    home: str, procs: list[subprocess.Popen[str]], n: int
) -> None:
    env, f = await open_env(home)
    go = os.path.join(home, "go")
    for _ in range(2):
        procs.append(spawn(COUNTER, home, str(n), go))
    for p in procs:
        assert await aline(p) == "ready"
    open(go, "w").close()
    for p in procs:
        assert await aline(p) == f"done {n}"
        assert await asyncio.to_thread(p.wait, 120) == 0
    assert await value(f, 0) == 2 * n  # no update lost
    # The environment's statistics count both (closed) processes' commits.
    mine = env.txn_stat(handle=True)
    assert env.txn_stat().commits_nosync - mine.commits_nosync == 2 * n
    await close_env(home, env, f)


DEADLOCK = """
import asyncio, os, sys
import aiodbenv

async def main():
    home = sys.argv[1]
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    tx = await env.txn()
    (await tx.page(f, 1)).data[100] = 7
    print("holds 1", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    (await tx.page(f, 2)).data[100] = 7  # waits for the parent, which holds 2
    info = await tx.commit()
    await f.close()
    await env.close()
    print("committed", info.pages, flush=True)

asyncio.run(main())
"""


async def test_deadlock_between_two_processes(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    env, f = await open_env(home)
    child = spawn(DEADLOCK, home)
    procs.append(child)
    assert await aline(child) == "holds 1"
    tx = await env.txn()
    (await tx.page(f, 2)).data[100] = 9
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    await asyncio.sleep(0.2)  # the child now waits for page 2
    with pytest.raises(Deadlock):
        await tx.page(f, 1)  # held by the child, below page 2: refused, not waited for
    await tx.abort()
    assert await aline(child) == "committed 2"
    assert await asyncio.to_thread(child.wait, 60) == 0
    for pgno in (1, 2):
        async with f.get(pgno) as p:
            assert p.data[100] == 7  # the child's commit; the parent's 9 was aborted
    assert env.txn_stat().deadlocks == 1 and env.txn_stat().aborts == 1
    await close_env(home, env, f)


HOLDER = """
import asyncio, os, sys
import aiodbenv

async def main():
    home = sys.argv[1]
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    tx = await env.txn()
    (await tx.page(f, 0)).data[64:72] = b"PRIVATE!"
    print("holding", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_killed_latch_holder_is_released_by_the_reaper(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    env, f = await open_env(home)
    child = spawn(HOLDER, home)
    procs.append(child)
    assert await aline(child) == "holding"
    child.send_signal(signal.SIGKILL)
    await asyncio.to_thread(child.wait, 30)
    async with env.txn(latch_timeout=30) as tx:  # waits until the reaper frees the latch
        p = await tx.page(f, 0)
        assert bytes(p.data[64:72]) == bytes(8)  # its change never reached shared memory
        p.data[64:72] = b"mine...."
    assert not env._core.panicked
    async with f.get(0) as pg:
        assert bytes(pg.data[64:72]) == b"mine...."
    await close_env(home, env, f)


COMMITTER = """
import asyncio, os, sys
import aiodbenv

async def main():
    home = sys.argv[1]
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=4096, lsn_offset=0)
    pages = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for i in range(pages):  # cached first: one page is then taken and built by the hot path
        async with f.get(i):
            pass
    async with env.txn() as tx:
        for i in range(pages):
            (await tx.page(f, i)).data[64:72] = b"COMMIT!!"
    print("survived", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    "step,logged",
    [
        ("txn.committing", False),  # before the log put: aborted
        ("txn.logged", True),  # in the log, not yet in the buffers: finished from the log
        ("txn.copied", True),  # one page of three copied: the others finished from the log
        ("txn.released", True),  # the latches released: the commit is whole in the buffers
    ],
)
async def test_kill_inside_a_commit(
    home: str, procs: list[subprocess.Popen[str]], step: str, logged: bool
) -> None:
    await kill_inside_a_commit(home, procs, step, logged, {})


@pytest.mark.one_loop  # the loops were covered above; this is the other process's commit
@pytest.mark.parametrize(
    "step,logged",
    [("txn.committing", False), ("txn.logged", True), ("txn.released", True)],
)
async def test_kill_inside_a_one_page_commit(
    home: str, procs: list[subprocess.Popen[str]], step: str, logged: bool
) -> None:
    # A one-page commit of a cached page: taken, built and marked by the compiled hot path.
    await kill_inside_a_commit(home, procs, step, logged, {}, pages=1)


@pytest.mark.one_loop  # the loops were covered above; this is the other process's commit
@pytest.mark.parametrize("step,logged", [("txn.committing", False), ("txn.copied", True)])
async def test_kill_inside_a_python_commit(
    home: str, procs: list[subprocess.Popen[str]], step: str, logged: bool
) -> None:
    # The Python commit (the compiled one's twin, AIODBENV_MUTEX=abi) where its steps differ
    # from the compiled one's: marking the pages, copying them in.
    await kill_inside_a_commit(home, procs, step, logged, {"AIODBENV_MUTEX": "abi"})


async def kill_inside_a_commit(
    home: str,
    procs: list[subprocess.Popen[str]],
    step: str,
    logged: bool,
    extra: dict[str, str],
    pages: int = 3,
) -> None:
    """A process is killed at ``step`` of a commit of ``pages`` pages. The others go on, the
    environment is not panicked: a commit whose record was ``logged`` is whole in every page
    (finished from the log by the reaper if it died before copying all of it in), one that
    was not is aborted (no page changed); and recovery after losing the regions agrees."""
    env, f = await open_env(home)
    child = spawn(
        COMMITTER, home, str(pages), env={"AIODBENV_TEST_SIGNAL": f"{step}:at:1:SIGKILL", **extra}
    )
    procs.append(child)
    assert await asyncio.to_thread(child.wait, 60) == -signal.SIGKILL
    want = b"COMMIT!!" if logged else bytes(8)
    async with env.txn(latch_timeout=30) as tx:  # waits until the reaper is done
        for i in range(pages):
            assert bytes((await tx.page(f, i)).data[64:72]) == want
    assert not env._core.panicked
    async with f.get(0, latch=True) as pg:
        assert bytes(pg.data[64:72]) == want
    if not logged:
        await close_env(home, env, f)
        return
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)  # the cache is lost; the log is not
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    f = await env.pool.open_file(env.resolve("data.db"), page_size=PS, lsn_offset=0)
    for i in range(pages):
        async with f.get(i) as pg:
            assert bytes(pg.data[64:72]) == want
    await close_env(home, env, f)
