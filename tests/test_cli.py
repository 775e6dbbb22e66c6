"""python -m aiodbenv: demo, stat -e, remove; errors are one line and a non-zero status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import aiodbenv

from .conftest import REPO


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiodbenv", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_runs_end_to_end() -> None:
    r = run("demo")
    assert r.returncode == 0, r.stderr
    assert "2 handles open" in r.stdout
    # The second process found the first one's pages in the shared cache...
    assert "this process: 2 cache hits, 0 pages read from disk" in r.stdout
    # ...and the first one sees the second one's change without any write.
    assert "Page 2 seen from the first process: written by the child" in r.stdout
    assert "region files left: none" in r.stdout


def test_demo_in_system_memory(shm_key: int) -> None:
    r = run("demo", "--region", "system", "--shm-key", str(shm_key))
    assert r.returncode == 0, r.stderr
    assert f"shm key {shm_key:#x}" in r.stdout


async def test_stat_prints_pool_statistics(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True) as env:
        async with env.pool.open_file("s.db", create=True) as f:
            for i in range(3):
                async with f.get(i, create=True):
                    pass
            async with f.get(0):
                pass
            text = run("stat", "-m", "-h", home)
            js = run("stat", "-m", "-h", home, "--json")
    assert text.returncode == 0, text.stderr
    assert "1           Requested pages found in the cache" in text.stdout
    assert "Pool File: " + os.path.join(home, "s.db") in text.stdout
    data = json.loads(js.stdout)
    assert data["cache_hit"] == 1 and data["page_create"] == 3
    assert data["files"][0]["open_handles"] == 1
    await aiodbenv.Env.remove(home, force=True)  # dirty pages may be left: discard them
    os.remove(os.path.join(home, "s.db"))


async def test_stat_prints_region_statistics(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, cache_size=1 << 20):
        text = run("stat", "-e", "-h", home)
        js = run("stat", "-e", "-h", home, "--json")
    assert text.returncode == 0, text.stderr
    assert "Open handles:               2" in text.stdout
    assert os.path.join(home, "__db.001") in text.stdout
    data = json.loads(js.stdout)
    assert data["handles"] == 2 and data["cache_size"] == 1 << 20
    assert data["regions"][0]["region_id"] == 1
    await aiodbenv.Env.remove(home)


def test_errors_are_one_line_and_nonzero(home: str) -> None:
    r = run("stat", "-e", "-h", home)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "no environment" in r.stderr
    r = run("stat", "-e", "-h", os.path.join(home, "missing"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    # Every command words a missing home the same way (recover said "is not a directory").
    for command in (("recover",), ("printlog",), ("checkpoint", "-1"), ("remove",)):
        r = run(*command, "-h", os.path.join(home, "missing"))
        assert r.returncode == 1 and "does not exist" in r.stderr, (command, r.stderr)


async def test_remove_command(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    r = run("remove", "-h", home)
    assert r.returncode == 1 and "open handles" in r.stderr
    r = run("remove", "-f", "-h", home)
    assert r.returncode == 0, r.stderr
    assert not os.listdir(home)
    try:
        await env.close()
    except aiodbenv.RunRecovery:
        pass


# -- the log: stat -l, printlog, archive, checkpoint with a log ----------------------------------


async def test_stat_l_prints_log_statistics(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        for i in range(10):
            await env.log.put(b"rec %d" % i, flush=i == 9)
        text = run("stat", "-l", "-h", home)
        js = run("stat", "-l", "-h", home, "--json")
        st = env.log.stat()
    assert text.returncode == 0, text.stderr
    assert f"{st.records:<12}Records entered into the log" in text.stdout
    assert f"{st.scount:<12}Total log file flushes" in text.stdout
    data = json.loads(js.stdout)
    assert data["records"] == st.records and data["cur_file"] == 1 and data["scount"] >= 1
    await aiodbenv.Env.remove(home)


async def test_printlog_prints_every_record_with_checkpoints_decoded(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, log=True) as env:
        lsns = [await env.log.put(b"hello %d" % i + bytes(40)) for i in range(5)]
        result = await env.checkpoint()  # ckp_lsn = the end of the log, then its record
        after = await env.log.put(b"after", flush=True)
        assert result.lsn is not None
        r = run("printlog", "-h", home)
        part = run("printlog", "-h", home, "-b", str(lsns[1]), "-e", str(lsns[3]))
        full = run("printlog", "-h", home, "-v")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 7
    for lsn, line in zip(lsns, lines):
        assert line.startswith(f"[{lsn.file}][{lsn.offset}] record len 47 data ")
        assert line.endswith(" ...")  # 47 bytes: the first 32 shown
    ckp = result.lsn
    assert f"checkpoint len 24 ckp_lsn [{ckp.file}][{ckp.offset}] last_ckp [0][0] time " in lines[5]
    assert lines[6] == f"[{after.file}][{after.offset}] record len 5 data {b'after'.hex()}"
    assert [x.split()[0] for x in part.stdout.splitlines()] == [
        f"[{x.file}][{x.offset}]" for x in lsns[1:4]
    ]
    assert (b"hello 0" + bytes(40)).hex() in full.stdout
    await aiodbenv.Env.remove(home)


async def test_archive_lists_and_removes_the_old_log_files(home: str) -> None:
    async with aiodbenv.Env.open(
        home, create=True, log=True, log_buffer_size=4096, log_file_size=8192
    ) as env:
        assert run("archive", "-h", home).stdout == ""  # no checkpoint yet: nothing
        for _ in range(2):
            for _i in range(100):
                await env.log.put(b"x" * 100)
            ck = run("checkpoint", "-1", "-h", home)
            assert ck.returncode == 0, ck.stderr
            assert "checkpoint LSN " in ck.stdout
        last = env.log.last_checkpoint
        assert last is not None
        names = run("archive", "-h", home).stdout.split()
        assert names and names == sorted(names)
        assert all(int(n.split(".")[1]) < last[1].file for n in names)
        full = run("archive", "-a", "-h", home).stdout.split()
        assert full == [os.path.join(home, n) for n in names]
        gone = run("archive", "--remove", "-h", home)
        assert gone.returncode == 0, gone.stderr
        assert not any(os.path.exists(p) for p in full)
        assert run("archive", "-h", home).stdout == ""
        # The records after the checkpoint are all still readable.
        assert [d async for _, d in env.log.cursor(last[0])]
    await aiodbenv.Env.remove(home)


async def test_log_commands_without_a_log_fail_in_one_line(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True):
        for args in (("printlog",), ("archive",), ("stat", "-l")):
            r = run(*args, "-h", home)
            assert r.returncode == 1, (args, r.stdout)
            assert len(r.stderr.splitlines()) == 1 and "no log" in r.stderr
        bad = run("printlog", "-h", home, "-b", "one/two")
        assert bad.returncode == 2 and "not an LSN" in bad.stderr
    await aiodbenv.Env.remove(home)
