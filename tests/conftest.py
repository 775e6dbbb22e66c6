"""Shared fixtures: homes and shm keys that must be left clean, child processes, loops.

Every async test runs under both the default asyncio loop and uvloop (the
``pytest_asyncio_loop_factories`` hook), and every test is checked for leftovers: a System V
segment that exists after the test but not before it fails the test (and is removed), as does
a region file left in a ``home``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import aiodbenv
from aiodbenv.region.remove import remove_environment

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run long soak and stress tests")


def pytest_sessionstart(session: pytest.Session) -> None:
    # CI's artifact run (.ci/run) sets AIODBENV_EXPECT_INSTALLED=1 to test the installed wheel;
    # a source tree that shadows it would make that run test the tree again, so refuse it.
    if os.environ.get("AIODBENV_EXPECT_INSTALLED") == "1":
        where = Path(aiodbenv.__file__).resolve().parent
        site = {Path(sysconfig.get_path(kind)).resolve() for kind in ("purelib", "platlib")}
        if where.parent not in site or sys.prefix == sys.base_prefix:
            pytest.exit(
                f"AIODBENV_EXPECT_INSTALLED=1, but aiodbenv was imported from {where}, "
                f"not from this virtualenv's site-packages {sorted(map(str, site))}",
                returncode=3,
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# -- event loops --------------------------------------------------------------------------------


#: Loops every async test runs under, unless AIODBENV_TEST_LOOPS names a subset (the reruns of
#: whole suites with another code path switched on: :func:`run_suites`).
LOOPS = ("asyncio", "uvloop")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    import uvloop

    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop,
        "uvloop": uvloop.new_event_loop,
    }
    # A test marked one_loop drives other processes and only waits for them: its own loop
    # does nothing a second loop would test again.
    names = ["asyncio"] if item.get_closest_marker("one_loop") else list(LOOPS)
    only = os.environ.get("AIODBENV_TEST_LOOPS")
    if only:
        wanted = only.split(",")
        unknown = set(wanted) - set(LOOPS)
        if unknown:
            raise pytest.UsageError(f"AIODBENV_TEST_LOOPS names unknown loops {sorted(unknown)}")
        names = [n for n in names if n in wanted] or names
    return {n: factories[n] for n in names}


# -- leftovers ----------------------------------------------------------------------------------


KEY_BASE = 0x6A000000 + (os.getpid() % 4096) * 4096  # this run's shm keys: KEY_BASE + 0..4095


def _segments() -> dict[int, tuple[int, int]]:
    """shmid -> (key, creator pid) of every System V segment on the machine."""
    out = {}
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for line in f:
            fields = line.split()
            out[int(fields[1])] = (int(fields[0]), int(fields[4]))
    return out


def _ours(key: int, cpid: int) -> bool:
    # Only this run's keys, or segments this process made: other test runs on the machine
    # (and their leak checks) must not see each other's segments.
    return KEY_BASE <= key < KEY_BASE + 4096 or cpid == os.getpid()


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = _segments()
    yield
    leaked = {
        shmid: kc
        for shmid, kc in _segments().items()
        if shmid not in before and kc[0] != 0 and _ours(*kc)
    }
    for shmid in leaked:
        subprocess.run(["ipcrm", "-m", str(shmid)], check=False)
    assert not leaked, f"test left System V segments behind: {leaked}"


def _region_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("__db."))


@pytest.fixture
def home() -> Iterator[str]:
    """A fresh environment home; the test must remove its environment before it ends."""
    path = tempfile.mkdtemp(prefix="aiodbenv-test-")
    os.chmod(path, 0o755)  # other users (the modes tests) may look inside
    try:
        yield path
        left = _region_files(path)
        assert not left, f"test left region files in its home: {left}"
    finally:
        if _region_files(path):
            try:
                remove_environment(path, force=True)
            except Exception:
                pass
        shutil.rmtree(path, ignore_errors=True)


_keys = itertools.count()


@pytest.fixture
def shm_key() -> int:
    """A System V key no other test (or test run) uses; regions use key, key+1, ..."""
    return KEY_BASE + (next(_keys) * 64) % 4096


# -- processes ----------------------------------------------------------------------------------


def python(
    code: str,
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    user: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (never a fork) and wait for it."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        env={**os.environ, **(env or {})},
        user=user,
    )


def run_suites(
    *files: str,
    env: dict[str, str],
    k: str | None = None,
    timeout: float = 900,
    loops: str = "asyncio",
) -> None:
    """Run the test files again in a fresh pytest process with ``env`` set (a switch that
    picks another code path: ``AIODBENV_MUTEX=abi``, ``AIODBENV_HOT=python``, ...) and assert
    that they passed. The rerun's async tests run under ``loops`` only (comma-separated): the
    switch changes a code path, not how it meets the loop, which the first run tests under
    both loops."""
    env = {"AIODBENV_TEST_LOOPS": loops, **env}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *files]
    if k is not None:
        argv += ["-k", k]
    r = subprocess.run(
        argv,
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


async def in_forked_child(work: Callable[[], Awaitable[object]]) -> object:
    """Fork; the child runs ``work()`` on the loop it inherits, sends its result (as JSON)
    through a pipe and leaves at once, never back into pytest. Returns that result; raises
    AssertionError with the child's traceback if ``work`` raised."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            os.write(wfd, json.dumps(await work()).encode())
            code = 0
        except BaseException:
            os.write(wfd, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = await asyncio.to_thread(r.read)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data.decode()
    return json.loads(data)


def lock_in_dying_thread(ptr: Any) -> None:
    """Lock the robust mutex at ``ptr`` in a thread that then ends holding it, and return once
    the kernel has ended the thread, so the mutex's next locker finds its holder dead
    (EOWNERDEAD). ``Thread.join`` alone is not enough: it returns when the thread's Python
    code is done, a moment before the kernel walks the thread's robust list, so a try-lock
    right after it can still see a live holder (EBUSY)."""
    from aiodbenv.region.mutex import lib

    assert os.path.isdir("/proc/self/task"), "needs /proc to see the thread end"
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(lib.pthread_mutex_lock(ptr)), daemon=True)
    t.start()
    t.join(10)
    assert got == [0] and not t.is_alive(), got
    task = f"/proc/self/task/{t.native_id}"
    for _ in range(1000):
        if not os.path.exists(task):
            return
        time.sleep(0.01)
    pytest.fail(f"thread {t.native_id} did not end")


def spawn(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``code`` in a fresh interpreter; the caller waits for or kills it."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env={**os.environ, **(env or {})},
    )


async def wait_stopped(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Wait until ``proc`` has stopped (SIGSTOP: state ``T`` in ``/proc``), e.g. at a point of
    an ``AIODBENV_TEST_SIGNAL`` plan; fails the test after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.05)):
        with open(f"/proc/{proc.pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        await asyncio.sleep(0.05)
    pytest.fail(f"process {proc.pid} did not stop")


def end_stopped(proc: subprocess.Popen[Any]) -> None:
    """Resume (SIGCONT) and kill ``proc``, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(30)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """A list to put started processes in; any still running at teardown is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
async def env(home: str) -> object:
    """An open file-backed environment; closed and removed in teardown (another task)."""
    e = await aiodbenv.Env.open(home, create=True)
    yield e
    await e.close()
    await aiodbenv.Env.remove(home)
