"""Corrupt regions are errors, never crashes or hangs.

The fuzz test builds one small environment (two files, cached pages in two caches, some of
them dirty), closes it, and then, case by case in child processes, copies it, corrupts its
region files (random bytes, and targeted words: headers, the region table, the cache and pool
headers, bucket heads, buffer headers and their chain links, file entries, allocator chunks;
chains made to loop or to point into the middle of other structures; files truncated or
extended) and uses it: open, pin, dirty, unpin, sync, trickle, stat, close, remove with force.
The only outcomes allowed are success and an :class:`~aiodbenv.errors.AiodbenvError`; another
exception type, a death by signal (a segfault) or a hang (a per-case alarm) fails the test and
names the case, whose mutation is deterministic in ``(seed, case)``.

The child runs many cases one after another (starting an interpreter per case would leave
time for few); when one dies, the parent starts another from the next case.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from aiodbenv import Env

from .conftest import python

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corrupt_child.py")
FILES = ("a.db", "b.db")
PAGES = 12


async def _make_template(home: str) -> None:
    async with Env.open(home, create=True, cache_size=96 * 1024, ncache=2) as env:
        for name in FILES:
            # b.db with page checksums: corrupt regions must not confuse their checks either.
            f = await env.pool.open_file(name, create=True, checksum=name == "b.db")
            for i in range(PAGES):
                async with f.get(i, create=True) as page:
                    page.data[:4] = i.to_bytes(4, "little")
                    page.mark_dirty()
            await env.pool.sync()
            for i in range(0, PAGES, 3):  # some pages dirty at close, in the chains
                async with f.get(i) as page:
                    page.mark_dirty()
            await f.close()


def run_fuzz(seed: int, cases: int, timeout: int = 20) -> tuple[list[str], dict[str, int]]:
    """Run ``cases`` fuzz cases; returns (failures, outcome counts)."""
    top = tempfile.mkdtemp(prefix="aiodbenv-fuzz-")
    template = os.path.join(top, "template")
    os.mkdir(template)
    failures: list[str] = []
    outcomes: dict[str, int] = {}
    try:
        asyncio.run(_make_template(template))
        # Every case's home starts from this one; the live environment is closed, so its
        # region files hold exactly what the pool left in them.
        case = 0
        while case < cases:
            proc = subprocess.run(
                [sys.executable, CHILD, template, top, str(seed), str(case), str(cases - case)],
                capture_output=True,
                text=True,
                env={**os.environ, "AIODBENV_FUZZ_TIMEOUT": str(timeout)},
                timeout=timeout * (cases - case) + 60,
            )
            started = None
            what = ""
            for line in proc.stdout.splitlines():
                tag, _, rest = line.partition(" ")
                num, _, text = rest.partition(" ")
                if tag == "START":
                    started, what = int(num), text
                elif tag == "DONE":
                    started = None
                    for o in text.split():
                        outcomes[o] = outcomes.get(o, 0) + 1
                    case = int(num) + 1
                elif tag == "BAD":
                    failures.append(
                        f"seed {seed} case {num} ({what}): unclean error\n"
                        + text.replace("\\n", "\n")
                    )
                    started = None
                    case = int(num) + 1
            if proc.returncode == 0:
                break
            if started is not None:
                rc = proc.returncode
                how = "hang (alarm)" if rc == -14 else f"died with {rc}"
                failures.append(
                    f"seed {seed} case {started} ({what}): {how}\n{proc.stderr[-2000:]}"
                )
                case = started + 1
            elif proc.returncode != 3:
                failures.append(f"seed {seed}: child failed ({proc.returncode})\n{proc.stderr}")
                break
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return failures, outcomes


def _budget(request: pytest.FixtureRequest) -> int:
    return 3000 if request.config.getoption("--run-slow") else 400


def test_fuzz_corrupt_regions(request: pytest.FixtureRequest) -> None:
    """Corrupted region files give success or a clean aiodbenv error: no other exception,
    no signal death, no hang."""
    failures, outcomes = run_fuzz(seed=9, cases=_budget(request))
    assert not failures, f"{len(failures)} unclean case(s):\n" + "\n\n".join(failures[:10])
    # The fuzz must reach the pool, not stop at the header checks every time.
    assert outcomes.get("ok", 0) > 0
    assert outcomes.get("CorruptRegion", 0) > 0


@pytest.mark.slow
def test_fuzz_corrupt_regions_other_seeds() -> None:
    """More seeds (``--run-slow``)."""
    for seed in (1, 2, 3):
        failures, _ = run_fuzz(seed=seed, cases=1000)
        assert not failures, "\n\n".join(failures[:10])


LIVE = r"""
import asyncio, os, sys, time
import aiodbenv
from aiodbenv import CorruptRegion, RunRecovery
from aiodbenv.mpool.layout import BH, BUCKET
async def main(home, ncache):
    env = await aiodbenv.Env.open(home, create=True, cache_size=256 * 1024, ncache=ncache)
    f = await env.pool.open_file("data.db", create=True)
    for i in range(16):
        async with f.get(i, create=True):
            pass
    core = env.pool._core
    # A cached page's bucket; its first buffer's link made to point at itself.
    cache, b = core.locate(f._fidx, 3)
    head = int(cache.words[cache.bucket_words[b] + BUCKET.word.head])
    assert head
    cache.words[(head >> 3) + BH.word.next] = head
    # A page of the same bucket that is not cached: its lookup must walk the loop.
    pgno = next(p for p in range(16, 100000) if core.locate(f._fidx, p) == (cache, b))
    t = time.monotonic()
    try:
        await f.get(pgno, create=True)
    except CorruptRegion as err:
        print("corrupt", round(time.monotonic() - t, 3), err, flush=True)
    # The environment is panicked, for this handle and for any other open.
    try:
        await f.get(0)
    except RunRecovery:
        print("panicked", flush=True)
    try:
        await aiodbenv.Env.open(home)
    except RunRecovery:
        print("open refused", flush=True)
    try:
        await env.close()
    except RunRecovery:
        print("close reports the panic", flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.parametrize("backend", ["compiled", "abi"])
@pytest.mark.parametrize("ncache", [1, 2])
def test_live_chain_loop_is_corrupt_region_not_a_hang(home: str, backend: str, ncache: int) -> None:
    """A running environment whose bucket chain is made to loop: the next pin through that
    bucket raises CorruptRegion at once (no 100 % CPU spin) and panics the environment."""
    env = {"AIODBENV_MUTEX": "abi"} if backend == "abi" else {}
    try:
        r = python(LIVE, home, str(ncache), env=env, timeout=60)
    finally:
        asyncio.run(Env.remove(home, force=True))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("corrupt "), r.stdout + r.stderr
    assert "loops" in lines[0]
    assert float(lines[0].split()[1]) < 5  # the walk is bounded: milliseconds, not a spin
    assert lines[1:] == ["panicked", "open refused", "close reports the panic"]
