"""The compiled log append (aiodbenv/_csrc/60_log.c) against its Python twin: the same records
through both give the same log bytes, its CRC-32 is zlib's, a corrupt header word is refused,
a put after fork or close does not go through it, and the log suites pass with the Python
twin alone (AIODBENV_MUTEX=abi)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import zlib
from typing import Any

import pytest

import aiodbenv
from aiodbenv import CorruptRegion, InvalidArgument, RunRecovery, _io
from aiodbenv.errors import ForkedProcessError
from aiodbenv.log import accel
from aiodbenv.log.files import log_path
from aiodbenv.log.layout import LOG_HEADER
from aiodbenv.log.threadrounds import CRound

from .conftest import REPO, in_forked_child, run_suites

compiled = pytest.mark.skipif(not accel.COMPILED, reason="the compiled accelerator is not in use")

# Puts a fixed mix of records (tiny to larger than the buffer, across several files of a small
# file log, and around the ring of an in-memory log), then prints a digest of every log byte.
AGREE = r"""
import asyncio, hashlib, json, os, random, sys
import aiodbenv
from aiodbenv.log import accel

async def main(home, mode):
    os.makedirs(home)
    rng = random.Random(12)
    sizes = [0, 1, 7, 8, 9, 15, 16, 17, 100, 1000, 3000, 5000, 9000]
    if mode == "file":
        env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192,
                                      log_file_size=65536)
    else:
        env = await aiodbenv.Env.open(home, create=True, log_inmemory=True,
                                      log_buffer_size=65536, log_file_size=16384)
    lsns = []
    for i in range(400):
        n = sizes[rng.randrange(len(sizes))] if mode == "file" else rng.randrange(0, 600)
        data = bytes(rng.getrandbits(8) for _ in range(n))
        lsns.append(str(await env.log.put(data, flush=(i % 97 == 0))))
    st = env.log.stat()
    out = {"compiled": env.log._fast is not None, "lsns": lsns, "records": st.records,
           "bytes": st.bytes}
    if mode == "memory":
        c = env.log._c
        out["ring"] = hashlib.sha256(bytes(c.buf[c.b0:c.b0 + c.bsize])).hexdigest()
        out["tail"] = c.word("tail")
        await env.close()
    else:
        await env.close()
        for name in sorted(os.listdir(home)):
            if name.startswith("log."):
                with open(os.path.join(home, name), "rb") as f:
                    out[name] = hashlib.sha256(f.read()).hexdigest()
    await aiodbenv.Env.remove(home)
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _agree_run(home: str, mode: str, abi: bool) -> dict[str, object]:
    env = dict(os.environ)
    if abi:
        env["AIODBENV_MUTEX"] = "abi"
    else:
        env.pop("AIODBENV_MUTEX", None)
    r = subprocess.run(
        [sys.executable, "-c", AGREE, home, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


@compiled
@pytest.mark.parametrize("mode", ["file", "memory"])
def test_compiled_and_python_appends_write_the_same_bytes(home: str, mode: str) -> None:
    # Separate homes: removing an environment keeps its log files.
    fast = _agree_run(os.path.join(home, "compiled"), mode, abi=False)
    slow = _agree_run(os.path.join(home, "python"), mode, abi=True)
    assert fast.pop("compiled") is True
    assert slow.pop("compiled") is False
    if mode == "file":
        assert sum(k.startswith("log.") for k in fast) >= 3  # the records crossed files
    assert fast == slow


@compiled
def test_compiled_crc32_is_zlibs() -> None:
    rng = random.Random(5)
    for n in [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4097]:
        data = rng.randbytes(n)
        assert accel.crc32(data) == zlib.crc32(data), n


@compiled
async def test_corrupt_fill_is_refused_and_panics(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    try:
        c = env.log._c
        i = c.h + LOG_HEADER.word.tail
        c.w[i] = (c.w[i] & ~0xFFFFFFFF) | (c.bsize + 8)  # a fill past the buffer
        tail, records = c.w[i], c.word("st_records")
        with pytest.raises(CorruptRegion):
            await env.log.put(b"x")
        with pytest.raises(RunRecovery):
            await env.log.put(b"y")
        assert (c.w[i], c.word("st_records")) == (tail, records)  # nothing appended
    finally:
        with pytest.raises(RunRecovery):
            await env.close()
        await aiodbenv.Env.remove(home, force=True)


@compiled
async def test_full_buffer_and_large_records_go_the_python_way(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=4096)
    try:
        data = [b"%d" % i * (i % 50) for i in range(300)] + [b"L" * 10000]
        lsns = [await env.log.put(d) for d in data]
        assert lsns == sorted(lsns)
        got = [d async for _, d in env.log.cursor()]
        assert got == data
        assert env.log.stat().wcount_fill > 0  # appends found the buffer full
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


async def test_put_after_close_is_refused(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    log = env.log
    await log.put(b"a")
    await env.close()
    assert log._fast is None
    with pytest.raises(InvalidArgument):
        await log.put(b"b")
    await aiodbenv.Env.remove(home)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
async def test_forked_child_does_not_put_through_the_parents_handle(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    try:
        log = env.log  # the handle the child inherits (env.log itself refuses in a child)
        end = log.end_lsn
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            code = b"?"
            try:
                coro = log.put(b"child")
                try:
                    code = b"suspended: %r" % (coro.send(None),)
                except StopIteration:
                    code = b"appended"
                except ForkedProcessError:
                    code = b"refused" if log._fast is None else b"armed"
                except BaseException as err:
                    code = repr(err).encode()
            finally:
                os.write(w, code)
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            assert f.read() == b"refused"
        os.waitpid(pid, 0)
        assert env.log.end_lsn == end
        assert env.log._fast is not None or not accel.COMPILED
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


def test_log_suites_pass_with_the_python_append() -> None:
    """The log test suites again with AIODBENV_MUTEX=abi: the Python append, flush and ring."""
    if os.environ.get("AIODBENV_MUTEX") == "abi":
        assert not accel.COMPILED
        return
    run_suites(
        "tests/test_log.py",
        "tests/test_log_cancel.py",
        "tests/test_log_model.py",
        "tests/test_log_processes.py",
        env={"AIODBENV_MUTEX": "abi"},
        # Closes that give up on slow writes: the Python rounds the first run takes already
        # (the fault seam forces them), and a few seconds of waiting each.
        k="not a_late and not slower_than and not file_switch and not stays_counted",
    )


# -- writes behind ----------------------------------------------------------------------------


def wait_io(r: Any, timeout: float = 30.0) -> None:
    """Block (the loop too, on purpose) until the round's thread is done with it: the
    executor's future, or the round thread's job state (it has no future)."""
    deadline = time.monotonic() + timeout
    while not r.io_done():
        assert time.monotonic() < deadline, "the round never finished"
        time.sleep(0.0005)


def _send(coro: Any) -> tuple[bool, Any]:
    """Run a coroutine's first step: (True, result) if it finished without suspending."""
    try:
        fut = coro.send(None)
    except StopIteration as done:
        return True, done.value
    return False, (coro, fut)


async def test_write_behind_starts_and_finishes_without_suspending_the_put(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192)
    try:
        log = env.log
        lsns = [await log.put(b"first", flush=True)]  # the file is open here, the buffer empty
        rec = b"r" * 84  # 100 bytes with its header
        # Up to half the buffer: appended in place, nothing written.
        while log._inflight is None:
            finished, value = _send(log.put(rec))
            assert finished, "a put with room in the buffer suspended"
            lsns.append(value)
        # The put that passed half handed the write to the writer's thread before returning.
        r = log._inflight
        assert r is not None and r.end > 0
        wait_io(r)
        # The thread published the write and let the writer role go, with the event loop
        # blocked all along (here): other processes' flushes are never kept waiting on it.
        assert r.finished and log._c.role_holder() == (0, 0)
        assert log.written_lsn > lsns[-1]
        # Fill the rest: the put that finds the buffer full frees it without suspending, since
        # the write behind is done, and starts the next.
        before = log.stat().wcount
        for _ in range(60):
            finished, value = _send(log.put(rec))
            assert finished, "a put suspended although the write behind was done"
            lsns.append(value)
        # The write the puts started runs in the writer's thread and is counted when it ends:
        # wait for it (on a loaded machine it may still be under way here).
        r2 = log._inflight
        if r2 is not None:
            wait_io(r2)
        assert log.stat().wcount > before  # a write the puts started, counted
        assert log.stat().wcount_fill == 0
        await log.flush()
        assert [lsn async for lsn, _ in log.cursor()] == lsns
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


async def test_failed_write_behind_panics(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192)
    try:
        log = env.log
        await log.put(b"first", flush=True)
        with _io.inject("pwrite", errno.EIO):
            while log._inflight is None:
                await log.put(b"w" * 84)
            r = log._inflight
            assert concurrent.futures.wait([r.cf], timeout=30).done
            assert isinstance(r.cf.exception(), OSError)
            # The thread panicked the environment and let the role go; nothing was published.
            assert log._c.role_holder() == (0, 0)
            assert log.written_lsn < log.end_lsn
        with pytest.raises(RunRecovery, match="log file"):
            await log.put(b"after")
    finally:
        with pytest.raises(RunRecovery):
            await env.close()
        await aiodbenv.Env.remove(home, force=True)


async def _start_behind(log: Any) -> Any:
    """Put 100-byte records until a put starts a write behind; return its round."""
    while log._inflight is None:
        await log.put(b"b" * 84)
    return log._inflight


@compiled
async def test_write_behind_is_one_compiled_call_and_wakes_the_loop(home: str) -> None:
    # Without the seam's faults, a write behind is the compiled call (CRound), which writes,
    # publishes, lets the role go, counts the write, and wakes a waiting loop (eventfd).
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192)
    try:
        log = env.log
        await log.put(b"first", flush=True)
        before = log.stat().wcount
        r = await _start_behind(log)
        assert isinstance(r, CRound)
        await asyncio.wait_for(r.wait(), 30)  # woken by the eventfd, or re-checked
        assert r.finished and log._c.role_holder() == (0, 0)
        assert log.written_lsn.offset >= r.end and log.stat().wcount == before + 1
        await log.flush()
        recs = [data async for _, data in log.cursor()]
        assert recs[0] == b"first" and set(recs[1:]) == {b"b" * 84}
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


@compiled
async def test_compiled_write_behind_failure_panics(home: str) -> None:
    # The seam cannot reach the compiled call: its write fails on a descriptor open
    # read-only. The loop reports it as the Python thread would: panic, role let go.
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192)
    try:
        log = env.log
        await log.put(b"first", flush=True)
        file = log.end_lsn.file
        good = log._fds[file]
        log._fds[file] = os.open(log_path(log.directory, file), os.O_RDONLY)
        try:
            r = await _start_behind(log)
            assert isinstance(r, CRound)
            await asyncio.wait_for(r.wait(), 30)
            assert r.failure() == errno.EBADF
            await asyncio.sleep(0)  # the eventfd's reader runs: it reports the failure
            assert log._finish_now(r)
            assert log._env.panicked and log._c.role_holder() == (0, 0)
            assert log.written_lsn < log.end_lsn
        finally:
            os.close(log._fds[file])
            log._fds[file] = good
        with pytest.raises(RunRecovery, match="log file"):
            await log.put(b"after")
    finally:
        with pytest.raises(RunRecovery):
            await env.close()
        await aiodbenv.Env.remove(home, force=True)


@compiled
async def test_compiled_write_behind_left_stuck_is_published_by_the_loop(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mutex held (here, by the loop's thread) past the compiled call's bounded wait: it
    # leaves the round written, not published, with the role held; the loop publishes it.
    # The call runs in the writer's executor thread (which this test gates), not the round
    # thread of its own.
    monkeypatch.setattr(accel, "ROUND_THREAD", False)
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192)
    try:
        log = env.log
        await log.put(b"first", flush=True)
        gate = threading.Event()
        log._thread.submit(gate.wait, 30)  # the writer's thread waits: the round queues
        r = await _start_behind(log)
        assert isinstance(r, CRound)
        with log._c.mutex:
            gate.set()
            assert concurrent.futures.wait([r.cf], timeout=30).done
            assert r.stuck and not r.finished
        assert log._c.role_holder()[0] == os.getpid()
        await asyncio.wait_for(log._settle_behind(), 30)
        assert r.finished and log._inflight is None and log._c.role_holder() == (0, 0)
        await log.flush()
        assert len([lsn async for lsn, _ in log.cursor()]) > 2
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


@pytest.mark.parametrize("how", ["flush", "write_nosync"])
async def test_a_lone_flush_is_one_round_its_thread_finishes(home: str, how: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    try:
        log = env.log
        await log.put(b"first", flush=True)  # the file is open here
        commits = log.stat().maxcommitperflush
        task = asyncio.ensure_future(log.put(b"x", **{how: True}))
        await asyncio.sleep(0)  # its first step: it waits for its round, in the writer's thread
        if task.done():
            # A write without fsync can be over before the task first looks (it then does
            # not suspend at all): the thread published it and let the role go all the same.
            assert how == "write_nosync"
            assert log._c.role_holder() == (0, 0) and log._inflight is None
            assert log.written_lsn > task.result()
            return
        r = log._inflight
        assert r is not None and r.sync == (how == "flush")
        wait_io(r)
        # With the loop blocked (here), the thread made it durable (or written), published it
        # and let the writer role go: another process's flush would not wait for this loop.
        assert r.finished and log._c.role_holder() == (0, 0)
        assert log.written_lsn == log.end_lsn
        if how == "flush":
            assert log.flushed_lsn == log.end_lsn
            assert log.stat().maxcommitperflush >= commits
        lsn = await task
        assert lsn.file == r.file and log.written_lsn > lsn
        assert log._inflight is None
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


@pytest.mark.parametrize("how", ["flush", "write_nosync"])
async def test_the_writers_thread_serves_calls_registered_during_its_fsync(
    home: str, how: str
) -> None:
    """Group commit without an event loop in the way: while handle A's thread fsyncs (slowed
    through the I/O seam), handle B (another writer token, as another process would be)
    registers a flush (or a write-through); A's thread runs the next round for it at once
    (with an fsync only for a flush), and B never takes the writer role."""
    try:
        async with aiodbenv.Env.open(home, create=True, log=True) as a:
            async with aiodbenv.Env.open(home) as b:
                await a.log.put(b"open a", flush=True)
                await b.log.put(b"open b", flush=True)
                taken: list[int] = []
                real_take = b.log._c.take_role

                def take_role(dead: Any = None) -> bool:
                    got = real_take(dead)
                    if got:
                        taken.append(1)
                    return got

                b.log._c.take_role = take_role  # type: ignore[method-assign]
                fsyncs = a.log.stat().scount
                with _io.inject("fdatasync", None, delay=0.3, times=1):
                    first = asyncio.ensure_future(a.log.put(b"A", flush=True))
                    while a.log._inflight is None:
                        await asyncio.sleep(0.001)
                    writes = a.log.stat().wcount
                    lsn_b = await b.log.put(b"B", **{how: True})
                    lsn_a = await first
                assert a.log.flushed_lsn > lsn_a and b.log.written_lsn > lsn_b
                assert a.log.stat().wcount == writes + 2
                assert a.log.stat().scount == fsyncs + (2 if how == "flush" else 1)
                assert taken == []  # B's flush was served by A's thread
                assert a.log._c.role_holder() == (0, 0)
    finally:
        await aiodbenv.Env.remove(home)


@pytest.mark.skipif(
    not accel.COMPILED or accel._hot is None, reason="the compiled put (aiodbenv._hot) is off"
)
async def test_compiled_put_makes_real_lsns_and_hands_back_the_rest(home: str) -> None:
    # The C put returns aiodbenv.LSN instances (tuples: ordered, hashable, unpacked), hands
    # a non-bytes record back (None) and the buffer's passing half back as the int word.
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192)
    try:
        log = env.log
        putter = log._fast.putter
        lsns = [await log.put(b"a" * 10), await log.put(bytearray(b"b" * 10))]
        lsns.append(await log.put(memoryview(b"c" * 10)))
        assert all(type(x) is aiodbenv.LSN for x in lsns)
        assert lsns == sorted(lsns) and len(set(lsns)) == 3
        file, offset = lsns[0]
        assert (file, offset) == (lsns[0].file, lsns[0].offset) and str(
            lsns[0]
        ) == f"{file}/{offset}"
        assert putter.put(bytearray(b"x")) is None and putter.put("text") is None
        assert putter.lsn((7 << 32) | 9) == aiodbenv.LSN(7, 9)
        word = None
        while word is None:  # up to half: LSNs; the put that passes half: its int word
            r = putter.put(b"d" * 84)
            if type(r) is int:
                word = r
            else:
                lsns.append(r)
        assert word & accel.HALF and word ^ accel.HALF > (lsns[-1][0] << 32 | lsns[-1][1])
        await log.flush()
        got = [lsn async for lsn, _ in log.cursor()]
        assert got[: len(lsns)] == lsns and len(got) == len(lsns) + 1
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


@compiled
async def test_cffi_append_without_the_compiled_put(home: str) -> None:
    # Without aiodbenv._hot (AIODBENV_HOT=python) a put is the cffi append and a Python LSN:
    # the same records, write behinds included, as with it.
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192)
    try:
        log = env.log
        log._fast.put = log._fast._put_cffi
        recs = [bytes([i % 251]) * (i % 200) for i in range(600)]
        lsns = [await log.put(r) for r in recs]
        assert all(type(x) is aiodbenv.LSN for x in lsns) and lsns == sorted(lsns)
        assert log.stat().wcount > 0  # write behinds ran
        await log.flush()
        assert [(lsn, data) async for lsn, data in log.cursor()] == list(zip(lsns, recs))
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


# A compiled write behind still running when its handle's close gives up waiting for it (a
# disk slower than wait_timeout): here its thread has written the round and waits for the log
# mutex, which another process holds. Close then detaches the regions; the thread goes on to
# lock and publish in the log region. Run in a child, so that a region unmapped under the
# thread is a crash the test reports rather than the end of the test run.
OUTLIVES_CLOSE = r"""
import asyncio, json, logging, subprocess, sys, threading, time
import aiodbenv
from aiodbenv.log.accel import JOB_RUNNING
from aiodbenv.log.orphan import running
from aiodbenv.log.threadrounds import CRound

HOLD = '''
import asyncio, json, sys, time
import aiodbenv
async def main(home, extra):
    env = await aiodbenv.Env.open(home, log=True, **extra)
    with env.log._c.mutex:
        print("held", flush=True)
        time.sleep(0.8)  # past the closing handle's waits, within the thread's lock wait
    await env.close(nosync=True)
asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
'''

async def main(home, extra):
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=8192, **extra)
    log = env.log
    await log.put(b"first", flush=True)
    gate = threading.Event()
    log._thread.submit(gate.wait, 30)  # the round queues behind this
    while log._inflight is None:
        await log.put(b"b" * 84)
    r = log._inflight
    assert isinstance(r, CRound), r
    holder = subprocess.Popen([sys.executable, "-c", HOLD, home, json.dumps(extra)],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    gate.set()
    while r.job.state() != JOB_RUNNING:  # written, or writing; then it waits for the mutex
        time.sleep(0.001)
    log.wait_timeout = 0.1
    await env.close(nosync=True)
    assert running() == 2  # the round's keep, and the log thread's (the round runs there)
    r.cf.result(timeout=30)  # it locked and published, or gave up: in a region still mapped
    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread's last job follows the round's
    assert running() == 0  # their views released, their descriptors closed
    assert holder.wait(timeout=30) == 0
    while not env._core.closed:  # the handle's last step waited for the late work
        await asyncio.sleep(0.01)
    await aiodbenv.Env.remove(home)
    print("ok")

logging.basicConfig(level=logging.WARNING)
asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


@compiled
@pytest.mark.parametrize("kind", ["file", "system"])
def test_write_behind_outliving_close_keeps_the_region_mapped(
    home: str, kind: str, shm_key: int
) -> None:
    extra = {"region": kind, "shm_key": shm_key} if kind == "system" else {}
    r = subprocess.run(
        [sys.executable, "-c", OUTLIVES_CLOSE, home, json.dumps(extra)],
        # The round must wait in the writer's executor thread, which the script gates.
        env={**os.environ, "AIODBENV_LOG_ROUND_THREAD": "0"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-3000:])
    # The region was left mapped for the thread, and the log says so.
    assert "still running" in r.stderr, r.stderr[-3000:]


# The same in the handle's round thread (the default): its fdatasync is made to last 1.5 s
# (strace's delay injection, from outside the process), longer than the closing handle waits.
ROUND_OUTLIVES_CLOSE = r"""
import asyncio, sys, time
import aiodbenv
from aiodbenv.log import accel
from aiodbenv.log.orphan import running

async def main(home):
    env = await aiodbenv.Env.open(home, create=True, log=True)
    log = env.log
    await log.put(b"first", flush=True)  # opens the log file in this process
    await asyncio.sleep(0.01)
    task = asyncio.ensure_future(log.put(b"x", flush=True))
    await asyncio.sleep(0)  # its round starts in the round thread, and sleeps in fdatasync
    job = log._bjob
    assert job is not None and job.thread, "not the round thread"
    assert job.state() in (accel.JOB_QUEUED, accel.JOB_RUNNING), job.state()
    log.wait_timeout = 0.1
    task.cancel()
    await env.close(nosync=True)
    assert running() == 1, running()
    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread ends the round, in a region still mapped, then lets go
    assert running() == 0
    while not env._core.closed:  # the handle's last step waited for the late work
        await asyncio.sleep(0.01)
    # Nothing of the closed handle is kept once its thread has ended (not until the next
    # close of a log handle): its job went, and the views kept for its round with it.
    deadline = time.monotonic() + 10
    while accel._BY_JOB and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not accel._BY_JOB, accel._BY_JOB
    await aiodbenv.Env.remove(home)
    print("ok")

asyncio.run(main(sys.argv[1]))
"""


@compiled
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.skipif(not accel.ROUND_THREAD, reason="the round thread is off")
def test_round_thread_outliving_close_keeps_the_region_mapped(home: str) -> None:
    r = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fdatasync",
            "-e",
            "inject=fdatasync:delay_enter=1500000",
            "-o",
            os.devnull,
            sys.executable,
            "-c",
            ROUND_OUTLIVES_CLOSE,
            home,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-3000:])
    assert "still running" in r.stderr, r.stderr[-3000:]


@compiled
@pytest.mark.skipif(not accel.ROUND_THREAD, reason="the round thread is off")
async def test_a_closed_handles_round_thread_job_is_dropped_once_it_ends(home: str) -> None:
    """The job array of a handle's round thread is kept until the thread has ended, then
    dropped without waiting for another log handle to close (it refers to the log's core)."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    try:
        for _ in range(3):  # the first opens the log file; the next go to the thread
            await env.log.put(b"x", flush=True)
        job = env.log._bjob
        assert job is not None and job.thread
        assert job in accel._BY_JOB.values()
        await env.close()
        deadline = time.monotonic() + 10
        while job in accel._BY_JOB.values() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert job not in accel._BY_JOB.values()
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


@compiled
@pytest.mark.skipif(not accel.ROUND_THREAD, reason="the round thread is off")
async def test_a_forked_child_keeps_none_of_the_parents_round_thread_jobs(home: str) -> None:
    """The child has none of the parent's round threads: their jobs are dropped at the fork
    (one still ending would otherwise be looked for by every loop of the child, for good)."""
    env = await aiodbenv.Env.open(home, create=True, log=True)
    try:
        for _ in range(3):
            await env.log.put(b"x", flush=True)
        job = env.log._bjob
        assert job is not None and job.thread and job in accel._BY_JOB.values()

        async def in_child() -> object:
            return [len(accel._BY_JOB), accel._forget_on is None]

        assert await in_forked_child(in_child) == [0, True]
        assert job in accel._BY_JOB.values()  # the parent's is kept
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)
