"""Write-back under faults, with real processes: no page is ever lost or left claimed.

A child process dirties pages and runs sync, fsync, trickle, a checkpoint or evicting pins;
``AIODBENV_TEST_SIGNAL`` (see :mod:`aiodbenv._io`) makes it SIGKILL or SIGSTOP itself at an
exact step of write-back: once it holds its claims, after the pwritev, before or after the
fsync, after the claims are released. A surviving process's ``sync()`` must then write every
page (checked byte for byte in the data file) and fsync every file written by anyone, or raise;
never report success with a page missing, and never leave a frame claimed (``WRITING``).

Also: a failed fsync (through the I/O seam, and once through strace) panics the environment
for every process; a full disk (a small tmpfs) gives NoSpace and keeps the pages dirty; a sync
in a process that never opened the file writes all of it (the descriptor has one owner); a
page dirtied while its copy is written stays dirty.

The children run the compiled accelerator and, where parametrized, the pure-Python twins
(``AIODBENV_MUTEX=abi``); the survivor runs whichever the test process runs (the suite is run
again with ``AIODBENV_MUTEX=abi`` by tests/test_mutex.py).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

import pytest

import aiodbenv
from aiodbenv import _io
from aiodbenv._workers import last_checkpoint, run_checkpoint
from aiodbenv.errors import Incomplete, NoSpace, RunRecovery
from aiodbenv.mpool.layout import BH, BH_DIRTY, BH_WRITING, BUCKET, FILE_ENTRY

from .conftest import REPO

PAGE = 4096
CACHE = 4 * 1024 * 1024  # room for every page the tests dirty (sync/trickle/checkpoint)
SMALL_CACHE = 64 * PAGE  # the eviction tests: the child's pins must evict dirty pages

CHILD = r"""
import asyncio, os, sys
import aiodbenv
from aiodbenv._workers import run_checkpoint

def content(pgno, size):
    return bytes([pgno % 251 + 1]) * size

async def main():
    home, op, name = sys.argv[1], sys.argv[2], sys.argv[4]
    n, stride = int(sys.argv[3]), int(sys.argv[5])
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file(name, create=True)
    for i in range(0, n * stride, stride):
        async with f.get(i, create=True) as p:
            p.data[:] = content(i, len(p.data))
            p.mark_dirty()
        print("page", i, flush=True)
    print("dirty", flush=True)
    if op == "sync":
        await env.pool.sync()
    elif op == "fsync":
        await f.sync()
    elif op == "trickle":
        await env.pool.trickle(100)
    elif op == "checkpoint":
        await run_checkpoint(env.pool)
    elif op == "evict":  # pins of new pages in a full cache evict (write) dirty pages
        for i in range(n, 3 * n):
            async with f.get(i, create=True) as p:
                p.data[:] = content(i, len(p.data))
                p.mark_dirty()
            print("page", i, flush=True)
    elif op == "leave":  # close without writing anything: another process must
        pass
    print("done", flush=True)
    if op != "leave":
        sys.stdin.readline()  # the test says when to go
    await f.close()
    await env.close()

try:
    asyncio.run(main())
except BaseException as err:
    print("ERROR", type(err).__name__, err, flush=True)
    raise
