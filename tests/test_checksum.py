"""Page checksums (``open_file(checksum=True)``, Berkeley DB's DB_CHKSUM).

Pages are written through the pool, the environment is removed (so nothing is cached), the
file is damaged at rest the ways disks and crashes damage files (a flipped bit, a torn page,
a page written at the wrong offset, a lost trailer), and a fresh environment reads it back:
every damaged page must raise PageCorrupt naming the file and page, every intact page must
read back exactly.
"""

from __future__ import annotations

import os
import random

import pytest

import aiodbenv
from aiodbenv import Env, InvalidArgument, PageCorrupt
from aiodbenv.mpool.checksum import TRAILER

PS = 4096
PAGES = 16


def _content(pgno: int) -> bytes:
    return random.Random(pgno).randbytes(PS - TRAILER)


async def _write_file(home: str, name: str, **kw: object) -> None:
    async with Env.open(home, create=True) as env:
        f = await env.pool.open_file(name, create=True, checksum=True, **kw)  # type: ignore[arg-type]
        for i in range(PAGES):
            async with f.get(i, create=True) as page:
                assert len(page.data) == PS - TRAILER
                page.data[:] = _content(i)
                page.mark_dirty()
        await env.pool.sync()
        await f.close()
    await Env.remove(home)  # nothing stays cached: the next reads come from the disk


async def _read_all(home: str, name: str, **kw: object) -> dict[int, str]:
    """Each page's outcome in a fresh environment: "ok", "wrong" (read, bad bytes) or the
    error's name."""
    out: dict[int, str] = {}
    async with Env.open(home, create=True) as env:
        f = await env.pool.open_file(name, checksum=True, **kw)  # type: ignore[arg-type]
        for i in range(PAGES):
            try:
                async with f.get(i) as page:
                    out[i] = "ok" if bytes(page.data) == _content(i) else "wrong"
            except PageCorrupt as err:
                assert err.path == f.name and err.pgno == i and f"page {i}" in str(err)
                out[i] = "PageCorrupt"
        await f.close()
    await Env.remove(home)
    return out


async def test_round_trip_and_trailer(home: str) -> None:
    await _write_file(home, "data.db")
    path = os.path.join(home, "data.db")
    with open(path, "rb") as fh:
        raw = fh.read()
    assert len(raw) == PAGES * PS
    for i in range(PAGES):
        page = raw[i * PS : (i + 1) * PS]
        assert page[: PS - TRAILER] == _content(i)
        assert page[PS - TRAILER :] != bytes(TRAILER)  # the trailer is written
    assert await _read_all(home, "data.db") == dict.fromkeys(range(PAGES), "ok")
    os.unlink(path)


def _damage(raw: bytearray, rng: random.Random, how: str) -> int:
    """Damage one page of ``raw`` the way ``how`` says; returns its number."""
    pgno = rng.randrange(PAGES)
    start = pgno * PS
    if how == "bitflip":
        off = start + rng.randrange(PS)
        raw[off] ^= 1 << rng.randrange(8)
    elif how == "torn":  # the first sectors of a newer version, the rest of the old one
        cut = rng.choice([512, 1024, 2048, 3584])
        raw[start : start + cut] = rng.randbytes(cut)
    elif how == "misplaced":  # another page's (valid) bytes at this offset
        other = (pgno + rng.randrange(1, PAGES)) % PAGES
        raw[start : start + PS] = raw[other * PS : (other + 1) * PS]
    elif how == "no-trailer":  # the body survived, the trailer was zeroed
        raw[start + PS - TRAILER : start + PS] = bytes(TRAILER)
    elif how == "garbage":
        raw[start : start + PS] = rng.randbytes(PS)
    return pgno


