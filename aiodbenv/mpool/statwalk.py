"""The statistics' walk over a cache's buckets: its pinned buffers, and its sums of dirty pages
and bucket-mutex waits.

Finding the pinned buffers means visiting every chain under its bucket mutex. For a large cache
that is tens of thousands of buckets: tens of milliseconds of Python, all on the event loop
(``pool.stat()`` is synchronous), so the compiled accelerator does it in one call
(``aiodb_stat_walk``, aiodbenv/_csrc/55_stat.c) and hands back only the buckets it could not
try-lock. Those, and every bucket when the accelerator is not in use, are visited here under
their mutex with a short bound: a bucket whose mutex a stopped process holds is left out of the
figures rather than hold the loop.
"""

from __future__ import annotations

import errno

from ..errors import LockTimeout
from ..region.layout import MAX_PROCS, MUTEX_SLOT
from ..region.mutex import ffi, step_waits
from . import accel
from .cache import Cache
from .layout import BH, BUCKET, PINS_HALF

__all__ = ["Pinned", "slot_pins", "walk"]

#: A pinned buffer: (file slot, pgno, pins, when the first of them was taken, in
#: CLOCK_MONOTONIC_COARSE ns).
Pinned = tuple[int, int, int, int]

# A bucket mutex's waits counter, from its nowaits counter (the word the arrays index).
_WAITS_FROM_NOWAITS = MUTEX_SLOT.word.waits - MUTEX_SLOT.word.nowaits
_OUT_ENTRIES = 1024  # pinned buffers gathered per compiled call (grown for a longer chain)


def walk(cache: Cache, shared: bool, out: list[Pinned]) -> tuple[int, int, int]:
    """Append every pinned buffer of ``cache`` (in every process) to ``out``; return
    ``(dirty, waits, nowaits)``: the dirty buffers its buckets count, and the waits and
    uncontended locks of its bucket mutexes (both 0 when the region is not shared)."""
    if accel.stat_walk is not None:
        sums = _walk_compiled(cache, out)
    else:
        sums = [0, 0, 0]
        for b in range(cache.nbuckets):
            _visit(cache, b, out, sums)
    return (sums[0], sums[1], sums[2]) if shared else (sums[0], 0, 0)


def _walk_compiled(cache: Cache, out: list[Pinned]) -> list[int]:
    nb = cache.nbuckets
    cap = _OUT_ENTRIES
    buf = ffi.new("uint64_t[]", 4 * cap)
    got = ffi.new("uint64_t *")
    c_sums = ffi.new("uint64_t[3]")
    rc = ffi.new("int64_t *")
    sums = [0, 0, 0]
    b = 0
    while b < nb:
        b = accel.stat_walk(
            cache.wptr,
            cache.c_mptrs,
            cache.c_nowait_words,
            cache.c_bucket_words,
            nb,
            b,
            buf,
            cap,
            got,
            c_sums,
            rc,
        )
        n = got[0]
        if n:
            v = ffi.unpack(buf, 4 * n)
            out.extend(zip(v[0::4], v[1::4], v[2::4], v[3::4], strict=True))
        if b >= nb:
            break
        if rc[0] == accel.CORRUPT:
            cache.corrupt(f"bucket {b}'s chain or its place in the region")
        if rc[0] == 0:
            # The out array was too full for bucket b's chain: empty it (done above), and
            # make it large enough should the chain alone not fit.
            count = int(cache.words[cache.bucket_words[b] + BUCKET.word.count])
            if count > cache.max_chain:
                cache.corrupt(f"bucket {b}'s count {count}")
            if n == 0:
                cap = count
                buf = ffi.new("uint64_t[]", 4 * cap)
            continue
        # Its mutex is held by someone (-EBUSY) or its holder died (-EOWNERDEAD: held by
        # this thread now): this bucket is visited here, then the call goes on past it.
        _visit(cache, b, out, sums, owner_died=rc[0] == -errno.EOWNERDEAD)
        b += 1
    for i in range(3):
        sums[i] += int(c_sums[i])
    return sums


def _visit(
    cache: Cache, b: int, out: list[Pinned], sums: list[int], owner_died: bool = False
) -> None:
    """Gather bucket ``b``'s pinned buffers under its mutex, and add its sums. With
    ``owner_died`` the caller's try-lock found its holder dead and holds the mutex: it is
    repaired (or the environment panics) before the chain is read."""
    w = cache.words
    bw = cache.bucket_words[b]
    if owner_died:
        m = cache.mutexes[b]
        m.acquire_contended(errno.EOWNERDEAD)
        try:
            _chain(cache, bw, out)
        finally:
            m.__exit__(None, None, None)
    elif w[bw + BUCKET.word.count]:
        try:
            with step_waits(), cache.mutexes[b]:
                _chain(cache, bw, out)
        except LockTimeout:
            pass  # a stopped holder: this bucket's pins are left out of the figures
    nw = cache.nowait_words[b]
    sums[0] += int(w[bw + BUCKET.word.dirty])
    sums[1] += int(w[nw + _WAITS_FROM_NOWAITS])
    sums[2] += int(w[nw])


def _chain(cache: Cache, bw: int, out: list[Pinned]) -> None:
    w = cache.words
    off = w[bw + BUCKET.word.head]
    left = int(w[bw + BUCKET.word.count])  # bounds the walk should a chain be corrupt
    while off and left > 0:
        if not cache.bh_ok(off):
            cache.corrupt(f"a buffer offset {int(off)} in a hash chain")
        h = off >> 3
        ref = int(w[h + BH.word.ref])
        if ref and w[h + BH.word.file]:
            out.append(
                (
                    int(w[h + BH.word.file]) - 1,
                    int(w[h + BH.word.pgno]),
                    ref,
                    int(w[h + BH.word.pinned_at]),
                )
            )
        off = w[h + BH.word.next]
        left -= 1


def slot_pins(caches: list[Cache]) -> dict[int, int]:
    """Pins held per registry slot in ``caches``, summed over every buffer (env.stat()'s
    per-process pins). Unlocked: a figure may be a pin off while pins change, and an offset
    that fails its check (a chain changing under us, or a corrupt one) ends that bucket's walk;
    the mutexed paths report corruption. Only buffers pinned at all (ref, the sum of their
    slots' counts, not 0) are looked into; compiled when the accelerator is in use (a Python
    walk of a 256 MiB cache held the loop for 30 ms, and 200 ms before that check)."""
    if accel.slot_pins is not None:
        sums = ffi.new("uint64_t[]", MAX_PROCS)
        for cache in caches:
            accel.slot_pins(cache.wptr, cache.c_bucket_words, cache.nbuckets, sums)
        return {s: int(c) for s, c in enumerate(sums) if c}
    out: dict[int, int] = {}
    for cache in caches:
        w = cache.words
        halves = cache.halves
        for bw in cache.bucket_words:
            off = int(w[bw + BUCKET.word.head])
            n = 0
            while off and n < cache.max_chain:
                if not cache.bh_ok(off):
                    break
                x = off >> 3
                if w[x + BH.word.ref]:
                    p = (off >> 1) + PINS_HALF
                    for s, c in enumerate(halves[p : p + MAX_PROCS]):
                        if c:
                            out[s] = out.get(s, 0) + c
                off = int(w[x + BH.word.next])
                n += 1
    return out
