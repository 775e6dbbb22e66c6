"""The child side of the corrupt-region fuzz test (tests/test_corrupt.py).

Run as ``python tests/corrupt_child.py TEMPLATE WORKDIR SEED FIRST COUNT``: for each case
``FIRST .. FIRST+COUNT-1`` it copies the template environment into a fresh home, corrupts
its region files the way case ``(SEED, i)`` says, then opens the environment and uses it
(pin, dirty, unpin, sync, stat, close) and removes it with force. It prints one line per
case: ``START i <what>`` before, ``DONE i <outcome>`` after, where the outcome is ``ok`` or
the name of a clean aiodbenv error. Anything else -- another exception type -- prints
``BAD i <traceback>`` and exits 3. A crash (a signal) or a hang (SIGALRM, left at its default
action so that even a hang inside C kills the process) is seen by the parent as the death of
the process during case ``i``.

The mutations are deterministic in (seed, case): the same command reproduces a failure.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import random
import shutil
import signal
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import aiodbenv  # noqa: E402
from aiodbenv.errors import AiodbenvError  # noqa: E402
from aiodbenv.mpool.layout import (  # noqa: E402
    BH,
    BUCKET,
    CACHE_HEADER,
    FILE_ENTRY,
    MAX_FILES,
    POOL_HEADER,
)
from aiodbenv.region.layout import (  # noqa: E402
    ALLOC_CHUNK,
    ENV_HEADER,
    MUTEX_STORAGE_BYTES,
    REGION_HEADER,
    WORD,
)

#: Seconds one case may take before it counts as a hang.
CASE_TIMEOUT = int(os.environ.get("AIODBENV_FUZZ_TIMEOUT", "20"))
FILES = ("a.db", "b.db")
PAGES = 12


def _word(data: bytes | bytearray, off: int) -> int:
    return int.from_bytes(data[off : off + WORD], "little")


def interesting_words(name: str, data: bytes) -> list[int]:
    """Byte offsets of words worth corrupting in region file ``name``: headers, the region
    table, the cache and pool headers, bucket heads and counts, and the fields of every
    buffer header and file entry reachable in the clean template."""
    out = [i * WORD for i in range(REGION_HEADER.size // WORD)]
    if name == "__db.001":
        base = REGION_HEADER.size
        out += [base + i * WORD for i in range(ENV_HEADER.size // WORD)]
        return out
    c = REGION_HEADER.size
    out += [c + i * WORD for i in range(CACHE_HEADER.size // WORD)]
    nb = _word(data, c + CACHE_HEADER.offset("nbuckets"))
    start = _word(data, c + CACHE_HEADER.offset("buckets_off"))
    if _word(data, c + CACHE_HEADER.offset("cache_index")) == 0:
        p = c + CACHE_HEADER.size
        out += [p + i * WORD for i in range(POOL_HEADER.size // WORD)]
        files = p + POOL_HEADER.offset("files")
        for i in range(8):
            e = _word(data, files + i * WORD)
            if e and e + FILE_ENTRY.size <= len(data):
                out += [e + k * WORD for k in range(FILE_ENTRY.size // WORD)]
    for b in range(min(nb, 4096)):
        bw = start + b * BUCKET.size
        if bw + BUCKET.size > len(data):
            break
        for f in ("head", "dirty", "count"):
            out.append(bw + BUCKET.offset(f))
        off = _word(data, bw + BUCKET.offset("head"))
        n = 0
        while off and off + BH.size <= len(data) and n < 64:
            out += [off + k * WORD for k in range(BH.size // WORD)]
            out.append(off - ALLOC_CHUNK.size)  # the allocator's chunk size word
            off = _word(data, off + BH.offset("next"))
            n += 1
    return out


def mutex_words(name: str, data: bytes) -> set[int]:
    """Byte ranges of the pthread mutexes in region file ``name``.

    The fuzz leaves them alone: a mutex word that reads as held by a thread that never
    existed blocks ``pthread_mutex_lock`` for good, which is the unbounded-wait part of the
    issue (bounded, timed locks), not a bounds check.
    """
    out = [(REGION_HEADER.offset("alloc_mutex"), MUTEX_STORAGE_BYTES)]
    if name == "__db.001":
        out.append((REGION_HEADER.size + ENV_HEADER.offset("mutex"), MUTEX_STORAGE_BYTES))
        return {w for a, n in out for w in range(a // WORD, (a + n) // WORD)}
    c = REGION_HEADER.size
    nb = _word(data, c + CACHE_HEADER.offset("nbuckets"))
    start = _word(data, c + CACHE_HEADER.offset("buckets_off"))
    for b in range(min(nb, max(0, len(data) - start) // BUCKET.size)):
        out.append((start + b * BUCKET.size + BUCKET.offset("mutex"), MUTEX_STORAGE_BYTES))
    if _word(data, c + CACHE_HEADER.offset("cache_index")) == 0:
        p = c + CACHE_HEADER.size
        out.append((p + POOL_HEADER.offset("mutex"), MUTEX_STORAGE_BYTES))
        files = p + POOL_HEADER.offset("files")
        for i in range(MAX_FILES):
            e = _word(data, files + i * WORD)
            if e:
                out.append((e + FILE_ENTRY.offset("mutex"), MUTEX_STORAGE_BYTES))
    return {w for a, n in out for w in range(a // WORD, (a + n) // WORD)}


def _in(words: set[int], off: int, n: int) -> bool:
    return any(w in words for w in range(off // WORD, (off + n - 1) // WORD + 1))


def chain_buffers(data: bytes) -> list[tuple[int, int]]:
    """(bucket word offset, buffer offset) of every buffer in an mpool region's chains."""
    c = REGION_HEADER.size
    nb = _word(data, c + CACHE_HEADER.offset("nbuckets"))
    start = _word(data, c + CACHE_HEADER.offset("buckets_off"))
    out = []
    for b in range(min(nb, 4096)):
        bw = start + b * BUCKET.size
        off = _word(data, bw + BUCKET.offset("head"))
        n = 0
        while off and off + BH.size <= len(data) and n < 64:
            out.append((bw, off))
            off = _word(data, off + BH.offset("next"))
            n += 1
    return out


