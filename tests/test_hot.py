"""The compiled hot path of ``PoolFile.get()`` (aiodbenv._hot, aiodbenv.mpool.hot): in use
when installed, off when disabled, and the same behaviour as the Python hot path at its edges.

Each edge case runs twice: with the compiled context (``c``) and with the file's compiled
``get`` taken away (``python``: the Python PinContext over the cffi or Python hit path). A
subset of the pool suite runs again in a subprocess with ``AIODBENV_HOT=python``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import tracemalloc
from collections.abc import AsyncIterator

import pytest

import aiodbenv
from aiodbenv.errors import InvalidArgument
from aiodbenv.mpool import hot
from aiodbenv.mpool.hotpath import detach

from .conftest import REPO, python, run_suites

DISABLED = (
    os.environ.get("AIODBENV_HOT", "").lower() == "python"
    or os.environ.get("AIODBENV_MUTEX", "").lower() == "abi"
)


def _compiler() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_extension_compiles_where_pointer_mismatches_are_errors() -> None:
    """GCC 14 makes a mismatched pointer type an error by default, and the limited API's
    reference-counting functions are typed: a ``Py_XDECREF(copy)`` of a C struct pointer built
    here with a warning and would have dropped the whole extension there (the build makes it
    optional). The module checked as such a compiler would."""
    src = REPO / "aiodbenv" / "_csrc" / "capi" / "hot.c"
    if not src.exists():
        pytest.skip("the C source is not here (an installed-wheel run)")
    r = subprocess.run(
        [
            "gcc",
            "-fsyntax-only",
            "-Wall",
            "-Werror=incompatible-pointer-types",
            "-Werror=implicit-function-declaration",
            "-Werror=int-conversion",
            "-I" + sysconfig.get_paths()["include"],
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]


# -- which path runs --------------------------------------------------------------------------


async def test_compiled_type_is_in_use_when_installed(home: str) -> None:
    if DISABLED:
        assert not hot.COMPILED
    elif not _compiler() or os.environ.get("AIODBENV_NO_COMPILE") == "1":
        pytest.skip("no C compiler on this machine: the compiled hot path cannot be built")
    else:
        assert hot.COMPILED, "a compiler is present but aiodbenv._hot is missing or refused"
    env = await aiodbenv.Env.open(home, create=True)
    try:
        f = await env.pool.open_file("a.db", create=True)
        ctx = f.get(0, create=True)
        assert type(ctx).__name__ == "PinContext"  # create=True: always the Python context
        async with ctx:
            pass
        kind = type(f.get(0))
        if hot.COMPILED:
            assert kind.__module__ == "aiodbenv._hot" and f._hotc is not None
        else:
            assert kind is aiodbenv.PinContext and f._hotc is None
        await f.close()
    finally:
        await env.close()
        await aiodbenv.Env.remove(home, force=True)


@pytest.mark.parametrize(
    "variables",
    [{"AIODBENV_HOT": "python"}, {"AIODBENV_MUTEX": "abi"}],
    ids=["hot-python", "mutex-abi"],
)
def test_disabled_by_the_environment(variables: dict[str, str]) -> None:
    r = python(
        """
        import asyncio, tempfile, aiodbenv
        from aiodbenv.mpool import hot
        async def main():
            with tempfile.TemporaryDirectory() as home:
                env = await aiodbenv.Env.open(home, create=True)
                f = await env.pool.open_file("a.db", create=True)
                async with f.get(0, create=True):
                    pass
                print(hot.COMPILED, type(f.get(0)) is aiodbenv.PinContext, f._hotc)
                await f.close()
                await env.close(nosync=True)
                await aiodbenv.Env.remove(home, force=True)
        asyncio.run(main())
        """,
        env=variables,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "None"]


def test_an_unknown_choice_is_refused() -> None:
    r = python("import aiodbenv", env={"AIODBENV_HOT": "fast"})
    assert r.returncode != 0
    assert "AIODBENV_HOT must be 'c' or 'python'" in r.stderr


# -- edge cases, on both paths ----------------------------------------------------------------


@pytest.fixture(params=["c", "python", "c-ncache3"])
async def pf(request: pytest.FixtureRequest, home: str) -> AsyncIterator[aiodbenv.PoolFile]:
    """A file of 16 cached pages, with the compiled ``get`` (``c``; ``c-ncache3`` in a pool of
    three caches) or without (``python``)."""
    ncache = 3 if request.param == "c-ncache3" else 1
    env = await aiodbenv.Env.open(
        home, create=True, cache_size=ncache << 20, ncache=ncache, page_size=4096
    )
    try:
        f = await env.pool.open_file("a.db", create=True, page_size=4096)
        if request.param == "python":
            detach(f)
        elif not hot.COMPILED:
            pytest.skip("the compiled hot path is not in use")
        for p in range(16):
            async with f.get(p, create=True) as page:
                page.data[0:4] = p.to_bytes(4, "little")
        yield f
        if not f.closed:
            await f.close()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


def _region_pins(f: aiodbenv.PoolFile) -> int:
    return sum(f._pool.slot_pins().values())


async def test_exception_inside_the_block_still_unpins(pf: aiodbenv.PoolFile) -> None:
    with pytest.raises(KeyError):
        async with pf.get(3) as page:
            assert page.pinned and _region_pins(pf) == 1
            raise KeyError("inside")
    assert not page.pinned
    assert not pf._pins and _region_pins(pf) == 0
    with pytest.raises(ValueError):
        page.data[0]


async def test_aexit_twice_and_reuse(pf: aiodbenv.PoolFile) -> None:
    ctx = pf.get(5)
    page = await ctx.__aenter__()
    assert int.from_bytes(page.data[0:4], "little") == 5
    assert await ctx.__aexit__(None, None, None) is None
    assert await ctx.__aexit__(None, None, None) is None  # nothing left to unpin: a no-op
    assert _region_pins(pf) == 0
    async with ctx as again:  # the same context pins again
        assert again is not page and again.pinned
        with pytest.raises(RuntimeError, match="already entered"):
            await ctx.__aenter__()
        assert _region_pins(pf) == 1
    assert _region_pins(pf) == 0 and not pf._pins


async def test_context_methods_bound_and_from_the_class(pf: aiodbenv.PoolFile) -> None:
    # The compiled context hands out bound methods embedded in itself (no allocation per
    # `async with`): they keep the context alive, and the class attributes take the context
    # first, as contextlib.AsyncExitStack calls them.
    ctx = pf.get(4)
    enter, leave = ctx.__aenter__, ctx.__aexit__
    assert "Cancellation" in (type(ctx).__aenter__.__doc__ or "")
    assert "Cancellation" in (leave.__doc__ or "")
    del ctx
    gc.collect()
    page = await enter()
    assert page.pinned and page.pgno == 4 and _region_pins(pf) == 1
    assert await leave(None, None, None) is None
    assert not page.pinned and _region_pins(pf) == 0
    del enter, leave
    async with contextlib.AsyncExitStack() as stack:
        page = await stack.enter_async_context(pf.get(6))
        assert page.pinned and int.from_bytes(page.data[0:4], "little") == 6
    assert not page.pinned and _region_pins(pf) == 0
    with pytest.raises(TypeError):
        await pf.get(6).__aexit__()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await pf.get(6).__aenter__(1)  # type: ignore[call-arg]
    assert _region_pins(pf) == 0


async def test_many_contexts_alive_at_once(pf: aiodbenv.PoolFile) -> None:
    # More contexts than the compiled free list keeps, entered together and left in another
    # order: each keeps its own page.
    ctxs = [pf.get(i % 16) for i in range(200)]
    pages = [await c.__aenter__() for c in ctxs]
    assert _region_pins(pf) == 200 and len(pf._pins) == 200
    for i in [*range(0, 200, 2), *range(1, 200, 2)]:
        assert pages[i].pgno == i % 16 and pages[i].pinned
        assert int.from_bytes(pages[i].data[0:4], "little") == i % 16
        await ctxs[i].__aexit__(None, None, None)
        assert not pages[i].pinned
    del ctxs
    assert _region_pins(pf) == 0 and not pf._pins
    for i in range(300):  # contexts now come from the free list: none holds stale state
        async with pf.get(i % 16) as page:
            assert page.pgno == i % 16 and _region_pins(pf) == 1


async def test_await_then_explicit_unpin(pf: aiodbenv.PoolFile) -> None:
    page = await pf.get(7)
    assert page.pinned and page in pf._pins and page.pgno == 7
    page.data[4:8] = b"dirt"
    page.mark_dirty()
    before = pf._pool.stat().page_dirty
    await pf.unpin(page)
    assert not page.pinned and _region_pins(pf) == 0
    assert pf._pool.stat().page_dirty >= min(before, 1)
    async with pf.get(7) as page:
        assert bytes(page.data[4:8]) == b"dirt"
    with pytest.raises(InvalidArgument, match="not pinned"):
        await pf.unpin(page)


async def test_dirty_flag_reaches_the_buffer(pf: aiodbenv.PoolFile) -> None:
    assert (await pf.sync()).errors == []
    assert pf._pool.stat().page_dirty == 0
    async with pf.get(2) as page:
        page.data[8:12] = b"abcd"
        page.mark_dirty()
    assert pf._pool.stat().page_dirty == 1
    async with pf.get(2) as page:
        page.mark_clean()
    assert pf._pool.stat().page_dirty == 0
    async with pf.get(2) as page:
        page.mark_dirty()
        page.discard()
    assert pf._pool.stat().page_dirty == 1


async def test_page_used_after_unpin(pf: aiodbenv.PoolFile) -> None:
    async with pf.get(1) as page:
        part = page.data[0:4]  # a slice lives on, as a slice of any memoryview does
        with pytest.raises(TypeError):
            bytes(page)  # type: ignore[call-overload]  # a Page is not a bytes-like object
    assert not page.pinned and "unpinned" in repr(page)
    with pytest.raises(ValueError):
        bytes(page.data)
    assert int.from_bytes(part, "little") == 1
    del part


async def test_view_released_at_unpin_whether_referenced_or_not(
    pf: aiodbenv.PoolFile, caplog: pytest.LogCaptureFixture
) -> None:
    # The compiled unpin drops a view only the page refers to, and releases one referenced
    # elsewhere: either way every use of it afterwards raises ValueError.
    async with pf.get(2) as page:
        kept = page.data
        assert int.from_bytes(kept[0:4], "little") == 2
    with pytest.raises(ValueError):
        kept[0]
    async with pf.get(3) as other:
        assert other.data[0] == 3
    with pytest.raises(ValueError):
        other.data[0]
    with pytest.raises(ValueError):
        bytes(other.data)
    # A buffer taken from the view (an export) cannot be released: the unpin releases the pin
    # all the same (no frame held for good) and logs that the buffer outlives it.
    ctx = pf.get(4)
    page = await ctx.__aenter__()
    held = pickle.PickleBuffer(page.data)  # holds a buffer of the view (an export)
    with caplog.at_level(logging.WARNING, "aiodbenv"):
        await ctx.__aexit__(None, None, None)
    assert "page 4 was unpinned while a buffer taken from its page.data" in caplog.text
    assert not page.pinned and not pf._pins and _region_pins(pf) == 0
    held.release()
    page.data.release()  # what the unpin could not do; possible once the buffer is let go


async def test_file_closed_while_a_page_is_held(pf: aiodbenv.PoolFile) -> None:
    ctx = pf.get(4)
    page = await ctx.__aenter__()
    with pytest.warns(ResourceWarning, match="pin"):
        await pf.close()
    assert not page.pinned and _region_pins(pf) == 0
    with pytest.raises(ValueError):
        page.data[0]
    with pytest.raises(InvalidArgument, match="already unpinned"):
        await ctx.__aexit__(None, None, None)
    with pytest.raises(InvalidArgument, match="closed"):
        async with pf.get(4):
            pass


async def test_contended_bucket_takes_the_slow_way(pf: aiodbenv.PoolFile) -> None:
    async with pf.get(6) as page:
        b = page._bucket
        cache = page._cache
    assert cache is not None
    mutex = cache.mutexes[b]
    loop = asyncio.get_running_loop()
    mutex.__enter__()  # as another process holding the bucket would
    loop.call_later(0.02, cache.unlock, b)
    async with pf.get(6) as page:  # the hit sees EBUSY: the slow path backs off and retries
        assert page.pinned
        mutex.__enter__()
        loop.call_later(0.02, cache.unlock, b)
        waits = mutex.stats()
    # The unpin met the held mutex too and finished once it was free.
    assert not page.pinned and _region_pins(pf) == 0
    assert mutex.stats() != waits


async def test_unpin_wakes_a_frame_waiter(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, cache_size=20 * 1024, page_size=512)
    try:
        pool = env.pool
        f = await pool.open_file("a.db", create=True, page_size=512)
        pool.fail_fast = True
        held = []
        with pytest.raises(aiodbenv.errors.CacheFull):
            for p in range(1000):  # pin until every frame is pinned
                held.append(await f.pin(p, create=True))
        await f.unpin(held[0])
        ctx = f.get(0)
        await ctx.__aenter__()  # a hit (the compiled one when installed): all pinned again
        pool.fail_fast = False
        # The waiter's poll (for frames freed by other processes) would wake it too: not in
        # this test's minute.
        pool._frame_poll_delay = 60.0
        waiter = asyncio.ensure_future(f.pin(5000, create=True))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # waits for a frame
        wakeups = pool.frame_wakeups
        await ctx.__aexit__(None, None, None)
        # The exit released the last pin of a frame: the waiter was woken by it, at once.
        assert pool.frame_wakeups >= wakeups + 1
        page = await asyncio.wait_for(waiter, 5)
        await f.unpin(page)
        for page in held[1:]:
            await f.unpin(page)
        await f.close()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


async def test_no_leak_over_100k_pins(pf: aiodbenv.PoolFile) -> None:
    async def loop(n: int) -> None:
        for i in range(n):
            async with pf.get(i & 15) as page:
                page.data[0]

    def counts() -> tuple[int, int, int]:
        return sys.getrefcount(pf), sys.getrefcount(pf._cache0), sys.getrefcount(pf._cache0.buf)

    await loop(10_000)  # warm: caches, free lists
    await _settle()
    refs = counts()
    objects = len(gc.get_objects())
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        await loop(100_000)
        await _settle()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, f"{after - before} bytes kept by 100k pins"
    assert len(gc.get_objects()) - objects < 100

    # The cache's and its buffer's counts are exact: every page a pin makes holds both. pf's
    # own count moved by one, either way, in two loaded CI runs of the three-cache case
    # (never in 30 local runs, loaded or in CI's order), without a leak's growth: a leak of
    # one reference per pin, or per slow path taken, would move it by thousands. So pf's
    # count may differ by at most 2, after waiting a second for transient holders.
    def drift() -> tuple[int, int, int]:
        now = counts()
        return now[0] - refs[0], now[1] - refs[1], now[2] - refs[2]

    for _ in range(100):
        if drift() == (0, 0, 0):
            break
        await asyncio.sleep(0.01)
        gc.collect()
    d = drift()
    assert abs(d[0]) <= 2 and d[1:] == (0, 0), (d, [type(r).__name__ for r in gc.get_referrers(pf)])
    assert not pf._pins and _region_pins(pf) == 0


async def _settle() -> None:
    """Let the loop run the callbacks already due (done callbacks, tasks' last steps), then
    collect: what is left holds on."""
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()


# -- the pool suite with the compiled path off -----------------------------------------------


# Slow (about 100 s): CI covers the Python pin context in test_mutex's AIODBENV_MUTEX=abi
# rerun of the pool suites; this isolates the one switch with the rest compiled.
@pytest.mark.slow
@pytest.mark.skipif(DISABLED, reason="already a run without the compiled hot path")
def test_pin_tests_pass_without_the_compiled_hot_path() -> None:
    """The pin, unpin, close, cancel and fork tests again with ``AIODBENV_HOT=python``: the
    Python PinContext over the cffi hit and unpin (``AIODBENV_MUTEX=abi`` runs of
    tests/test_mutex.py cover the pure-Python twin)."""
    run_suites(
        "tests/test_hot.py",
        "tests/test_fork.py",
        "tests/test_pool_cancel.py",
        "tests/test_pool.py",
        k="pin or unpin or close or hit or cancel or fork or Hot or hot",
        env={"AIODBENV_HOT": "python"},
    )


async def test_pins_are_tracked_for_close(pf: aiodbenv.PoolFile) -> None:
    # The file's pin record (a compiled PinSet when installed, else a set) behaves as a set.
    pins = pf._pins
    a = await pf.get(1)
    ctx = pf.get(2)
    b = await ctx.__aenter__()
    c = await asyncio.ensure_future(pf.get(3))  # __await__ through a Task
    assert len(pins) == 3 and a in pins and b in pins and c in pins
    assert {p.pgno for p in pins} == {1, 2, 3}
    pins.add(a)  # already there: no change
    assert len(pins) == 3
    for page in list(pins):  # as close does
        if page is a:
            await pf.unpin(page)
    assert len(pins) == 2 and a not in pins
    pins.discard(a)  # not there: no change
    await ctx.__aexit__(None, None, None)
    await pf.unpin(c)
    assert not pins and len(pins) == 0 and list(pins) == []


async def test_hits_are_counted(pf: aiodbenv.PoolFile) -> None:
    # The compiled hit counts what the Python one does: a hit per pin, no miss.
    before = pf.stat()
    for i in range(100):
        async with pf.get(i % 16):
            pass
    after = pf.stat()
    assert after.cache_hit - before.cache_hit == 100
    assert after.cache_miss == before.cache_miss
