"""The buffer pool under Berkeley DB's own mpool tests and across real processes.

memp001 (random single-process updates, many pins of one page at once) and memp002 (four
processes sharing a tiny cache while each keeps a master page pinned), then cross-process
coherence with exact statistics, processes SIGKILLed holding a pin or in the middle of a read,
and two processes hammering the same hot pages.

Child processes are always fresh interpreters (``spawn``), never forks, and run the same kind
of event loop as the test that started them. A child fails the test by exiting non-zero or by
printing a line containing ``FAIL`` (Berkeley DB's ``findfail``).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import pytest

import aiodbenv
from aiodbenv.errors import CacheFull, Incomplete

from .conftest import spawn

SHARED_KINDS = ["file", "system"]


def kind_args(kind: str, shm_key: int) -> dict[str, Any]:
    return {"region": kind, "shm_key": shm_key if kind == "system" else None}


def pattern(text: str, size: int) -> bytes:
    """``text`` repeated to fill ``size`` bytes (tcl_mpool's page ``init``/``check``)."""
    b = text.encode()
    return (b * (size // len(b) + 1))[:size]


def fill(view: memoryview, text: str) -> None:
    view[:] = pattern(text, len(view))


def loop_name() -> str:
    """The running loop's kind, so that children run under the same one."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


def read_pages(path: str, page_size: int) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    return [data[i : i + page_size] for i in range(0, len(data), page_size)]


# -- child processes ----------------------------------------------------------------------------

#: Shared by every child: ``argv[1]`` is the loop kind, the test's own arguments follow.
PRELUDE = r"""
import asyncio, os, sys, time
import aiodbenv

def run(main):
    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())

def pattern(text, size):
    b = text.encode()
    return (b * (size // len(b) + 1))[:size]

def fill(view, text):
    view[:] = pattern(text, len(view))

def say(*args):
    print(*args, flush=True)
"""


def kill_all(children: Sequence[subprocess.Popen[str]]) -> None:
    for p in children:
        if p.poll() is None:
            p.kill()
    for p in children:
        p.wait(timeout=10)


async def read_line(child: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The child's next stdout line; fails (killing it) on timeout or early exit."""
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout)
    except TimeoutError:
        child.kill()  # unblocks the reading thread
        child.wait(timeout=10)
        raise AssertionError(f"no line from child {child.pid} within {timeout} s") from None
    if not line:
        child.wait(timeout=10)
        err = child.stderr.read() if child.stderr else ""
        raise AssertionError(f"child {child.pid} exited ({child.returncode}) early:\n{err}")
    return line.strip()


def tell(child: subprocess.Popen[str], line: str = "go") -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


async def finish(children: Sequence[subprocess.Popen[str]], timeout: float) -> list[str]:
    """Wait for every child to exit 0; returns their outputs. Any ``FAIL`` line fails."""

    async def one(p: subprocess.Popen[str]) -> tuple[str, str]:
        return await asyncio.to_thread(p.communicate, timeout=timeout)

    try:
        results = await asyncio.gather(*(one(p) for p in children))
    except subprocess.TimeoutExpired:
        kill_all(children)
        outs = [p.communicate() for p in children]
        raise AssertionError(f"children did not finish within {timeout} s: {outs}") from None
    outputs = []
    for p, (out, err) in zip(children, results):
        assert p.returncode == 0, f"child {p.pid} exited {p.returncode}:\n{out}\n{err}"
        fails = [line for line in out.splitlines() if "FAIL" in line]
        assert not fails, f"child {p.pid} reported failures:\n{out}\n{err}"
        outputs.append(out)
    return outputs


# -- 1. memp001: random single-process updates --------------------------------------------------

M1_FILES = 5
M1_PAGES = 50
M1_PS = 512


def m1_original(pgno: int) -> bytes:
    return str(pgno).encode().ljust(M1_PS - 1, b"\0") + b"Z"


async def memp001(
    home: str, shm_key: int, kind: str, cache_size: int | None, ncache: int, iterations: int
) -> None:
    names = [f"data_file.{i}" for i in range(1, M1_FILES + 1)]
    for name in names:
        with open(os.path.join(home, name), "wb") as out:
            out.write(b"".join(m1_original(i) for i in range(M1_PAGES)))
        assert os.path.getsize(os.path.join(home, name)) == M1_PAGES * M1_PS
    pid = os.getpid()
    pinned_text = f"Page is pinned by {pid}"
    unpinned_text = f"Page is unpinned by {pid}"
    rng = random.Random(0xF0F0F0F0)
    # What each page must hold in the cache, and which pages were ever dirtied: with no
    # eviction (asserted below) this is exactly what the cache and, after a sync, the disk hold.
    content: dict[tuple[int, int], bytes] = {}
    dirty: set[tuple[int, int]] = set()
    pins = 0

    env = await aiodbenv.Env.open(
        home, create=True, cache_size=cache_size, ncache=ncache, **kind_args(kind, shm_key)
    )
    try:
        pool = env.pool
        assert pool.stat().ncache == ncache
        files = [
            await pool.open_file(name, page_size=M1_PS, create=True, mode=0o644) for name in names
        ]
        assert [f.pages for f in files] == [M1_PAGES] * M1_FILES

        async def pin(fi: int, pgno: int) -> aiodbenv.Page:
            nonlocal pins
            page = await files[fi].pin(pgno)
            pins += 1
            assert page.pgno == pgno, f"Page mismatch: asked for {pgno}, got {page.pgno}"
            assert bytes(page.data) == content.get((fi, pgno), m1_original(pgno))
            return page

        async def get_range(fi: int, top: int) -> aiodbenv.Page:
            page = await pin(fi, rng.randint(0, top))
            fill(page.data, pinned_text)
            content[fi, page.pgno] = bytes(page.data)
            return page

        async def replace(fi: int, page: aiodbenv.Page) -> aiodbenv.Page:
            pgno = page.pgno
            fill(page.data, unpinned_text)
            content[fi, pgno] = bytes(page.data)
            dirty.add((fi, pgno))
            await files[fi].unpin(page, dirty=True)
            return await pin(fi, pgno)

        for _ in range(iterations):
            fi = rng.randrange(M1_FILES)
            p1 = await get_range(fi, 10)
            p2 = await get_range(fi, 10)
            p3 = await get_range(fi, 10)
            p1 = await replace(fi, p1)
            p3 = await replace(fi, p3)
            p4 = await replace(fi, await get_range(fi, 20))
            p5 = await get_range(fi, 10)
            p6 = await get_range(fi, 20)
            p7 = await get_range(fi, 10)
            p8 = await get_range(fi, 20)
            p5 = await replace(fi, p5)
            p6 = await replace(fi, p6)
            p9 = await get_range(fi, 40)
            p9 = await replace(fi, p9)
            p10 = await get_range(fi, 40)
            p7 = await replace(fi, p7)
            p8 = await replace(fi, p8)
            p9 = await replace(fi, p9)
            p10 = await replace(fi, p10)
            for page in (p1, p2, p3, p4, p5, p6, p7, p8, p9, p10):
                await files[fi].unpin(page)

        st = pool.stat()
        assert st.ncache == ncache
        # Every pin is one search, found or not; at most 5 x 41 pages of 512 bytes are ever
        # touched, far less than any of these caches holds: nothing may be evicted.
        assert st.cache_hit + st.cache_miss == st.hash_searches == pins == 20 * iterations
        assert st.ro_evict == st.rw_evict == 0
        assert st.cache_miss == st.page_in == len(content)
        assert st.page_dirty == len(dirty)
        for f in files:
            await f.sync()
        assert pool.stat().page_dirty == 0
        for fi, name in enumerate(names):
            on_disk = read_pages(os.path.join(home, name), M1_PS)
            assert len(on_disk) == M1_PAGES
            for pgno, data in enumerate(on_disk):
                # Berkeley DB's check: the original page or a whole pattern of ours.
                assert data in (
                    m1_original(pgno),
                    pattern(unpinned_text, M1_PS),
                    pattern(pinned_text, M1_PS),
                ), (name, pgno, data[:40])
                # Exact: a page once dirtied holds its last content; the others were never
                # written (a change to a clean page without a dirty unpin is not saved).
                want = content[fi, pgno] if (fi, pgno) in dirty else m1_original(pgno)
                assert data == want, (name, pgno, data[:40], want[:40])
        for f in files:
            await f.close()
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)
        for name in names:
            os.remove(os.path.join(home, name))


M1_MATRIX = [(None, 1), (400000, 1), (400000, 3)]


@pytest.mark.parametrize(("cache_size", "ncache"), M1_MATRIX)
@pytest.mark.parametrize("kind", ["file", "private", "system"])
async def test_memp001_random_updates(
    home: str, shm_key: int, kind: str, cache_size: int | None, ncache: int
) -> None:
    await memp001(home, shm_key, kind, cache_size, ncache, iterations=100)


@pytest.mark.slow
@pytest.mark.parametrize(("cache_size", "ncache"), M1_MATRIX)
@pytest.mark.parametrize("kind", ["file", "private", "system"])
async def test_memp001_random_updates_500(
    home: str, shm_key: int, kind: str, cache_size: int | None, ncache: int
) -> None:
    await memp001(home, shm_key, kind, cache_size, ncache, iterations=500)


# -- 2. memp002: processes sharing a tiny cache ------------------------------------------------

M2_PROCS = 4
M2_PAGE_SIZES = [512, 1024, 2048, 4096, 8192]
M2_PAGES = 100
M2_CACHE = M2_PROCS * (512 + 8192)  # 34816 bytes, Berkeley DB's mpoolscript cache

MEMP002_CHILD = (
    PRELUDE
    + r"""
import fcntl, random
from aiodbenv.errors import CacheFull

PAGE_SIZES = [512, 1024, 2048, 4096, 8192]
NPAGES = 100

async def main():
    home, ident, nprocs, iters = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    max_sleep = float(sys.argv[6])
    rng = random.Random(ident)
    lockfd = os.open(os.path.join(home, "memp002.lock"), os.O_RDWR)
    fails = 0

    def fail(msg):
        nonlocal fails
        fails += 1
        if fails <= 20:
            say(f"FAIL {ident}: {msg}")

    # Berkeley DB took "f:p" in its lock region; there is none here: a byte-range lock does.
    def lock(off):
        fcntl.lockf(lockfd, fcntl.LOCK_EX, 1, off)

    def unlock(off):
        fcntl.lockf(lockfd, fcntl.LOCK_UN, 1, off)

    env = await aiodbenv.Env.open(home)
    pool = env.pool
    pool.wait_timeout = 60.0
    pins = wrote = 0
    try:
        files = [await pool.open_file(f"file{k}", page_size=ps, create=True, mode=0o644)
                 for k, ps in enumerate(PAGE_SIZES)]
        lock(ident)
        master = await files[0].pin(ident, create=True)
        pins += 1
        fill(master.data, f"MASTER{ident}")
        files[0].set(master, dirty=True)
        unlock(ident)
        seen = [set() for _ in PAGE_SIZES]  # pages this process saw written: never zero again
        for it in range(iters):
            for fi in range(1, len(PAGE_SIZES)):
                f = files[fi]
                ps = f.page_size
                pred = (ident - 1) % nprocs if fi % 2 == 0 else (ident + 1) % nprocs
                zero = bytes(ps)
                mine = pattern(str(ident), ps)
                theirs = pattern(str(pred), ps)
                valid = {pattern(str(k), ps) for k in range(nprocs)}
                for p in range(NPAGES):
                    lock(fi * 1000 + p)
                    try:
                        page = await f.pin(p, create=True)
                        pins += 1
                        if page.pgno != p:
                            fail(f"asked for page {p} of file{fi}, got {page.pgno}")
                        data = bytes(page.data)
                        if data == zero:
                            if p in seen[fi]:
                                fail(f"file{fi} page {p} was written, now reads zeros (lost)")
                        elif data not in valid:
                            fail(f"file{fi} page {p} holds garbage: {data[:24]!r}")
                        else:
                            seen[fi].add(p)
                        if data == zero or data == theirs:
                            page.data[:] = mine
                            seen[fi].add(p)
                            await f.unpin(page, dirty=True)
                            wrote += 1
                        else:
                            # memp_fput without DB_MPOOL_DIRTY. Not clean=True: that would
                            # forget another process's unwritten change to this page.
                            await f.unpin(page)
                    finally:
                        unlock(fi * 1000 + p)
                if bytes(master.data) != pattern(f"MASTER{ident}", 512):
                    fail(f"pinned master page {ident} changed: {bytes(master.data[:24])!r}")
            if max_sleep:
                await asyncio.sleep(rng.uniform(0, max_sleep))
        if bytes(master.data) != pattern(f"MASTER{ident}", 512):
            fail(f"pinned master page {ident} changed: {bytes(master.data[:24])!r}")
        await files[0].unpin(master, dirty=True)
        for i in range(nprocs):
            if i == ident:
                continue
            async with files[0].get(i, create=True) as page:
                pins += 1
                if bytes(page.data) != pattern(f"MASTER{i}", 512):
                    say(f"WARNING {ident}: master page {i} reads {bytes(page.data[:12])!r}")
        for f in files:
            await f.close()
    except CacheFull as err:
        fail(f"CacheFull: {err}; pool stat: {pool.stat()}")
    finally:
        await env.close()
    say(f"DONE {ident} pins={pins} wrote={wrote}")

run(main)
"""
)


async def memp002(
    home: str,
    shm_key: int,
    procs: list[subprocess.Popen[str]],
    kind: str,
    iterations: int,
    max_sleep: float,
    timeout: float,
) -> None:
    names = [f"file{k}" for k in range(len(M2_PAGE_SIZES))]
    env = await aiodbenv.Env.open(
        home, create=True, cache_size=M2_CACHE, **kind_args(kind, shm_key)
    )
    children: list[subprocess.Popen[str]] = []
    try:
        assert env.pool.cache_size == M2_CACHE
        with open(os.path.join(home, "memp002.lock"), "wb") as lk:
            lk.write(bytes(8192))
        for ident in range(M2_PROCS):
            child = spawn(
                MEMP002_CHILD,
                loop_name(),
                home,
                str(ident),
                str(M2_PROCS),
                str(iterations),
                str(max_sleep),
            )
            procs.append(child)
            children.append(child)
        outputs = await finish(children, timeout)
        for ident, out in enumerate(outputs):
            assert f"DONE {ident} pins={1 + iterations * 4 * M2_PAGES + M2_PROCS - 1}" in out, out

        pool = env.pool
        st = pool.stat()
        pins = M2_PROCS * (1 + iterations * 4 * M2_PAGES + M2_PROCS - 1)
        assert st.cache_hit + st.cache_miss == st.hash_searches == pins, st
        assert st.page_out > 0 and st.ro_evict + st.rw_evict > 0, st
        assert st.cache_miss == st.page_in + st.page_create, st
        assert st.page_create <= M2_PROCS + (len(M2_PAGE_SIZES) - 1) * M2_PAGES, st

        # What the children left: every page of files 1-4 written by someone, a whole pattern;
        # each master page its owner's. Through the cache, then on disk after a sync.
        valid = {ps: {pattern(str(k), ps) for k in range(M2_PROCS)} for ps in M2_PAGE_SIZES}
        files = [await pool.open_file(n, page_size=ps) for n, ps in zip(names, M2_PAGE_SIZES)]
        for fi, f in enumerate(files):
            assert f.pages == (M2_PROCS if fi == 0 else M2_PAGES)
            for p in range(f.pages):
                async with f.get(p) as page:
                    data = bytes(page.data)
                if fi == 0:
                    assert data == pattern(f"MASTER{p}", 512), (p, data[:16])
                else:
                    assert data in valid[f.page_size], (fi, p, data[:16])
        await pool.sync()
        for fi, (name, ps) in enumerate(zip(names, M2_PAGE_SIZES)):
            pages = read_pages(os.path.join(home, name), ps)
            if fi == 0:
                assert pages == [pattern(f"MASTER{p}", 512) for p in range(M2_PROCS)]
            else:
                assert len(pages) == M2_PAGES
                assert all(data in valid[ps] for data in pages), name
        for f in files:
            await f.close()
    finally:
        kill_all(children)
        await env.close()
        await aiodbenv.Env.remove(home)
        for name in [*names, "memp002.lock"]:
            if os.path.exists(os.path.join(home, name)):
                os.remove(os.path.join(home, name))


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_memp002_processes_share_a_tiny_cache(
    home: str, shm_key: int, procs: list[subprocess.Popen[str]], kind: str
) -> None:
    await memp002(home, shm_key, procs, kind, iterations=10, max_sleep=0, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_memp002_processes_share_a_tiny_cache_125(
    home: str, shm_key: int, procs: list[subprocess.Popen[str]], kind: str
) -> None:
    # Berkeley DB slept 1-3 s after each iteration to interleave the processes differently;
    # up to 50 ms does that here without making the run take minutes.
    await memp002(home, shm_key, procs, kind, iterations=125, max_sleep=0.05, timeout=900)


# -- 3. cross-process coherence and exact statistics -------------------------------------------

C_PS = 1024
C_FRAMES = 20  # a 20 KiB cache of 1 KiB pages

COHERENCE_CHILD = (
    PRELUDE
    + r"""
async def main():
    home, nhits = sys.argv[2], int(sys.argv[3])
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file("c.db", page_size=1024)
    page = await f.pin(3)
    page.data[:5] = b"CHILD"
    await f.unpin(page, dirty=True)
    held = await f.pin(3)
    hits = 2
    while hits < nhits:
        for p in range(10):
            if p != 3 and hits < nhits:
                async with f.get(p):
                    hits += 1
    say("READY", hits, bytes(held.data[:5]).decode())
    sys.stdin.readline()
    await f.unpin(held)
    await f.close()
    await env.close()
    say("DONE")

run(main)
"""
)


def c_original(pgno: int, tag: str = "c") -> bytes:
    return f"{tag} page {pgno}".encode().ljust(C_PS, b".")


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_pages_and_statistics_are_shared_exactly(
    home: str, shm_key: int, procs: list[subprocess.Popen[str]], kind: str
) -> None:
    cpath, gpath = os.path.join(home, "c.db"), os.path.join(home, "fill.db")
    with open(cpath, "wb") as out:
        out.write(b"".join(c_original(i) for i in range(10)))
    with open(gpath, "wb") as out:
        out.write(b"".join(c_original(i, "fill") for i in range(64)))
    env = await aiodbenv.Env.open(
        home, create=True, cache_size=C_FRAMES * C_PS, page_size=C_PS, **kind_args(kind, shm_key)
    )
    child: subprocess.Popen[str] | None = None
    try:
        pool = env.pool
        f = await pool.open_file("c.db")
        g = await pool.open_file("fill.db")
        for p in range(10):
            async with f.get(p) as page:
                assert bytes(page.data) == c_original(p)
        base = f.stat()
        assert (base.cache_miss, base.cache_hit, base.page_in) == (10, 0, 10)
        for _ in range(5):
            for p in range(10):
                async with f.get(p):
                    pass
        hits = 50

        child = spawn(COHERENCE_CHILD, loop_name(), home, "70")
        procs.append(child)
        assert await read_line(child) == "READY 70 CHILD"
        hits += 70
        st = f.stat()
        # The child's pins are counted in the same shared statistics, exactly.
        assert (st.cache_hit, st.cache_miss, st.page_in) == (hits, 10, 10)
        assert st.open_handles == 2
        assert pool.stat().cache_hit == hits and pool.stat().hash_searches == hits + 10

        # The child's change is in the shared cache: no sync, no read.
        async with f.get(3) as page:
            assert bytes(page.data) == b"CHILD" + c_original(3)[5:]
        hits += 1
        assert f.stat().cache_miss == 10

        # Dirty and pinned by the child: sync cannot write it, and says so.
        assert pool.stat().page_dirty == 1
        with pytest.raises(Incomplete) as err:
            await f.sync()
        assert err.value.result.incomplete == 1 and err.value.result.written == 0  # type: ignore[attr-defined]
        with pytest.raises(Incomplete):
            await pool.sync()

        # Push 64 other pages through the 20 frames: page 3 stays, everything else goes.
        before = pool.stat()
        for p in range(64):
            async with g.get(p) as page:
                assert bytes(page.data) == c_original(p, "fill")
        after = pool.stat()
        assert after.rw_evict == before.rw_evict  # the one dirty page is pinned
        assert after.ro_evict - before.ro_evict == 64 - (C_FRAMES - 10), (before, after)
        assert read_pages(cpath, C_PS)[3] == c_original(3)  # never written
        async with f.get(3) as page:  # still cached: a hit
            assert bytes(page.data[:5]) == b"CHILD"
        hits += 1
        assert (f.stat().cache_hit, f.stat().cache_miss) == (hits, 10)
        assert pool.stat().page_dirty == 1

        tell(child)
        assert await read_line(child) == "DONE"
        assert child.wait(timeout=10) == 0
        st = f.stat()
        assert (st.cache_hit, st.cache_miss, st.open_handles) == (hits, 10, 1)  # kept at close

        # Unpinned now: the next pages through the cache write the child's change -- evicting
        # it, or (compiled write-back) in a batch of dirty victims started in the background
        # when a victim search passes it over for a clean frame (mpool/victims.py), which
        # runs when the loop does.
        for _ in range(5):
            for p in range(64):
                async with g.get(p):
                    pass
            await asyncio.sleep(0.05)
            if read_pages(cpath, C_PS)[3] != c_original(3):
                break
        assert read_pages(cpath, C_PS)[3] == b"CHILD" + c_original(3)[5:]
        if not pool._core.clean_first:
            assert pool.stat().rw_evict == before.rw_evict + 1
        assert pool.stat().page_dirty == 0
        await pool.sync()
        assert read_pages(cpath, C_PS) == [
            b"CHILD" + c_original(3)[5:] if p == 3 else c_original(p) for p in range(10)
        ]
        async with f.get(3) as page:  # read back from the file (or still cached, written)
            assert bytes(page.data[:5]) == b"CHILD"
        if pool._core.clean_first:  # written by a batch: it may still be cached
            assert f.stat().cache_miss in (10, 11)
        else:
            assert f.stat().cache_miss == 11
        await f.close()
        await g.close()
    finally:
        if child is not None:
            kill_all([child])
        await env.close()
        await aiodbenv.Env.remove(home)
        os.remove(cpath)
        os.remove(gpath)


# -- 4. processes killed holding a pin, or in the middle of a read ------------------------------

K_PAGES = 40

HOLD_PIN_CHILD = (
    PRELUDE
    + r"""
async def main():
    env = await aiodbenv.Env.open(sys.argv[2])
    f = await env.pool.open_file("k.db", page_size=1024)
    page = await f.pin(5)
    page.data[:6] = b"KILLED"
    f.set(page, dirty=True)
    say("HOLDING")
    time.sleep(600)

run(main)
"""
)

SLOW_READ_CHILD = (
    PRELUDE
    + r"""
from aiodbenv import _io

async def main():
    env = await aiodbenv.Env.open(sys.argv[2])
    f = await env.pool.open_file("k.db", page_size=1024)
    real_preadv = _io.preadv

    def preadv(*args):
        say("READING")  # the page's buffer is in the cache now, flagged as being read by us
        return real_preadv(*args)

    _io.preadv = preadv
    # Every read of this process now sleeps first, also the RWF_NOWAIT one on the event loop.
    with _io.inject("pread", None, delay=60):
        page = await f.pin(7)
    say("FAIL: the read finished although this process should have been killed")

run(main)
"""
)


async def k_setup(home: str, shm_key: int, kind: str) -> aiodbenv.Env:
    with open(os.path.join(home, "k.db"), "wb") as out:
        out.write(b"".join(c_original(i, "k") for i in range(K_PAGES)))
    return await aiodbenv.Env.open(
        home, create=True, cache_size=C_FRAMES * C_PS, page_size=C_PS, **kind_args(kind, shm_key)
    )


async def k_teardown(
    home: str, env: aiodbenv.Env, child: subprocess.Popen[str] | None, *, force: bool = False
) -> None:
    if child is not None:
        kill_all([child])
    await env.close()
    await aiodbenv.Env.remove(home, force=force)
    os.remove(os.path.join(home, "k.db"))


async def pin_all_frames(f: aiodbenv.PoolFile, pgnos: Sequence[int]) -> list[aiodbenv.Page]:
    pages = []
    for p in pgnos:
        pages.append(await asyncio.wait_for(f.pin(p), 10))
    return pages


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_process_killed_holding_a_pin(
    home: str, shm_key: int, procs: list[subprocess.Popen[str]], kind: str
) -> None:
    env = await k_setup(home, shm_key, kind)
    child = None
    try:
        pool = env.pool
        f = await pool.open_file("k.db")
        child = spawn(HOLD_PIN_CHILD, loop_name(), home)
        procs.append(child)
        assert await read_line(child) == "HOLDING"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)

        # The dead process's pin is reclaimed by the reaper: no failchk, nothing to call. Its
        # page was pinned and flagged dirty: it stays dirty and the next sync writes it.
        started = time.monotonic()
        for p in range(10, 15):
            async with f.get(p) as page:
                page.data[:3] = b"new"
                page.mark_dirty()
        result = await asyncio.wait_for(pool.sync(), 10)
        assert time.monotonic() - started < 2.0 + 3.0  # 2 s, plus slack for a loaded machine
        assert result.written == 6 and result.incomplete == 0
        on_disk = read_pages(os.path.join(home, "k.db"), C_PS)
        assert on_disk[5] == b"KILLED" + c_original(5, "k")[6:]
        assert all(on_disk[p][:3] == b"new" for p in range(10, 15))
        st = pool.stat()
        assert (st.procs_reaped, st.pins_reclaimed, st.dirty_inherited) == (1, 1, 1)
        assert st.page_pinned == 0 and st.oldest_pin_age is None  # nothing leaked
        assert env.stat().handles == 1

        # The frame came back: every frame can be pinned again.
        held = await pin_all_frames(f, list(range(C_FRAMES)))
        pool.fail_fast = True
        with pytest.raises(CacheFull):
            await f.pin(30)
        pool.fail_fast = False
        for page in held:
            await f.unpin(page)
        async with f.get(30) as page:
            assert bytes(page.data) == c_original(30, "k")
        # The dead process's change to page 5 reached the disk: nothing is left for a forced
        # remove to throw away.
        assert pool.stat().page_dirty == 0
        await f.close()
        await env.close()
    finally:
        await k_teardown(home, env, child, force=True)


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_process_killed_in_the_middle_of_a_read(
    home: str, shm_key: int, procs: list[subprocess.Popen[str]], kind: str, reap: bool
) -> None:
    env = await k_setup(home, shm_key, kind)
    child = None
    try:
        pool = env.pool
        f = await pool.open_file("k.db")
        child = spawn(SLOW_READ_CHILD, loop_name(), home)
        procs.append(child)
        assert await read_line(child) == "READING"
        # Our own pin finds the child's buffer being read and waits for it.
        waiter = asyncio.ensure_future(f.pin(7))
        await asyncio.sleep(0.3)
        assert not waiter.done(), "the child's read did not block"
        child.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        if reap:
            child.wait(timeout=10)
        # "zombie": the killed child is not waited for yet (our own dead child, unreaped):
        # it is dead all the same and its read will never finish.
        try:
            page = await asyncio.wait_for(waiter, 5)
        except TimeoutError:
            raise AssertionError(
                f"page 7 still not readable 5 s after its reader was SIGKILLed "
                f"({'reaped' if reap else 'dead but not yet reaped: a zombie'})"
            ) from None
        finally:
            child.wait(timeout=10)
        took = time.monotonic() - killed
        assert bytes(page.data) == c_original(7, "k")
        await f.unpin(page)
        assert took < 3, took
        st = f.stat()
        # The dead reader's miss, then ours; one page read.
        assert (st.cache_miss, st.page_in, st.cache_hit) == (2, 1, 0), st
        # The dead reader's pin went with its buffer: every frame can be pinned again.
        held = await pin_all_frames(f, range(C_FRAMES))
        assert bytes(held[7].data) == c_original(7, "k")
        for page in held:
            await f.unpin(page)
        await pool.sync()
        await f.close()
    finally:
        await k_teardown(home, env, child)


# -- 5. two processes on the same hot pages -----------------------------------------------------

HOT_PAGES = 8

HOT_CHILD = (
    PRELUDE
    + r"""
async def main():
    home, ident, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file("h.db", page_size=1024)
    say("READY")
    sys.stdin.readline()
    counts = [0] * 8
    lo, hi = 8 * ident, 8 * ident + 8
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in range(8):
            async with f.get(p) as page:
                # Only this process writes these 8 bytes of the shared page.
                v = int.from_bytes(page.data[lo:hi], "little") + 1
                page.data[lo:hi] = v.to_bytes(8, "little")
                page.mark_dirty()
            counts[p] += 1
    await f.close()
    await env.close()
    say("COUNTS", *counts)

run(main)
"""
)


@pytest.mark.parametrize("kind", SHARED_KINDS)
async def test_two_processes_pin_the_same_hot_pages(
    home: str, shm_key: int, procs: list[subprocess.Popen[str]], kind: str
) -> None:
    path = os.path.join(home, "h.db")
    with open(path, "wb") as out:
        out.write(bytes(HOT_PAGES * C_PS))
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    children: list[subprocess.Popen[str]] = []
    try:
        pool = env.pool
        f = await pool.open_file("h.db", page_size=C_PS)
        for p in range(HOT_PAGES):
            async with f.get(p):
                pass
        base = f.stat()
        for ident in range(2):
            child = spawn(HOT_CHILD, loop_name(), home, str(ident), "1.0")
            procs.append(child)
            children.append(child)
        for child in children:
            assert await read_line(child) == "READY"
        for child in children:
            tell(child)
        outputs = await finish(children, 60)
        counts = []
        for output in outputs:
            fields = output.split()
            assert fields[0] == "COUNTS", output
            counts.append([int(x) for x in fields[1:]])
        assert all(c > 0 for row in counts for c in row), counts
        st = f.stat()
        assert st.cache_hit - base.cache_hit == sum(map(sum, counts)), (st, counts)
        assert st.cache_miss == base.cache_miss == HOT_PAGES
        # Both processes' updates of the shared pages are all there.
        for p in range(HOT_PAGES):
            async with f.get(p) as page:
                for ident in range(2):
                    slot = bytes(page.data[8 * ident : 8 * ident + 8])
                    assert int.from_bytes(slot, "little") == counts[ident][p], (p, ident)
        await pool.sync()
        on_disk = read_pages(path, C_PS)
        for p in range(HOT_PAGES):
            for ident in range(2):
                slot = on_disk[p][8 * ident : 8 * ident + 8]
                assert int.from_bytes(slot, "little") == counts[ident][p]
        await f.close()
    finally:
        kill_all(children)
        await env.close()
        await aiodbenv.Env.remove(home)
        os.remove(path)
