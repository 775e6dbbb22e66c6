"""Bad input must get a clear error, and nothing else.

Every case below hands aiodbenv something wrong (a region file that is empty, truncated,
random, another program's, a FIFO, a symlink, from a future layout; a home that is missing, a
file or not writable; a System V key that is taken; a bad setting) and checks three things:

- the error is the exact typed aiodbenv error for the case (not a bare ``OSError``,
  ``ValueError`` or a hang);
- it comes in under one second;
- nothing that is not ours was written to: foreign files and segments keep their bytes, their
  ``mtime_ns``/``ctime_ns`` and their mode, and the home gains no files.

Each test cleans up what it made: environments are removed (with force where the environment
is broken), foreign files and segments are deleted by the test itself.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sysv_ipc

from aiodbenv import (
    Busy,
    CacheFull,
    ConfigError,
    CorruptRegion,
    Env,
    EnvNotFound,
    InvalidArgument,
    RunRecovery,
    ShmKeyInUse,
    VersionMismatch,
)
from aiodbenv.region.layout import (
    ENV_HEADER,
    LAYOUT_VERSION,
    REGION_HEADER,
    REGION_MAGIC,
    SHM_REF,
    SHM_REF_MAGIC,
    WORD,
)

from .conftest import python, spawn

#: Every error must arrive within this many seconds.
LIMIT = 1.0
#: An open that takes longer than this is a hang: give up on it (and fail).
HANG = 5.0
#: Bytes of region 1's headers: below this a region file cannot even be checked.
HEADERS = REGION_HEADER.size + ENV_HEADER.size
NOBODY = 65534

DB1 = "__db.001"


# -- helpers ------------------------------------------------------------------------------------


def describe(err: BaseException) -> str:
    return f"{type(err).__module__}.{type(err).__qualname__}: {err}"


async def fails_with(
    cls: type[BaseException], action: Callable[[], Awaitable[Any]], what: str = "open"
) -> BaseException:
    """Run ``action``; it must raise exactly ``cls`` within LIMIT seconds. Returns the error."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(HANG):
            result = await action()
    except Exception as err:
        elapsed = time.monotonic() - t0
        if isinstance(err, TimeoutError) and elapsed >= HANG:
            pytest.fail(f"{what} hung for {HANG} s instead of raising {cls.__name__}")
        assert type(err) is cls, f"{what}: expected {cls.__name__}, got {describe(err)}"
        assert elapsed < LIMIT, f"{what}: {cls.__name__} took {elapsed:.3f} s (limit {LIMIT} s)"
        assert str(err), f"{what}: {cls.__name__} has no message"
        return err
    if isinstance(result, Env):
        await result.close()  # do not leak the handle of an open that should have failed
    pytest.fail(f"{what} succeeded; expected {cls.__name__}")


async def open_fails(cls: type[BaseException], home: str, **kwargs: Any) -> BaseException:
    return await fails_with(cls, lambda: Env.open(home, **kwargs), f"Env.open({kwargs})")


def snapshot(path: str) -> tuple[object, ...]:
    """Everything a write, truncate, chmod or replace of ``path`` would change.

    ``path`` itself is not followed (a symlink is described as a link). A FIFO or socket is
    never opened.
    """
    st = os.lstat(path)
    data: bytes | None = None
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            data = f.read()
    elif stat.S_ISLNK(st.st_mode):
        data = os.readlink(path).encode()
    return (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, data)


def listing(home: str) -> list[str]:
    return sorted(os.listdir(home))


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


async def real_env(home: str, **kwargs: Any) -> str:
    """Create an environment in ``home``, close it, and return the path of its __db.001."""
    env = await Env.open(home, create=True, **kwargs)
    await env.close()
    return os.path.join(home, DB1)


