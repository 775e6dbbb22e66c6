"""After ``fork``, handles inherited from the parent refuse to work in the child.

The child shares the parent's mapping of the regions: an inherited ``PoolFile`` that still
worked there could drop the parent's pin (whose own unpin would then panic the environment
for every process) or change a page under it. Every object that touches the region refuses
with :class:`~aiodbenv.errors.ForkedProcessError`, and the parent goes on unharmed.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys

import pytest

import aiodbenv
from aiodbenv import Env

from .conftest import in_forked_child

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork semantics of Linux")


async def _child_tries(
    env: Env, pool: aiodbenv.Pool, f: aiodbenv.PoolFile, page: aiodbenv.Page
) -> dict[str, str]:
    """What each use of an inherited handle does in the child (no await ever suspends: the
    calls must refuse before touching anything)."""
    out: dict[str, str] = {}

    async def attempt(name: str, coro_or_call: object) -> None:
        try:
            if inspect.isawaitable(coro_or_call):
                await coro_or_call
            elif callable(coro_or_call):
                coro_or_call()
            out[name] = "ok"
        except Exception as err:  # the test reports whatever came out
            out[name] = type(err).__name__

    await attempt("unpin", f.unpin(page))
    await attempt("get_hit", f.get(0).__aenter__())  # page 0 is cached: the hit path
    await attempt("get_miss", f.get(5, create=True).__aenter__())
    await attempt("set", lambda: f.set(page, dirty=True))
    await attempt("page_data", lambda: page.data[0])
    await attempt("stat", f.stat)
    await attempt("close", f.close())
    await attempt("env_pool", lambda: env.pool)
    await attempt("pool_sync", pool.sync())
    await attempt("pool_trickle", pool.trickle(50))
    await attempt("pool_stat", pool.stat)
    await attempt("pool_open_file", pool.open_file("other.db", create=True))
    await attempt("env_stat", env.stat)
    worker = env._trickle
    assert worker is not None
    await attempt("worker_stop", worker.stop())
    return out


async def test_inherited_handles_refuse_in_the_child(home: str) -> None:
    env = await Env.open(home, create=True, trickle=10)
    try:
        f = await env.pool.open_file("data.db", create=True)
        for i in range(4):
            async with f.get(i, create=True):
                pass
        page = await f.get(3)
        pool = env.pool  # the child gets it by inheritance, not through env.pool
        result = await in_forked_child(lambda: _child_tries(env, pool, f, page))
        assert isinstance(result, dict)
        refused = {k: v for k, v in result.items() if k != "page_data"}
        assert refused == dict.fromkeys(refused, "ForkedProcessError"), result
        assert result["page_data"] == "ValueError"  # the view was released in the child
        # The parent's pin and environment are untouched: its unpin is the one that counts.
        assert page.pinned
        page.data[0:1] = b"p"
        await f.unpin(page, dirty=True)
        assert not env.health().panicked
        async with f.get(3) as again:
            assert bytes(again.data[0:1]) == b"p"
        assert (await env.pool.sync()).errors == []
        await f.close()
    finally:
        await env.close()
        await Env.remove(home, force=True)  # pages made here are dirty on purpose


async def test_parent_hit_path_unchanged_by_a_fork_elsewhere(home: str) -> None:
    """Forking disarms handles in the child only: the parent's hits still take the fast
    path (its counters move as hits, not as slow-path pins)."""
    env = await Env.open(home, create=True)
    try:
        f = await env.pool.open_file("data.db", create=True)
        async with f.get(0, create=True):
            pass
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        await asyncio.to_thread(os.waitpid, pid, 0)
        assert f._hot and not f._forked
        async with f.get(0) as page:
            assert page.pgno == 0
        await f.close()
    finally:
        await env.close()
        await Env.remove(home, force=True)  # pages made here are dirty on purpose