"""


def content(pgno: int) -> bytes:
    return bytes([pgno % 251 + 1]) * PAGE


def start_child(
    home: str,
    op: str,
    n: int,
    *,
    plan: str = "",
    abi: bool = False,
    name: str = "data",
    prefix: list[str] | None = None,
    stride: int = 1,
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AIODBENV_TEST_SIGNAL",)}
    if plan:
        env["AIODBENV_TEST_SIGNAL"] = plan
    if abi:
        env["AIODBENV_MUTEX"] = "abi"
    return subprocess.Popen(
        [
            *(prefix or []),
            *(sys.executable, "-c", textwrap.dedent(CHILD)),
            *(home, op, str(n), name, str(stride)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=env,
    )


def finish(p: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = p.communicate("go\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"child did not finish: {out[-2000:]} {err[-2000:]}") from None
    return p.returncode, out, err


def pages_done(out: str) -> list[int]:
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("page ")]


def frames(pool: aiodbenv.Pool) -> tuple[int, int, int]:
    """(buffers flagged WRITING, buffers flagged DIRTY, the buckets' dirty counts), from the
    region: the counts must agree, and nothing may stay claimed."""
    writing = dirty = counted = 0
    for cache in pool._core.caches:
        w = cache.words
        for bw in cache.bucket_words:
            counted += int(w[bw + BUCKET.word.dirty])
            off = w[bw + BUCKET.word.head]
            while off:
                x = off >> 3
                writing += bool(w[x + BH.word.flags] & BH_WRITING)
                dirty += bool(w[x + BH.word.flags] & BH_DIRTY)
                off = w[x + BH.word.next]
    return writing, dirty, counted


def cached_dirty(pool: aiodbenv.Pool) -> set[int]:
    out = set()
    for cache in pool._core.caches:
        w = cache.words
        for bw in cache.bucket_words:
            off = w[bw + BUCKET.word.head]
            while off:
                x = off >> 3
                if w[x + BH.word.flags] & BH_DIRTY and w[x + BH.word.file]:
                    out.add(int(w[x + BH.word.pgno]))
                off = w[x + BH.word.next]
    return out


def unsynced_files(pool: aiodbenv.Pool) -> list[str]:
    """Files with page writes no fsync has covered yet."""
    core = pool._core
    out = []
    for fidx in core.file_slots():
        e = core.entry(fidx)
        if (
            core.meta_words[e + FILE_ENTRY.word.written_gen]
            > core.meta_words[e + FILE_ENTRY.word.synced_gen]
        ):
            out.append(core.file_name(fidx) or "?")
    return out


def missing_pages(path: str, pages: list[int]) -> list[int]:
    with open(path, "rb") as f:
        data = f.read()
    return [p for p in pages if data[p * PAGE : (p + 1) * PAGE] != content(p)]


@pytest.fixture
def fhome() -> Iterator[str]:
    """A home for tests that manage their own environment (and loop) inside the test."""
    path = tempfile.mkdtemp(prefix="aiodbenv-wb-")
    try:
        yield path
        left = sorted(n for n in os.listdir(path) if n.startswith("__db."))
        assert not left, f"test left region files in its home: {left}"
    finally:
        if any(n.startswith("__db.") for n in os.listdir(path)):
            from aiodbenv.region.remove import remove_environment

            try:
                remove_environment(path, force=True)
            except Exception:
                pass
        shutil.rmtree(path, ignore_errors=True)


# -- SIGKILL at every step of write-back ---------------------------------------------------------

#: (operation, point of the kill). ``claimed``: the pages are claimed (WRITING), nothing
#: written; ``pwrite:after``: the first run is in the OS, not yet released; ``write_done``:
#: (a batch, or a chunk of the compiled path)
#: claims released (pages clean), not fsynced; ``fsync:before``/``fsync:after``: around the
#: fsync of the file.
KILL_POINTS = [
    ("sync", "claimed:at:1"),
    ("sync", "pwrite:after:1"),
    ("sync", "write_done:at:1"),
    ("sync", "fsync:before:1"),
    ("sync", "fsync:after:1"),
    ("fsync", "claimed:at:1"),
    ("fsync", "fsync:before:1"),
    ("trickle", "claimed:at:1"),
    ("trickle", "pwrite:after:1"),
    ("trickle", "write_done:at:1"),
    ("checkpoint", "claimed:at:1"),
    ("checkpoint", "write_done:at:1"),
    ("checkpoint", "pwrite:after:1"),
    ("checkpoint", "fsync:before:1"),
    ("evict", "claimed:at:1"),
    ("evict", "pwrite:after:1"),
    ("evict", "write_done:at:1"),
]
ABI_POINTS = [("sync", "claimed:at:1"), ("sync", "write_done:at:1"), ("evict", "claimed:at:1")]


def _kill_case(home: str, op: str, point: str, abi: bool, shm_key: int | None = None) -> None:
    n = 48 if op == "evict" else 128
    cache = SMALL_CACHE if op == "evict" else CACHE

    async def survivor() -> None:
        env = await aiodbenv.Env.open(
            home,
            create=True,
            cache_size=cache,
            region="system" if shm_key else None,
            shm_key=shm_key,
        )
        try:
            child = start_child(home, op, n, plan=f"{point}:SIGKILL", abi=abi)
            rc, out, err = finish(child)
            assert rc == -signal.SIGKILL, (rc, out[-1500:], err[-1500:])
            done = pages_done(out)
            assert len(done) >= n, out[-500:]
            pool = env.pool
            # This process never opened the file: its sync must still write and fsync it.
            result = await pool.sync()
            writing, dirty, counted = frames(pool)
            assert writing == 0, "a frame stayed claimed by the dead writer"
            assert dirty == counted == 0
            assert unsynced_files(pool) == [], "a file written by the dead process is not synced"
            lost = missing_pages(os.path.join(home, "data"), done)
            assert lost == [], f"{len(lost)} page(s) lost: {lost[:10]}"
            assert result.incomplete == 0
        finally:
            await env.close()
            await aiodbenv.Env.remove(home)

    asyncio.run(survivor())


@pytest.mark.parametrize(("op", "point"), KILL_POINTS)
def test_sigkill_at_each_writeback_step_loses_nothing(fhome: str, op: str, point: str) -> None:
    _kill_case(fhome, op, point, abi=False)


@pytest.mark.parametrize(("op", "point"), ABI_POINTS)
def test_sigkill_python_twins(fhome: str, op: str, point: str) -> None:
    """The same with the child on the pure-Python write-back (claims, release, unpin)."""
    _kill_case(fhome, op, point, abi=True)


@pytest.mark.parametrize(("op", "point"), [("sync", "claimed:at:1"), ("evict", "claimed:at:1")])
def test_sigkill_system_v_regions(fhome: str, shm_key: int, op: str, point: str) -> None:
    """The same in System V shared memory regions."""
    _kill_case(fhome, op, point, abi=False, shm_key=shm_key)


def test_dead_writers_frames_become_evictable(fhome: str) -> None:
    """A writer SIGKILLed holding claims in a small cache: a pin in another process that
    needs frames takes the claims over (without any sync) and evicts those pages, after
    writing them."""

    async def survivor() -> None:
        env = await aiodbenv.Env.open(fhome, create=True, cache_size=SMALL_CACHE)
        try:
            child = start_child(fhome, "sync", 48, plan="claimed:at:1:SIGKILL")
            rc, _out, _ = finish(child)
            assert rc == -signal.SIGKILL
            assert frames(env.pool)[0] > 0  # the dead writer's claims are there
            pool = env.pool
            pool.wait_timeout = 20
            async with pool.open_file("other", create=True) as g:
                # Hold pins on 40 pages: with 48 frames claimed by the dead writer and 64 in
                # all, the pins past the free frames find no victim but those claims.
                pins = []
                try:
                    for i in range(40):
                        pins.append(await g.pin(i, create=True))
                finally:
                    for page in pins:
                        await g.unpin(page)
            writing, _, _ = frames(pool)
            assert writing == 0
            await pool.sync()
            assert missing_pages(os.path.join(fhome, "data"), list(range(48))) == []
        finally:
            await env.close()
            await aiodbenv.Env.remove(fhome)

    asyncio.run(survivor())


# -- a stopped writer --------------------------------------------------------------------------


def _wait_stopped(pid: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        if stat[stat.rfind(")") + 2] in "Tt":
            return
        time.sleep(0.01)
    raise AssertionError("the child never stopped")


@pytest.mark.parametrize("op", ["sync", "checkpoint"])
def test_sigstopped_writer_is_reported_never_success(fhome: str, op: str) -> None:
    async def survivor() -> None:
        env = await aiodbenv.Env.open(fhome, create=True, cache_size=CACHE)
        child = start_child(fhome, "sync", 128, plan="claimed:at:1:SIGSTOP")
        try:
            _wait_stopped(child.pid)
            pool = env.pool
            pool.wait_timeout = 1.0
            t0 = time.monotonic()
            with pytest.raises(Incomplete) as info:
                if op == "sync":
                    await pool.sync()
                else:
                    await run_checkpoint(pool)
            elapsed = time.monotonic() - t0
            assert str(child.pid) in str(info.value)
            assert child.pid in info.value.result.stalled_writers  # type: ignore[attr-defined]
            assert elapsed < 30, f"the bound was not kept: {elapsed:.1f} s"
            if op == "checkpoint":
                assert last_checkpoint(pool) is None  # an incomplete checkpoint is not recorded
            os.kill(child.pid, signal.SIGCONT)
            rc, out, err = finish(child)
            assert rc == 0, out[-1500:] + err[-1500:]
            await pool.sync()
            assert frames(pool) == (0, 0, 0)
            assert missing_pages(os.path.join(fhome, "data"), list(range(128))) == []
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGCONT)
                child.kill()
                child.communicate()
            await env.close()
            await aiodbenv.Env.remove(fhome)

    asyncio.run(survivor())


# -- a failed fsync ----------------------------------------------------------------------------

PROBE = r"""
import asyncio, sys
import aiodbenv

async def main():
    try:
        env = await aiodbenv.Env.open(sys.argv[1])
    except Exception as err:
        print("OPEN", type(err).__name__, err, flush=True)
        return
    try:
        await env.pool.sync()
        print("SYNC OK", flush=True)
    except Exception as err:
        print("SYNC", type(err).__name__, err, flush=True)
    try:
        await env.close()
    except Exception:
        pass

asyncio.run(main())
"""


def _probe(home: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, home],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
    )
    return r.stdout + r.stderr


async def _dirty(f: aiodbenv.PoolFile, n: int) -> None:
    for i in range(n):
        async with f.get(i, create=True) as p:
            p.data[:] = content(i)
            p.mark_dirty()


@pytest.mark.parametrize("how", ["sync", "checkpoint", "trickle-then-sync"])
def test_fsync_eio_panics_every_process(fhome: str, how: str) -> None:
    async def main() -> None:
        env = await aiodbenv.Env.open(fhome, create=True, cache_size=CACHE)
        pool = env.pool
        try:
            f = await pool.open_file("data", create=True)
            await _dirty(f, 32)
            if how == "trickle-then-sync":
                # the pages are written (and clean) before the sync: its fsync still counts
                assert await pool.trickle(100) == 32
                assert cached_dirty(pool) == set()
            with _io.inject("fsync", errno.EIO) as fault:
                with pytest.raises(RunRecovery, match=r"fsync of .*data.*errno 5"):
                    if how == "checkpoint":
                        await run_checkpoint(pool)
                    else:
                        await pool.sync()
            assert fault.fired == 1
            assert last_checkpoint(pool) is None
            # Forgotten? No: every later call in this process fails, without the fault too.
            with pytest.raises(RunRecovery, match="fsync of"):
                await pool.sync()
            with pytest.raises(RunRecovery):
                await run_checkpoint(pool)
            assert last_checkpoint(pool) is None
            # And another process sees it.
            out = await asyncio.to_thread(_probe, fhome)
            assert "RunRecovery" in out and "SYNC OK" not in out, out
        finally:
            with pytest.raises(RunRecovery):
                await env.close()
            await aiodbenv.Env.remove(fhome, force=True)

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_fsync_eio_from_strace_panics(fhome: str) -> None:
    """The real system call fails (strace's fault injection), in a child: the child gets
    RunRecovery, and the environment is panicked for this process too."""

    async def main() -> None:
        env = await aiodbenv.Env.open(fhome, create=True, cache_size=CACHE)
        try:
            child = start_child(
                fhome,
                "sync",
                64,
                prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-e", "inject=fsync:error=EIO"],
            )
            rc, out, err = finish(child)
            if "PTRACE" in err or ("Operation not permitted" in err and "strace" in err):
                pytest.skip(f"strace cannot trace here: {err[-300:]}")
            assert "ERROR RunRecovery" in out and "fsync of" in out, out[-1500:] + err[-1500:]
            assert rc != 0
            with pytest.raises(RunRecovery, match=r"fsync of .*data"):
                await env.pool.sync()
        finally:
            with pytest.raises(RunRecovery):
                await env.close()
            await aiodbenv.Env.remove(fhome, force=True)

    asyncio.run(main())


# -- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs() -> Iterator[str]:
    """A 1 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tempfile.mkdtemp(prefix="aiodbenv-tmpfs-")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path], capture_output=True, text=True
    )
    if r.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


