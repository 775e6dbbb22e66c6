"""The steps of a commit that touch every taken page: build the batch record, mark the buffers
dirty and the latches committing, copy the images in. Two forms give the same log bytes and
page bytes: the compiled one (aiodbenv/_csrc/75_commit.c, three calls for all the pages) and
the Python one (its complete twin: ``AIODBENV_MUTEX=abi``, and every case the compiled calls
hand back). :class:`~aiodbenv.txn.txn.Txn` drives them in the same order, with the same crash
test steps (``txn.committing``, ``txn.logged``, ``txn.copied``) between them.
"""

from __future__ import annotations

import errno
import functools
from typing import TYPE_CHECKING, Any

from .. import _io
from ..errors import CorruptRegion, LockTimeout
from ..log.lsn import LSN, pack_word, unpack_word
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
    "describe",
    "file_entry",
    "latch",
    "mark",
    "mark_now",
]

#: True when commits go through the compiled steps.
COMPILED = (
    speedups is not None
    and hasattr(speedups, "aiodb_commit_build")
    and _batch.FRAG_CHUNK == 64  # the chunk the C part compares in
)
_c: Any = speedups if COMPILED else None
_CORRUPT = -1000000
_CD_COUNT = 13  # words per page in the C descriptor array (CD_COUNT)
_CD_HEAD = 2  # the array's result words first: changed pages, full images
_CD_KIND = 12
_CD_FENT = 9
_EOWNERDEAD = errno.EOWNERDEAD
_MAX_PAGES = 64  # the most pages the C part takes in one call (its own bound)


def file_entry(bf: _batch.BatchFile) -> bytes:
    """The bytes a batch record holds for file ``bf`` (the same as :func:`batch.encode`)."""
    return _batch.encode([bf], [])[_batch.HEADER_SIZE :]


def describe(page: Page, fidx: int, data: bytearray, entry: bytes, lsn_off: int) -> Any:
    """The compiled commit's words for a taken page (None without it): addresses and offsets
    of its buffer, bucket mutex and private copy ``data``, which stays alive with the result
    (a cffi buffer that also pins ``data``'s size). Made once, when the page is taken."""
    if _c is None:
        return None
    cache = page._cache
    assert cache is not None
    b = page._bucket
    priv = ffi.from_buffer(data)
    words = [
        0,  # the head words of a one-page commit's array
        0,
        int(ffi.cast("uintptr_t", cache.wptr)),
        int(ffi.cast("uintptr_t", cache.mptrs[b])),
        cache.nowait_words[b],
        cache.bucket_words[b],
        page._bh,
        int(ffi.cast("uintptr_t", priv)),
        len(data),
        lsn_off,
        fidx,
        0,  # the entry's place in the commit's files blob, set at commit
        len(entry),
        page.pgno,
        0,  # what the build found: 0 unchanged, 1 fragments, 2 full image
    ]
    # A commit of this page alone uses this array as it is (its entry first in the blob).
    return (words, priv, entry, ffi.new("uint64_t[]", words))


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

    __slots__ = ("changed", "desc", "fulls", "record")

    def __init__(self, record: bytes, changed: list[int], fulls: int, desc: Any) -> None:
        self.record = record
        self.changed = changed
        self.fulls = fulls
        self.desc = desc


def build(
    pages: list[TxnPage],
    redo_start: int,
    worst: int,
) -> Built:
    """The batch record of the taken ``pages``, with the first change of a page whose LSN is
    before ``redo_start`` (an LSN word) logged as a full image. ``worst`` is the record's most
    bytes. Copies each buffer's LSN into its private copy first (those bytes are the
    library's)."""
    descs = [tp._desc for tp in pages]
    if _c is not None and len(descs) <= _MAX_PAGES and None not in descs:
        if len(descs) == 1:
            d, files = descs[0][3], descs[0][2]
        else:
            blob: list[bytes] = []
            at: dict[int, int] = {}
            pos = 0
            flat: list[int] = [0, 0]
            for words, _priv, entry, _d in descs:
                fidx = words[_CD_HEAD + 8]
                off = at.get(fidx)
                if off is None:
                    off = at[fidx] = pos
                    blob.append(entry)
                    pos += len(entry)
                words[_CD_HEAD + _CD_FENT] = off
                flat += words[_CD_HEAD:]
            d = ffi.new("uint64_t[]", flat)
            files = b"".join(blob)
        out = ffi.new("unsigned char[]", worst)
        n = _c.aiodb_commit_build(d, len(descs), files, len(files), redo_start, out, worst)
        if n < 0:
            raise CorruptRegion(f"a transaction's commit failed a bounds check ({n})")
        if len(descs) == 1:
            changed = [0] if n else []
        else:
            changed = [i for i in range(len(descs)) if d[_CD_HEAD + i * _CD_COUNT + _CD_KIND]]
        return Built(bytes(ffi.buffer(out, n)), changed, int(d[1]), d)
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
    """Mark the changed pages' buffers dirty, then every latch of ``owner`` committing (the
    Python form, after :func:`mark_now`). A busy bucket mutex is waited for asynchronously
    (LockTimeout past the pool's ``wait_timeout``). Cancellation: some pages may be marked
    dirty (harmless: a write at most), no latch is marked committing."""
    for i in built.changed:
        f, page = pages[i].file, pages[i]._page
        try:
            f.set(page, dirty=True)
        except LockTimeout:
            await pool._locked(functools.partial(f.set, page, dirty=True))
    for tp in pages:
        set_committing(tp._page, owner)


def apply(
    pages: list[TxnPage],
    built: Built,
    lsn: LSN,
) -> None:
    """Copy the changed pages' images into their buffers and stamp ``lsn`` on each (the
    ``txn.copied`` crash test step after each page)."""
    d = built.desc
    if d is not None and not _io._signal_plan:
        if _c.aiodb_commit_apply(d, 0, len(pages), pack_word(lsn)) != len(built.changed):
            raise CorruptRegion("a transaction's buffer failed its check at commit")
        return
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