def patch_word(path: str, offset: int, value: int) -> bytes:
    """Overwrite the word at ``offset`` of file ``path``; returns the old bytes."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, WORD, offset)
        os.pwrite(fd, value.to_bytes(WORD, "little"), offset)
        return old
    finally:
        os.close(fd)


def shm_id_of(backing: str) -> int:
    """The segment id in a RegionStat.backing of the form ``shm key 0x... id N``."""
    assert backing.startswith("shm key "), backing
    return int(backing.rsplit(" ", 1)[1])


def segment_state(shm: Any) -> tuple[object, ...]:
    return (
        shm.id,
        shm.key,
        shm.size,
        shm.mode,
        shm.uid,
        shm.last_change_time,
        shm.number_attached,
        shm.read(shm.size),
    )


def segment_exists(shm_id: int) -> bool:
    with open("/proc/sysvipc/shm") as f:
        next(f)
        return any(int(line.split()[1]) == shm_id for line in f)


# -- running as another user ----------------------------------------------------------------------

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
    """How a child can run as nobody here: ("user", "") with python(user=...), ("drop", "") by
    dropping privileges inside a root child, or ("skip", reason)."""
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
    except OSError as err:
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


def run_as_nobody(code: str, *args: str) -> Any:
    """Run ``code`` (which may use asyncio, os, sys, time, aiodbenv) as uid nobody."""
    method, reason = as_nobody_method()
    if method == "skip":
        pytest.skip(reason)
    prelude = "import asyncio, os, sys, time\nimport aiodbenv\n"
    if method == "user":
        return python(prelude + code, *args, user=NOBODY, timeout=30)
    return python(_DROP_PRIVILEGES + code, *args, timeout=30)


_CHILD_OPEN = """
async def main():
    home, create = sys.argv[1], sys.argv[2] == "1"
    t0 = time.monotonic()
    try:
        env = await aiodbenv.Env.open(home, create=create)
    except Exception as err:
        print(type(err).__name__, f"{time.monotonic() - t0:.3f}")
        return
    await env.close()
    print("opened", f"{time.monotonic() - t0:.3f}")
