"""A killed worker never stalls the pool: the registry of live processes and the reaper.

Real processes, real SIGKILL and SIGSTOP. Children are killed at exact steps of a pin, an unpin,
a read and a write-back through ``AIODBENV_TEST_SIGNAL`` (see :mod:`aiodbenv._io`), never after
a sleep. After each, the invariant is checked from the region: every buffer's pin count is the
sum of its per-slot counts, and only live slots hold pins.
(The SIGKILL-while-pinned-and-dirty case, "within 2 s sync succeeds and the page is on disk",
is ``test_process_killed_holding_a_pin`` in test_pool_processes.py.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

import aiodbenv
from aiodbenv.errors import CacheFull
from aiodbenv.mpool.layout import BH, BUCKET, CACHE_HEADER, PINS_HALF
from aiodbenv.mpool.reaper import REAP_INTERVAL
from aiodbenv.region.layout import (
    ENV_HEADER,
    ENV_WORD,
    MAX_PROCS,
    PROC_SLOT,
    PROC_SLOT_WORDS,
    PROCS_WORD,
)
from aiodbenv.region.mutex import trylock, unlock
from aiodbenv.region.registry import LOCK_FILE, Registry, process_start_time, read_slots

from .conftest import spawn

PAGES = 64  # pages of the test file
PS = 1024

WORKER = r"""
import asyncio, os, random, sys, time
import aiodbenv

def say(*args):
    print(*args, flush=True)

async def main():
    home, mode, hold, ops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    env = await aiodbenv.Env.open(home)
    env.pool.wait_timeout = 60
    f = await env.pool.open_file("r.db", page_size=1024)
    if mode == "slow":
        f._pin_hit = lambda pgno: None  # every pin takes the slow path (its crash steps)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    say("READY")
    rnd = random.Random(os.getpid())
    held = []
    worst = 0.0
    n = 0
    while not stop.is_set() and (ops == 0 or n < ops):
        n += 1
        t = time.monotonic()
        page = await f.pin(rnd.randrange(int(sys.argv[5])))
        worst = max(worst, time.monotonic() - t)
        if rnd.random() < 0.3:
            page.data[:4] = b"dirt"
            try:
                f.set(page, dirty=True)
            except aiodbenv.errors.TryAgain:
                # set() waits 2 ms at most (documented): on a loaded machine a holder may be
                # descheduled longer. Dirty at the unpin instead.
                page.mark_dirty()
        held.append(page)
        if len(held) > hold:
            await f.unpin(held.pop(0))
        if mode == "slow" and n % 16 == 0:
            try:
                await f.sync()
            except aiodbenv.errors.Incomplete:
                pass  # our own pins hold some dirty pages
        if n % 8 == 0:
            await asyncio.sleep(0)
        if n == 50:
            say("RUNNING")
    for page in held:
        await f.unpin(page)
    await f.close()
    await env.close()
    say("WORST", worst)

asyncio.run(main())
"""

HOLD = r"""
import asyncio, sys, time
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    f = await env.pool.open_file("r.db", page_size=1024)
    pages = [await f.pin(p) for p in range(int(sys.argv[2]))]
    if sys.argv[3:] == ["dirty"]:
        for page in pages:
            page.data[:4] = b"HELD"
            f.set(page, dirty=True)
    print("HOLDING", flush=True)
    sys.stdin.readline()
    for page in pages:
        await f.unpin(page)
    await env.close()

