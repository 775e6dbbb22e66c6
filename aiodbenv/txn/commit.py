"""The steps of a commit that touch every taken page: build the batch record, mark the buffers
dirty and the latches committing, copy the images in. Two forms give the same log bytes and
page bytes: the compiled one (aiodbenv/_csrc/75_commit.c, three calls for all the pages) and
the Python one (its complete twin: ``AIODBENV_MUTEX=abi``, and every case the compiled calls
hand back). :class:`~aiodbenv.txn.txn.Txn` drives them in the same order, with the same crash
test steps (``txn.committing``, ``txn.logged``, ``txn.copied``) between them.

With the compiled part 78 (aiodbenv/_csrc/78_txnfast.c) a page is taken in one call
(:func:`take`: latch, private copy, descriptor), and a commit is two calls around the log put
(:func:`prepare`: build and mark; :func:`apply`: copy in and release the latches).
"""

from __future__ import annotations

import errno
import functools
from typing import TYPE_CHECKING, Any

from .. import _io
from ..errors import CorruptRegion, LockTimeout
from ..log.lsn import LSN, pack_word, unpack_word
from ..mpool.hot import module as _hot
from ..region.mutex import ffi, speedups
from . import batch as _batch
from .latch import LATCH_COMMITTING, set_committing

if TYPE_CHECKING:
    from ..mpool.page import Page
    from ..mpool.pool import Pool
    from .txn import TxnPage

__all__ = [
    "COMPILED",
    "Built",
    "apply",
    "build",
    "descriptor",
    "file_entry",
    "latch",
    "mark",
    "mark_now",
    "prepare",
    "take",
]

#: True when commits go through the compiled steps.
COMPILED = (
    speedups is not None
    and hasattr(speedups, "aiodb_commit_build")
    and _batch.FRAG_CHUNK == 64  # the chunk the C part compares in
)
_c: Any = speedups if COMPILED else None
#: True when pages are taken and commits prepared and finished by part 78 (its calls reuse part
#: 75's descriptor layout, so it is used only together with it).
FAST = COMPILED and hasattr(speedups, "aiodb_txn_take")
_MARK_BASE = int(speedups.AIODB_TXN_MARK_BASE) if FAST else -2000000
_TAKE_LATCH, _TAKE_NEW = 1, 2  # aiodb_txn_take's flags
# _CD_HEAD + _CD_COUNT: one page's descriptor array (the room after a private copy).
_D_WORDS = int(speedups.AIODB_TXN_DESC_WORDS) if FAST else 15
_CORRUPT = -1000000
# Part 75's descriptor layout (its AIODB_CD_* constants): the array's result words first
# (changed pages, full images), then per page _CD_COUNT words, of which these are read or
# written here. Only the compiled commit reads it (the values are the C part's own).
_CD_HEAD, _CD_COUNT, _CD_FKEY, _CD_FENT, _CD_FLEN, _CD_KIND = (
    tuple(
        int(getattr(speedups, "AIODB_CD_" + k))
        for k in ("HEAD", "COUNT", "FKEY", "FENT", "FLEN", "KIND")
    )
    if COMPILED
    else (2, 13, 8, 9, 10, 12)
)
# The record's buffer: the C build writes what it returns the length of, and only that is read
# (zeroing its worst case, more than a page, was 5% of a nosync commit's instructions).
_new_unzeroed: Any = ffi.new_allocator(should_clear_after_alloc=False) if ffi is not None else None
#: True when tx.page's common case (a cached page, its latch free) is one call of the compiled
#: hot path (``HotFile.txn_take`` of :mod:`aiodbenv._hot`: hot.c's pin, then aiodb_txn_take).
HOT_TAKE = FAST and _hot is not None and hasattr(_hot, "txn_prepare_many")
if HOT_TAKE:
    _hot.configure_txn(
        int(ffi.cast("uintptr_t", ffi.addressof(speedups, "aiodb_txn_take"))),
        _TAKE_LATCH,
        _D_WORDS,
        int(ffi.cast("uintptr_t", ffi.addressof(speedups, "aiodb_txn_prepare"))),
        (_CD_HEAD, _CD_COUNT, _CD_FKEY, _CD_FENT, _CD_FLEN, _CD_KIND),
    )
_TxnCopy: Any = _hot.TxnCopy if HOT_TAKE else None
_hot_prepare: Any = _hot.txn_prepare if HOT_TAKE else None
_hot_prepare_many: Any = _hot.txn_prepare_many if HOT_TAKE else None
_EOWNERDEAD = errno.EOWNERDEAD
_MAX_PAGES = 64  # the most pages the C part takes in one call (its own bound)


