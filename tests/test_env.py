"""Env: create, join from another process, close, remove, in all three kinds of memory."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import time

import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv.errors import Busy, EnvNotFound, ForkedProcessError, InvalidArgument, RunRecovery

from .conftest import python, spawn

SHARED_KINDS = ["file", "system"]


def kind_args(kind: str, shm_key: int) -> dict[str, object]:
    return {"region": kind, "shm_key": shm_key if kind == "system" else None}


def segment_exists(shmid: int) -> bool:
    with open("/proc/sysvipc/shm") as f:
        next(f)
        return any(int(line.split()[1]) == shmid for line in f)


def shm_ids(env: aiodbenv.Env) -> list[int]:
    return [
        int(r.backing.rsplit(" ", 1)[1]) for r in env.stat().regions if r.backing.startswith("shm")
    ]


JOIN_AND_REPORT = """
import asyncio, json, sys, aiodbenv
async def main(home):
    async with aiodbenv.Env.open(home) as env:
        st = env.stat()
        print(json.dumps({"env_id": st.env_id, "handles": st.handles, "kind": st.kind,
                          "cache_size": st.cache_size, "page_size": st.page_size}))
asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_create_join_from_another_process_close_remove(
    home: str, shm_key: int, kind: str
) -> None:
    env = await aiodbenv.Env.open(
        home, create=True, cache_size=1 << 20, page_size=8192, **kind_args(kind, shm_key)
    )
    st = env.stat()
    assert st.kind == kind and st.handles == 1 and not st.panicked
    assert os.path.exists(os.path.join(home, "__db.001"))
    if kind == "system":
        # __db.001 holds only the record that finds the segment.
        assert os.path.getsize(os.path.join(home, "__db.001")) == 48
        assert st.regions[0].backing.startswith(f"shm key {shm_key:#x} ")
    ids = shm_ids(env)

    child = python(JOIN_AND_REPORT, home)
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    assert seen == {
        "env_id": st.env_id,
        "handles": 2,
        "kind": kind,
        "cache_size": 1 << 20,
        "page_size": 8192,
    }

    st = env.stat()
    assert st.handles == 1 and st.opens == 2
    await env.close()
    assert env.closed
    await aiodbenv.Env.remove(home)
    assert not [n for n in os.listdir(home) if n.startswith("__db.")]
    assert not any(segment_exists(i) for i in ids)


async def test_private_environment_admits_one_handle(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, region="private")
    assert env.kind == "private"
    assert not os.listdir(home), "a private environment writes no region files"
    with pytest.raises(Busy):
        await aiodbenv.Env.open(home, create=True, region="private")
    with pytest.raises(Busy):  # nor can a shared handle join it
        await aiodbenv.Env.open(home, create=True)
    other = python(
        """
        import asyncio, sys, aiodbenv
        async def main():
            try:
                await aiodbenv.Env.open(sys.argv[1], create=True, region="private")
            except aiodbenv.Busy as err:
                print("Busy", err)
        asyncio.run(main())
        """,
        home,
    )
    assert other.stdout.startswith("Busy"), other.stdout + other.stderr
    assert env.stat().handles == 1
    await env.close()
    # Once closed the home is free again.
    async with aiodbenv.Env.open(home, create=True, region="private") as again:
        assert again.stat().handles == 1
    await aiodbenv.Env.remove(home)


async def test_await_and_async_with_both_work(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True) as env:
        assert isinstance(env, aiodbenv.Env) and not env.closed
    assert env.closed
    env = await aiodbenv.Env.open(home)
    async with env:
        pass
    assert env.closed
    await env.close()  # closing twice is harmless
    with pytest.raises(InvalidArgument):
        env.stat()
    await aiodbenv.Env.remove(home)


async def test_open_in_one_task_close_in_another(home: str) -> None:
    env = await asyncio.ensure_future(_open(home))
    await asyncio.ensure_future(env.close())
    await asyncio.ensure_future(aiodbenv.Env.remove(home))


async def _open(home: str) -> aiodbenv.Env:
    return await aiodbenv.Env.open(home, create=True)


async def test_fixture_opened_env_is_usable(env: aiodbenv.Env) -> None:
    # The `env` fixture opens in its own task and closes in teardown.
    assert env.stat().handles == 1


