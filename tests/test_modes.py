"""Exact modes: ``mode`` is the permission of every region file and segment, whatever the umask.

For file-backed and system-memory environments, every ``__db.NNN`` file and every System V
segment must carry exactly the ``mode`` given at creation (``st_mode & 0o777`` and the segment's
``shm_perm.mode & 0o777``), under a restrictive umask set in this process or in a child. Then
the mode is checked as another user where root can switch users (uid 65534, nobody): a mode that
leaves others out must refuse them with ``PermissionDenied``, ``0o666`` must let them join.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any

import pytest
import sysv_ipc

from aiodbenv import Env

from .conftest import python

KINDS = ["file", "system"]
MODES = [0o640, 0o600, 0o666, 0o604]
UMASKS = [0o077, 0o777]
NOBODY = 65534


def octal(value: int) -> str:
    return f"{value:#o}"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def kind_args(kind: str, shm_key: int) -> dict[str, Any]:
    return {"region": kind, "shm_key": shm_key} if kind == "system" else {"region": kind}


def region_files(home: str) -> list[str]:
    return sorted(os.path.join(home, n) for n in os.listdir(home) if n.startswith("__db."))


def file_modes(home: str) -> dict[str, int]:
    """Full ``st_mode`` of every region file (lstat: a region file is never a link)."""
    return {path: os.lstat(path).st_mode for path in region_files(home)}


def shm_id_of(backing: str) -> int:
    assert backing.startswith("shm key ") and " id " in backing, backing
    return int(backing.rsplit(" ", 1)[1])


def segment_modes(env: Env) -> dict[int, int]:
    """``mode`` of every segment of a system-memory environment, by segment id."""
    modes = {}
    for region in env.stat().regions:
        shm = sysv_ipc.attach(shm_id_of(region.backing))
        try:
            modes[shm.id] = shm.mode
        finally:
            shm.detach()
    return modes


def assert_exact_modes(home: str, env: Env, kind: str, mode: int) -> None:
    files = file_modes(home)
    assert os.path.join(home, "__db.001") in files
    for path, st_mode in files.items():
        assert stat.S_ISREG(st_mode), f"{path} is not a regular file"
        assert st_mode & 0o777 == mode, (
            f"{path} has mode {octal(st_mode & 0o777)}, not {octal(mode)}"
        )
        assert st_mode & 0o7000 == 0, f"{path} has set-id or sticky bits: {octal(st_mode)}"
    st = env.stat()
    assert st.mode == mode
    if kind == "file":
        assert {r.backing for r in st.regions} <= set(files)
    else:
        segments = segment_modes(env)
        assert len(segments) == len(st.regions) >= 1
        for shm_id, shm_mode in segments.items():
            assert shm_mode & 0o777 == mode, (
                f"segment {shm_id} has mode {octal(shm_mode & 0o777)}, not {octal(mode)}"
            )


# -- exact modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask{m:03o}")
@pytest.mark.parametrize("mode", MODES, ids=octal)
@pytest.mark.parametrize("kind", KINDS)
async def test_exact_mode(home: str, shm_key: int, kind: str, mode: int, mask: int) -> None:
    with umask(mask):
        env = await Env.open(home, create=True, mode=mode, **kind_args(kind, shm_key))
    try:
        assert_exact_modes(home, env, kind, mode)
        # A second handle in this process sees the same and changes nothing.
        async with Env.open(home) as again:
            assert again.stat().mode == mode
        assert_exact_modes(home, env, kind, mode)
    finally:
        await env.close()
        await Env.remove(home)
    assert region_files(home) == []


_CHILD_CREATE = """
import asyncio, os, sys
import aiodbenv