def file_entry(bf: _batch.BatchFile) -> bytes:
    """The bytes a batch record holds for file ``bf`` (the same as :func:`batch.encode`)."""
    return _batch.encode([bf], [])[_batch.HEADER_SIZE :]


def take(
    page: Page, owner: int, latch: bool, new: bool, lsn_off: int, fidx: int, entry: bytes
) -> tuple[int, Any, Any]:
    """Take pinned ``page`` for ``owner`` in one compiled call (:data:`FAST` only): with
    ``latch``, its latch if it is free; then its private copy and its commit descriptor (the
    page's LSN zeroed in the copy if ``new``). Returns ``(0, data, desc)``: ``data`` the private
    copy (a writable buffer of C memory that the descriptor points to; ``desc`` keeps it
    alive too); else ``(r, None, None)``, nothing done: ``r`` > 0 the latch's holder, < 0 the
    bucket mutex was busy (wait in :func:`~aiodbenv.txn.latch.acquire`, then call again
    without ``latch``). Raises CorruptRegion if the buffer fails its bounds check."""
    cache = page._cache
    assert cache is not None
    size = len(page.data)
    # One allocation for the copy and, after it (8-byte aligned), the descriptor.
    at = (size + 7) & ~7
    priv = ffi.new("unsigned char[]", at + 8 * _D_WORDS)
    d = ffi.cast("uint64_t *", priv + at)
    r = _c.aiodb_txn_take(
        d,
        cache.wptr,
        cache.c_mptrs,
        cache.c_nowait_words,
        cache.c_bucket_words,
        page._bucket,
        page._bh,
        owner,
        priv,
        size,
        lsn_off,
        fidx,
        len(entry),
        page.pgno,
        (_TAKE_LATCH if latch else 0) | (_TAKE_NEW if new else 0),
    )
    if r == 0:
        # The descriptor holds the copy's address: it keeps the copy alive (a cffi buffer
        # keeps its owner alive, so the copy outlives the descriptor while data is held).
        return 0, ffi.buffer(priv, size), (d, priv)
    if r == _CORRUPT:
        raise CorruptRegion(f"page {page.pgno}'s buffer failed its bounds check")
    if r == -_EOWNERDEAD:
        cache.release_dead_holder(page._bucket)  # repaired (or panicked) the usual way
    return int(r), None, None


def descriptor(pages: list[TxnPage]) -> tuple[Any, bytes]:
    """The compiled commit's descriptor array of the taken ``pages`` (each has one from
    :func:`take`) and the blob of their files' batch entries."""
    if len(pages) == 1:
        tp = pages[0]
        return tp._desc[0], tp._entry
    n = len(pages)
    d = ffi.new("uint64_t[]", _CD_HEAD + _CD_COUNT * n)
    blob: list[bytes] = []
    at: dict[int, tuple[int, int]] = {}
    pos = 0
    for i, tp in enumerate(pages):
        base = _CD_HEAD + i * _CD_COUNT
        ffi.memmove(d + base, tp._desc[0] + _CD_HEAD, _CD_COUNT * 8)
        fidx = tp.file._fidx
        got = at.get(fidx)
        if got is None:
            got = at[fidx] = (pos, len(tp._entry))
            blob.append(tp._entry)
            pos += len(tp._entry)
        # The file's entry once, the first page's: its offset and its length (another handle
        # of the file, opened by another path, has an entry of another length).
        d[base + _CD_FENT], d[base + _CD_FLEN] = got
    return d, b"".join(blob)


def _changed(d: Any, n: int) -> list[int]:
    """The indexes of the changed pages of a built descriptor array of ``n`` pages."""
    if n == 1:
        return [0] if d[0] else []
    return [i for i in range(n) if d[_CD_HEAD + i * _CD_COUNT + _CD_KIND]]