asyncio.run(main())
"""


# -- region files that are not environments ----------------------------------------------------


@pytest.mark.parametrize("create", [False, True])
async def test_empty_region_file(home: str, create: bool) -> None:
    path = os.path.join(home, DB1)
    write_file(path, b"")
    before, names = snapshot(path), listing(home)
    await open_fails(CorruptRegion, home, create=create)
    assert snapshot(path) == before
    assert listing(home) == names
    await fails_with(CorruptRegion, lambda: Env.remove(home), "Env.remove")
    assert snapshot(path) == before
    os.unlink(path)


def _cut(size: int, kind: str) -> int:
    return {
        "half": size // 2,
        "below-headers": HEADERS - 8,
        "ref-size": SHM_REF.size,
        "one-word": WORD,
    }[kind]


@pytest.mark.parametrize("cut", ["half", "below-headers", "ref-size", "one-word"])
async def test_truncated_region_file(home: str, cut: str) -> None:
    path = await real_env(home)
    os.truncate(path, _cut(os.path.getsize(path), cut))
    before, names = snapshot(path), listing(home)
    await open_fails(CorruptRegion, home)
    await open_fails(CorruptRegion, home, create=True)
    assert snapshot(path) == before, "a failed open wrote to the truncated region file"
    assert listing(home) == names
    await Env.remove(home, force=True)
    assert listing(home) == []


async def test_truncated_system_reference(home: str, shm_key: int) -> None:
    path = await real_env(home, region="system", shm_key=shm_key)
    with open(path, "rb") as f:
        record = f.read()
    assert len(record) == SHM_REF.size
    os.truncate(path, SHM_REF.size // 2)
    before = snapshot(path)
    try:
        await open_fails(CorruptRegion, home)
        await open_fails(CorruptRegion, home, create=True, region="system", shm_key=shm_key)
        assert snapshot(path) == before
    finally:
        write_file(path, record, 0o600)  # our own record back, so that remove finds the segment
    await Env.remove(home)
    assert listing(home) == []


@pytest.mark.parametrize(
    "size",
    [
        1,
        SHM_REF.size - 1,
        SHM_REF.size,
        SHM_REF.size + 1,
        HEADERS - 1,
        HEADERS,
        HEADERS + 1,
        65536 + 8192,
    ],
)
@pytest.mark.parametrize("create", [False, True])
async def test_random_bytes(home: str, size: int, create: bool) -> None:
    data = random.Random(size).randbytes(size)
    assert data[:WORD] != bytes(WORD)
    path = os.path.join(home, DB1)
    write_file(path, data)
    before, names = snapshot(path), listing(home)
    await open_fails(CorruptRegion, home, create=create)
    assert snapshot(path) == before
    assert listing(home) == names
    await fails_with(CorruptRegion, lambda: Env.remove(home), "Env.remove")
    assert snapshot(path) == before
    os.unlink(path)


async def test_zeroed_file_of_a_dead_creator(home: str) -> None:
    """All zeros, nobody building: what a creator that died before writing anything leaves."""
    path = os.path.join(home, DB1)
    write_file(path, bytes(65536), 0o600)
    before = snapshot(path)
    await open_fails(CorruptRegion, home)
    await open_fails(CorruptRegion, home, create=True)
    assert snapshot(path) == before
    await Env.remove(home, force=True)
    assert listing(home) == []


def _png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0\0"))
        + chunk(b"IEND", b"")
    )


FOREIGN = {
    "sqlite": b"SQLite format 3\0" + b"\x10\x00\x01\x01\x00\x40\x20\x20" + bytes(4096 - 24),
    "png": _png(),
    "elf": b"\x7fELF\x02\x01\x01" + bytes(9) + random.Random(7).randbytes(8192 - 16),
    "text": b"set_cachesize 0 262144 1\n",
    "berkeley-db-btree": bytes(12) + (0x053162).to_bytes(4, "little") + bytes(4096 - 16),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
@pytest.mark.parametrize("create", [False, True])
async def test_another_programs_file(home: str, name: str, create: bool) -> None:
    path = os.path.join(home, DB1)
    write_file(path, FOREIGN[name], 0o644)
    before, names = snapshot(path), listing(home)
    await open_fails(CorruptRegion, home, create=create)
    assert snapshot(path) == before, f"aiodbenv wrote to another program's file ({name})"
    assert listing(home) == names
    await fails_with(CorruptRegion, lambda: Env.remove(home), "Env.remove")
    assert snapshot(path) == before
    os.unlink(path)


# -- special files named __db.001 ---------------------------------------------------------------


@pytest.mark.parametrize("create", [False, True])
async def test_fifo(home: str, create: bool) -> None:
    path = os.path.join(home, DB1)
    os.mkfifo(path, 0o600)
    before, names = snapshot(path), listing(home)
    await open_fails(CorruptRegion, home, create=create)
    assert snapshot(path) == before
    assert listing(home) == names
    await fails_with(CorruptRegion, lambda: Env.remove(home), "Env.remove")
    assert snapshot(path) == before
    os.unlink(path)


@pytest.mark.parametrize("create", [False, True])
async def test_directory(home: str, create: bool) -> None:
    path = os.path.join(home, DB1)
    os.mkdir(path, 0o755)
    with open(os.path.join(path, "inside"), "wb") as f:
        f.write(b"not ours")
    before, names = snapshot(path), listing(home)
    try:
        await open_fails(CorruptRegion, home, create=create)
        assert snapshot(path) == before
        assert listing(home) == names
        await fails_with(CorruptRegion, lambda: Env.remove(home), "Env.remove")
        assert snapshot(path) == before
        assert os.listdir(path) == ["inside"]
    finally:
        os.unlink(os.path.join(path, "inside"))
        os.rmdir(path)


@pytest.mark.parametrize("create", [False, True])
async def test_unix_socket(home: str, create: bool) -> None:
    path = os.path.join(home, DB1)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        before, names = snapshot(path), listing(home)
        await open_fails(CorruptRegion, home, create=create)
        assert snapshot(path) == before
        assert listing(home) == names
    finally:
        sock.close()
        os.unlink(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a device node")
@pytest.mark.parametrize("create", [False, True])
async def test_character_device(home: str, create: bool) -> None:
    path = os.path.join(home, DB1)
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    before = snapshot(path)
    try:
        await open_fails(CorruptRegion, home, create=create)
        assert snapshot(path) == before
    finally:
        os.unlink(path)


# -- symbolic links -----------------------------------------------------------------------------


@pytest.mark.parametrize("create", [False, True])
async def test_symlink_to_a_valid_environment(home: str, tmp_path: Any, create: bool) -> None:
    elsewhere = str(tmp_path / "elsewhere")
    os.mkdir(elsewhere)
    target = await real_env(elsewhere)
    link = os.path.join(home, DB1)
    try:
        os.symlink(target, link)
        target_before, link_before = snapshot(target), snapshot(link)
        await open_fails(CorruptRegion, home, create=create)
        assert snapshot(target) == target_before, "aiodbenv followed the symlink and wrote"
        assert snapshot(link) == link_before
        assert listing(home) == [DB1]
        # The environment elsewhere is intact: it opens, and nobody counted a handle in it.
        async with Env.open(elsewhere) as env:
            assert env.stat().handles == 1
        os.unlink(link)
    finally:
        if os.path.lexists(link):
            os.unlink(link)
        await Env.remove(elsewhere)
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("create", [False, True])
async def test_symlink_to_a_foreign_file(home: str, tmp_path: Any, create: bool) -> None:
    target = str(tmp_path / "precious.sqlite")
    write_file(target, FOREIGN["sqlite"], 0o644)
    link = os.path.join(home, DB1)
    os.symlink(target, link)
    target_before, link_before = snapshot(target), snapshot(link)
    await open_fails(CorruptRegion, home, create=create)
    await fails_with(CorruptRegion, lambda: Env.remove(home), "Env.remove")
    assert snapshot(target) == target_before
    assert snapshot(link) == link_before
    os.unlink(link)
    os.unlink(target)


@pytest.mark.parametrize("create", [False, True])
async def test_dangling_symlink(home: str, tmp_path: Any, create: bool) -> None:
    target = str(tmp_path / "not-there")
    link = os.path.join(home, DB1)
    os.symlink(target, link)
    before = snapshot(link)
    await open_fails(CorruptRegion, home, create=create)
    assert snapshot(link) == before
    assert not os.path.lexists(target), "aiodbenv created the symlink's target"
    os.unlink(link)


# -- versions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("create", [False, True])
async def test_future_version_region_file(home: str, create: bool) -> None:
    path = await real_env(home)
    patch_word(path, REGION_HEADER.offset("version"), LAYOUT_VERSION + 1)
    before = snapshot(path)
    err = await open_fails(VersionMismatch, home, create=create)
    assert isinstance(err, VersionMismatch) and err.db_code == -30969
    assert snapshot(path) == before, "a joiner wrote to an environment of another version"
    await Env.remove(home, force=True)
    assert listing(home) == []


async def test_future_version_system_reference(home: str, shm_key: int) -> None:
    path = await real_env(home, region="system", shm_key=shm_key)
    old = patch_word(path, SHM_REF.offset("version"), LAYOUT_VERSION + 1)
    before = snapshot(path)
    try:
        await open_fails(VersionMismatch, home)
        await open_fails(VersionMismatch, home, create=True, region="system", shm_key=shm_key)
        assert snapshot(path) == before
    finally:
        patch_word(path, SHM_REF.offset("version"), int.from_bytes(old, "little"))
    await Env.remove(home)
    assert listing(home) == []


async def test_future_version_segment(home: str, shm_key: int) -> None:
    async with Env.open(home, create=True, region="system", shm_key=shm_key) as env:
        shm_id = shm_id_of(env.stat().regions[0].backing)
    shm = sysv_ipc.attach(shm_id)
    offset = REGION_HEADER.offset("version")
    try:
        shm.write((LAYOUT_VERSION + 1).to_bytes(WORD, "little"), offset)
        image = shm.read(shm.size)
        await open_fails(VersionMismatch, home)
        await open_fails(VersionMismatch, home, create=True, region="system", shm_key=shm_key)
        assert shm.read(shm.size) == image, "a joiner wrote to a segment of another version"
        shm.write(LAYOUT_VERSION.to_bytes(WORD, "little"), offset)
    finally:
        shm.detach()
    await Env.remove(home)
    assert listing(home) == []


# -- the home -----------------------------------------------------------------------------------


async def test_home_does_not_exist(home: str) -> None:
    """Without ``create`` a missing home is an error and is not made (with ``create`` it is:
    test_env.py::test_create_makes_a_missing_home)."""
    missing = os.path.join(home, "missing")
    err = await open_fails(EnvNotFound, missing, create=False)
    assert isinstance(err, FileNotFoundError)
    assert not os.path.exists(missing), "open created the missing home"
    with pytest.raises(FileNotFoundError):
        await Env.open(missing, create=False)
    assert listing(home) == []


@pytest.mark.parametrize("create", [False, True])
@pytest.mark.parametrize("where", ["file", "under-a-file"])
async def test_home_is_a_regular_file(home: str, create: bool, where: str) -> None:
    path = os.path.join(home, "plain")
    write_file(path, b"just a file\n")
    before = snapshot(path)
    target = path if where == "file" else os.path.join(path, "sub")
    await open_fails(InvalidArgument, target, create=create)
    await fails_with(InvalidArgument, lambda: Env.remove(target), "Env.remove")
    assert snapshot(path) == before
    assert listing(home) == ["plain"]
    os.unlink(path)


async def test_home_not_writable(home: str) -> None:
    """A home nobody may write to: creating there is PermissionDenied, as that user."""
    ro = os.path.join(home, "readonly")
    os.mkdir(ro)
    os.chmod(ro, 0o555)  # owned by root when we are root: nobody can read, not write
    try:
        created = run_as_nobody(_CHILD_OPEN, ro, "1")
        assert created.returncode == 0, created.stderr
        name, elapsed = created.stdout.split()
        assert name == "PermissionDenied", created.stdout + created.stderr
        assert float(elapsed) < LIMIT
        joined = run_as_nobody(_CHILD_OPEN, ro, "0")
        assert joined.returncode == 0, joined.stderr
        assert joined.stdout.split()[0] == "EnvNotFound", joined.stdout + joined.stderr
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)
        os.rmdir(ro)


# -- System V keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, REGION_HEADER.size, 4096, 65536])
async def test_shm_key_used_by_a_foreign_segment(home: str, shm_key: int, size: int) -> None:
    foreign = sysv_ipc.SharedMemory(shm_key, sysv_ipc.IPC_CREX, mode=0o600, size=size)
    try:
        data = random.Random(size).randbytes(size)
        assert data[:WORD] != REGION_MAGIC.to_bytes(WORD, "little")
        foreign.write(data)
        before = segment_state(foreign)
        err = await open_fails(ShmKeyInUse, home, create=True, region="system", shm_key=shm_key)
        assert isinstance(err, Busy)
        assert segment_exists(foreign.id), "aiodbenv removed another program's segment"
        assert segment_state(foreign) == before, "aiodbenv changed another program's segment"
        assert listing(home) == [], "a failed create left files in the home"
    finally:
        foreign.detach()
        foreign.remove()


async def test_foreign_segment_at_a_later_region_key(home: str, shm_key: int) -> None:
    """A foreign segment at ``shm_key + 1`` (region 2's key): the create fails with
    ShmKeyInUse after region 1's segment was made, and that segment is removed again (it
    used to leak: its header was not filled in yet, so the undo did not know it as ours)."""
    foreign = sysv_ipc.SharedMemory(shm_key + 1, sysv_ipc.IPC_CREX, mode=0o600, size=4096)
    try:
        before = segment_state(foreign)
        await open_fails(ShmKeyInUse, home, create=True, region="system", shm_key=shm_key)
        with pytest.raises(sysv_ipc.ExistentialError):
            sysv_ipc.SharedMemory(shm_key, 0)  # region 1's segment is gone
        assert segment_exists(foreign.id) and segment_state(foreign) == before
        assert listing(home) == []
    finally:
        foreign.detach()
        foreign.remove()


async def test_shm_key_of_a_live_environment(home: str, tmp_path: Any, shm_key: int) -> None:
    """The key belongs to a live environment in another home: Busy, and that one unharmed."""
    other = str(tmp_path / "other")
    os.mkdir(other)
    async with Env.open(other, create=True, region="system", shm_key=shm_key) as live:
        shm = sysv_ipc.attach(shm_id_of(live.stat().regions[0].backing))
        try:
            image = shm.read(shm.size)
            err = await open_fails(Busy, home, create=True, region="system", shm_key=shm_key)
            assert type(err) is Busy
            assert listing(home) == []
            assert shm.read(shm.size) == image
            assert live.stat().handles == 1 and not live.stat().panicked
        finally:
            shm.detach()
    await Env.remove(other)
    assert os.listdir(other) == []


_CHILD_SYSTEM_ENV = """
import asyncio, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1], create=True, region="system",
                                  shm_key=int(sys.argv[2]))
    st = env.stat()
    print(st.env_id, " ".join(r.backing.rsplit(" ", 1)[1] for r in st.regions), flush=True)
    sys.stdin.readline()  # hold it open until killed

