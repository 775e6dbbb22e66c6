"""The statistics' bucket walk (aiodbenv/mpool/statwalk.py): the compiled walk and its Python
twin give the same pinned buffers and sums; a bucket whose mutex is held is visited by the Python
path with a short bound (left out when its holder does not let go); one whose holder died is
repaired and counted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from typing import Any

import pytest

import aiodbenv
from aiodbenv.mpool import accel, statwalk

from .test_mutex import _hold_and_kill

KINDS = ["file", "system", "private"]


def kind_args(kind: str, shm_key: int) -> dict[str, Any]:
    return {"region": kind, "shm_key": shm_key} if kind == "system" else {"region": kind}


def walk_all(pool: Any, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    core = pool._core
    with monkeypatch.context() as m:
        if not compiled:
            m.setattr(accel, "stat_walk", None)
        out: list[statwalk.Pinned] = []
        sums = [statwalk.walk(c, core.shared, out) for c in core.caches]
    return sorted(out), sums


@pytest.mark.skipif(not accel.COMPILED, reason="compares the compiled walk with the Python one")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_entries", [1, 1024])
async def test_compiled_and_python_walks_agree(
    home: str, shm_key: int, kind: str, out_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins in many buckets (some pinned twice, some dirty): the same list and the same sums
    either way, also when the compiled call's out array holds one entry at a time."""
    monkeypatch.setattr(statwalk, "_OUT_ENTRIES", out_entries)
    env = await aiodbenv.Env.open(home, create=True, cache_size=1 << 20, **kind_args(kind, shm_key))
    f = await env.pool.open_file("data.db", create=True)
    pages = [await f.get(p, create=True) for p in range(0, 120, 3)]
    again = [await f.get(p) for p in range(0, 120, 9)]
    for page in pages[::4]:
        page.mark_dirty()
    compiled = walk_all(env.pool, True, monkeypatch)
    python = walk_all(env.pool, False, monkeypatch)
    assert compiled[0] == python[0]
    assert len(compiled[0]) == len(pages)
    assert {pgno: ref for _, pgno, ref, _ in compiled[0]} == {
        p: 2 if p % 9 == 0 else 1 for p in range(0, 120, 3)
    }
    # The walks' own try-locks count as uncontended locks: compare the dirty sums, and that
    # the lock counters only grew.
    assert [s[0] for s in compiled[1]] == [s[0] for s in python[1]]
    assert all(p[2] >= c[2] for c, p in zip(compiled[1], python[1], strict=True))
    assert env.pool.stat().page_pinned == len(pages)
    for page in again + pages:
        await f.unpin(page)
    assert env.pool.stat().page_pinned == 0
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)


@pytest.mark.parametrize("kind", ["file", "system"])
async def test_a_held_bucket_is_left_out_then_counted(home: str, shm_key: int, kind: str) -> None:
    """A bucket mutex held by another thread for longer than the walk's short bound: its pinned
    page is left out of the figures (the stat does not wait for it), the others are counted;
    once it is released, the page is counted again."""
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    f = await env.pool.open_file("data.db", create=True)
    pinned = [await f.get(p, create=True) for p in (3, 40, 77)]
    cache, b = env.pool._core.locate(f._fidx, 40)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache.mutexes[b]:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        st = env.pool.stat()
        others = sum(1 for p in (3, 77) if env.pool._core.locate(f._fidx, p) != (cache, b))
        assert st.page_pinned == others
    finally:
        release.set()
        t.join(10)
    assert env.pool.stat().page_pinned == 3
    for page in pinned:
        await f.unpin(page)
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)


@pytest.mark.parametrize("kind", ["file", "system"])
async def test_a_bucket_whose_holder_died_is_repaired_and_counted(
    home: str, shm_key: int, kind: str, procs: list[subprocess.Popen[str]]
) -> None:
    """A process killed holding a bucket mutex: the stat's walk finds the holder dead, repairs
    the bucket (counted in ``mutex_owner_died``) and counts its pinned page."""
    env = await aiodbenv.Env.open(home, create=True, **kind_args(kind, shm_key))
    f = await env.pool.open_file("data.db", create=True)
    for i in range(8):
        async with f.get(i, create=True):
            pass
    page = await f.get(7)
    _hold_and_kill(home, "bucket", procs)  # locks page 7's bucket of data.db, then dies
    assert env.stat().mutex_owner_died == 0
    assert env.pool.stat().page_pinned == 1
    assert env.stat().mutex_owner_died == 1 and not env.stat().panicked
    await f.unpin(page)
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home, force=True)