def test_enospc_is_nospace_and_pages_stay_dirty(home: str, small_tmpfs: str) -> None:
    async def main() -> None:
        env = await aiodbenv.Env.open(home, create=True, cache_size=CACHE)
        try:
            filler = os.path.join(small_tmpfs, "filler")
            with open(filler, "wb") as fh:  # leave about 64 KiB free
                fh.write(b"\0" * (1024 * 1024 - 64 * 1024))
            data = os.path.join(small_tmpfs, "data")
            async with env.pool.open_file(data, create=True) as f:
                await _dirty(f, 64)  # 256 KiB: does not fit
                with pytest.raises(NoSpace, match="no space left"):
                    await env.pool.sync()
                writing, dirty, counted = frames(env.pool)
                assert writing == 0 and dirty == counted
                assert len(cached_dirty(env.pool)) >= 64 - 16  # at most what fitted is clean
                os.unlink(filler)
                await env.pool.sync()
                assert frames(env.pool) == (0, 0, 0)
                assert missing_pages(data, list(range(64))) == []
        finally:
            await env.close()
            await aiodbenv.Env.remove(home)

    asyncio.run(main())


def test_short_write_is_continued(home: str) -> None:
    """A short pwritev (the seam reports one byte less, once) is continued, not failed."""

    async def main() -> None:
        env = await aiodbenv.Env.open(home, create=True, cache_size=CACHE)
        try:
            async with env.pool.open_file("data", create=True) as f:
                await _dirty(f, 16)
                with _io.inject("pwrite", short=True, times=1) as fault:
                    r = await env.pool.sync()
                assert fault.fired == 1 and r.written == 16
                assert missing_pages(os.path.join(home, "data"), list(range(16))) == []
        finally:
            await env.close()
            await aiodbenv.Env.remove(home)

    asyncio.run(main())