asyncio.run(main())
"""


async def test_stale_segment_of_a_dead_environment(
    home: str, shm_key: int, procs: list[Any]
) -> None:
    child = spawn(_CHILD_SYSTEM_ENV, home, str(shm_key))
    procs.append(child)
    assert child.stdout is not None and child.stderr is not None
    line = child.stdout.readline()
    assert line, f"child failed: {child.stderr.read()}"
    old_env_id, *old_ids = (int(x) for x in line.split())
    child.send_signal(signal.SIGKILL)  # never closes, never removes
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert all(segment_exists(i) for i in old_ids)
    os.unlink(os.path.join(home, DB1))  # the home is lost; only the segment is left

    t0 = time.monotonic()
    env = await Env.open(home, create=True, region="system", shm_key=shm_key)
    elapsed = time.monotonic() - t0
    try:
        assert elapsed < LIMIT, f"replacing a stale segment took {elapsed:.3f} s"
        st = env.stat()
        assert st.env_id != old_env_id
        assert st.shm_key == shm_key and st.handles == 1
        assert not any(segment_exists(i) for i in old_ids), "the stale segment is still there"
    finally:
        await env.close()
        await Env.remove(home)
    assert listing(home) == []


async def test_reference_to_a_foreign_segment(home: str, shm_key: int) -> None:
    """A well-formed __db.001 reference record that points at another program's segment."""
    foreign = sysv_ipc.SharedMemory(shm_key, sysv_ipc.IPC_CREX, mode=0o600, size=65536)
    try:
        foreign.write(random.Random(1).randbytes(65536))
        before = segment_state(foreign)
        rec = {
            "magic": SHM_REF_MAGIC,
            "version": LAYOUT_VERSION,
            "env_id": 12345,
            "shm_key": shm_key,
            "shm_id": foreign.id,
            "size": 65536,
        }
        body = b"".join(rec[f].to_bytes(WORD, "little") for f in SHM_REF.fields())
        path = os.path.join(home, DB1)
        write_file(path, body, 0o600)
        file_before = snapshot(path)
        await open_fails(CorruptRegion, home)
        await open_fails(CorruptRegion, home, create=True, region="system", shm_key=shm_key + 1)
        assert segment_exists(foreign.id)
        assert segment_state(foreign) == before
        assert snapshot(path) == file_before
        os.unlink(path)
    finally:
        foreign.detach()
        foreign.remove()