def prepare(pool: Pool, pages: list[TxnPage], redo_start: int, worst: int, owner: int) -> Built:
    """:func:`build`, and with :data:`FAST` also :func:`mark_now` in the same compiled call:
    ``built.marked`` says whether the marking is done (else the caller marks with
    :func:`mark_now` / :func:`mark`)."""
    n = len(pages)
    if n == 1:
        tp = pages[0]
        desc = tp._desc
        if desc is None:
            return build(pages, redo_start, worst)
        d, files = desc[0], tp._entry
        if type(desc[1]) is _TxnCopy:
            # Taken by HotFile.txn_take: built into the compiled module's own buffer, without
            # a cffi allocation and copy (the same C build and marks).
            r = _hot_prepare(desc[1], files, redo_start, worst, owner, LATCH_COMMITTING)
            if type(r) is tuple:
                pool._note_dirty(tp.file.page_size)
                built = Built(r[0], [0], r[1], d)
                built.marked = True
                return built
            return _prepared(pool, pages, redo_start, worst, d, r)
    elif not FAST or n > _MAX_PAGES or any(tp._desc is None for tp in pages):
        return build(pages, redo_start, worst)
    elif n and _hot_prepare_many is not None and all(type(tp._desc[1]) is _TxnCopy for tp in pages):
        # Every page taken by HotFile.txn_take: the descriptors gathered and the record built
        # by the compiled module (descriptor()'s work, then the same C build and marks).
        r = _hot_prepare_many(
            tuple(tp._desc[1] for tp in pages),
            tuple(tp._entry for tp in pages),
            redo_start,
            worst,
            owner,
            LATCH_COMMITTING,
        )
        if type(r) is tuple:
            changed = list(r[2])
            for i in changed:
                pool._note_dirty(pages[i].file.page_size)
            # The array is read by the finish (apply): the cffi view of it keeps it alive.
            built = Built(r[0], changed, r[1], ffi.from_buffer("uint64_t[]", r[3]))
            built.marked = True
            return built
        return _prepared(pool, pages, redo_start, worst, None, r)
    else:
        d, files = descriptor(pages)
    out = _new_unzeroed("unsigned char[]", worst)
    r = _c.aiodb_txn_prepare(
        d, n, files, len(files), redo_start, out, worst, owner, LATCH_COMMITTING
    )
    if r > 0:
        changed = [0] if n == 1 else _changed(d, n)
        for i in changed:
            pool._note_dirty(pages[i].file.page_size)
        built = Built(ffi.buffer(out, r)[:], changed, int(d[1]), d)
        built.marked = True
        return built
    return _prepared(pool, pages, redo_start, worst, d, r)


def _prepared(
    pool: Pool, pages: list[TxnPage], redo_start: int, worst: int, d: Any, r: int
) -> Built:
    """What :func:`prepare` does with an aiodb_txn_prepare result ``r`` <= 0."""
    if r == 0:
        return Built(b"", [], 0, d)
    if r > _CORRUPT:  # -ENOSPC
        raise CorruptRegion(f"a transaction's commit failed a bounds check ({r})")
    if r == _CORRUPT:
        raise CorruptRegion("a transaction's latch or buffer failed its check at commit")
    rc = (r - _MARK_BASE) % 1000 - 1000
    if rc == -_EOWNERDEAD:
        i = -(r - _MARK_BASE) // 1000 - 1
        page = pages[i]._page
        assert page._cache is not None
        page._cache.release_dead_holder(page._bucket)
    # A bucket mutex was busy: the latches are flagged committing, not every page is marked
    # dirty. Built again (the same bytes: the copies and the buffers do not change under the
    # latches), for the caller to mark the slow way (marking a page dirty twice, or flagging
    # a latch twice, changes nothing).
    return build(pages, redo_start, worst)


def latch(page: Page, owner: int) -> int:
    """Take the latch of pinned ``page`` for ``owner`` if it is free and its bucket mutex is
    not held: 0, else non-zero (nothing taken: go on with :func:`~aiodbenv.txn.latch.acquire`,
    which waits). The compiled :func:`~aiodbenv.txn.latch.try_latch`, without a wait."""
    cache = page._cache
    assert cache is not None
    b = page._bucket
    r = int(
        _c.aiodb_commit_latch(cache.wptr, cache.mptrs[b], cache.nowait_words[b], page._bh, owner)
    )
    if r == -_EOWNERDEAD:
        cache.release_dead_holder(b)  # repaired (or panicked) the usual way
    return r


class Built:
    """A built commit: the ``record`` (bytes), the ``changed`` pages' indexes in the
    transaction's page order, how many of them are ``fulls``, and the compiled form's
    descriptor array (None for the Python form)."""

    __slots__ = ("changed", "desc", "fulls", "marked", "record")

    def __init__(self, record: bytes, changed: list[int], fulls: int, desc: Any) -> None:
        self.record = record
        self.changed = changed
        self.fulls = fulls
        self.desc = desc
        #: The pages are marked dirty and the latches committing (:func:`prepare` did it).
        self.marked = False


def build(
    pages: list[TxnPage],
    redo_start: int,
    worst: int,
) -> Built:
    """The batch record of the taken ``pages``, with the first change of a page whose LSN is
    before ``redo_start`` (an LSN word) logged as a full image. ``worst`` is the record's most
    bytes. Copies each buffer's LSN into its private copy first (those bytes are the
    library's)."""
    if _c is not None and len(pages) <= _MAX_PAGES and all(tp._desc is not None for tp in pages):
        d, files = descriptor(pages)
        out = _new_unzeroed("unsigned char[]", worst)
        n = _c.aiodb_commit_build(d, len(pages), files, len(files), redo_start, out, worst)
        if n < 0:
            raise CorruptRegion(f"a transaction's commit failed a bounds check ({n})")
        return Built(bytes(ffi.buffer(out, n)), _changed(d, len(pages)), int(d[1]), d)
    return _build_py(pages, unpack_word(redo_start))


