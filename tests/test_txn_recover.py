"""Recovery: a sync-committed transaction of a process SIGKILLed right after survives the loss
of the regions with recover=True, an uncommitted one does not appear; without recover the
open says RunRecovery; recovery is idempotent; a power loss before the N-th I/O of a workload
in one process or three (unsynced writes dropped or torn, through the I/O seam: see
tests/powerloss.py) loses no sync commit and shows no commit in part."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import select
import signal
import subprocess
import time

import pytest

import aiodbenv
from aiodbenv import RunRecovery
from aiodbenv.txn.recover import recover
from tests import powerloss
from tests import txn_powerloss as txp
from tests.conftest import python, spawn

PS = 4096

CHILD = """
import asyncio, sys
import aiodbenv

async def main():
    home = sys.argv[1]
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=4096,
                                 lsn_offset=0)
    for i in range(5):
        async with env.txn(durability="sync") as tx:
            for pgno in range(3):
                p = await tx.page(f, pgno, create=True)
                p.data[64 + 8 * i: 72 + 8 * i] = b"commit%02d" % i
    print("committed", flush=True)
    tx = await env.txn()
    (await tx.page(f, 1)).data[1000:1010] = b"UNCOMMITED"
    print("open txn", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def pages(home: str) -> list[bytes]:
    out = []
    with open(os.path.join(home, "data.db"), "rb") as fh:
        raw = fh.read()
    for i in range(0, len(raw), PS):
        out.append(raw[i : i + PS])
    return out


async def test_killed_committer_survives_region_loss_with_recover(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    child = spawn(CHILD, home)
    procs.append(child)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "committed"
    assert child.stdout.readline().strip() == "open txn"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    await aiodbenv.Env.remove(home, force=True)  # the regions are lost; nothing was written
    data_path = os.path.join(home, "data.db")
    with open(data_path, "rb") as fh:
        assert b"commit00" not in fh.read()  # the commits are only in the log
    # Without recovery, the open refuses to serve stale pages (and leaves no regions).
    with pytest.raises(RunRecovery, match="recover=True"):
        await aiodbenv.Env.open(home, create=True, log=True)
    out = python(
        "import sys; from aiodbenv._cli import main; sys.exit(main())", "recover", "-h", home
    )
    # (python -m aiodbenv recover -h HOME)
    assert out.returncode == 0, out.stderr
    assert "5 committed transaction(s); 15 page change(s) applied" in out.stdout
    # The regions it rebuilt (with the defaults) are gone: the service's open makes its own.
    assert "regions removed" in out.stdout
    assert not [n for n in os.listdir(home) if n.startswith("__db.")]
    env = await aiodbenv.Env.open(home, create=True, log=True, cache_size=8 << 20)
    assert env.pool.cache_size >= 8 << 20  # recovered, nothing stale, its own settings
    f = await env.pool.open_file(env.resolve("data.db"), page_size=PS, lsn_offset=0)
    for pgno in range(3):
        async with f.get(pgno) as p:
            for i in range(5):
                assert bytes(p.data[64 + 8 * i : 72 + 8 * i]) == b"commit%02d" % i
            assert bytes(p.data[1000:1010]) == bytes(10)  # the open transaction: nowhere
    await f.close()
    await env.close()
    # Recovery wrote and fsynced the pages: the files hold the commits.
    on_disk = await pages(home)
    assert all(p[64:72] == b"commit00" for p in on_disk[:3])
    # A second recovery gives the same bytes, and a plain open is now content.
    await aiodbenv.Env.remove(home)
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    await env.close()
    assert await pages(home) == on_disk
    await aiodbenv.Env.remove(home)
    env = await aiodbenv.Env.open(home, create=True, log=True)
    await env.close()
    await aiodbenv.Env.remove(home)


RECOVER_CLI = "import sys; from aiodbenv._cli import main; sys.exit(main())"


async def test_recover_command_finds_a_log_kept_in_its_own_directory(home: str) -> None:
    # The service keeps its log in HOME/logs; its commits are only in the log when the
    # regions are lost.
    env = await aiodbenv.Env.open(home, create=True, log=True, log_dir="logs")
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    for i in range(4):
        async with env.txn(durability="sync") as tx:
            (await tx.page(f, i, create=True)).data[64:72] = b"commit%02d" % i
    await f.close()
    await env.close(nosync=True)
    await aiodbenv.Env.remove(home, force=True)
    before = sorted(os.listdir(home))
    # Without -l (and no set_lg_dir), the home has no log: refused, nothing created there.
    out = python(RECOVER_CLI, "recover", "-h", home)
    assert out.returncode == 1
    assert "no log files in" in out.stderr and "-l LOGDIR" in out.stderr, out.stderr
    assert sorted(os.listdir(home)) == before
    # With -l, the commits are replayed.
    out = python(RECOVER_CLI, "recover", "-h", home, "-l", "logs")
    assert out.returncode == 0, out.stderr
    assert "4 committed transaction(s); 4 page change(s) applied" in out.stdout
    assert os.path.join(home, "logs") in out.stdout
    assert not [n for n in os.listdir(home) if n.startswith(("__db.", "log."))]
    assert [p[64:72] for p in await pages(home)] == [b"commit%02d" % i for i in range(4)]
    # DB_CONFIG's set_lg_dir names it too; the second recovery finds everything written.
    with open(os.path.join(home, "DB_CONFIG"), "w") as fh:
        fh.write("set_lg_dir logs\n")
    out = python(RECOVER_CLI, "recover", "-h", home)
    assert out.returncode == 0, out.stderr
    assert "page change(s) applied" in out.stdout and "no log files" not in out.stderr
    # -l is overridden by DB_CONFIG (as Env.open's log_dir is), and the message says so.
    with open(os.path.join(home, "DB_CONFIG"), "w") as fh:
        fh.write("set_lg_dir oldlogs\n")
    out = python(RECOVER_CLI, "recover", "-h", home, "-l", "logs")
    assert out.returncode == 1
    assert "DB_CONFIG's set_lg_dir oldlogs overrides -l logs" in out.stderr, out.stderr
    out = python(RECOVER_CLI, "recover", "-h", os.path.join(home, "nowhere"))
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = python(RECOVER_CLI, "recover", "-h", os.path.join(home, "DB_CONFIG"))
    assert out.returncode == 1 and "is not a directory" in out.stderr
    os.unlink(os.path.join(home, "DB_CONFIG"))
    env = await aiodbenv.Env.open(home, create=True, log=True, log_dir="logs")
    await env.close()
    await aiodbenv.Env.remove(home)


async def test_replay_twice_gives_the_same_bytes(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    rng = random.Random(5)
    for _ in range(30):
        async with env.txn(durability="nosync") as tx:
            for pgno in rng.sample(range(6), 2):
                p = await tx.page(f, pgno, create=True)
                off = rng.randrange(8, PS - 16)
                p.data[off : off + 16] = rng.randbytes(16)
    await f.close()
    await env.log.flush()
    await env.close(nosync=True)
    await aiodbenv.Env.remove(home, force=True)
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    await env.close()
    first = await pages(home)
    assert len(first) == 6
    await aiodbenv.Env.remove(home)
    # Replay everything again over pages that already hold it: nothing changes.
    env = await aiodbenv.Env.open(home, create=True, log=True)
    again = await recover(env)
    assert again.applied >= 0
    await env.close()
    assert await pages(home) == first
    await aiodbenv.Env.remove(home)


async def test_recover_needs_create_and_a_file_log(home: str) -> None:
    with pytest.raises(aiodbenv.InvalidArgument):
        await aiodbenv.Env.open(home, create=True, recover=True)
    with pytest.raises(aiodbenv.InvalidArgument):
        await aiodbenv.Env.open(home, create=True, log_inmemory=True, recover=True)


# -- power loss ---------------------------------------------------------------------------------


async def power_loss_round(home: str, seed: int) -> None:
    """One process runs the workload (tests/txn_powerloss.py) with small caches and log files,
    so pages are written and fsynced between commits; the power goes before its N-th write or
    fsync (it runs on a little past that point, not knowing); then recover and check."""
    rng = random.Random(seed)
    base = await txp.prepare(home)
    crash_at = rng.randint(1, 80)
    journal_path = os.path.join(home, "journal")
    env = await aiodbenv.Env.open(home)
    f = await txp.open_data(env)
    with powerloss.record(journal_path) as journal:
        try:
            await txp.workload(env, f, journal, rng, range(1, 120), stop_after_ios=crash_at)
        finally:
            await f.close()
            await env.close(nosync=True)
    await aiodbenv.Env.remove(home, force=True)
    disk, marks, _ = powerloss.replay(journal_path, base, crash_at)
    disk.lose_power(rng, home)
    await txp.check(home, seed, marks)
    txp.clean(home)


async def test_power_loss_keeps_sync_commits_whole(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "aiodbenv")
    for seed in range(12):
        await power_loss_round(home, seed)


@pytest.mark.slow
async def test_power_loss_many_seeds(home: str) -> None:
    for seed in range(12, 1000):
        await power_loss_round(home, seed)


async def power_loss_round_processes(
    home: str, seed: int, procs: list[subprocess.Popen[str]]
) -> None:
    """Three processes run the workload at once on shared pages; the power goes before the
    N-th write or fsync of them all (in the order the journal gives them): every process is
    SIGKILLed then, its regions lost, its unsynced writes kept, dropped or torn."""
    rng = random.Random(seed)
    base = await txp.prepare(home)
    crash_at = rng.randint(1, 150)
    journal_path = os.path.join(home, "journal")
    share = 50
    children = [
        spawn(
            "import asyncio, sys; from tests.txn_powerloss import child_main; "
            "asyncio.run(child_main(*sys.argv[1:]))",
            home,
            journal_path,
            str(seed * 10 + i),
            str(1 + i * share),
            str(share),
        )
        for i in range(3)
    ]
    procs.extend(children)
    done: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(journal_path) and powerloss.count_ios(journal_path) >= crash_at:
            break  # the power goes now
        done |= {i for i, c in enumerate(children) if i not in done and _said_done(c)}
        if len(done) == len(children) or any(c.poll() is not None for c in children):
            break  # all finished first (the power goes at the end), or one failed
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"seed {seed}: the workload did not finish in 60 s")
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGKILL)
        c.wait(timeout=10)
        assert c.returncode == -signal.SIGKILL, c.stderr.read() if c.stderr else ""
    for c in children:  # the fixture's teardown is too late: 9 pipes a round ran out of fds
        for stream in (c.stdin, c.stdout, c.stderr):
            if stream is not None:
                stream.close()
    await aiodbenv.Env.remove(home, force=True)
    disk, marks, _ = powerloss.replay(journal_path, base, crash_at)
    disk.lose_power(rng, home)
    await txp.check(home, seed, marks)
    txp.clean(home)


def _said_done(child: subprocess.Popen[str]) -> bool:
    """True once ``child`` printed ``done`` (without blocking)."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], 0)
    return bool(ready) and child.stdout.readline().strip() == "done"


@pytest.mark.one_loop  # the workload runs in three other processes; this loop recovers
async def test_power_loss_with_three_processes(
    home: str, procs: list[subprocess.Popen[str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "aiodbenv")
    for seed in range(8):
        await power_loss_round_processes(home, seed, procs)


@pytest.mark.slow
async def test_power_loss_with_three_processes_many_seeds(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    for seed in range(8, 1000):
        await power_loss_round_processes(home, seed, procs)


async def test_recovery_from_a_checkpoint_taken_at_the_end_of_a_log_file(home: str) -> None:
    """A checkpoint begun when the last record filled its file has a ``ckp_lsn`` where no
    record starts (the next record went to the next file): recovery, which starts one
    checkpoint back, begins at the next file's first record instead of failing."""
    size = 64 * 1024
    env = await aiodbenv.Env.open(home, create=True, log=True, log_file_size=size)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    end = env.log.end_lsn
    await env.log.put(bytes(size - end.offset - 16 - 8))  # leaves 8 bytes: no record fits
    await env.checkpoint()
    assert env.log.last_checkpoint is not None
    first_ckp_lsn = env.log.last_checkpoint[1]
    assert first_ckp_lsn == aiodbenv.LSN(1, size - 8)
    async with env.txn(durability="sync") as tx:
        (await tx.page(f, 0, create=True)).data[100:105] = b"first"
    await env.checkpoint()
    async with env.txn(durability="sync") as tx:
        (await tx.page(f, 1, create=True)).data[100:106] = b"second"
    await f.close()
    await env.close(nosync=True)
    await aiodbenv.Env.remove(home, force=True)
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    assert env.recovered is not None and env.recovered.start == first_ckp_lsn
    assert env.recovered.batches == 2
    await env.close()
    on_disk = await pages(home)
    assert on_disk[0][100:105] == b"first" and on_disk[1][100:106] == b"second"
    await aiodbenv.Env.remove(home)


async def test_archive_keeps_what_recovery_reads(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``log.archive(remove=True)`` between checkpoints, then the regions lost: recovery finds
    the checkpoint before the last (it starts at its ``ckp_lsn``), never falls back with a
    WARNING, and every commit is there."""
    caplog.set_level(logging.WARNING, "aiodbenv")
    env = await aiodbenv.Env.open(home, create=True, log=True, log_file_size=64 * 1024)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    rng = random.Random(3)
    expect: dict[int, bytes] = {}
    removed: list[str] = []
    for _round in range(4):
        for _ in range(40):
            async with env.txn(durability="nosync") as tx:
                pgno = rng.randrange(8)
                p = await tx.page(f, pgno, create=True)
                p.data[8:] = rng.randbytes(PS - 8)  # a full image each time: the log grows
                expect[pgno] = bytes(p.data[8:])
        await env.checkpoint()
        removed += await env.log.archive(remove=True)
    assert removed and not any(os.path.exists(p) for p in removed)
    async with env.txn(durability="sync") as tx:
        p = await tx.page(f, 0)
        p.data[8:16] = b"lastone!"
        expect[0] = bytes(p.data[8:])
    await f.close()
    await env.close(nosync=True)
    await aiodbenv.Env.remove(home, force=True)
    caplog.clear()
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    assert "no longer in the log" not in caplog.text
    assert env.recovered is not None and env.recovered.batches > 0
    await env.close()
    on_disk = await pages(home)
    assert {pgno: on_disk[pgno][8:] for pgno in expect} == expect
    await aiodbenv.Env.remove(home)


# -- torn pages of checksummed files ------------------------------------------------------------


async def _checksummed(env: aiodbenv.Env) -> aiodbenv.PoolFile:
    return await env.pool.open_file(
        env.resolve("sum.db"), create=True, page_size=PS, lsn_offset=0, checksum=True
    )


def _tear(home: str, pgno: int) -> None:
    """Tear page ``pgno`` of sum.db on disk: its second half is of another write."""
    with open(os.path.join(home, "sum.db"), "r+b") as fh:
        fh.seek(pgno * PS + PS // 2)
        fh.write(bytes(range(256)) * (PS // 512))


async def test_torn_checksummed_page_is_repaired_from_a_full_image(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await _checksummed(env)
    await env.checkpoint()
    async with env.txn(durability="sync") as tx:  # first change since the checkpoint:
        p = await tx.page(f, 0, create=True)  # logged as a full image
        p.data[100:105] = b"first"
    async with env.txn(durability="sync") as tx:  # then byte ranges on top of it
        (await tx.page(f, 0)).data[2000:2006] = b"second"
    await env.pool.sync()  # the page is written ...
    await f.close()
    await env.close(nosync=True)
    await aiodbenv.Env.remove(home, force=True)
    _tear(home, 0)  # ... and torn by the power loss
    with pytest.raises(RunRecovery, match=r"page 0 of sum\.db fails its checksum"):
        await aiodbenv.Env.open(home, create=True, log=True)  # the open checks the pages
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    assert env.recovered is not None and env.recovered.repaired == 1
    f = await _checksummed(env)
    async with f.get(0) as p:
        assert bytes(p.data[100:105]) == b"first" and bytes(p.data[2000:2006]) == b"second"
        assert bytes(p.data[PS // 2 : PS // 2 + 4]) == bytes(4)  # the torn half is gone
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home)


async def test_torn_checksummed_page_without_a_full_image_is_reported(
    home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    f = await _checksummed(env)
    async with env.txn(durability="sync") as tx:
        p = await tx.page(f, 0, create=True)
        p.data[100:105] = b"first"
    async with env.txn(durability="sync") as tx:
        (await tx.page(f, 1, create=True)).data[100:105] = b"other"
    await env.checkpoint()
    # Forced: nothing was logged since the first, and recovery starts one checkpoint back, so
    # only a second record puts the full images before where recovery starts.
    await env.checkpoint(force=True)
    # A commit that logs only byte ranges of page 0 (as if its full image were before the
    # checkpoint: the case of a log whose image was lost), and one with a full image of 1.
    with monkeypatch.context() as m:
        # (A commit reads the last checkpoint record's LSN word from the log region.)
        core, word = env.log._c, env.log._c.word
        m.setattr(core, "word", lambda name: 0 if name == "ckp_rec" else word(name))
        async with env.txn(durability="sync") as tx:
            (await tx.page(f, 0)).data[2000:2006] = b"second"
    async with env.txn(durability="sync") as tx:
        (await tx.page(f, 1)).data[2000:2006] = b"third!"
    await env.pool.sync()
    await f.close()
    await env.close(nosync=True)
    await aiodbenv.Env.remove(home, force=True)
    _tear(home, 0)
    _tear(home, 1)
    with pytest.raises(aiodbenv.PageCorrupt, match=r"cannot repair page 0 of sum\.db") as info:
        await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    assert info.value.pgno == 0 and info.value.path == os.path.join(home, "sum.db")
    assert "backup" in str(info.value)
    # Page 1 had a full image: it was repaired and written all the same.
    with open(os.path.join(home, "sum.db"), "rb") as fh:
        fh.seek(PS)
        page1 = fh.read(PS)
    assert page1[100:105] == b"other" and page1[2000:2006] == b"third!"
    await aiodbenv.Env.remove(home, force=True)


HOLDS_IT_OPEN = """
import asyncio, sys
import aiodbenv

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    print("open", flush=True)
    sys.stdin.readline()
    lsn = await env.log.put(b"still fine", flush=True)  # not panicked by the refused recovery
    print("ok", lsn.file, flush=True)
    await env.close()

asyncio.run(main())
"""


async def test_recovery_is_refused_while_another_process_has_it_open(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    await env.log.put(b"x", flush=True)
    child = spawn(HOLDS_IT_OPEN, home)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "open"
        # (this process's own handle counts too: closed first, then the other process's)
        with pytest.raises(aiodbenv.Busy, match="has open handles"):
            await aiodbenv.Env.open(home, create=True, log=True, recover=True)
        await env.close()
        with pytest.raises(aiodbenv.Busy, match="has open handles"):
            await aiodbenv.Env.open(home, create=True, log=True, recover=True)
        out = python(RECOVER_CLI, "recover", "-h", home)
        assert out.returncode == 1 and "has open handles" in out.stderr, out.stderr
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().split()[0] == "ok"
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)  # now it may
    await env.close()
    await aiodbenv.Env.remove(home)