async def test_reference_to_a_vanished_segment(home: str, shm_key: int) -> None:
    """The segment went away (a reboot, ipcrm) but __db.001 still names it."""
    path = await real_env(home, region="system", shm_key=shm_key)
    with open(path, "rb") as f:
        record = f.read()
    shm_id = int.from_bytes(record[SHM_REF.offset("shm_id") :][:WORD], "little")
    seg = sysv_ipc.attach(shm_id)
    seg.remove()
    seg.detach()
    assert not segment_exists(shm_id)
    try:
        await open_fails(EnvNotFound, home)
        await open_fails(EnvNotFound, home, create=True, region="system", shm_key=shm_key)
        # What is left of the environment must still be removable.
        t0 = time.monotonic()
        await Env.remove(home, force=True)
        assert time.monotonic() - t0 < LIMIT
        assert listing(home) == []
    finally:
        if os.path.exists(path):
            os.unlink(path)  # our own reference record; keeps teardown quiet if remove failed


@pytest.mark.parametrize("field", ["shm_id", "shm_key"])
@pytest.mark.parametrize("value", [2**31, 2**40, 2**64 - 1])
async def test_reference_with_an_out_of_range_id(
    home: str, shm_key: int, field: str, value: int
) -> None:
    """__db.001's record names a segment id or key no System V segment can have: the open
    is CorruptRegion (not OverflowError), and a forced remove still cleans up."""
    path = await real_env(home, region="system", shm_key=shm_key)
    with open(path, "rb") as f:
        record = f.read()
    shm_id = int.from_bytes(record[SHM_REF.offset("shm_id") :][:WORD], "little")
    try:
        with open(path, "r+b") as f:
            f.seek(SHM_REF.offset(field))
            f.write(value.to_bytes(WORD, "little"))
        await open_fails(CorruptRegion, home)
        await fails_with(CorruptRegion, lambda: Env.remove(home), "Env.remove")
        await Env.remove(home, force=True)
        assert listing(home) == []
    finally:
        if segment_exists(shm_id):  # the record no longer leads to it: remove it ourselves
            seg = sysv_ipc.attach(shm_id)
            seg.remove()
            seg.detach()
        if os.path.exists(path):
            os.unlink(path)