# -- descriptors: a sync in a process that never opened the file --------------------------------


@pytest.mark.parametrize("op", ["sync", "trickle"])
def test_sync_of_a_file_this_process_never_opened(fhome: str, op: str) -> None:
    async def main() -> None:
        env = await aiodbenv.Env.open(fhome, create=True, cache_size=CACHE)
        try:
            # Every other page: one pwritev per page, several runs per batch, two batches in
            # flight (what made the old code close a descriptor twice).
            rc, out, err = finish(start_child(fhome, "leave", 512, stride=2))
            assert rc == 0, out[-1500:] + err[-1500:]
            pool = env.pool
            loop = asyncio.get_running_loop()
            unhandled: list[object] = []
            loop.set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
            if op == "trickle":
                assert await pool.trickle(100) == 512
                assert unsynced_files(pool) != []
                r = await pool.sync()
                assert r.written == 0 and r.files_synced == 1
            else:
                r = await pool.sync()
                assert r.written == 512 and r.files_synced == 1
            assert frames(pool) == (0, 0, 0)
            assert unsynced_files(pool) == []
            assert missing_pages(os.path.join(fhome, "data"), list(range(0, 1024, 2))) == []
            assert len(pool._io.wfds) == 1  # one descriptor, owned by the pool
            assert unhandled == []
        finally:
            await env.close()
            await aiodbenv.Env.remove(fhome)

    asyncio.run(main())