def mutate(home: str, rng: random.Random) -> str:
    """Corrupt the region files in ``home``; returns what was done (for the log)."""
    names = sorted(n for n in os.listdir(home) if n.startswith("__db."))
    name = rng.choice(names)
    path = os.path.join(home, name)
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    size = len(data)
    kind = rng.choices(
        ["bytes", "word", "loop", "cross", "truncate", "extend", "multi"],
        weights=[3, 8, 2, 2, 1, 1, 2],
    )[0]
    what = f"{name} {kind}"
    locks = mutex_words(name, bytes(data))
    values = [
        0,
        1,
        3,
        WORD,
        size - WORD,
        size,
        size + WORD,
        size * 4096,
        2**31,
        2**32 + WORD,
        2**63,
        2**64 - 1,
        2**64 - WORD,
    ]
    if kind in ("word", "multi"):
        spots = [o for o in interesting_words(name, bytes(data)) if not _in(locks, o, WORD)]
        for _ in range(1 if kind == "word" else rng.randint(2, 6)):
            off = rng.choice(spots)
            if off + WORD > size:
                continue
            old = _word(data, off)
            v = rng.choice(
                values + [old + rng.choice([-16, -8, -1, 1, 8, 16]), rng.getrandbits(64)]
            )
            v %= 2**64
            data[off : off + WORD] = v.to_bytes(WORD, "little")
            what += f" @{off}={v:#x}"
    elif kind == "bytes":
        for _ in range(rng.randint(1, 4)):
            off = rng.randrange(0, max(1, min(size, 64 * 1024)))
            n = rng.randint(1, 16)
            if off >= size or _in(locks, off, n):
                continue
            data[off : off + n] = rng.randbytes(n)
            what += f" @{off}+{n}"
    elif kind in ("loop", "cross"):
        chain = chain_buffers(bytes(data)) if name != "__db.001" else []
        if chain:
            bw, bh = rng.choice(chain)
            if kind == "loop":
                # The buffer's next points back to its bucket's head (or itself): a cycle.
                target = rng.choice([bh, _word(data, bw + BUCKET.offset("head"))])
            else:
                # Point into the middle of another buffer, or into a bucket, or a page.
                _, other = rng.choice(chain)
                target = other + rng.choice([WORD, BH.size, BH.size + 64, -ALLOC_CHUNK.size])
            data[bh + BH.offset("next") : bh + BH.offset("next") + WORD] = target.to_bytes(
                WORD, "little"
            )
            what += f" bh {bh} next={target}"
        else:
            off = rng.randrange(0, max(1, min(size, 4096))) & ~7
            if off + WORD <= size and not _in(locks, off, WORD):
                data[off : off + WORD] = rng.randbytes(WORD)
            what += f" @{off} random"
    elif kind == "truncate":
        cut = rng.choice([0, 3, WORD, 100, 4096, size // 2, size - 1, size - 4096])
        del data[max(0, cut) :]
        what += f" to {len(data)}"
    elif kind == "extend":
        n = rng.choice([1, 7, 8, 4096, 65536])
        data += b"\0" * n
        what += f" by {n}"
    with open(path, "wb") as fh:
        fh.write(data)
    return what


async def use(home: str, rng: random.Random) -> None:
    """Open the corrupted environment and use it as an application would."""
    env = await aiodbenv.Env.open(home)
    try:
        files = []
        for n in FILES:
            files.append(await env.pool.open_file(n, checksum=n == "b.db"))
        for _ in range(3):
            for f in files:
                for pgno in rng.sample(range(PAGES + 2), 6):
                    try:
                        page = await f.get(pgno)
                    except aiodbenv.PageNotFound:
                        continue
                    if rng.random() < 0.5:
                        page.data[0:1] = b"x"
                        page.mark_dirty()
                    await f.unpin(page)
            await env.pool.sync()
            await env.pool.trickle(50)
        env.pool.stat()
        env.stat()
        for f in files:
            f.stat()
            await f.close()
    finally:
        await env.close()


def run_case(template: str, workdir: str, seed: int, case: int) -> str:
    rng = random.Random(seed * 1_000_003 + case)
    home = os.path.join(workdir, f"case{case}")
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(template, home)
    what = mutate(home, rng)
    if rng.random() < 0.3:
        what += " + " + mutate(home, rng)
    print(f"START {case} {what}", flush=True)
    # Only the library's part is timed (copying files on a loaded machine is not a hang).
    signal.alarm(CASE_TIMEOUT)  # default action: a hang, even inside C, kills us
    # Just before that: every thread's stack on stderr, to say where it hung.
    faulthandler.dump_traceback_later(max(1, CASE_TIMEOUT - 1), exit=False)
    outcome = []
    try:
        asyncio.run(use(home, rng))
        outcome.append("ok")
    except AiodbenvError as err:
        outcome.append(type(err).__name__)
    try:
        asyncio.run(aiodbenv.Env.remove(home, force=True))
    except AiodbenvError as err:
        outcome.append("remove:" + type(err).__name__)
    signal.alarm(0)
    faulthandler.cancel_dump_traceback_later()
    shutil.rmtree(home, ignore_errors=True)
    return " ".join(outcome)


def main() -> int:
    template, workdir, seed, first, count = sys.argv[1:6]
    for case in range(int(first), int(first) + int(count)):
        try:
            outcome = run_case(template, workdir, int(seed), case)
        except BaseException:
            tb = traceback.format_exc().replace("\n", "\\n")
            print(f"BAD {case} {tb}", flush=True)
            return 3
        print(f"DONE {case} {outcome}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
