"""Mistakes get a clear word: what a user who gets something wrong is told."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest

import aiodbenv
from aiodbenv.errors import Busy, Incomplete, InvalidArgument, PermissionDenied

from .conftest import REPO


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiodbenv", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


#: Runs the command line as uid 65534 (nobody): imports what it needs while still root (the
#: interpreter may live where nobody cannot read, e.g. under a 0700 /root), then drops root
#: for good before parsing the arguments.
AS_NOBODY = """
import os, sys
import asyncio, concurrent.futures.thread
import anyio, anyio.to_thread, anyio._backends._asyncio
import aiodbenv, aiodbenv._cli, aiodbenv.metrics
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert os.geteuid() == 65534
sys.exit(aiodbenv._cli.main(sys.argv[1:]))
"""


def cli_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def make_dirty(home: str, n: int) -> None:
    async with aiodbenv.Env.open(home, create=True) as env:
        async with env.pool.open_file("d.db", create=True) as f:
            for i in range(n):
                async with f.get(i, create=True) as p:
                    p.data[0] = 1
                    p.mark_dirty()


# -- remove --------------------------------------------------------------------------------


async def test_remove_with_dirty_pages_needs_force(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    await make_dirty(home, 3)
    with pytest.raises(Busy) as err:
        await aiodbenv.Env.remove(home)
    assert "3 dirty page(s)" in str(err.value) and "force" in str(err.value)
    assert os.path.exists(os.path.join(home, "__db.001"))  # nothing changed
    r = cli("remove", "-h", home)  # the command line says the same, in one line
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "3 dirty page(s)" in r.stderr
    with caplog.at_level(logging.WARNING, logger="aiodbenv"):
        await aiodbenv.Env.remove(home, force=True)
    assert "3 dirty page(s) discarded" in caplog.text
    assert not os.path.exists(os.path.join(home, "__db.001"))


async def test_a_clean_environment_removes_without_force(home: str) -> None:
    await make_dirty(home, 2)
    async with aiodbenv.Env.open(home) as env:
        await env.checkpoint()
    r = cli("remove", "-h", home)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(home, "__db.001"))


def test_cli_remove_force_discards_dirty_pages(home: str) -> None:
    asyncio.run(make_dirty(home, 1))
    r = cli("remove", "-f", "-h", home)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(home, "__db.001"))


# -- pins left at close --------------------------------------------------------------------


async def test_closing_with_pins_warns_naming_them_and_a_late_unpin_says_why(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    f = await env.pool.open_file("p.db", create=True)
    held = [await f.pin(7, create=True), await f.pin(3, create=True)]
    with caplog.at_level(logging.WARNING, logger="aiodbenv"):
        with pytest.warns(
            ResourceWarning, match=r"p\.db with 2 pin\(s\) still held on page\(s\) 3, 7"
        ):
            await env.close(nosync=True)
    assert "page(s) 3, 7" in caplog.text
    assert not held[0].pinned
    with pytest.raises(InvalidArgument, match="already unpinned when its file"):
        await f.unpin(held[0])
    await aiodbenv.Env.remove(home, force=True)


async def test_an_unpin_after_the_file_closed_in_async_with_says_why(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True) as env:
        f = await env.pool.open_file("q.db", create=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            with pytest.raises(InvalidArgument, match=r"page 0 of .*q\.db was already unpinned"):
                async with f.get(0, create=True):
                    await f.close()
        # a real over-unpin keeps its own message
        page = await (await env.pool.open_file("q.db")).pin(0)
        await page._file.unpin(page)
        with pytest.raises(InvalidArgument, match="more unpins than pins"):
            await page._file.unpin(page)
    await aiodbenv.Env.remove(home, force=True)


def test_an_env_collected_while_open_warns(home: str) -> None:
    async def leak() -> None:
        env = await aiodbenv.Env.open(home, create=True)
        with pytest.warns(ResourceWarning, match="unclosed environment handle"):
            del env
            gc.collect()

    asyncio.run(leak())
    from aiodbenv.region.remove import remove_environment

    remove_environment(home, force=True)  # the dropped handle still holds the home


async def test_closed_env_is_not_warned_about(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    await env.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del env
        gc.collect()
    await aiodbenv.Env.remove(home)


# -- joining, page sizes -------------------------------------------------------------------


async def test_joining_with_other_sizes_logs_once_at_info(
    home: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with aiodbenv.Env.open(home, create=True, cache_size=1 << 20, page_size=2048):
        with caplog.at_level(logging.INFO, logger="aiodbenv"):
            async with aiodbenv.Env.open(home, cache_size=4 << 20, page_size=8192) as joined:
                assert joined.pool.page_size == 2048
        notes = [r for r in caplog.records if "creator's settings" in r.getMessage()]
        assert len(notes) == 1 and notes[0].levelno == logging.INFO
        text = notes[0].getMessage()
        assert "cache_size=1048576 (asked for 4194304)" in text
        assert "page_size=2048 (asked for 8192)" in text
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="aiodbenv"):
            async with aiodbenv.Env.open(home, cache_size=1 << 20):  # the same: nothing said
                pass
            async with aiodbenv.Env.open(home):
                pass
        assert "creator's settings" not in caplog.text
    await aiodbenv.Env.remove(home)


async def test_reopening_a_file_with_another_page_size_names_it(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True) as env:
        async with env.pool.open_file("ps.db", create=True, page_size=1024):
            with pytest.raises(InvalidArgument) as err:
                await env.pool.open_file("ps.db", page_size=4096)
    assert os.path.join(home, "ps.db") in str(err.value)
    assert "page size 1024, not 4096" in str(err.value)
    await aiodbenv.Env.remove(home)


# -- page.data -----------------------------------------------------------------------------


async def test_wrong_length_slice_assignment_gives_pythons_documented_error(home: str) -> None:
    """page.data is a plain memoryview (wrapping it would slow every hit): a slice
    assignment of the wrong length raises Python's ValueError, as docs/pool.md says, and
    leaves the page unchanged."""
    async with aiodbenv.Env.open(home, create=True) as env:
        async with env.pool.open_file("s.db", create=True) as f:
            async with f.get(0, create=True) as page:
                with pytest.raises(
                    ValueError,
                    match="memoryview assignment: lvalue and rvalue have different structures",
                ):
                    page.data[0:4] = b"toolong"
                assert bytes(page.data[0:8]) == bytes(8)
                page.data[0:7] = b"toolong"  # the right length works
    await aiodbenv.Env.remove(home, force=True)


# -- asyncio only --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["trio", "anyio-trio"])
def test_env_open_under_trio_refuses_at_once(home: str, how: str) -> None:
    trio = pytest.importorskip("trio", reason="trio is in the test extra")
    seen: list[BaseException] = []

    async def main() -> None:
        try:
            async with aiodbenv.Env.open(home, create=True):
                pass
        except InvalidArgument as err:
            seen.append(err)

    if how == "trio":
        trio.run(main)
    else:
        import anyio

        anyio.run(main, backend="trio")
    assert len(seen) == 1 and "asyncio only" in str(seen[0]) and "under trio" in str(seen[0])
    assert not os.path.exists(os.path.join(home, "__db.001"))  # refused before doing anything


# -- types ---------------------------------------------------------------------------------


def test_incomplete_result_and_region_literal_are_typed(tmp_path: object) -> None:
    code = textwrap.dedent(
        """
        import aiodbenv
        from aiodbenv import Incomplete, SyncResult

        def written(err: Incomplete) -> int:
            r: SyncResult | None = err.result
            return 0 if r is None else r.written

        async def good() -> None:
            await aiodbenv.Env.open("/tmp/x", region="system")

        async def bad() -> None:
            await aiodbenv.Env.open("/tmp/x", region="shared")
        """
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "check.py")
        with open(path, "w") as f:
            f.write(code)
        r = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental", path],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, r.stdout
    assert "check.py:13:" in errors[0] and '"region"' in errors[0], errors
    assert Incomplete("x").result is None


# -- the command line ----------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_home_it_cannot_search_is_permission_denied() -> None:
    top = tempfile.mkdtemp(prefix="aiodbenv-noaccess-")
    try:
        os.chmod(top, 0o700)  # root's: user 65534 may not search it
        home = os.path.join(top, "env")
        os.mkdir(home)
        for args in (("stat", "-m", "-h", home), ("metrics", "-h", home), ("remove", "-h", home)):
            r = cli_as_nobody(*args)
            assert r.returncode == 1, (args, r.stderr)
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
            assert "permission denied" in r.stderr.lower(), r.stderr
    finally:
        shutil.rmtree(top)
    assert issubclass(PermissionDenied, PermissionError)


async def test_watch_into_a_closed_pipe_exits_quietly(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True):
        r = await asyncio.to_thread(
            subprocess.run,
            f"{sys.executable} -m aiodbenv watch -h {home} -i 0.01 | head -n 1",
            shell=True,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            executable="/bin/bash",
        )
        assert r.stdout.startswith("aiodbenv " + home)
        assert r.stderr == "", r.stderr
        # bash's PIPESTATUS: the exit status of watch itself
        r2 = await asyncio.to_thread(
            subprocess.run,
            f"{sys.executable} -m aiodbenv watch -h {home} -i 0.01 | head -n 1 >/dev/null; "
            'echo "${PIPESTATUS[0]}"',
            shell=True,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            executable="/bin/bash",
        )
        assert r2.stdout.strip() == "0" and r2.stderr == "", r2
    await aiodbenv.Env.remove(home)


@pytest.mark.parametrize(
    "args,complaint",
    [
        (("watch", "-i", "0"), "-i/--interval: must be a positive number"),
        (("watch", "-i", "nan"), "-i/--interval: must be a positive number"),
        (("watch", "-i", "soon"), "-i/--interval: not a number"),
        (("watch", "-c", "-1"), "-c/--count: must be at least 0"),
        (("watch", "-c", "1.5"), "-c/--count: not a whole number"),
        (("checkpoint", "--completion-target", "1.5"), "--completion-target: must be within 0..1"),
        (("checkpoint", "--completion-target=-0.1"), "--completion-target: must be within"),
        (("checkpoint", "-p-1"), "-p: must be a positive number"),
        (("checkpoint", "-k", "0"), "-k: must be at least 1"),
    ],
)
def test_nonsense_options_are_refused(args: tuple[str, ...], complaint: str) -> None:
    r = cli(*args)
    assert r.returncode == 2 and complaint in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_version_and_plain_text_help() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"aiodbenv {aiodbenv.__version__}"
    for args in (
        (),
        *((c,) for c in ("demo", "stat", "remove", "checkpoint", "watch", "metrics")),
    ):
        r = cli(*args, "--help")
        assert r.returncode == 0, r.stderr
        assert "usage: python -m aiodbenv" in r.stdout
        for rest in ("``", ":class:", ":meth:", ":func:", ":mod:"):
            assert rest not in r.stdout, (args, r.stdout)
