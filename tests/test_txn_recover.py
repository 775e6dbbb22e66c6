"""Recovery: a sync-committed transaction of a process SIGKILLed right after survives the loss
of the regions with recover=True, an uncommitted one does not appear; without recover the
open says RunRecovery; recovery is idempotent; a power loss after the N-th I/O of a workload
(unsynced writes dropped or torn, through the I/O seam) loses no sync commit and shows no
commit in part."""

from __future__ import annotations

import logging
import os
import random
import signal
import struct
import subprocess

import pytest

import aiodbenv
from aiodbenv import RunRecovery, _io
from aiodbenv.txn.recover import recover
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
    env = await aiodbenv.Env.open(home, create=True, log=True)  # recovered: nothing stale
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


class Disk:
    """What the disk would hold after a power loss: every file's bytes as of its last fsync,
    plus the writes since (dropped, kept or torn when the power goes)."""

    def __init__(self, home: str) -> None:
        self.home = home
        self.paths: dict[int, str] = {}
        self.durable: dict[str, bytearray] = {}
        self.pending: dict[str, list[tuple[int, bytes]]] = {}
        self.ios = 0
        self.crash_at = -1
        for name in os.listdir(home):
            if name.startswith(("log.", "data")):
                with open(os.path.join(home, name), "rb") as fh:
                    self.durable[os.path.join(home, name)] = bytearray(fh.read())

    def _tick(self) -> None:
        """At the crash point the disk's state is frozen: what happens after it never
        reached the disk (the process goes on, as if it did not know yet)."""
        self.ios += 1
        if self.ios == self.crash_at:
            self.frozen = (
                {k: bytearray(v) for k, v in self.durable.items()},
                {k: list(v) for k, v in self.pending.items()},
            )

    frozen: tuple[dict[str, bytearray], dict[str, list[tuple[int, bytes]]]] | None = None

    def open_file(self, real: object, path: str, flags: int, mode: int = 0o600) -> int:
        fd: int = real(path, flags, mode)  # type: ignore[operator]
        if os.path.basename(path).startswith(("log.", "data")):
            self.paths[fd] = path
            self.pending.setdefault(path, [])
            self.durable.setdefault(path, bytearray())
        return fd

    def fallocate(self, real: object, fd: int, offset: int, length: int) -> None:
        real(fd, offset, length)  # type: ignore[operator]
        path = self.paths.get(fd)
        if path is not None and len(self.durable[path]) < offset + length:
            self.durable[path].extend(bytes(offset + length - len(self.durable[path])))

    def pwritev(self, real: object, fd: int, buffers: list[bytes], offset: int) -> int:
        self._tick()
        n: int = real(fd, buffers, offset)  # type: ignore[operator]
        path = self.paths.get(fd)
        if path is not None:
            self.pending[path].append((offset, b"".join(bytes(b) for b in buffers)[:n]))
        return n

    def sync(self, real: object, fd: int) -> None:
        self._tick()
        real(fd)  # type: ignore[operator]
        path = self.paths.get(fd)
        if path is not None:
            image = self.durable[path]
            for off, data in self.pending[path]:
                if len(image) < off + len(data):
                    image.extend(bytes(off + len(data) - len(image)))
                image[off : off + len(data)] = data
            self.pending[path] = []

    def lose_power(self, rng: random.Random) -> None:
        durable, pending = self.frozen or (self.durable, self.pending)
        for path, image in durable.items():
            image = bytearray(image)
            for off, data in pending.get(path, []):
                fate = rng.random()
                if fate < 0.3:
                    continue
                if len(image) < off + len(data):
                    image.extend(bytes(off + len(data) - len(image)))
                if fate < 0.6:
                    image[off : off + len(data)] = data
                elif fate < 0.8:
                    cut = rng.randint(0, len(data))
                    image[off : off + cut] = data[:cut]
                else:
                    for s in range(0, len(data), 512):
                        if rng.random() < 0.5:
                            image[off + s : off + s + 512] = data[s : s + 512]
            with open(path, "wb") as fh:
                fh.write(image)


NPAGES = 6


async def power_loss_round(home: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Transactions each write one stamp (txn number) into 1-3 pages and a counter page; with
    small caches and checkpoints so that pages are written and fsynced between commits. The
    power goes at the N-th I/O; afterwards every sync-acknowledged transaction is in every
    page it touched, and every transaction found is found in all of its pages."""
    rng = random.Random(seed)
    env = await aiodbenv.Env.open(
        home, create=True, log=True, cache_size=64 * 1024, log_file_size=64 * 1024
    )
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    touched: dict[int, list[int]] = {}
    acked: set[int] = set()
    with monkeypatch.context() as m:
        d = Disk(home)
        d.crash_at = rng.randint(1, 80)
        for name, method in (
            ("open_file", d.open_file),
            ("fallocate", d.fallocate),
            ("pwritev", d.pwritev),
            ("fdatasync", d.sync),
            ("fsync", d.sync),
        ):
            real = getattr(_io, name)
            m.setattr(_io, name, lambda *a, _m=method, _r=real: _m(_r, *a))
        try:
            for n in range(1, 120):
                if d.frozen is not None:
                    break
                pgnos = sorted(rng.sample(range(NPAGES), rng.randint(1, 3)))
                touched[n] = pgnos
                durability = rng.choice(["sync", "sync", "nosync"])
                async with env.txn(durability=durability) as tx:  # type: ignore[arg-type]
                    for pgno in pgnos:
                        p = await tx.page(f, pgno, create=True)
                        # Slot n % 400 of the page holds n: whole-txn presence is checkable.
                        off = 16 + 8 * (n % 400)
                        p.data[off : off + 8] = struct.pack("<Q", n)
                        if rng.random() < 0.3:
                            p.data[2048:] = rng.randbytes(2048)  # big changes: full images
                if durability == "sync" and d.frozen is None:
                    acked.add(n)
                r = rng.random()
                if r < 0.1:
                    await env.checkpoint()
                elif r < 0.3:
                    await env.pool.sync()
        except aiodbenv.Incomplete:
            pass
    try:
        await f.close()
        await env.close(nosync=True)
    except Exception:
        pass
    await aiodbenv.Env.remove(home, force=True)
    d.lose_power(rng)
    env = await aiodbenv.Env.open(home, create=True, log=True, recover=True)
    f = await env.pool.open_file(env.resolve("data.db"), create=True, page_size=PS, lsn_offset=0)
    contents = {}
    for pgno in range(NPAGES):
        async with f.get(pgno, create=True) as p:
            contents[pgno] = bytes(p.data)
    await f.close()
    await env.close()
    await aiodbenv.Env.remove(home)

    def has(n: int, pgno: int) -> bool:
        off = 16 + 8 * (n % 400)
        return struct.unpack_from("<Q", contents[pgno], off)[0] == n

    for n, pgnos in touched.items():
        found = [has(n, pg) for pg in pgnos]
        if n in acked:
            assert all(found), f"seed {seed}: sync-committed txn {n} lost on {pgnos}: {found}"
        # A later txn may overwrite the slot only with a larger n in the same slot (n+400):
        # there are fewer than 400 transactions, so each slot belongs to one txn.
        assert all(found) or not any(found), f"seed {seed}: txn {n} in part: {found}"
    for name in os.listdir(home):
        os.unlink(os.path.join(home, name))


async def test_power_loss_keeps_sync_commits_whole(
    home: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "aiodbenv")
    for seed in range(12):
        await power_loss_round(home, seed, monkeypatch)


@pytest.mark.slow
async def test_power_loss_many_seeds(home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for seed in range(12, 400):
        await power_loss_round(home, seed, monkeypatch)