async def test_home_from_db_home_and_relative_names(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_HOME", home)
    async with aiodbenv.Env.open(create=True) as env:
        assert env.home == home
        assert env.resolve("data.db") == os.path.join(home, "data.db")
        assert env.resolve("/abs/x") == "/abs/x"
    await aiodbenv.Env.remove()


async def test_joiner_inherits_creator_settings(home: str) -> None:
    async with aiodbenv.Env.open(
        home, create=True, cache_size=512 << 10, page_size=1024, mmap_size=4096, nommap=True
    ) as creator:
        async with aiodbenv.Env.open(
            home, create=True, cache_size=8 << 20, page_size=16384, mmap_size=1
        ) as joiner:
            s = joiner.settings
            assert (s.cache_size, s.page_size, s.mmap_size, s.nommap) == (
                512 << 10,
                1024,
                4096,
                True,
            )
            assert joiner.stat().env_id == creator.stat().env_id
    await aiodbenv.Env.remove(home)


async def test_join_with_another_kind_is_refused(home: str, shm_key: int) -> None:
    async with aiodbenv.Env.open(home, create=True, region="file"):
        with pytest.raises(InvalidArgument, match="file regions"):
            await aiodbenv.Env.open(home, region="system", shm_key=shm_key)
    await aiodbenv.Env.remove(home)


# -- Berkeley DB's env001: remove semantics ---------------------------------------------------


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_env001_remove_semantics_one_process(home: str, shm_key: int, kind: str) -> None:
    args = kind_args(kind, shm_key)
    # (a) open without create on an empty home fails
    with pytest.raises(EnvNotFound, match="no environment"):
        await aiodbenv.Env.open(home)
    # (b, c) create, close
    env = await aiodbenv.Env.open(home, create=True, **args)
    await env.close()
    # (d) reopen without create, close, remove with force
    env = await aiodbenv.Env.open(home)
    await env.close()
    await aiodbenv.Env.remove(home, force=True)
    assert not os.listdir(home)
    # (e1) an open handle: remove without force is refused, and changes nothing
    env = await aiodbenv.Env.open(home, create=True, **args)
    with pytest.raises(Busy) as busy:
        await aiodbenv.Env.remove(home)
    assert busy.value.errno == errno.EBUSY
    assert env.stat().handles == 1
    # (e2) remove with force succeeds; the handle's close reports the run-recovery error
    ids = shm_ids(env)
    await aiodbenv.Env.remove(home, force=True)
    assert not os.listdir(home)
    # Every RunRecovery says how to recover, with a log and without one.
    with pytest.raises(RunRecovery, match=r"recover=True.*else remove it"):
        env.stat()
    with pytest.raises(RunRecovery, match=r"recover=True.*else remove it"):
        await env.close()
    # Removed segments linger (keyless) only until the last process detaches.
    assert not any(segment_exists(i) for i in ids)
    # (f) an environment in a new subdirectory
    sub = os.path.join(home, "NEWDIR")
    os.mkdir(sub)
    async with aiodbenv.Env.open(sub, create=True, **args):
        pass
    await aiodbenv.Env.remove(sub)
    assert not os.listdir(sub)
    os.rmdir(sub)


HOLD_OPEN = """
import asyncio, sys, aiodbenv
async def main(home):
    env = await aiodbenv.Env.open(home)
    print("open", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # wait for the parent
    try:
        env.stat()
        print("stat ok", flush=True)
    except aiodbenv.RunRecovery as err:
        print("stat RunRecovery", err, flush=True)
    try:
        await env.close()
        print("close ok", flush=True)
    except aiodbenv.RunRecovery as err:
        print("close RunRecovery", err, flush=True)
asyncio.run(main(sys.argv[1]))
"""


def _tell(p: subprocess.Popen[str]) -> list[str]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out.splitlines()


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_env001_remove_semantics_two_processes(
    home: str, shm_key: int, kind: str, procs: list[subprocess.Popen[str]]
) -> None:
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    # (e3) handles in two processes; one closes; remove without force is still refused
    other = spawn(HOLD_OPEN, home)
    procs.append(other)
    assert other.stdout is not None and other.stdout.readline().strip() == "open"
    assert env.stat().handles == 2
    await env.close()
    with pytest.raises(Busy):
        await aiodbenv.Env.remove(home)
    assert _tell(other) == ["stat ok", "close ok"]
    await aiodbenv.Env.remove(home)
    assert not os.listdir(home)

    # (e4) two processes; remove with force; both handles fail with run-recovery
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    other = spawn(HOLD_OPEN, home)
    procs.append(other)
    assert other.stdout is not None and other.stdout.readline().strip() == "open"
    await aiodbenv.Env.remove(home, force=True)
    assert not os.listdir(home)
    lines = _tell(other)
    assert lines[0].startswith("stat RunRecovery") and "recovery" in lines[0]
    assert lines[1].startswith("close RunRecovery")
    with pytest.raises(RunRecovery, match="recovery"):
        await env.close()


async def test_remove_is_not_blocked_by_a_killed_process(home: str) -> None:
    """A SIGKILLed holder cannot decrement the handle count itself: the next open reaps its
    registry slot and corrects the count; liveness for remove comes from its flock."""
    env = await aiodbenv.Env.open(home, create=True)
    await env.close()
    holder = spawn(HOLD_OPEN, home)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=10)
    async with aiodbenv.Env.open(home) as env:
        assert env.stat().handles == 1  # the dead process is no longer counted...
    await aiodbenv.Env.remove(home)  # ...and it holds nothing, so remove goes ahead
    assert not os.listdir(home)