async def main():
    os.umask(int(sys.argv[2], 8))
    env = await aiodbenv.Env.open(sys.argv[1], create=True, mode=int(sys.argv[3], 8),
                                  **({"region": "system", "shm_key": int(sys.argv[5])}
                                     if sys.argv[4] == "system" else {}))
    await env.close()  # closed, not removed: the parent checks what is left
    print("created")

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", [0o640, 0o666], ids=octal)
@pytest.mark.parametrize("kind", KINDS)
async def test_exact_mode_under_a_childs_umask(
    home: str, shm_key: int, kind: str, mode: int
) -> None:
    """The creator is a fresh process whose umask (0o277) would strip most bits."""
    r = python(_CHILD_CREATE, home, "277", octal(mode)[2:], kind, str(shm_key), timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "created", r.stderr
    env = await Env.open(home)
    try:
        assert env.kind == kind
        assert_exact_modes(home, env, kind, mode)
    finally:
        await env.close()
        await Env.remove(home)
    assert region_files(home) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_joiners_mode_changes_nothing(home: str, shm_key: int, kind: str) -> None:
    """Only the creator's mode counts: a joiner with another mode (and umask) chmods nothing."""
    env = await Env.open(home, create=True, mode=0o640, **kind_args(kind, shm_key))
    try:
        with umask(0o000):
            async with Env.open(home, create=True, mode=0o666, **kind_args(kind, shm_key)) as j:
                assert j.stat().mode == 0o640
        assert_exact_modes(home, env, kind, 0o640)
    finally:
        await env.close()
        await Env.remove(home)


# -- as another user ----------------------------------------------------------------------------

#: Imports everything an open needs while still root, then becomes nobody for good. Used when
#: nobody cannot execute this interpreter or read the venv (e.g. it lives under a 0700 /root).
_DROP_PRIVILEGES = f"""
import asyncio, concurrent.futures.thread, os, sys, time
import anyio, anyio.to_thread, anyio._backends._asyncio
import aiodbenv
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
assert os.getuid() == os.geteuid() == {NOBODY} and os.getgid() == os.getegid() == {NOBODY}
"""

_how_to_be_nobody: tuple[str, str] | None = None


def as_nobody_method() -> tuple[str, str]:
    """How a child can run as nobody here: ("user", "") through python(user=...), ("drop", "")
    by dropping privileges inside a root child after its imports, or ("skip", reason)."""
    global _how_to_be_nobody
    if _how_to_be_nobody is not None:
        return _how_to_be_nobody
    if os.geteuid() != 0:
        _how_to_be_nobody = ("skip", "needs root to switch users")
        return _how_to_be_nobody
    probe = "import os, aiodbenv, sysv_ipc; print(os.geteuid())"
    try:
        r = python(probe, user=NOBODY, timeout=30)
        if r.returncode == 0 and r.stdout.strip() == str(NOBODY):
            _how_to_be_nobody = ("user", "")
            return _how_to_be_nobody
        why = r.stderr.strip().splitlines()[-1:] or ["no output"]
    except OSError as err:  # e.g. nobody may not execute the interpreter
        why = [str(err)]
    r = python(_DROP_PRIVILEGES + "print(os.geteuid())", timeout=30)
    if r.returncode == 0 and r.stdout.strip() == str(NOBODY):
        _how_to_be_nobody = ("drop", "")
    else:
        _how_to_be_nobody = (
            "skip",
            f"the interpreter or venv is not usable by uid {NOBODY} ({why[0]}) and dropping "
            f"privileges in a child failed: {r.stderr.strip()[-300:]}",
        )
    return _how_to_be_nobody


def need_nobody(home: str) -> None:
    method, reason = as_nobody_method()
    if method == "skip":
        pytest.skip(reason)
    path = home
    while True:  # nobody must reach the home
        st = os.stat(path)
        if not st.st_mode & stat.S_IXOTH:
            pytest.skip(f"{path} is not searchable by others ({octal(st.st_mode & 0o777)})")
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if os.stat(home).st_mode & 0o777 != 0o755:
        pytest.skip(f"the home must be 0o755 for this test, not {octal(os.stat(home).st_mode)}")


def run_as_nobody(code: str, *args: str) -> Any:
    method, _ = as_nobody_method()
    if method == "user":
        prelude = "import asyncio, os, sys, time\nimport aiodbenv\n"
        return python(prelude + code, *args, user=NOBODY, timeout=30)
    return python(_DROP_PRIVILEGES + code, *args, timeout=30)


_CHILD_JOIN = """
async def main():
    home, create = sys.argv[1], sys.argv[2] == "1"
    assert os.geteuid() == 65534
    try:
        env = await aiodbenv.Env.open(home, create=create)
    except Exception as err:
        print(type(err).__name__, str(err).replace(" ", "_"))
        return
    st = env.stat()
    await env.close()
    print("opened", st.handles, st.kind, oct(st.mode))

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (0o600, "PermissionDenied"),
        (0o640, "PermissionDenied"),
        (0o604, "PermissionDenied"),
        (0o666, "opened"),
    ],
    ids=lambda v: octal(v) if isinstance(v, int) else v,
)
@pytest.mark.parametrize("kind", KINDS)
async def test_join_as_another_user(
    home: str, shm_key: int, kind: str, mode: int, expected: str
) -> None:
    need_nobody(home)
    env = await Env.open(home, create=True, mode=mode, **kind_args(kind, shm_key))
    try:
        files = file_modes(home)
        r = run_as_nobody(_CHILD_JOIN, home, "0")
        assert r.returncode == 0, r.stderr
        out = r.stdout.split()
        assert out[0] == expected, f"mode {octal(mode)} as nobody: {r.stdout}{r.stderr}"
        if expected == "opened":
            assert out[1:] == ["2", kind, octal(mode)]  # it joined ours, next to our handle
        assert env.stat().handles == 1  # the other user's handle is gone again
        assert not env.stat().panicked
        assert file_modes(home) == files  # nobody chmodded anything
        assert_exact_modes(home, env, kind, mode)
    finally:
        await env.close()
        await Env.remove(home)
    assert region_files(home) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_join_as_another_user_with_create_flag(home: str, shm_key: int, kind: str) -> None:
    """``create=True`` only creates an environment that does not exist: joining an existing
    0o666 environment in a home the user may not write must work as it does without it."""
    need_nobody(home)
    env = await Env.open(home, create=True, mode=0o666, **kind_args(kind, shm_key))
    try:
        r = run_as_nobody(_CHILD_JOIN, home, "1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == "opened", f"create=True as nobody: {r.stdout}{r.stderr}"
        assert env.stat().handles == 1
    finally:
        await env.close()
        await Env.remove(home)


async def test_segment_mode_is_checked_too(home: str, shm_key: int) -> None:
    """A reference file others may open does not let them into a 0o600 segment."""
    need_nobody(home)
    env = await Env.open(home, create=True, mode=0o600, region="system", shm_key=shm_key)
    try:
        os.chmod(os.path.join(home, "__db.001"), 0o666)
        r = run_as_nobody(_CHILD_JOIN, home, "0")
        assert r.returncode == 0, r.stderr
        out = r.stdout.split()
        assert out[0] == "PermissionDenied", r.stdout + r.stderr
        assert "shm" in out[1], r.stdout
        assert env.stat().handles == 1
        assert all(m & 0o777 == 0o600 for m in segment_modes(env).values())
    finally:
        await env.close()
        await Env.remove(home)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o666, 0o604])
async def test_open_file_create_mode_is_exact(home: str, mode: int) -> None:
    """``open_file(create=True, mode=...)`` gives a new data file exactly ``mode`` under a
    umask that would strip bits, and leaves an existing file's mode alone."""
    async with Env.open(home, create=True) as env:
        path = os.path.join(home, "data.db")
        with umask(0o077):
            f = await env.pool.open_file(path, create=True, mode=mode)
        await f.close()
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        os.chmod(path, 0o640)
        with umask(0o000):
            f = await env.pool.open_file(path, create=True, mode=0o666)  # exists: kept
        await f.close()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    await Env.remove(home)