# -- a page dirtied while its copy is being written --------------------------------------------


def test_page_dirtied_during_its_write_stays_dirty(home: str) -> None:
    async def main() -> None:
        env = await aiodbenv.Env.open(home, create=True, cache_size=CACHE)
        try:
            async with env.pool.open_file("data", create=True) as f:
                await _dirty(f, 1)
                with _io.inject("pwrite", None, delay=0.5):
                    sync = asyncio.ensure_future(env.pool.sync())
                    while not frames(env.pool)[0]:  # wait for the claim
                        await asyncio.sleep(0.005)
                    async with f.get(0) as p:  # a hit on a page being written
                        p.data[:] = b"\x77" * PAGE
                        p.mark_dirty()
                    r = await sync
                assert r.written == 1
                assert cached_dirty(env.pool) == {0}, "the newer contents must still be written"
                assert frames(env.pool) == (0, 1, 1)
                await env.pool.sync()
                with open(os.path.join(home, "data"), "rb") as fh:
                    assert fh.read(PAGE) == b"\x77" * PAGE
        finally:
            await env.close()
            await aiodbenv.Env.remove(home)

    asyncio.run(main())


# -- every task awaited ------------------------------------------------------------------------


def test_a_batch_that_fails_unexpectedly_is_reported_and_releases_its_claims(home: str) -> None:
    """Not an OSError of a write but a bug-like failure inside a batch task: the sync raises
    it (no "Task exception was never retrieved"), no frame stays claimed, the pages stay
    dirty and the next sync writes them."""

    async def main() -> None:
        env = await aiodbenv.Env.open(home, create=True, cache_size=CACHE)
        loop = asyncio.get_running_loop()
        unhandled: list[object] = []
        loop.set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
        try:
            pool = env.pool
            async with pool.open_file("data", create=True) as f:
                await _dirty(f, 200)  # several batches, two in flight
                real = pool._io.fd_for_write

                def broken(fidx: int) -> int | None:
                    raise RuntimeError("injected failure inside a batch")

                pool._io.fd_for_write = broken  # type: ignore[method-assign]
                try:
                    with pytest.raises(RuntimeError, match="injected failure"):
                        await pool.sync()
                finally:
                    pool._io.fd_for_write = real  # type: ignore[method-assign]
                writing, dirty, counted = frames(pool)
                assert writing == 0 and dirty == counted == 200
                r = await pool.sync()
                assert r.written == 200 and frames(pool) == (0, 0, 0)
                assert missing_pages(os.path.join(home, "data"), list(range(200))) == []
            await asyncio.sleep(0.05)
            assert unhandled == []
        finally:
            await env.close()
            await aiodbenv.Env.remove(home)

    asyncio.run(main())


