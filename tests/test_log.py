"""The log: LSNs, put/flush, cursors, file switching, the in-memory ring, checkpoint records,
archive, statistics and the settings (issue 12 items 1-5, 8's archive and ring, 10, 11).

Ports of Berkeley DB's log tests: log001 (records of many sizes, forward and backward
iteration, reopen), log003 (file switching with a small log file size), the in-memory ring
(fills, wraps, LogBufferFull) and archive.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator

import pytest

import aiodbenv
from aiodbenv import LSN, CheckpointRecord, ConfigError, InvalidArgument, LogBufferFull
from aiodbenv.log.record import FILE_HEADER_BYTES, HEADER


def log_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("log."))


async def read_all(log: aiodbenv.Log) -> list[tuple[LSN, bytes]]:
    return [item async for item in log.cursor()]


async def read_backward(log: aiodbenv.Log) -> list[tuple[LSN, bytes]]:
    out = []
    async with log.cursor() as c:
        item = await c.last()
        while item is not None:
            out.append(item)
            item = await c.prev()
    return out


@pytest.fixture
async def logenv(home: str) -> AsyncIterator[aiodbenv.Env]:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    yield env
    await env.close()
    await aiodbenv.Env.remove(home)


# -- LSNs -----------------------------------------------------------------------------------------


def test_lsn_orders_like_log_compare_and_packs_as_on_a_page() -> None:
    assert LSN(1, 500) < LSN(2, 0) < LSN(2, 1)
    assert sorted([LSN(3, 1), LSN(1, 9), LSN(2, 5)]) == [LSN(1, 9), LSN(2, 5), LSN(3, 1)]
    raw = LSN(7, 4096).pack()
    assert raw == (7).to_bytes(4, "little") + (4096).to_bytes(4, "little")
    page = bytearray(32)
    page[8:16] = raw
    assert LSN.unpack(page, 8) == LSN(7, 4096)
    assert LSN(0, 0) == aiodbenv.log.lsn.ZERO_LSN
    assert str(LSN(1, 28)) == "1/28"


# -- opening and settings -------------------------------------------------------------------------


async def test_log_is_created_with_its_first_file_and_defaults(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert env.has_log
        log = env.log
        assert not log.inmemory and log.directory == home
        assert (log.buffer_size, log.file_size) == (32000, 10 * 1024 * 1024)
        assert log_files(home) == ["log.0000000001"]
        # The first file exists, preallocated and with its header durable, from the start.
        assert os.path.getsize(os.path.join(home, "log.0000000001")) == 10 * 1024 * 1024
        assert log.end_lsn == LSN(1, FILE_HEADER_BYTES) == log.flushed_lsn
        assert env.durability == "sync"
        s = env.settings
        assert (s.log, s.log_inmemory, s.log_buffer_size, s.log_file_size) == (
            True,
            False,
            32000,
            10 * 1024 * 1024,
        )
    await aiodbenv.Env.remove(home)


async def test_env_without_log_refuses_log_calls(env: aiodbenv.Env) -> None:
    assert not env.has_log
    with pytest.raises(InvalidArgument, match="has no log"):
        env.log  # noqa: B018


async def test_joiner_gets_the_creators_log(home: str) -> None:
    async with aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=4096, log_file_size=65536
    ) as a:
        async with aiodbenv.Env.open(home) as b:  # no log=True: inherited
            assert b.has_log
            assert (b.log.buffer_size, b.log.file_size) == (4096, 65536)
            lsn = await a.log.put(b"from a")
            assert await b.log.cursor().set(lsn) == (lsn, b"from a")
    await aiodbenv.Env.remove(home)


async def test_log_asked_of_an_environment_without_one(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True):
        with pytest.raises(InvalidArgument, match="created without a log"):
            await aiodbenv.Env.open(home, log=True)
    await aiodbenv.Env.remove(home)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_inmemory": True, "log_buffer_size": 256 * 1024}, "must be larger"),
        ({"log_inmemory": True, "log_buffer_size": 4096, "log_file_size": 8192}, "larger"),
        ({"log_inmemory": True, "txn_nosync": True}, "in-memory log"),
        ({"log_inmemory": True, "txn_write_nosync": True}, "in-memory log"),
        ({"log_inmemory": True, "log_dir": "logs"}, "no files"),
        ({"log_buffer_size": 65536}, "need log=True"),
        ({"log_file_size": 65536}, "need log=True"),
        ({"log_dir": "logs"}, "need log=True"),
        ({"log": True, "log_buffer_size": 10}, "log_buffer_size must be"),
        ({"log": True, "log_file_size": 1 << 40}, "log_file_size must be"),
        ({"log": True, "log_file_size": "big"}, "must be an integer"),
        ({"log": True, "log_dir": ""}, "log_dir"),
    ],
)
async def test_config_errors(home: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        await aiodbenv.Env.open(home, create=True, **kwargs)  # type: ignore[arg-type]
    assert os.listdir(home) == []


@pytest.mark.parametrize("region", ["file", "system", "private"])
async def test_a_log_dir_that_is_a_file_is_refused_at_once_and_leaves_nothing(
    home: str, region: str, shm_key: int
) -> None:
    """The regions are made before the log directory is looked at. A ``log_dir`` naming a
    file made ``os.makedirs`` raise ``FileExistsError`` while building, which the create took
    for another process winning the race to ``__db.001``: it removed its regions and built
    them again, forever, at full CPU. Now it is a ``ConfigError``, and the regions made are
    removed."""
    with open(os.path.join(home, "notadir"), "w"):
        pass
    extra = {"shm_key": shm_key} if region == "system" else {}
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="not a directory"):
        await asyncio.wait_for(
            aiodbenv.Env.open(
                home, create=True, log=True, log_dir="notadir", region=region, **extra
            ),
            timeout=20,
        )
    assert time.monotonic() - t0 < 5
    assert os.listdir(home) == ["notadir"]  # (segments: the autouse leak check)


async def test_db_config_lines(home: str) -> None:
    with open(os.path.join(home, "DB_CONFIG"), "w") as f:
        f.write("set_lg_max 65536\nset_lg_bsize 8192\nset_lg_dir logs\n")
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        log = env.log
        assert (log.buffer_size, log.file_size) == (8192, 65536)
        assert log.directory == os.path.join(home, "logs")
        assert log_files(os.path.join(home, "logs")) == ["log.0000000001"]
        assert not log_files(home)
    await aiodbenv.Env.remove(home)


async def test_db_config_inmemory_order_does_not_matter(home: str) -> None:
    # The ring must be larger than a "file" once every line is read, whatever their order.
    with open(os.path.join(home, "DB_CONFIG"), "w") as f:
        f.write("set_lg_max 2097152\nset_flags db_log_inmemory\nset_lg_bsize 4194304\n")
    async with aiodbenv.Env.open(home, create=True) as env:
        assert env.log.inmemory and (env.log.buffer_size, env.log.file_size) == (4 << 20, 2 << 20)
        assert not log_files(home)
    await aiodbenv.Env.remove(home)


async def test_db_config_nosync_with_inmemory_is_refused(home: str) -> None:
    with open(os.path.join(home, "DB_CONFIG"), "w") as f:
        f.write("set_flags db_log_inmemory\nset_flags db_txn_nosync\n")
    with pytest.raises(ConfigError, match="in-memory"):
        await aiodbenv.Env.open(home, create=True)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, "sync"), ({"txn_nosync": True}, "nosync"), ({"txn_write_nosync": True}, "write_nosync")],
)
async def test_durability(home: str, kwargs: dict[str, bool], expected: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True, **kwargs) as env:
        assert env.durability == expected
        async with aiodbenv.Env.open(home) as joiner:
            assert joiner.durability == expected
    await aiodbenv.Env.remove(home)


# -- put and flush --------------------------------------------------------------------------------


async def test_put_flush_and_lsns(logenv: aiodbenv.Env) -> None:
    log = logenv.log
    a = await log.put(b"alpha")
    assert a == LSN(1, FILE_HEADER_BYTES)
    assert log.end_lsn == LSN(1, a.offset + HEADER.size + 5)
    assert log.flushed_lsn <= a  # in the buffer only
    b = await log.put(bytearray(b"beta"), write_nosync=True)
    assert log.written_lsn > b and log.flushed_lsn <= b
    c = await log.put(memoryview(b"gamma"), flush=True)
    assert log.flushed_lsn > c
    await log.flush(a)  # already durable: returns at once
    with pytest.raises(InvalidArgument, match="exclude"):
        await log.put(b"x", flush=True, write_nosync=True)
    with pytest.raises(InvalidArgument, match="past the end"):
        await log.flush(LSN(log.end_lsn.file, log.end_lsn.offset + 1))
    with pytest.raises(InvalidArgument, match="bytes"):
        await log.put("text")  # type: ignore[arg-type]
    await log.flush(log.end_lsn)  # the end itself: everything so far
    await log.flush(LSN(0, 0))  # "not logged"


async def test_flush_of_a_durable_lsn_takes_no_thread_hop(
    logenv: aiodbenv.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = logenv.log
    lsn = await log.put(b"x", flush=True)
    import anyio.to_thread

    async def no_threads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread hop for an LSN already flushed")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)
    coro = log.flush(lsn)
    # It completes without ever suspending: one send() finishes it.
    with pytest.raises(StopIteration):
        coro.send(None)


async def test_record_larger_than_a_file_is_refused(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True, log_file_size=4096) as env:
        limit = 4096 - FILE_HEADER_BYTES - HEADER.size
        with pytest.raises(InvalidArgument, match="larger than the maximum log file size"):
            await env.log.put(bytes(limit + 1))
        lsn = await env.log.put(bytes(limit), flush=True)  # exactly a file's room
        assert lsn.offset == FILE_HEADER_BYTES
    await aiodbenv.Env.remove(home)


async def test_records_larger_than_the_buffer(home: str) -> None:
    # Written straight to the file by the writer (log_put's large-record path).
    async with aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=1024, log_file_size=16384
    ) as env:
        log = env.log
        rng = random.Random(5)
        want = []
        for i in range(40):
            data = rng.randbytes(rng.choice([10, 900, 1500, 5000]))
            want.append((await log.put(data, flush=i % 7 == 0), data))
        assert await read_all(log) == want
        assert await read_backward(log) == want[::-1]
    await aiodbenv.Env.remove(home)


# -- log001: records of many sizes, forward and backward, reopen ----------------------------------


async def test_log001_many_sizes_forward_backward_and_reopen(home: str) -> None:
    rng = random.Random(1)
    want: list[tuple[LSN, bytes]] = []
    async with aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=8192, log_file_size=1 << 20
    ) as env:
        log = env.log
        for i in range(600):
            size = rng.choice([0, 1, 7, 64, 100, 512, 3000, 7000])
            data = bytes([i % 251]) * size
            want.append((await log.put(data), data))
        assert await read_all(log) == want
        assert await read_backward(log) == want[::-1]
        c = log.cursor()
        for lsn, data in rng.sample(want, 50):
            assert await c.set(lsn) == (lsn, data)
        with pytest.raises(InvalidArgument, match="no log record"):
            await c.set(LSN(want[3][0].file, want[3][0].offset + 1))
        assert await c.set(log.end_lsn) is None
        c.close()
    # Reopen (the regions kept), then after losing the regions: the same log.
    async with aiodbenv.Env.open(home) as env:
        assert await read_all(env.log) == want
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert await read_all(env.log) == want
        assert await read_backward(env.log) == want[::-1]
        more = await env.log.put(b"after reopen", flush=True)
        assert more > want[-1][0]
        assert (await read_all(env.log))[-1] == (more, b"after reopen")
    await aiodbenv.Env.remove(home)


async def test_cursor_sees_records_appended_later_and_mixed_moves(logenv: aiodbenv.Env) -> None:
    log = logenv.log
    c = log.cursor()
    assert await c.first() is None and await c.last() is None and await c.next() is None
    a = await log.put(b"a")
    assert await c.next() == (a, b"a")
    b = await log.put(b"b")
    assert await c.next() == (b, b"b")
    assert await c.next() is None
    assert await c.prev() == (a, b"a")
    assert await c.prev() is None
    assert [x async for x in log.cursor(start=b)] == [(b, b"b")]
    c.close()


# -- log003: file switching -----------------------------------------------------------------------


async def test_log003_switching_files(home: str) -> None:
    rng = random.Random(3)
    want: list[tuple[LSN, bytes]] = []
    async with aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=2048, log_file_size=4096
    ) as env:
        log = env.log
        for i in range(300):
            data = rng.randbytes(rng.randint(0, 600))
            want.append((await log.put(data, flush=i % 50 == 0), data))
        files = {lsn.file for lsn, _ in want}
        assert len(files) > 20 and files == set(range(1, max(files) + 1))
        assert all(lsn.offset + HEADER.size + len(d) <= 4096 for lsn, d in want)
        assert log.stat().switches == max(files) - 1
        await log.flush()
        # Every file but the current one was fsynced at its switch; all are preallocated.
        for name in log_files(home):
            assert os.path.getsize(os.path.join(home, name)) == 4096
        assert await read_all(log) == want
        assert await read_backward(log) == want[::-1]
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert await read_all(env.log) == want
        assert env.log.end_lsn.file == want[-1][0].file
    await aiodbenv.Env.remove(home)


async def test_log_file_size_change_applies_to_new_files(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True, log_file_size=4096) as env:
        for _ in range(10):
            await env.log.put(bytes(500))
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, log=True, log_file_size=8192) as env:
        first = env.log.end_lsn.file
        for _ in range(40):
            await env.log.put(bytes(500), flush=True)
        assert os.path.getsize(os.path.join(home, f"log.{first:010d}")) == 4096
        assert os.path.getsize(os.path.join(home, f"log.{first + 1:010d}")) == 8192
        assert len(await read_all(env.log)) == 50
    await aiodbenv.Env.remove(home)


# -- the in-memory ring ---------------------------------------------------------------------------


async def test_inmemory_ring_fills_wraps_and_refuses_overwriting_what_a_checkpoint_needs(
    home: str,
) -> None:
    async with aiodbenv.Env.open(
        home, create=True, log_inmemory=True, log_buffer_size=16384, log_file_size=4096
    ) as env:
        log = env.log
        assert log.inmemory and not log_files(home)
        # Without a checkpoint, old "files" are reused: far more than the ring holds.
        want = [(await log.put(bytes([i % 256]) * 200), bytes([i % 256]) * 200) for i in range(500)]
        assert want[-1][0].file > 4
        got = await read_all(log)
        assert got == want[-len(got) :]
        assert 3 * (4096 // 216) <= len(got) <= 4 * (4096 // 216)
        assert await read_backward(log) == got[::-1]
        await log.flush()
        assert log.flushed_lsn == log.end_lsn
        # A checkpoint pins its ckp_lsn's "file": the ring holds four, so the fourth switch
        # after it would overwrite it.
        ckp = log.end_lsn
        await log.checkpoint_record(ckp)
        with pytest.raises(LogBufferFull) as err:
            for _ in range(500):
                await log.put(bytes(200))
        assert err.value.db_code == -30991
        assert log.end_lsn.file == ckp.file + 3
        assert (await read_all(log))[0][0].file == ckp.file  # nothing it needs was lost
        # A newer checkpoint frees the ring again.
        await log.checkpoint_record(log.end_lsn)
        for _ in range(30):
            await log.put(bytes(200))
        assert not log_files(home)
    await aiodbenv.Env.remove(home)


async def test_inmemory_defaults(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log_inmemory=True, region="private") as env:
        assert (env.log.buffer_size, env.log.file_size) == (1 << 20, 256 * 1024)
        lsn = await env.log.put(b"r", flush=True)
        assert env.log.flushed_lsn > lsn
        assert await env.log.archive() == []
    assert os.listdir(home) == []


# -- checkpoint records and archive ---------------------------------------------------------------


async def test_checkpoint_records_are_returned_and_told_apart(logenv: aiodbenv.Env) -> None:
    log = logenv.log
    assert log.last_checkpoint is None
    a = await log.put(b"user")
    first = await log.checkpoint_record(a)
    assert log.last_checkpoint == (first, a)
    assert log.flushed_lsn > first
    second = await log.checkpoint_record(log.end_lsn)
    items = await read_all(log)
    assert [lsn for lsn, _ in items] == [a, first, second]
    assert type(items[0][1]) is bytes
    ckp = items[2][1]
    assert isinstance(ckp, CheckpointRecord) and isinstance(ckp, bytes)
    assert ckp.last_ckp == first and ckp.ckp_lsn == LSN(first.file, first.offset + 16 + 24)
    assert abs(ckp.time - __import__("time").time()) < 60
    assert log.stat().checkpoints == 2
    with pytest.raises(InvalidArgument, match="past the end"):
        await log.checkpoint_record(LSN(9, 9))


async def test_last_checkpoint_is_found_again_after_the_regions_are_lost(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True, log_file_size=4096) as env:
        ckp = await env.log.put(b"x" * 100)
        rec = await env.log.checkpoint_record(ckp)
        for _ in range(30):
            await env.log.put(b"y" * 300)
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        assert env.log.last_checkpoint == (rec, ckp)
    await aiodbenv.Env.remove(home)


async def test_archive(home: str) -> None:
    async with aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=2048, log_file_size=4096
    ) as env:
        log = env.log
        assert await log.archive() == []  # no checkpoint: nothing may go
        for _ in range(60):
            await log.put(bytes(400))
        ckp = log.end_lsn
        await log.checkpoint_record(ckp)
        # One checkpoint: recovery would replay from the first record, so nothing may go.
        assert await log.archive() == []
        for _ in range(20):
            await log.put(bytes(400))
        await log.checkpoint_record(log.end_lsn)
        # Recovery starts at the previous checkpoint's ckp_lsn: the files before it may go.
        expect = [os.path.join(home, f"log.{n:010d}") for n in range(1, ckp.file)]
        assert len(expect) > 3
        assert await log.archive() == expect
        assert all(os.path.exists(p) for p in expect)
        assert await log.archive(remove=True) == expect
        assert not any(os.path.exists(p) for p in expect)
        assert await log.archive() == []
        with pytest.raises(InvalidArgument, match="no log record"):
            await log.cursor().set(LSN(1, FILE_HEADER_BYTES))  # its file is gone
        # What remains still reads: from the checkpoint's file on.
        items = await read_all(log)
        assert items[0][0].file == ckp.file
        assert await read_backward(log) == items[::-1]
    await aiodbenv.Env.remove(home)


# -- statistics and the replication seam ----------------------------------------------------------


async def test_stat_figures(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=1024) as env:
        log = env.log
        st0 = log.stat()
        for _ in range(20):
            await log.put(bytes(100))  # 116 bytes each: the 1024-byte buffer fills
        await log.put(b"z", flush=True)
        st = log.stat()
        assert st.records - st0.records == 21
        assert st.bytes - st0.bytes == 20 * 116 + 17
        assert st.wcount_fill >= 1 and st.wcount > st0.wcount
        assert st.scount >= 1 and st.flushes >= 1
        assert (st.disk_file, st.disk_offset) == tuple(log.flushed_lsn)
        assert (st.cur_file, st.cur_offset) == tuple(log.end_lsn)
        assert st.file_bytes >= 20 * 116 + 17
        assert st.lg_bsize == 1024 and st.lg_size == 10 * 1024 * 1024
        assert st.maxcommitperflush >= st.mincommitperflush >= 1
        assert st.region_nowait > 0
        # Flushes of records in one block write that block again (the flash figure).
        before = log.stat().block_rewrites
        for _ in range(5):
            await log.put(b"c", flush=True)
        assert log.stat().block_rewrites - before == 5
    await aiodbenv.Env.remove(home)


async def test_durable_listener_sees_every_durable_byte_once(home: str) -> None:
    async with aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=2048, log_file_size=4096
    ) as env:
        log = env.log
        ranges: list[tuple[LSN, LSN, bytes]] = []
        log.add_durable_listener(lambda s, e, d: ranges.append((s, e, d)))
        for i in range(80):
            await log.put(bytes([i]) * 150, flush=i % 3 == 0, write_nosync=i % 3 == 1)
        await log.flush()
        # Contiguous, per file, and the bytes are those of the files.
        for (_, e1, _), (s2, _, _) in zip(ranges, ranges[1:]):
            assert s2 == e1 or (s2.file == e1.file + 1 and s2.offset == 0)
        for s, e, d in ranges:
            assert s.file == e.file and len(d) == e.offset - s.offset
            with open(os.path.join(home, f"log.{s.file:010d}"), "rb") as f:
                f.seek(s.offset)
                assert f.read(len(d)) == d
        assert ranges[-1][1] == log.flushed_lsn
    await aiodbenv.Env.remove(home)


async def test_durable_listener_in_memory(home: str) -> None:
    async with aiodbenv.Env.open(
        home, create=True, log_inmemory=True, log_buffer_size=16384, log_file_size=4096
    ) as env:
        seen: list[tuple[LSN, LSN, bytes]] = []
        env.log.add_durable_listener(lambda s, e, d: seen.append((s, e, d)))
        a = await env.log.put(b"one", flush=True)
        assert seen and seen[-1][1] == env.log.end_lsn and seen[-1][0] <= a
        assert seen[-1][2].endswith(b"one")
    await aiodbenv.Env.remove(home)


async def test_concurrent_coroutines_share_fsyncs(logenv: aiodbenv.Env) -> None:
    log = logenv.log
    st0 = log.stat()

    async def one(i: int) -> LSN:
        return await log.put(b"%d" % i, flush=True)

    lsns = await asyncio.gather(*(one(i) for i in range(50)))
    st = log.stat()
    assert len(set(lsns)) == 50 and log.flushed_lsn > max(lsns)
    assert st.scount - st0.scount < 50
    assert st.maxcommitperflush > 1


async def test_two_handles_in_one_process_write_one_at_a_time(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=1024) as a:
        async with aiodbenv.Env.open(home) as b:

            async def writer(env: aiodbenv.Env, tag: bytes) -> list[LSN]:
                return [await env.log.put(tag + b"%d" % i, flush=i % 5 == 0) for i in range(200)]

            la, lb = await asyncio.gather(writer(a, b"a" * 50), writer(b, b"b" * 50))
            await b.log.flush()
            items = await read_all(a.log)
            assert sorted(lsn for lsn, _ in items) == sorted(la + lb)
            assert [d for _, d in items if d[:1] == b"a"] == [
                b"a" * 50 + b"%d" % i for i in range(200)
            ]
    await aiodbenv.Env.remove(home)


@pytest.mark.parametrize("kind", ["private", "system"])
async def test_file_log_in_private_and_system_memory(home: str, kind: str, shm_key: int) -> None:
    extra = {"shm_key": shm_key} if kind == "system" else {}
    async with aiodbenv.Env.open(home, create=True, log=True, region=kind, **extra) as env:
        lsns = [await env.log.put(b"%d" % i, flush=True) for i in range(5)]
        assert [lsn for lsn, _ in await read_all(env.log)] == lsns
    await aiodbenv.Env.remove(home)
    async with aiodbenv.Env.open(home, create=True, log=True) as env:  # the files remain
        assert [lsn for lsn, _ in await read_all(env.log)] == lsns
    await aiodbenv.Env.remove(home)


async def test_durable_listener_in_memory_across_several_files(home: str) -> None:
    async with aiodbenv.Env.open(
        home, create=True, log_inmemory=True, log_buffer_size=16384, log_file_size=4096
    ) as env:
        seen: list[tuple[LSN, LSN, bytes]] = []
        env.log.add_durable_listener(lambda s, e, d: seen.append((s, e, d)))
        start = env.log.flushed_lsn
        lsns = [await env.log.put(bytes([i]) * 500) for i in range(20)]  # spans 3 "files"
        await env.log.flush()
        assert lsns[-1].file >= start.file + 2
        assert seen[0][0] == start and seen[-1][1] == env.log.end_lsn
        for (_, e1, _), (s2, _, _) in zip(seen, seen[1:]):
            assert s2 == LSN(e1.file + 1, 0)  # a range per "file", each up to its last record
        for s, e, d in seen:
            assert len(d) == e.offset - s.offset
        data = b"".join(d for _, _, d in seen)
        assert all(bytes([i]) * 500 in data for i in range(20))
    await aiodbenv.Env.remove(home)


async def test_flush_reads_the_end_of_the_log_under_its_mutex(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of the log is two region words that a write round changes together under the
    log mutex. Read without it, a round between the two reads gives an end too small (here:
    every unlocked read is torn that way). ``flush()`` must still make every record put before
    it durable, and ``flush(lsn)`` of a record put must not call it past the end."""
    from aiodbenv.region import mutex as mutex_mod

    env = await aiodbenv.Env.open(home, create=True, log=True)
    try:
        log = env.log
        core = log._c
        m = core.mutex
        real = core.end_word

        def torn_unless_locked() -> int:
            held = m._words[m._w + mutex_mod._W_HOLDER] == os.getpid()
            return real() if held else real() & ~0xFFFFFFFF

        monkeypatch.setattr(core, "end_word", torn_unless_locked)
        first = await log.put(b"a" * 100)
        await log.flush(first)
        assert log.flushed_lsn > first
        second = await log.put(b"b" * 100)
        await log.flush()
        assert log.flushed_lsn > second
        monkeypatch.undo()
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)


async def test_an_lsn_that_is_not_one_is_refused(home: str) -> None:
    """flush("1/2") failed as a bare TypeError; a negative or too large part packed to a word
    that means another LSN."""
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        lsn = await env.log.put(b"a record")
        for bad in ("1/2", (1,), (1, 2, 3), (-1, 0), (1, 1 << 32), (1.0, 2), [1, 2]):
            with pytest.raises(InvalidArgument, match=r"lsn must be an aiodbenv\.LSN"):
                await env.log.flush(bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match=r"lsn must be an aiodbenv\.LSN"):
                await env.log.cursor().set(bad)  # type: ignore[arg-type]
        await env.log.flush(lsn)
        assert (await env.log.cursor().set(lsn)) == (lsn, b"a record")
    await aiodbenv.Env.remove(home)
