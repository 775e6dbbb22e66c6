"""A batch of dirty victims in one compiled call: what :mod:`aiodbenv.mpool.victims` hands
to the batch thread.

:func:`prepare` builds, on the loop, the ``struct aiodb_batch`` of aiodbenv/_csrc/35_batch.c
(the caches, the files with their descriptors, page sizes, file mutexes and written
generations, the staging buffer kept from one batch to the next by :func:`stage`); :func:`run`
makes the call in the batch thread (:func:`thread`) with the GIL released, and does what the
call stops for -- repair a dead holder's mutex, leave a claim whose bucket stays locked to a
task of the pool, panic -- before calling again; it returns what the batch did per file.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import LockTimeout
from ..region.layout import MUTEX_SLOT
from ..region.mutex import ffi
from . import csync
from .cache import found
from .layout import CACHE_HEADER, FILE_ENTRY, MAX_FILES, POOL_HEADER
from .staging import zeroed

if TYPE_CHECKING:
    from .handle import PoolBase

__all__ = ["ONE_CALL", "Run", "prepare", "run", "stage", "thread"]

#: A batch is one compiled call (``aiodb_batch_run``, aiodbenv/_csrc/35_batch.c) with the GIL
#: released throughout; False: the stepwise calls of ``victims._collect_write`` (each of which
#: waits for the GIL again when it returns: 15-30 ms of wall time for 1.3 ms of work while the
#: loop runs misses). Both are tested (tests/test_victim_batch.py).
ONE_CALL = True

# Staging buffers (and entry arrays) kept for the next batch of the same pool and cache: a
# fresh 2 MiB mapping per batch costs page faults in the writer and an munmap on the loop
# when it is collected. Only one batch per key is ever under way, so one buffer per key is
# enough; the few most recent keys are kept (a process opening many pools keeps no more).
_stages: OrderedDict[tuple[int, int], tuple[mmap.mmap, mmap.mmap]] = OrderedDict()
_STAGES_KEPT = 4


def stage(pool: PoolBase, index: int, cap: int, nbytes: int) -> mmap.mmap:
    """The staging buffer (at least ``nbytes``) of the batch of ``pool``'s cache ``index``,
    with an entry array for ``cap`` entries kept beside it."""
    key = (id(pool), index)
    got = _stages.get(key)
    if got is None or len(got[0]) < nbytes:
        got = (zeroed(nbytes), zeroed(csync._E * 8 * cap))
        _stages[key] = got
    _stages.move_to_end(key)
    while len(_stages) > _STAGES_KEPT:
        _stages.popitem(last=False)
    return got[0]


@dataclass
class Run:
    """One batch for :func:`_run`: the C struct and the arrays it points to (kept alive)."""

    b: Any
    keep: list[Any]
    index: int


def prepare(
    pool: PoolBase,
    route: Any,
    tab: Any,
    keep: list[Any],
    index: int,
    hand: int,
    info: dict[int, tuple[int, int]],
    stage: mmap.mmap,
    cap: int,
) -> Run:
    """On the loop: the ``struct aiodb_batch`` of a batch of cache ``index`` from bucket
    ``hand`` on, for the files of ``info`` (file slot -> descriptor, page size)."""
    core = pool._core
    cache = core.caches[index]
    w0 = core.meta_words
    n = MAX_FILES + 1
    fd = ffi.new("int64_t[]", n)
    ps = ffi.new("uint64_t[]", n)
    fmutex = ffi.new("void *[]", n)
    fnowait, fslot, fentry, fgen = (ffi.new("uint64_t[]", n) for _ in range(4))
    base = core.meta_region.base
    files = core.pool_hdr + POOL_HEADER.word.files
    for fidx, (d, size) in info.items():
        e = core.entry(fidx)
        tag = fidx + 1
        fd[tag], ps[tag] = d, size
        fmutex[tag] = ffi.cast("void *", base + (e << 3) + FILE_ENTRY.offset("mutex"))
        fnowait[tag] = e + FILE_ENTRY.word.mutex + MUTEX_SLOT.word.nowaits
        fslot[tag], fentry[tag] = files + fidx, int(w0[files + fidx])
        fgen[tag] = e + FILE_ENTRY.word.written_gen
    ent_mem = _stages[(id(pool), index)][1]
    res = ffi.new("uint64_t[]", csync._lib.AIODB_BATCH_RES * (len(info) + 1))
    b = ffi.new("struct aiodb_batch *")
    w = cache.words
    counter = int(w[cache.hdr + CACHE_HEADER.word.lru_counter])
    cut = counter - max(1, int(w[cache.hdr + CACHE_HEADER.word.buffers]) // 10)
    b.tab = tab
    b.cache = index
    b.nb = cache.nbuckets
    b.hand = hand % cache.nbuckets
    # Not the most recently used tenth (see victims._from_hand).
    b.below = cut if cut > 0 else 0
    b.route = route
    b.nroute = MAX_FILES + 1
    b.fd, b.ps, b.fmutex = fd, ps, fmutex
    b.meta = ffi.cast("uint64_t *", core.meta_region.base)
    b.fnowait, b.fslot, b.fentry, b.fgen = fnowait, fslot, fentry, fgen
    ent = ffi.from_buffer("uint64_t[]", ent_mem)
    b.ent = ent
    b.cap = cap
    sv = ffi.from_buffer(stage)
    b.stage = sv
    b.pid = pool._pid
    b.max_run = csync.MAX_RUN
    b.srf_every = csync.SRF_BYTES
    b.hook = csync._hook()
    b.res = res
    return Run(
        b, [*keep, route, tab, fd, ps, fmutex, fnowait, fslot, fentry, fgen, ent, sv, res], index
    )


def run(pool: PoolBase, run: Run) -> tuple[list[tuple[int, csync.Chunk]], int | None]:
    """In a worker thread: the batch in one compiled call (more only when Python must repair
    a dead holder's mutex, record a claim left held, or panic); what it did per file, and
    where it filled up (as ``victims._collect_write``)."""
    lib = csync._lib
    core = pool._core
    b = run.b
    fast = csync.FastSet(b.ent, 0, b.tab, [], run.keep)
    unreleased: dict[int, list[tuple[Any, bool]]] = {}
    while True:
        rc = lib.aiodb_batch_run(b)
        if rc == 0:
            break
        cache = core.caches[int(b.stop_cache)]
        if rc == lib.AIODB_BATCH_DEAD_BUCKET:
            cache.release_dead_holder(int(b.stop_bucket))  # repaired: go on from there
        elif rc == lib.AIODB_BATCH_DEAD_FILE:
            fidx = int(b.ent[int(b.at) * csync._E]) - 1
            mx = core.file_mutex(fidx)
            mx.acquire_contended(errno.EOWNERDEAD)  # repair (the count is one word), held
            mx.__exit__(None, None, None)  # the call locks it again its usual way
        elif rc == lib.AIODB_BATCH_UNRELEASED:
            # Held past the bound (a stopped process?): released later by a task of the
            # pool; meanwhile the claim keeps the page dirty.
            k = int(b.at)
            e = b.ent
            item = found(
                int(e[k * csync._E]) - 1,
                int(e[k * csync._E + 1]),
                cache,
                int(b.stop_bucket),
                int(e[k * csync._E + 2]),
            )
            failed = not (b.ok and int(e[k * csync._E + 5]) == csync._WRITTEN)
            unreleased.setdefault(int(b.lo), []).append((item, failed))
            e[k * csync._E + 5] = csync._BUSY
            b.pos = k + 1
        elif rc == lib.AIODB_CORRUPT:
            if int(b.phase) == 2:  # in a claim: let go of the claims made (pages dirty)
                fast.n = int(b.n)
                csync._release(pool, fast, int(b.lo), int(b.at), False)
                cache.corrupt(
                    f"buffer {int(b.ent[int(b.at) * csync._E + 2])} has a bad offset or page size"
                )
            cache.corrupt(f"bucket {int(b.stop_bucket)}'s chain or dirty count is corrupt")
        else:
            return [], None  # a bucket held past the bound while collecting: nothing claimed
    fast.n = int(b.n)
    out = []
    width = lib.AIODB_BATCH_RES
    for i in range(int(b.nres)):
        tag, lo, hi, written, calls, nbytes, werr, note_failed = (
            int(x) for x in b.res[i * width : i * width + width]
        )
        got = csync.Chunk(written=written, calls=calls, nbytes=nbytes)
        werr = werr - (1 << 64) if werr >= 1 << 63 else werr
        if werr:
            got.error = OSError(-werr, f"{os.strerror(-werr)} (a compiled write-back pwrite)")
        if note_failed:
            got.error = got.error or LockTimeout(
                f"the mutex of file {tag - 1} stayed held: its written pages stay dirty"
            )
        got.unreleased = unreleased.get(lo, [])
        got.skipped = csync._pick(fast, lo, hi, csync._BUSY)
        out.append((tag - 1, got))
    full = int(b.full)
    return out, (full - 1 if full else None)


_thread_obj: ThreadPoolExecutor | None = None


def thread() -> ThreadPoolExecutor:
    """The process's batch thread (made on first use; one batch runs at a time, a few ms)."""
    global _thread_obj
    if _thread_obj is None:
        _thread_obj = ThreadPoolExecutor(1, thread_name_prefix="aiodbenv-victims")
    return _thread_obj


def _forget_thread() -> None:
    global _thread_obj
    _thread_obj = None  # a forked child has no such thread


os.register_at_fork(after_in_child=_forget_thread)