def _build_py(pages: list[TxnPage], redo_start: LSN) -> Built:
    files: list[_batch.BatchFile] = []
    fmap: dict[int, int] = {}
    bpages: list[_batch.BatchPage] = []
    changed: list[int] = []
    fulls = 0
    for i, tp in enumerate(pages):
        bf, priv, page = tp._bf, tp.data, tp._page
        lo = bf.lsn_offset
        shared = page.data
        priv[lo : lo + 8] = shared[lo : lo + 8]
        ranges = _batch.diff(shared, priv)
        if not ranges:
            continue
        fi = fmap.get(tp.file._fidx)
        if fi is None:
            fi = fmap[tp.file._fidx] = len(files)
            files.append(bf)
        page_lsn = LSN.unpack(shared, lo)
        nbytes = sum(e - s for s, e in ranges)
        if page_lsn == LSN(0, 0) or page_lsn < redo_start or 2 * nbytes > len(priv):
            bpages.append(_batch.BatchPage(fi, page.pgno, full=bytes(priv)))
            fulls += 1
        else:
            frags = [(s, bytes(priv[s:e])) for s, e in ranges]
            bpages.append(_batch.BatchPage(fi, page.pgno, frags=frags))
        changed.append(i)
    if not changed:
        return Built(b"", [], 0, None)
    return Built(_batch.encode(files, bpages), changed, fulls, None)


def mark_now(pool: Pool, pages: list[TxnPage], built: Built, owner: int) -> bool:
    """:func:`mark` in one compiled call, without a coroutine: True if done; False if it
    must be done by :func:`mark` (the Python form, or a bucket mutex was held)."""
    d = built.desc
    if d is None:
        return False
    r = int(_c.aiodb_commit_mark(d, len(pages), owner, LATCH_COMMITTING))
    if r == 0:
        for i in built.changed:
            pool._note_dirty(pages[i].file.page_size)
        return True
    if r == _CORRUPT:
        raise CorruptRegion("a transaction's latch or buffer failed its check at commit")
    i, rc = -r // 1000 - 1, r % 1000 - 1000
    if rc == -_EOWNERDEAD:
        page = pages[i]._page
        assert page._cache is not None
        page._cache.release_dead_holder(page._bucket)
    # A busy (or repaired) bucket mutex: the Python way, from the start (marking a page
    # dirty again changes nothing).
    return False


async def mark(pool: Pool, pages: list[TxnPage], built: Built, owner: int) -> None:
    """Mark every latch of ``owner`` committing, then the changed pages' buffers dirty (the
    Python form, after :func:`mark_now`; in this order, see aiodb_commit_mark in
    aiodbenv/_csrc/75_commit.c). A busy bucket mutex is waited for asynchronously
    (LockTimeout past the pool's ``wait_timeout``). Cancellation: the latches stay flagged
    and some pages may be marked dirty (harmless: a write at most); the caller aborts, and
    the release clears the flags."""
    for tp in pages:
        set_committing(tp._page, owner)
    for i in built.changed:
        f, page = pages[i].file, pages[i]._page
        try:
            f.set(page, dirty=True)
        except LockTimeout:
            await pool._locked(functools.partial(f.set, page, dirty=True))


def apply(pages: list[TxnPage], built: Built, lsn: LSN, owner: int) -> bool:
    """Copy the changed pages' images into their buffers and stamp ``lsn`` on each (the
    ``txn.copied`` crash test step after each page). Returns True if ``owner``'s latches of
    ``pages`` were released in the same call (the compiled finish), False if the caller must
    release them."""
    d = built.desc
    if d is not None and not _io._signal_plan:
        if FAST:
            word = (lsn[0] << 32) | lsn[1]  # pack_word
            r = _c.aiodb_txn_finish(d, len(pages), word, owner, LATCH_COMMITTING)
        else:
            r = _c.aiodb_commit_apply(d, 0, len(pages), pack_word(lsn))
        if r != len(built.changed):
            raise CorruptRegion("a transaction's buffer failed its check at commit")
        return FAST
    pack = lsn.pack()
    for i in built.changed:
        tp = pages[i]
        if d is not None:
            if _c.aiodb_commit_apply(d, i, i + 1, pack_word(lsn)) != 1:
                raise CorruptRegion("a transaction's buffer failed its check at commit")
        else:
            lo = tp._bf.lsn_offset
            shared = tp._page.data
            shared[:] = tp.data
            shared[lo : lo + 8] = pack
        _io.step("txn.copied")
    return False