async def test_mmap_size_out_of_range_argument(home: str) -> None:
    await open_fails(ConfigError, home, create=True, mmap_size=2**70)
    assert listing(home) == []


async def test_system_without_shm_key(home: str) -> None:
    err = await open_fails(InvalidArgument, home, create=True, region="system")
    assert "shm_key" in str(err)
    assert listing(home) == []


# -- settings -----------------------------------------------------------------------------------


BAD_SETTINGS = [
    ("cache_size", 0),
    ("cache_size", -1),
    ("cache_size", -(1 << 20)),
    ("cache_size", 1),
    ("cache_size", 10**15),
    ("cache_size", 262144.0),
    ("cache_size", "256K"),
    ("cache_size", True),
    ("ncache", 0),
    ("ncache", 1000),
    ("page_size", 1000),
    ("page_size", 0),
    ("page_size", 256),
    ("page_size", 131072),
    ("page_size", 4096.0),
    ("mmap_size", -1),
    ("mode", -1),
    ("mode", 0o1000),
    ("mode", 0o4600),
    ("mode", 0o7777),
    ("mode", 384.0),
    ("mode", "0600"),
    ("shm_key", 0),
    ("shm_key", -5),
    ("shm_key", 1 << 31),
    ("shm_key", "0x1234"),
    ("region", "shared"),
    ("region", "FILE"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS, ids=lambda v: repr(v))
@pytest.mark.parametrize("create", [False, True])
async def test_bad_setting(home: str, name: str, value: object, create: bool) -> None:
    err = await open_fails(ConfigError, home, create=create, **{name: value})
    assert isinstance(err, InvalidArgument) and isinstance(err, ValueError)
    assert listing(home) == []


async def test_bad_setting_is_refused_before_touching_an_existing_environment(home: str) -> None:
    path = await real_env(home)
    before = snapshot(path)
    await open_fails(ConfigError, home, create=True, cache_size=-1)
    await open_fails(ConfigError, home, mode=0o1000)
    assert snapshot(path) == before
    await Env.remove(home)


@pytest.mark.parametrize("value", [1, 0, None, "yes"])
async def test_create_not_a_bool(home: str, value: object) -> None:
    await open_fails(InvalidArgument, home, create=value)
    assert listing(home) == []


@pytest.mark.parametrize(
    "content",
    [
        b"set_cachesize 0 1 1\n",
        b"set_cachesize 0 262144\n",
        b"set_mp_pagesize 1000\n",
        b"set_shm_key -1\n",
        b"no_such_setting 1\n",
        b"set_flags db_nommap maybe\n",
        b"\xff\xfe\x00binary\n",
        b"set_mp_mmapsize 1180591620717411303424\n",
        b"set_shm_key 1099511627776\n",
    ],
    ids=[
        "tiny-cache",
        "missing-value",
        "bad-page-size",
        "negative-key",
        "unknown",
        "bad-switch",
        "not-utf8",
        "mmapsize-2**70",
        "shm-key-2**40",
    ],
)
async def test_bad_db_config(home: str, content: bytes) -> None:
    path = os.path.join(home, "DB_CONFIG")
    write_file(path, content)
    before = snapshot(path)
    await open_fails(ConfigError, home, create=True)
    assert snapshot(path) == before
    assert listing(home) == ["DB_CONFIG"]
    os.unlink(path)


@pytest.mark.parametrize("kind", ["fifo", "directory", "too-large"])
async def test_db_config_that_is_not_a_config_file(home: str, kind: str) -> None:
    path = os.path.join(home, "DB_CONFIG")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    else:
        write_file(path, b"# padding\n" * ((1 << 20) // 10 + 1))
    before = snapshot(path)
    await open_fails(ConfigError, home, create=True)
    assert snapshot(path) == before
    assert listing(home) == ["DB_CONFIG"]
    if kind == "directory":
        os.rmdir(path)
    else:
        os.unlink(path)


def test_helpers_agree_with_the_layout() -> None:
    """The sizes this file's cases are built around."""
    assert SHM_REF.size == 48
    assert HEADERS > SHM_REF.size


# -- flags and sizes the caller got wrong ----------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["nommap", "txn_nosync", "txn_write_nosync", "log_inmemory", "log"]
)
@pytest.mark.parametrize("value", ["0", "yes", 2, 0, None, []])
async def test_a_flag_that_is_not_a_bool_is_refused(home: str, flag: str, value: Any) -> None:
    """Only True or False: "0" and 2 were taken as on, "yes" failed with a bare ValueError."""
    with pytest.raises(ConfigError, match=f"{flag} must be True or False"):
        await Env.open(home, create=True, **{flag: value})
    assert not os.path.exists(os.path.join(home, "__db.001"))


async def test_recover_and_force_must_be_bools(home: str) -> None:
    with pytest.raises(InvalidArgument, match="recover must be True or False"):
        await Env.open(home, create=True, recover=0)  # type: ignore[arg-type]
    async with Env.open(home, create=True):
        pass
    with pytest.raises(InvalidArgument, match="force must be True or False"):
        await Env.remove(home, force="yes")  # type: ignore[arg-type]
    assert os.path.exists(os.path.join(home, "__db.001"))  # nothing removed
    await Env.remove(home)


async def test_a_segment_larger_than_the_machine_is_cache_full(home: str, shm_key: int) -> None:
    """shmget's ENOMEM came out of sysv_ipc as a bare MemoryError, not the documented
    CacheFull; nothing is left behind."""
    with pytest.raises(CacheFull, match="cannot create"):
        await Env.open(home, create=True, region="system", shm_key=shm_key, cache_size=1 << 40)
    assert not [n for n in os.listdir(home) if n.startswith("__db")]
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(shm_key)
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.SharedMemory(shm_key + 1)


async def test_closing_a_panicked_handle_again_does_nothing(home: str) -> None:
    """The first close says the environment panicked; a close of the closed handle does
    nothing (it raised RunRecovery again, each time)."""
    env = await Env.open(home, create=True)
    await Env.remove(home, force=True)  # panics the open handle
    with pytest.raises(RunRecovery):
        await env.close()
    await env.close()
    assert env.closed


async def test_the_handles_settings_are_checked_when_set(home: str) -> None:
    """A wrong value failed much later, deep inside the wait that needed it (a bare TypeError
    at the first pin that waited for a frame), or meant something else (``"no"`` is true)."""
    async with Env.open(home, create=True, log=True) as env:
        for value in ("5", None, -1, float("nan"), float("inf"), True):
            with pytest.raises(InvalidArgument, match="wait_timeout must be a number"):
                env.pool.wait_timeout = value  # type: ignore[assignment]
            with pytest.raises(InvalidArgument, match="wait_timeout must be a number"):
                env.log.wait_timeout = value  # type: ignore[assignment]
        for value in ("no", 0, None):
            with pytest.raises(InvalidArgument, match="fail_fast must be True or False"):
                env.pool.fail_fast = value  # type: ignore[assignment]
        assert env.pool.wait_timeout == 30.0 and env.log.wait_timeout == 30.0
        assert env.pool.fail_fast is False
        env.pool.wait_timeout = 0
        env.log.wait_timeout = 2
        env.pool.fail_fast = True
        assert env.pool.wait_timeout == 0.0 and env.log.wait_timeout == 2.0
        assert env.pool.fail_fast is True
    await Env.remove(home)


@pytest.mark.parametrize("path", [b"x.db", 7])
async def test_a_path_that_is_not_a_str_is_refused(home: str, path: Any) -> None:
    """A bytes path failed deep inside with "Can't mix strings and bytes in path components"."""
    with pytest.raises(InvalidArgument, match="home must be a"):
        await Env.open(os.fsencode(home) if isinstance(path, bytes) else path, create=True)
    async with Env.open(home, create=True) as env:
        with pytest.raises(InvalidArgument, match="a file's path must be a str path"):
            await env.pool.open_file(path, create=True)
    await Env.remove(home)
