"""Why an environment was panicked reaches every process: the first process to panic it
records its pid, the time and the reason in the environment header; RunRecovery in the other
processes, ``env.stat()``, ``env.health()`` and ``stat -e`` say so. A force remove records
itself as the cause; a second panic keeps the first cause."""

from __future__ import annotations

import errno
import os

import pytest

import aiodbenv
from aiodbenv import RunRecovery
from aiodbenv.region import panic
from aiodbenv.region.layout import PANIC_REASON_BYTES
from tests.conftest import python

# A second process whose fdatasync of the log fails (through the I/O seam): it panics.
CHILD = """
import asyncio, errno, os, sys
import aiodbenv
from aiodbenv import _io

async def main():
    env = await aiodbenv.Env.open(sys.argv[1])
    with _io.inject("fdatasync", errno.EIO):
        try:
            await env.log.put(b"doomed", flush=True)
        except aiodbenv.RunRecovery as err:
            print("panicked:", os.getpid(), err, flush=True)
    try:
        await env.close()
    except aiodbenv.RunRecovery:
        pass

asyncio.run(main())
"""


async def test_a_panic_in_another_process_says_who_when_and_why(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True, log=True)
    await env.log.put(b"before", flush=True)
    out = python(CHILD, home)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("panicked:"), out.stdout + out.stderr
    child = int(out.stdout.split()[1])
    with pytest.raises(RunRecovery) as info:
        await env.log.put(b"after", flush=True)
    text = str(info.value)
    assert f"by process {child} at " in text
    assert "fsync of log file" in text and os.strerror(errno.EIO) in text
    assert "recover=True" in text  # and still the advice
    with pytest.raises(RunRecovery, match=f"by process {child} at "):
        env.stat()
    health = env.health()
    assert not health.ok and health.panicked
    assert health.panic_cause is not None and health.panic_cause.startswith(f"by process {child} ")
    with pytest.raises(RunRecovery, match=f"by process {child} at "):
        await env.close()
    cli = python(
        "import sys; from aiodbenv._cli import main; sys.exit(main())", "stat", "-e", "-h", home
    )
    # A process opening it now (here: the stat command) is told why too.
    assert cli.returncode == 1 and f"by process {child} at " in cli.stderr, cli.stderr
    await aiodbenv.Env.remove(home, force=True)


async def test_force_remove_is_the_cause_and_the_first_cause_stays(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    assert env.health().panic_cause is None
    words = env._core._w
    await aiodbenv.Env.remove(home, force=True)  # with this handle still open
    why = panic.cause(words)
    assert why is not None and why.startswith(f"by process {os.getpid()} at ")
    assert why.endswith(f"the environment was removed with force ({home})")
    # A later panic does not replace the first cause.
    panic.record(words, 1, "a later one")
    assert panic.cause(words) == why
    with pytest.raises(RunRecovery, match="removed with force"):
        env.pool.stat()
    with pytest.raises(RunRecovery, match="removed with force"):
        await env.close()


async def test_a_long_reason_is_cut_at_a_character_boundary(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    env._core.panic("é" * PANIC_REASON_BYTES)  # two bytes each: cut inside one would be bad
    why = env._core.panic_cause()
    assert why is not None
    reason = why.split(": ", 1)[1]
    assert set(reason) == {"é"} and len(reason.encode()) <= PANIC_REASON_BYTES - 1
    with pytest.raises(RunRecovery):
        await env.close()
    await aiodbenv.Env.remove(home, force=True)