PIN_AND_WAIT = """
import asyncio, json, sys
import aiodbenv

async def main(home, args):
    env = await aiodbenv.Env.open(home, **json.loads(args))
    f = await env.pool.open_file("data.db")
    pages = [await f.get(p) for p in range(1, 60, 2)]  # 30 pins
    print("pinned", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for page in pages:
        await f.unpin(page)
    await f.close()
    await env.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.skipif(not accel.COMPILED, reason="compares the compiled walk with the Python one")
@pytest.mark.parametrize("kind", ["file", "system"])
async def test_pins_per_process_compiled_and_python_agree(
    home: str, shm_key: int, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """env.stat()'s pins per process, from the compiled walk and its Python twin, with pins
    of two processes (some pages pinned by both, some twice by one)."""
    import json

    from .conftest import spawn

    args = kind_args(kind, shm_key)
    env = await aiodbenv.Env.open(home, create=True, cache_size=1 << 20, **args)
    child = None
    try:
        f = await env.pool.open_file("data.db", create=True)
        mine = [await f.get(p, create=True) for p in range(0, 80)]  # 80 pins
        mine += [await f.get(p) for p in range(0, 80, 10)]  # 8 more, on pages pinned already
        child = spawn(PIN_AND_WAIT, home, json.dumps(args))
        assert child.stdout is not None and child.stdout.readline().strip() == "pinned"
        compiled = statwalk.slot_pins(env.pool._core.caches)
        with monkeypatch.context() as m:
            m.setattr(accel, "slot_pins", None)
            python = statwalk.slot_pins(env.pool._core.caches)
        assert compiled == python
        by_pid = {p.pid: p.pins for p in env.stat().processes}
        assert by_pid == {os.getpid(): 88, child.pid: 30}
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(30) == 0
        for page in mine:
            await f.unpin(page)
        assert statwalk.slot_pins(env.pool._core.caches) == {}
        await f.close()
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        await env.close()
        await aiodbenv.Env.remove(home, force=True)


@pytest.mark.parametrize("kind", ["file", "system"])
async def test_stat_from_another_thread_while_the_loop_pins_and_opens(
    home: str, shm_key: int, kind: str
) -> None:
    """``asyncio.to_thread(env.pool.stat)`` (what the docs advise for a large cache, and what a
    ``prometheus_client`` scrape thread does) runs beside the loop's pins, misses, dirtying
    and file opens without errors, and every result is sane. It is no atomic snapshot: the
    walk sums bucket by bucket while pages move. Buffers were once counted before the walk,
    so pages inserted and dirtied during it made page_dirty exceed pages (page_clean -80)."""
    env = await aiodbenv.Env.open(home, create=True, cache_size=2 << 20, **kind_args(kind, shm_key))
    try:
        f = await env.pool.open_file("s.db", create=True, page_size=4096)
        results: list[Any] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def scrape() -> None:
            # Back to back, but letting go of the GIL between calls: a thread that only ever
            # calls stat() would hold it for whole switch intervals while the loop waits.
            while not stop.wait(0.0005):
                try:
                    results.append(env.pool.stat())
                except BaseException as err:  # reported below
                    errors.append(err)
                    return

        thread = threading.Thread(target=scrape, daemon=True)
        thread.start()
        try:
            while not results and not errors:  # the first stat while the cache is empty
                await asyncio.sleep(0.001)
            for rnd in range(4):
                for p in range(1200):  # more pages than frames: misses and evictions too
                    async with f.get(p, create=True) as page:
                        page.data[0] = rnd
                        if p % 3 == 0:
                            page.mark_dirty()
                g = await env.pool.open_file(f"t{rnd}.db", create=True, page_size=4096)
                async with g.get(0, create=True):
                    pass
                await g.close()
                await env.pool.trickle(50)
            during = await asyncio.to_thread(env.pool.stat)
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive() and errors == []
        assert len(results) > 0 and during.pages > 0
        frames = during.cache_size // 4096
        bad = [
            (s.page_pinned, s.page_dirty, s.pages)
            for s in results
            if not (0 <= s.pages <= frames and 0 <= s.page_pinned <= 8 and 0 <= s.page_dirty)
        ]
        assert bad == []
        assert [(s.page_dirty, s.pages) for s in results if s.page_clean < 0] == []
        await f.close()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


async def test_a_private_pool_refuses_stat_from_another_thread(home: str) -> None:
    """A private region's buffers have no mutexes: a walk from another thread (the compiled one
    runs without the GIL) followed chains the loop was changing, and once never returned (a CI
    run hung). It is refused; on the loop's thread it works."""
    env = await aiodbenv.Env.open(home, create=True, region="private", cache_size=2 << 20)
    try:
        f = await env.pool.open_file("s.db", create=True, page_size=4096)
        async with f.get(0, create=True):
            pass
        assert env.pool.stat().pages == 1
        assert f.stat().pages == 1
        with pytest.raises(aiodbenv.InvalidArgument, match="private"):
            await asyncio.to_thread(env.pool.stat)
        with pytest.raises(aiodbenv.InvalidArgument, match="private"):
            await asyncio.to_thread(f.stat)
        await f.close()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