asyncio.run(main())
"""


@pytest.fixture
async def env(home: str) -> AsyncIterator[aiodbenv.Env]:
    """A file environment of 32 frames and a file of PAGES pages written through it."""
    e = await aiodbenv.Env.open(home, create=True, cache_size=32 * PS, page_size=PS)
    try:
        async with e.pool.open_file("r.db", create=True, page_size=PS) as f:
            for p in range(PAGES):
                async with f.get(p, create=True) as page:
                    page.data[:] = bytes([p]) * PS
                    page.mark_dirty()
        await e.pool.sync()
        yield e
    finally:
        if not e.closed:
            await e.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


def pin_totals(e: aiodbenv.Env) -> dict[int, int]:
    """Check the invariant from the region and return pins per slot: every linked buffer's
    ref is the sum of its slots' counts, only in-use slots hold pins, and no bucket mutex is
    held (one a dead process left is repaired by taking it, as any locker would)."""
    live = {s for s, state, *_ in read_slots(e._core._w) if state == 1}
    totals: dict[int, int] = {}
    for cache in e.pool._core.caches:
        w, halves = cache.words, cache.halves
        for b, bw in enumerate(cache.bucket_words):
            rc = trylock(cache.mptrs[b])
            assert rc != errno.EBUSY, f"bucket {b} mutex is held"
            if rc:
                cache.mutexes[b].acquire_contended(rc)
            try:
                off = int(w[bw + BUCKET.word.head])
                while off:
                    p = (off >> 1) + PINS_HALF
                    counts = halves[p : p + MAX_PROCS].tolist()
                    assert w[(off >> 3) + BH.word.ref] == sum(counts), (off, counts)
                    for s, c in enumerate(counts):
                        if c:
                            assert s in live, f"slot {s} is free but holds {c} pin(s)"
                            totals[s] = totals.get(s, 0) + c
                    off = int(w[(off >> 3) + BH.word.next])
            finally:
                unlock(cache.mptrs[b])
    return totals


def assert_no_mutex_held(e: aiodbenv.Env) -> None:
    """No mutex besides the buckets' (which :func:`pin_totals` checks) is held: the
    environment's, every region allocator's, the pool's, every cache's allocator and every
    open file's. One whose holder died is repaired by taking it, as any locker would."""
    core = e.pool._core
    mutexes = [e._core.mutex, *e._core.alloc_mutexes, core.mutex]
    mutexes += [c.alloc_mutex for c in core.caches]
    mutexes += [core.file_mutex(i) for i in core.file_slots()]
    for m in mutexes:
        ptr = getattr(m, "ptr", None)
        if ptr is None:
            continue  # a NullMutex: a private region
        rc = trylock(ptr)
        assert rc != errno.EBUSY, f"the {m.name} mutex is held"
        if rc:
            m.acquire_contended(rc)
        unlock(ptr)


def start_worker(
    home: str,
    *,
    mode: str = "fast",
    hold: int = 4,
    ops: int = 0,
    pages: int = PAGES,
    plan: str = "",
) -> subprocess.Popen[str]:
    env = {"AIODBENV_TEST_SIGNAL": plan}
    if mode == "slow":
        env["AIODBENV_MUTEX"] = "abi"  # the Python twin: the crash steps are in it
    return spawn(WORKER, home, mode, str(hold), str(ops), str(pages), env=env)


def line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return p.stdout.readline().strip()


# -- (c) killed at each step of a pin, an unpin, a read and a write-back ------------------------

STEPS = [
    "pin.lookup:at",  # found the buffer, about to count the pin (bucket mutex held)
    "pin.counted:at",  # ref counted, the slot's count not yet (bucket mutex held)
    "pin.inserted:at",  # a miss linked its frame, pinned, being read
    "unpin.counted:at",  # ref dropped, the slot's count not yet (bucket mutex held)
    "pread:before",  # a read in flight
    "pread:after",  # the page read into the frame, still flagged READING
    "read.publish:at",  # READING cleared, the reader's pid not yet (bucket mutex held)
    "claimed:at",  # a write-back claimed its pages (WRITING), nothing written yet
    "pwrite:before",  # a write-back in flight (pages claimed WRITING)
    "pwrite:after",  # written, the claims not yet released
    "write_done:at",  # claims released, pages clean
]


@pytest.mark.parametrize("nth", [2, 9])
@pytest.mark.parametrize("step", STEPS)
async def test_killed_at_each_step_keeps_the_invariant(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]], step: str, nth: int
) -> None:
    pool = env.pool
    # Evict everything first, so the child's pins miss (reads) and hit (lookups) both.
    child = start_worker(home, mode="slow", hold=6, ops=400, plan=f"{step}:{nth}:SIGKILL")
    procs.append(child)
    assert line(child) == "READY"
    assert child.wait(timeout=60) == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    pool.reap()
    assert pin_totals(env) == {}  # the dead child's pins are gone; we hold none
    assert_no_mutex_held(env)
    assert env.stat().handles == 1
    assert [p.pid for p in env.stat().processes] == [os.getpid()]
    # Nothing is stuck: every page can be read and pinned, every frame at once, and sync
    # writes whatever the child left dirty.
    async with pool.open_file("r.db", page_size=PS) as f:
        held = [await f.pin(p) for p in range(32)]
        for page in held:
            await f.unpin(page)
        for p in range(PAGES):
            async with f.get(p) as page:
                assert page.data[4:] == bytes([p]) * (PS - 4)
    await pool.sync()
    assert pool.stat().page_dirty == 0
    assert pin_totals(env) == {}