def test_checkpoint_worker_fsync_failure_is_not_recorded(home: str) -> None:
    """The background checkpoint worker hits a failed fsync: the environment panics, the
    worker reports the failure and no checkpoint is recorded as complete."""

    async def main() -> None:
        env = await aiodbenv.Env.open(home, create=True, cache_size=CACHE)
        pool = env.pool
        try:
            f = await pool.open_file("data", create=True)
            await _dirty(f, 32)
            with _io.inject("fsync", errno.EIO):
                worker = env.start_checkpoint(aiodbenv.CheckpointSettings(0.05, None, 0.0))
                deadline = time.monotonic() + 30
                while not worker.status().failures and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            st = worker.status()
            assert st.failures >= 1 and st.runs == 0
            assert st.last_error is not None and "fsync of" in st.last_error
            assert last_checkpoint(pool) is None
            with pytest.raises(RunRecovery, match="fsync of"):
                await pool.sync()
        finally:
            with pytest.raises(RunRecovery):
                await env.close()
            await aiodbenv.Env.remove(home, force=True)

    asyncio.run(main())


def test_a_file_removed_before_its_fsync_does_not_fail_every_sync(home: str) -> None:
    """Pages written by a trickle (not yet fsynced), the file closed and then removed: the
    next sync has nothing left to make durable and succeeds, and so do later ones."""

    async def main() -> None:
        env = await aiodbenv.Env.open(home, create=True, cache_size=CACHE)
        try:
            pool = env.pool
            async with pool.open_file("gone", create=True) as f:
                await _dirty(f, 8)
                assert await pool.trickle(100) == 8
            assert unsynced_files(pool) != []
            os.unlink(os.path.join(home, "gone"))
            await pool.sync()
            assert unsynced_files(pool) == []
            await pool.sync()
        finally:
            await env.close()
            await aiodbenv.Env.remove(home)

    asyncio.run(main())
