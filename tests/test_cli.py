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