async def test_forked_child_gets_a_clear_error(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only checks the refusal, then leaves without cleanup
        os.close(r)
        try:
            env.stat()
            os.write(w, b"no error")
        except ForkedProcessError as err:
            os.write(w, b"ForkedProcessError " + str(err).encode())
        except BaseException as err:  # pragma: no cover - reported to the parent
            os.write(w, repr(err).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    message = os.read(r, 4096).decode()
    os.close(r)
    assert status == 0
    assert message.startswith("ForkedProcessError") and "open the environment again" in message
    assert env.stat().handles == 1  # the parent's handle is untouched
    await env.close()
    await aiodbenv.Env.remove(home)


async def test_joiner_waits_while_creator_builds(home: str) -> None:
    # The creator's preallocation is slow; a joiner arriving meanwhile waits, then joins.
    with _io.inject("fallocate", None, delay=1.0, times=1):
        creator = asyncio.ensure_future(_open(home))
        # Wait for the creator to be inside its slow build (a loaded machine may take a while
        # to start the thread), bounded.
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(home, "__db.001")):
            assert time.monotonic() < deadline, "the creator never started building"
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        joiner = await aiodbenv.Env.open(home)
        waited = time.monotonic() - t0
        env = await creator
    assert waited > 0.1
    assert joiner.stat().env_id == env.stat().env_id and env.stat().handles == 2
    await joiner.close()
    await env.close()
    await aiodbenv.Env.remove(home)


async def test_cancelled_open_leaves_nothing_open(home: str) -> None:
    with _io.inject("fallocate", None, delay=0.3, times=1):
        task = asyncio.ensure_future(_open(home))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # The creating thread finishes and its handle is closed behind the scenes.
    deadline = time.monotonic() + 5
    while True:
        try:
            await aiodbenv.Env.remove(home)
            break
        except Busy:
            assert time.monotonic() < deadline, "the abandoned handle was never closed"
            await asyncio.sleep(0.02)
    assert not os.listdir(home)


async def test_failed_create_leaves_no_files(home: str) -> None:
    with _io.inject("fallocate", errno.ENOSPC):
        with pytest.raises(aiodbenv.NoSpace):
            await aiodbenv.Env.open(home, create=True)
    assert not os.listdir(home)


def _mount_tmpfs(path: str, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True
    )
    return r.returncode == 0


async def test_full_disk_is_enospc_not_sigbus(home: str) -> None:
    """On a real full filesystem (a 32 KiB tmpfs), creation fails with NoSpace, no SIGBUS."""
    disk = os.path.join(home, "small")
    os.mkdir(disk)
    if not _mount_tmpfs(disk, "32k"):
        os.rmdir(disk)
        pytest.skip("needs root and permission to mount a tmpfs (the I/O-seam test covers it)")
    try:
        with pytest.raises(aiodbenv.NoSpace) as err:
            await aiodbenv.Env.open(disk, create=True)
        assert err.value.errno == errno.ENOSPC
        assert not os.listdir(disk)
    finally:
        subprocess.run(["umount", disk], check=True)
        os.rmdir(disk)


async def test_concurrent_closes_of_one_handle(home: str) -> None:
    for _ in range(20):
        env = await aiodbenv.Env.open(home, create=True)
        await asyncio.gather(env.close(), env.close(), env.close())
        assert env.closed
    async with aiodbenv.Env.open(home) as env:
        assert env.stat().handles == 1  # no close was counted twice
    await aiodbenv.Env.remove(home)


async def test_forked_child_does_not_keep_the_environment_busy(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child inherits the handle's descriptors, then just waits
        os.write(w, b"x")  # fork's after-in-child hooks have run by now
        time.sleep(30)
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        await env.close()
        await aiodbenv.Env.remove(home)  # not Busy: the child dropped the inherited home lock
        assert not os.listdir(home)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize(
    ("mode", "dir_mode"), [(0o600, 0o700), (0o660, 0o770), (0o644, 0o755), (0o640, 0o750)]
)
@pytest.mark.parametrize("kind", ["file", "private"])
async def test_create_makes_a_missing_home(home: str, mode: int, dir_mode: int, kind: str) -> None:
    """``create=True`` makes a missing home like ``mkdir -p``; the home gets exactly the
    directory permission that lets the classes ``mode`` admits reach the region files."""
    path = os.path.join(home, "a", "b", "home")
    async with aiodbenv.Env.open(path, create=True, mode=mode, region=kind) as env:
        assert env.home == path
        assert os.stat(path).st_mode & 0o7777 == dir_mode
        assert env.stat().mode == mode
        if kind == "file":
            assert os.path.exists(os.path.join(path, "__db.001"))
    await aiodbenv.Env.remove(path)
    assert os.path.isdir(path), "remove keeps the home, as for a home the caller made"
    assert os.listdir(path) == []


async def test_create_leaves_an_existing_home_alone(home: str) -> None:
    os.chmod(home, 0o751)
    async with aiodbenv.Env.open(home, create=True, mode=0o660):
        assert os.stat(home).st_mode & 0o7777 == 0o751
    await aiodbenv.Env.remove(home)