# -- (a) without any call: the periodic reaper -------------------------------------------------


async def test_periodic_reaper_reclaims_without_being_asked(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    child = spawn(HOLD, home, "10")
    procs.append(child)
    assert line(child) == "HOLDING"
    assert sum(pin_totals(env).values()) == 10
    child.kill()
    child.wait(timeout=10)
    deadline = time.monotonic() + REAP_INTERVAL + 5.0  # slack for a loaded machine
    while env.pool.stat().procs_reaped == 0:
        assert time.monotonic() < deadline, "the background reaper did not run"
        await __import__("asyncio").sleep(0.05)
    st = env.pool.stat()
    assert (st.procs_reaped, st.pins_reclaimed, st.dirty_inherited) == (1, 10, 0)
    assert pin_totals(env) == {}
    assert env.stat().handles == 1


async def test_a_sync_or_a_frame_wait_reaps_even_just_after_a_look(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """The reaper's last look (by the background task, say) came just before the holder died:
    a sync that finds pinned dirty pages, and a pin that finds no free frame, look again at
    once instead of trusting it."""
    pool = env.pool
    task = pool._reaper_task
    assert task is not None
    task.cancel()  # no background look may tidy up behind the test's back
    pool._reaper_task = None
    for dirty, check in ((True, "sync"), (False, "frame")):
        child = spawn(HOLD, home, "32", "dirty" if dirty else "clean")  # every frame
        procs.append(child)
        assert line(child) == "HOLDING"
        child.kill()
        child.wait(timeout=10)
        pool._reaped_at = time.monotonic()  # a look made a moment before the death
        if check == "sync":
            result = await pool.sync()
            assert (result.written, result.incomplete) == (32, 0)
            with open(os.path.join(home, "r.db"), "rb") as fh:
                data = fh.read()
            assert all(data[p * PS : p * PS + 4] == b"HELD" for p in range(32))
        else:
            pool.fail_fast = True  # no waiting either: the first look must find the dead
            async with pool.open_file("r.db", page_size=PS) as f:
                async with f.get(40) as page:
                    assert page.data[4:] == bytes([40]) * (PS - 4)
            pool.fail_fast = False
        assert pin_totals(env) == {}
    st = pool.stat()
    assert (st.procs_reaped, st.pins_reclaimed, st.dirty_inherited) == (2, 64, 32)


async def test_metrics_count_what_the_reaper_did(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    import aiodbenv.metrics

    child = spawn(HOLD, home, "3", "dirty")
    procs.append(child)
    assert line(child) == "HOLDING"

    def samples() -> dict[str, float]:
        text = aiodbenv.metrics.generate(env)
        rows = [r.rsplit(" ", 1) for r in text.splitlines() if r and not r.startswith("#")]
        return {name: float(value) for name, value in rows}

    before = samples()
    assert before[f'aiodbenv_process_pins{{pid="{child.pid}",slot="1"}}'] == 3
    child.kill()
    child.wait(timeout=10)
    env.pool.reap()
    after = samples()
    assert not any(f'pid="{child.pid}"' in name for name in after)
    assert after["aiodbenv_dead_handles_reaped_total"] == 1
    assert after["aiodbenv_dead_pins_reclaimed_total"] == 3
    assert after["aiodbenv_dead_dirty_pages_inherited_total"] == 3
    await env.pool.sync()  # what it left dirty is written


# -- (d) a stopped process is never reaped; a wait on it names it -------------------------------


async def test_stopped_pin_holder_is_not_reaped_and_named(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    child = spawn(HOLD, home, "32")  # every frame of the cache
    procs.append(child)
    assert line(child) == "HOLDING"
    os.kill(child.pid, signal.SIGSTOP)
    try:
        assert env.pool.reap() == []
        assert child.pid in [p.pid for p in env.stat().processes]
        pool = env.pool
        pool.wait_timeout = 1.5
        async with pool.open_file("r.db", page_size=PS) as f:
            with pytest.raises(CacheFull, match=rf"pins held by process\(es\) {child.pid} "):
                await f.pin(40)
        assert env.pool.stat().procs_reaped == 0
        assert sum(pin_totals(env).values()) == 32  # still its pins
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == 0
    assert pin_totals(env) == {}
    assert env.pool.stat().procs_reaped == 0


# -- (e) a recycled pid is a different process ---------------------------------------------------


def _slot_words(e: aiodbenv.Env, slot: int) -> tuple[memoryview, int]:

    return e._core._w, PROCS_WORD + slot * PROC_SLOT_WORDS


async def test_recycled_pid_is_a_different_process(
    env: aiodbenv.Env, home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """A slot naming a live pid, locked by a live open file description (as a description
    inherited through fork would be), is dead when that pid's start time differs: the
    process with the pid now is not the one that took the slot. With the right start time it
    is alive; with its lock free it is dead whatever its pid."""
    from aiodbenv.region import registry as r

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    procs.append(other)  # type: ignore[arg-type]
    reg = env._core.registry
    assert reg is not None
    slot = MAX_PROCS - 1
    w, base = _slot_words(env, slot)
    # Lock the slot's byte through a description of our own, not the registry's.
    fd = os.open(os.path.join(home, LOCK_FILE), os.O_RDWR)
    try:
        fcntl.fcntl(fd, r._F_OFD_SETLK, struct.pack(r._FLOCK, fcntl.F_WRLCK, 0, slot, 1, 0))
        start = process_start_time(other.pid)
        assert start > 0
        with env._core.mutex:
            w[base + PROC_SLOT.word.pid] = other.pid
            w[base + PROC_SLOT.word.start_time] = start
            w[base + PROC_SLOT.word.opened_ns] = time.time_ns()
            w[base + PROC_SLOT.word.state] = r.IN_USE
        assert not reg.is_dead(slot)
        assert env.pool.reap() == []
        # The same pid, another start time: a recycled pid.
        w[base + PROC_SLOT.word.start_time] = start + 1
        assert reg.is_dead(slot)
        # Give it a pin on a cached page, as the dead owner would have left it.
        async with env.pool.open_file("r.db", page_size=PS) as f:
            async with f.get(3) as page:
                cache, bh = page._cache, page._bh
                assert cache is not None
                p = (bh >> 1) + PINS_HALF
                with cache.mutexes[page._bucket]:
                    cache.halves[p + slot] += 2
                    cache.words[(bh >> 3) + BH.word.ref] += 2
            assert sum(pin_totals(env).values()) == 2
            reaped = env.pool.reap()
        assert [(x.slot, x.pid, x.pins) for x in reaped] == [(slot, other.pid, 2)]
        assert reaped[0].pages == [(env.resolve("r.db"), 3)]
        assert pin_totals(env) == {}
        assert w[base + PROC_SLOT.word.state] == r.FREE
        # Lock free, pid alive with its true start time: dead all the same.
        with env._core.mutex:
            w[base + PROC_SLOT.word.pid] = other.pid
            w[base + PROC_SLOT.word.start_time] = start
            w[base + PROC_SLOT.word.state] = r.IN_USE
        os.close(fd)
        fd = -1
        assert reg.is_dead(slot)
        assert [x.pid for x in env.pool.reap()] == [other.pid]
    finally:
        if fd >= 0:
            os.close(fd)
        other.kill()
        other.wait()


async def test_a_frame_in_flight_of_a_dead_process_with_a_recycled_pid_is_freed(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    """A frame taken but not yet linked carries its taker's pid; when that pid names a live
    process again, only the registry knows the taker died: the reaper frees the frame."""
    from aiodbenv.mpool.layout import CHUNK_TAG_BEFORE_BH
    from aiodbenv.region import registry as r

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    procs.append(other)  # type: ignore[arg-type]
    e = await aiodbenv.Env.open(home, create=True, cache_size=32 * PS, page_size=PS)
    try:
        core = e.pool._core
        cache = core.caches[0]
        w = cache.words
        buffers = int(w[cache.hdr + CACHE_HEADER.word.buffers])
        bh = core.alloc_buffer(cache, PS)
        assert bh
        w[(bh >> 3) - CHUNK_TAG_BEFORE_BH] = other.pid  # taken by "other"
        assert core.reclaim_lost_buffers(cache) == 0  # the pid runs: it looks alive
        # The taker's slot: its lock byte free, its pid now another process's (recycled).
        slot = MAX_PROCS - 3
        rw, base = _slot_words(e, slot)
        with e._core.mutex:
            rw[base + PROC_SLOT.word.pid] = other.pid
            rw[base + PROC_SLOT.word.start_time] = process_start_time(other.pid) + 1
            rw[base + PROC_SLOT.word.state] = r.IN_USE
            rw[_env_refcnt_word(e)] += 1
        assert [x.pid for x in e.pool.reap()] == [other.pid]
        assert w[(bh >> 3) - CHUNK_TAG_BEFORE_BH] == 0
        assert w[cache.hdr + CACHE_HEADER.word.buffers] == buffers  # the frame is back
        assert e.stat().handles == 1
    finally:
        other.kill()
        other.wait()
        await e.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


# -- the registry itself ---------------------------------------------------------------------------


async def test_each_handle_has_a_slot_and_gives_it_back(env: aiodbenv.Env, home: str) -> None:
    second = await aiodbenv.Env.open(home)
    try:
        reg1, reg2 = env._core.registry, second._core.registry
        assert reg1 is not None and reg2 is not None and reg1.slot != reg2.slot
        # Two handles of one process: each sees the other alive (different descriptions).
        assert not reg1.is_dead(reg2.slot) and not reg2.is_dead(reg1.slot)
        assert {p.slot for p in env.stat().processes} == {reg1.slot, reg2.slot}
    finally:
        await second.close()
    assert {p.slot for p in env.stat().processes} == {reg1.slot}


async def test_private_environment_has_no_registry(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, region="private") as e:
        assert e._core.registry is None
        assert e.stat().processes == ()
        assert e.pool.reap() == []
    assert not os.path.exists(os.path.join(home, LOCK_FILE))


def test_registry_type_is_exported() -> None:
    assert Registry.__doc__


# -- (b) a worker killed and restarted again and again -----------------------------------------


@pytest.mark.one_loop  # the workers are other processes; this loop only sets up and checks
@pytest.mark.parametrize("rounds", [pytest.param(10, id="10"), pytest.param(50, id="50")])
async def test_worker_killed_and_restarted(
    home: str, procs: list[subprocess.Popen[str]], rounds: int, request: pytest.FixtureRequest
) -> None:
    if rounds > 10 and not request.config.getoption("--run-slow"):
        pytest.skip("slow: run with --run-slow")
    e = await aiodbenv.Env.open(home, create=True, cache_size=256 * PS, page_size=PS)
    try:
        async with e.pool.open_file("r.db", create=True, page_size=PS) as f:
            for p in range(1024):
                async with f.get(p, create=True) as page:
                    page.data[:] = bytes([p & 255]) * PS
                    page.mark_dirty()
        await e.pool.sync()
        # Three survivors hold 21 pins each; the victim holds 201 of the 256 frames, so the
        # survivors run out of frames each time it dies holding them, until it is reaped.
        survivors = [start_worker(home, hold=20, pages=1024) for _ in range(3)]
        procs.extend(survivors)
        for s in survivors:
            assert line(s) == "READY"
        for _ in range(rounds):
            victim = start_worker(home, hold=200, pages=1024)
            procs.append(victim)
            assert line(victim) == "READY"
            assert line(victim) == "RUNNING"
            time.sleep(0.05)
            victim.kill()
            victim.wait(timeout=10)
        time.sleep(0.2)
        for s in survivors:
            assert s.poll() is None, s.stderr.read() if s.stderr else ""
            assert s.stdin is not None
            s.stdin.write("\n")
            s.stdin.flush()
        worst = []
        for s in survivors:
            words = line(s).split()
            while words and words[0] == "RUNNING":
                words = line(s).split()
            assert words and words[0] == "WORST", words
            worst.append(float(words[1]))
            assert s.wait(timeout=60) == 0
        # Nobody waited for a frame much longer than the reaper's interval (plus slack for a
        # loaded machine; the on-demand reap usually frees them within milliseconds).
        assert max(worst) < REAP_INTERVAL + 4.0, worst
        e.pool.reap()
        assert pin_totals(e) == {}
        assert_no_mutex_held(e)
        assert e.stat().handles == 1
        assert [p.pid for p in e.stat().processes] == [os.getpid()]
        assert e.pool.stat().procs_reaped == rounds
    finally:
        await e.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)


# -- by hand: failchk, and what stat shows ------------------------------------------------------


async def test_failchk_and_stat_commands(home: str, procs: list[subprocess.Popen[str]]) -> None:
    from .test_cli import run

    e = await aiodbenv.Env.open(home, create=True, cache_size=32 * PS, page_size=PS)
    async with e.pool.open_file("r.db", create=True, page_size=PS) as f:
        for p in range(8):
            async with f.get(p, create=True):
                pass
    await e.pool.sync()
    await e.close()  # nobody here to reap: the command must do it
    try:
        child = spawn(HOLD, home, "3")
        procs.append(child)
        assert line(child) == "HOLDING"
        out = run("stat", "-e", "-h", home)
        assert out.returncode == 0, out.stderr
        assert f"pid {child.pid} " in out.stdout and "3 pin(s) held" in out.stdout
        child.kill()
        child.wait(timeout=10)
        out = run("failchk", "-h", home)
        assert out.returncode == 0, out.stderr
        assert f"process {child.pid} " in out.stdout
        assert "dropped 3 pin(s) of 3 page(s)" in out.stdout
        assert "r.db:0" in out.stdout
        assert "1 dead handle(s) reaped" in out.stdout
        out = run("failchk", "-h", home)
        assert "0 dead handle(s) reaped" in out.stdout
        out = run("stat", "-m", "-h", home)
        assert "Dead processes reaped" in out.stdout
        rows = {" ".join(r.split()[1:]): r.split()[0] for r in out.stdout.splitlines() if r}
        assert rows["Dead processes reaped"] == "1"
        assert rows["Pins of dead processes reclaimed"] == "3"
        assert rows["Dirty pages inherited from dead processes"] == "0"
    finally:
        await aiodbenv.Env.remove(home, force=True)


async def test_a_busy_bucket_never_blocks_the_reaper(env: aiodbenv.Env, home: str) -> None:
    """A bucket mutex held by a live process (stopped, say) makes the reaper give the slot
    back for its next look, within milliseconds, instead of blocking the event loop."""
    from aiodbenv.region import registry as r

    slot = MAX_PROCS - 2
    w, base = _slot_words(env, slot)
    async with env.pool.open_file("r.db", page_size=PS) as f:
        async with f.get(5) as page:
            cache, bh, b = page._cache, page._bh, page._bucket
            assert cache is not None
        with env._core.mutex:  # a dead handle (lock byte free) that left one pin on page 5
            w[base + PROC_SLOT.word.pid] = 2**22 + 1  # above the default pid_max: no such process
            w[base + PROC_SLOT.word.state] = r.IN_USE
            w[_env_refcnt_word(env)] += 1
        with cache.mutexes[b]:
            cache.halves[(bh >> 1) + PINS_HALF + slot] = 1
            cache.words[(bh >> 3) + BH.word.ref] += 1
        assert trylock(cache.mptrs[b]) == 0  # "another process" holds the bucket
        try:
            t0 = time.monotonic()
            assert env.pool.reap() == []
            assert time.monotonic() - t0 < 1.0
            assert w[base + PROC_SLOT.word.state] == r.IN_USE  # given back, to be reaped later
        finally:
            unlock(cache.mptrs[b])
        reaped = env.pool.reap()
        assert [(x.slot, x.pins, x.pages) for x in reaped] == [
            (slot, 1, [(env.resolve("r.db"), 5)])
        ]
    assert pin_totals(env) == {}
    assert env.stat().handles == 1


def _env_refcnt_word(e: aiodbenv.Env) -> int:

    return ENV_WORD + ENV_HEADER.word.refcnt