@pytest.mark.parametrize("how", ["bitflip", "torn", "misplaced", "no-trailer", "garbage"])
async def test_damage_at_rest_is_detected(home: str, how: str) -> None:
    """12 damaged files per kind (60 in all): every damaged page is PageCorrupt, every
    other page reads back intact."""
    await _write_file(home, "data.db")
    path = os.path.join(home, "data.db")
    with open(path, "rb") as fh:
        clean = fh.read()
    rng = random.Random(how)
    for _ in range(12):
        raw = bytearray(clean)
        pgno = _damage(raw, rng, how)
        with open(path, "wb") as fh:
            fh.write(raw)
        got = await _read_all(home, "data.db")
        expect = dict.fromkeys(range(PAGES), "ok")
        expect[pgno] = "PageCorrupt"
        assert got == expect, (how, pgno)
    os.unlink(path)


async def test_all_zero_page_is_accepted(home: str) -> None:
    """A page never written (a hole in the file) reads as zeros, with no trailer."""
    await _write_file(home, "data.db")
    path = os.path.join(home, "data.db")
    with open(path, "r+b") as fh:
        fh.seek(5 * PS)
        fh.write(bytes(PS))
    async with Env.open(home, create=True) as env:
        f = await env.pool.open_file(path, checksum=True)
        async with f.get(5) as page:
            assert bytes(page.data) == bytes(PS - TRAILER)
        await f.close()
    await Env.remove(home)
    os.unlink(path)


async def test_checksum_covers_pgout_output(home: str) -> None:
    """With pgin/pgout, the trailer is over what is on disk (after pgout) and is checked
    before pgin: the round trip works and damage is still found."""

    def flip(pgno: int, page: memoryview, cookie: bytes) -> None:
        page[: PS - TRAILER] = bytes(b ^ 0x5A for b in page[: PS - TRAILER])

    async with Env.open(home, create=True) as env:
        env.pool.register(7, flip, flip)
        f = await env.pool.open_file("data.db", create=True, checksum=True, ftype=7)
        for i in range(4):
            async with f.get(i, create=True) as page:
                page.data[:] = _content(i)
                page.mark_dirty()
        await env.pool.sync()
        await f.close()
    await Env.remove(home)
    path = os.path.join(home, "data.db")
    with open(path, "rb") as fh:
        raw = bytearray(fh.read())
    assert raw[: PS - TRAILER] != _content(0)  # pgout changed what went to disk
    raw[2 * PS + 10] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(raw)
    async with Env.open(home, create=True) as env:
        env.pool.register(7, flip, flip)
        f = await env.pool.open_file("data.db", checksum=True, ftype=7)
        for i in (0, 1, 3):
            async with f.get(i) as page:
                assert bytes(page.data) == _content(i)
        with pytest.raises(PageCorrupt):
            await f.get(2)
        await f.close()
    await Env.remove(home)
    os.unlink(path)


async def test_evicted_pages_are_sealed(home: str) -> None:
    """Pages written by eviction (a cache smaller than the file) carry their trailer too."""
    async with Env.open(home, create=True, cache_size=64 * 1024) as env:
        f = await env.pool.open_file("data.db", create=True, checksum=True)
        for i in range(64):
            async with f.get(i, create=True) as page:
                page.data[:8] = i.to_bytes(8, "little")
                page.mark_dirty()
        assert env.pool.stat().rw_evict > 0  # dirty pages were written to make room
        await env.pool.sync()
        await f.close()
    await Env.remove(home)
    async with Env.open(home, create=True) as env:
        f = await env.pool.open_file("data.db", checksum=True)
        for i in range(64):
            async with f.get(i) as page:
                assert bytes(page.data[:8]) == i.to_bytes(8, "little")
        await f.close()
    await Env.remove(home)
    os.unlink(os.path.join(home, "data.db"))


async def test_every_open_must_agree(env: aiodbenv.Env, home: str) -> None:
    path = os.path.join(home, "data.db")
    f = await env.pool.open_file(path, create=True, checksum=True)
    with pytest.raises(InvalidArgument, match=r"data\.db.*checksums on"):
        await env.pool.open_file(path)
    g = await env.pool.open_file(path, checksum=True)
    await g.close()
    await f.close()
    with pytest.raises(InvalidArgument):
        await env.pool.open_file(path, checksum=1)  # type: ignore[arg-type]
