"""Robust process-shared mutexes: a SIGKILLed holder never wedges anyone."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import time

import pytest

import aiodbenv
from aiodbenv.region import mutex as mutex_mod
from aiodbenv.region.layout import ALLOC_CHUNK, MUTEX_SLOT, REGION_HEADER
from aiodbenv.region.mutex import SharedMutex, ffi

from .conftest import run_suites, spawn

SHARED_KINDS = ["file", "system"]


def kind_args(kind: str, shm_key: int) -> dict[str, object]:
    return {"region": kind, "shm_key": shm_key if kind == "system" else None}


@pytest.fixture
def lone_mutex() -> SharedMutex:
    mm = mmap.mmap(-1, 4096)
    words = memoryview(mm).cast("Q")
    m = SharedMutex(ffi.from_buffer(mm), words, 64, "test")
    m.initialize()
    return m


def test_lock_unlock_counts_nowaits(lone_mutex: SharedMutex) -> None:
    for _ in range(3):
        with lone_mutex:
            assert lone_mutex.holder_pid() == os.getpid()
    assert lone_mutex.stats() == (0, 3, 0)
    assert lone_mutex.holder_pid() == 0


def test_unlocking_a_free_mutex_is_an_error(lone_mutex: SharedMutex) -> None:
    with pytest.raises(OSError):
        lone_mutex.__exit__(None, None, None)


def test_slot_is_big_enough_for_pthread() -> None:
    assert MUTEX_SLOT.offset("waits") >= 40  # glibc x86-64 pthread_mutex_t


HOLD_ENV_MUTEX = """
import asyncio, sys, time, aiodbenv
async def main(home, which):
    env = await aiodbenv.Env.open(home)
    core = env._core
    if which == "env":
        core.mutex.__enter__()
    elif which == "bucket":
        f = await env.pool.open_file("data.db")
        cache, b = env.pool._core.locate(f._fidx, 7)
        cache.lock(b)  # the hot path's inline lock: no holder pid recorded
    else:
        core.alloc_mutexes[0].__enter__()
        if which == "alloc-torn":
            # Die in the middle of an allocator update: the chunk walk no longer tiles.
            start = core.regions[0].words[%(arena_start)d // 8]
            core.regions[0].words[start // 8 + %(chunk_size)d // 8] = 24
    print("locked", flush=True)
    time.sleep(60)
asyncio.run(main(sys.argv[1], sys.argv[2]))
""" % {"arena_start": REGION_HEADER.offset("arena_start"), "chunk_size": ALLOC_CHUNK.offset("size")}


def _hold_and_kill(home: str, which: str, procs: list[subprocess.Popen[str]]) -> None:
    holder = spawn(HOLD_ENV_MUTEX, home, which)
    procs.append(holder)
    assert holder.stdout is not None
    line = holder.stdout.readline().strip()
    assert line == "locked", holder.stderr.read() if holder.stderr else line
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_env_mutex_holder_killed_is_repaired(
    home: str, shm_key: int, kind: str, procs: list[subprocess.Popen[str]]
) -> None:
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    _hold_and_kill(home, "env", procs)
    t0 = time.monotonic()
    # Joining locks the environment mutex: EOWNERDEAD, repaired, carry on.
    async with aiodbenv.Env.open(home) as joiner:
        took = time.monotonic() - t0
        st = joiner.stat()
    assert took < 1.0
    assert st.mutex_owner_died == 1 and not st.panicked
    # Us: the dead holder never closed its handle, and the reaper uncounted it for it.
    assert env.stat().handles == 1
    assert env.pool.stat().procs_reaped == 1
    await env.close()
    await aiodbenv.Env.remove(home)


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_bucket_mutex_holder_killed_is_counted(
    home: str, shm_key: int, kind: str, procs: list[subprocess.Popen[str]]
) -> None:
    """A process killed holding a bucket mutex: the next pin through that bucket repairs it,
    and the environment's ``mutex_owner_died`` counts it like any other mutex."""
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    f = await env.pool.open_file("data.db", create=True)
    for i in range(8):
        async with f.get(i, create=True):
            pass
    assert env.stat().mutex_owner_died == 0
    _hold_and_kill(home, "bucket", procs)
    async with f.get(7) as page:  # EOWNERDEAD on the bucket: recounted, carry on
        assert page.pgno == 7
    assert env.stat().mutex_owner_died == 1 and not env.stat().panicked
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)  # the pages made here are dirty


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_allocator_holder_killed_is_repaired(
    home: str, shm_key: int, kind: str, procs: list[subprocess.Popen[str]]
) -> None:
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    core = env._core
    with core.alloc_mutexes[0]:
        first = core.allocators[0].alloc(100)
    _hold_and_kill(home, "alloc", procs)
    with core.alloc_mutexes[0]:  # EOWNERDEAD: the free list is rebuilt from the chunk walk
        second = core.allocators[0].alloc(100)
        core.allocators[0].free(first)
    assert second != first
    assert env.stat().mutex_owner_died == 1 and not env.stat().panicked
    await env.close()
    await aiodbenv.Env.remove(home)


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_holder_killed_mid_update_panics_the_environment(
    home: str, shm_key: int, kind: str, procs: list[subprocess.Popen[str]]
) -> None:
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    _hold_and_kill(home, "alloc-torn", procs)
    with pytest.raises(aiodbenv.RunRecovery, match="could not be repaired"):
        with env._core.alloc_mutexes[0]:
            pass
    with pytest.raises(aiodbenv.RunRecovery):
        env.stat()
    with pytest.raises(aiodbenv.RunRecovery):  # nobody else can join a panicked environment
        await aiodbenv.Env.open(home)
    with pytest.raises(aiodbenv.RunRecovery, match="recovery"):
        await env.close()
    await aiodbenv.Env.remove(home, force=True)


WAIT_FOR_MUTEX = """
import asyncio, sys, time, aiodbenv
async def main(home):
    env = await aiodbenv.Env.open(home)
    print("joined", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    with env._core.mutex:
        waited = time.monotonic() - t0
    print(f"{waited:.3f}", flush=True)
    await env.close()
asyncio.run(main(sys.argv[1]))
"""


async def test_second_process_blocks_until_unlock(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """Berkeley DB's mutex002: a locker in another process waits for the holder's unlock."""
    env = await aiodbenv.Env.open(home, create=True)
    waiter = spawn(WAIT_FOR_MUTEX, home)
    procs.append(waiter)
    assert waiter.stdout is not None and waiter.stdin is not None
    assert waiter.stdout.readline().strip() == "joined"
    before = env.stat().mutex_waits
    with env._core.mutex:
        waiter.stdin.write("go\n")
        waiter.stdin.flush()
        time.sleep(0.7)  # hold it; the waiter is blocked in another process
    out, err = waiter.communicate(timeout=10)
    assert waiter.returncode == 0, err
    assert float(out.strip()) >= 0.5
    assert env.stat().mutex_waits == before + 1
    await env.close()
    await aiodbenv.Env.remove(home)


# -- both bindings --------------------------------------------------------------------------------


def test_backend_is_the_one_asked_for() -> None:
    if os.environ.get("AIODBENV_MUTEX") == "abi":
        assert mutex_mod.BACKEND == "abi"
    elif shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the compiled binding cannot be built")
    else:
        assert mutex_mod.BACKEND == "compiled", "a compiler is present but the module is missing"


@pytest.mark.skipif(os.environ.get("AIODBENV_MUTEX") == "abi", reason="already the ABI run")
def test_suite_passes_with_the_abi_fallback() -> None:
    """Runs the mutex, environment and pool tests again with AIODBENV_MUTEX=abi: the ABI
    binding of pthread, and the pure-Python hit, unpin and miss paths of the pool (the miss,
    eviction, reaper and cancellation suites and the hypothesis model included)."""
    run_suites(
        "tests/test_mutex.py",
        "tests/test_env.py",
        "tests/test_pool.py",
        "tests/test_miss.py",
        "tests/test_alloc.py",
        "tests/test_reaper.py",
        "tests/test_pool_cancel.py",
        "tests/test_pool_model.py",
        "tests/test_writeback_faults.py",
        "tests/test_waits.py",
        env={"AIODBENV_MUTEX": "abi"},
        # Restarting a worker ten times tests the reaper, whose code is the same either way;
        # the workers' pins are what differs, and the other reaper tests take them. Of the
        # model's machines, the uvloop one is left to the first run (the rerun's loop is
        # asyncio's) and the one without the compiled hot path is the ABI run's default.
        k="not worker_killed_and_restarted and not UvloopSystem and not PythonHot",
        timeout=1200,
    )


@pytest.mark.skipif(os.environ.get("AIODBENV_MUTEX") == "abi", reason="already the ABI run")
def test_log_and_transaction_tests_pass_with_the_abi_fallback() -> None:
    """The log and transaction suites with AIODBENV_MUTEX=abi: the Python append, flush
    rounds, take, commit build and recovery a machine without a compiler runs (about 20 s)."""
    run_suites(
        "tests/test_log.py",
        "tests/test_log_pool.py",
        "tests/test_txn.py",
        "tests/test_txn_commit.py",
        "tests/test_txn_recover.py",
        "tests/test_txn_reserve.py",
        env={"AIODBENV_MUTEX": "abi"},
    )
