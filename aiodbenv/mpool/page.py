"""``Page`` (a pinned page) and ``PinContext`` (what ``PoolFile.get`` returns)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InvalidArgument
from . import hot

if TYPE_CHECKING:
    from .cache import Cache
    from .fget import PageAccess
    from .file import PoolFile

__all__ = ["PAGE_CLEAN", "PAGE_DIRTY", "PAGE_DISCARD", "LatchedPinContext", "Page", "PinContext"]
__all__ += ["Pins", "new_pins"]

PAGE_DIRTY = 1
PAGE_CLEAN = 2
PAGE_DISCARD = 4


class Page:
    """A pinned page: ``data`` is a memoryview of the page in the shared cache (no copy).

    Changes to ``data`` are seen by every process at once; call :meth:`mark_dirty` so the page
    is written back before its buffer is reused. The view is released when the page is
    unpinned: using it afterwards raises ``ValueError`` instead of reading a buffer that may
    now hold another page. Pages of a memory-mapped read-only file have a read-only view.
    """

    __slots__ = ("__weakref__", "_bh", "_bucket", "_cache", "_file", "_flags", "data", "pgno")

    def __init__(
        self,
        file: PageAccess,
        pgno: int,
        data: memoryview,
        cache: Cache | None,
        bucket: int,
        bh: int,
    ) -> None:
        #: The page number (0-based).
        self.pgno = pgno
        #: The page's bytes, valid while the page is pinned (read-only for a read-only
        #: handle: a write through it would change the page for every process, unmarked).
        self.data = data.toreadonly() if file.readonly and not data.readonly else data
        self._file = file
        self._cache = cache  # None for a page served from a memory map
        self._bucket = bucket
        self._bh = bh  # the buffer's offset; -1 once unpinned; 0 for a mapped page
        self._flags = 0  # PAGE_* requested for the unpin

    def mark_dirty(self) -> None:
        """Write this page back before its buffer is reused (memp_fput ``DB_MPOOL_DIRTY``),
        applied when the page is unpinned. Raises
        :class:`~aiodbenv.errors.InvalidArgument` once it is unpinned."""
        self._check_pinned("mark_dirty()")
        self._flags = (self._flags & ~PAGE_CLEAN) | PAGE_DIRTY

    def mark_clean(self) -> None:
        """Forget earlier changes: the page need not be written (``DB_MPOOL_CLEAN``), applied
        when the page is unpinned. Raises :class:`~aiodbenv.errors.InvalidArgument` once it
        is unpinned."""
        self._check_pinned("mark_clean()")
        self._flags = (self._flags & ~PAGE_DIRTY) | PAGE_CLEAN

    def discard(self) -> None:
        """Make this page the first to be evicted once unpinned (``DB_MPOOL_DISCARD``).
        Raises :class:`~aiodbenv.errors.InvalidArgument` once it is unpinned."""
        self._check_pinned("discard()")
        self._flags |= PAGE_DISCARD

    def _check_pinned(self, what: str) -> None:
        # A flag set after the unpin would apply to nothing: a change made after the unpin
        # would silently never be written.
        if self._bh < 0:
            raise InvalidArgument(
                f"page {self.pgno} is not pinned: {what} applies at its unpin, which was "
                "made already"
            )

    @property
    def pinned(self) -> bool:
        """True until the page is unpinned."""
        return self._bh >= 0

    def __repr__(self) -> str:
        state = "pinned" if self._bh >= 0 else "unpinned"
        return f"<Page {self.pgno} of {self._file._path!r} {state}>"


if not TYPE_CHECKING and hot.PageType is not None:
    # With aiodbenv._hot installed, every page is its compiled twin of the class above (a
    # final C type with the same attributes, methods and docstrings, and no per-instance
    # Python overhead): the hot pin makes one per pin. The class above stays the one the
    # Python hot path uses, and what the docs and type checkers read.
    if (hot.module.PAGE_DIRTY, hot.module.PAGE_CLEAN, hot.module.PAGE_DISCARD) != (
        PAGE_DIRTY,
        PAGE_CLEAN,
        PAGE_DISCARD,
    ):
        raise ImportError("aiodbenv._hot disagrees with aiodbenv.mpool.page on the PAGE_* flags")
    Page = hot.PageType


class Pins(Protocol):
    """The pages a file handle holds pinned (``PageAccess._pins``): what closing the file
    unpins and a forked child's disarm releases."""

    def add(self, page: Page, /) -> None: ...
    def discard(self, page: Page, /) -> None: ...
    def __iter__(self) -> Iterator[Page]: ...
    def __len__(self) -> int: ...
    def __contains__(self, page: object, /) -> bool: ...


def new_pins() -> Pins:
    """An empty :class:`Pins`: the compiled ``PinSet`` (pages linked through their own fields,
    cheaper on the hot path than a set) when :mod:`aiodbenv._hot` is installed, else a set."""
    if hot.module is None:
        return set()
    pins: Pins = hot.module.PinSet()
    return pins


class PinContext:
    """The result of :meth:`PoolFile.get`, :meth:`~PoolFile.new` and :meth:`~PoolFile.last`.

    ``async with f.get(7) as page:`` pins page 7 and unpins it (with the flags set on the page
    by :meth:`Page.mark_dirty` and friends) when the block exits, also on an exception.
    ``page = await f.get(7)`` pins it and leaves the unpin to :meth:`PoolFile.unpin`.
    """

    __slots__ = ("_file", "_mode", "_page", "_pgno")

    def __init__(self, file: PoolFile, pgno: int, mode: int) -> None:
        self._file = file
        self._pgno = pgno
        self._mode = mode
        self._page: Page | None = None

    def __await__(self) -> Generator[Any, None, Page]:
        return self._file._pin(self._pgno, self._mode).__await__()

    async def __aenter__(self) -> Page:
        """Pin the page and return it. Cancellation: a pin cancelled while it waits (a miss, a
        held mutex) leaves no pin held."""
        if self._page is not None:
            raise RuntimeError(
                "this page context is already entered: exit it before entering again"
            )
        # A hit needs no await at all: the fast path is plain synchronous bookkeeping.
        page = self._file._pin_hit(self._pgno) if self._mode == 0 else None
        if page is None:
            page = await self._file._pin(self._pgno, self._mode)
        self._page = page
        return page

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Unpin the page with the flags set on it (as :meth:`PoolFile.unpin`). Cancellation:
        the page is unpinned for the caller at once; a release still waiting for the bucket
        mutex finishes in the background."""
        page = self._page
        if page is not None:
            self._page = None
            pending = self._file._unpin(page, page._flags)
            if pending is not None:  # the bucket mutex is held elsewhere: see PoolFile.unpin
                await asyncio.shield(pending)


class LatchedPinContext:
    """The result of ``PoolFile.get(pgno, latch=True)``: the page pinned *and* its latch held
    (the exclusive latch of transactions, ``aiodbenv.txn.latch``), so its bytes cannot
    change under the reader: no transaction's commit is ever seen in part. The latch is
    released when the page is unpinned (the end of the ``async with`` block, or
    :meth:`PoolFile.unpin`). While it is held, transactions that take the page wait.
    """

    __slots__ = ("_file", "_mode", "_page", "_pgno")

    def __init__(self, file: PoolFile, pgno: int, mode: int) -> None:
        self._file = file
        self._pgno = pgno
        self._mode = mode
        self._page: Page | None = None

    def __await__(self) -> Generator[Any, None, Page]:
        return self._file._pin_latched(self._pgno, self._mode).__await__()

    async def __aenter__(self) -> Page:
        self._page = await self._file._pin_latched(self._pgno, self._mode, scoped=True)
        return self._page

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        page = self._page
        if page is not None:
            self._page = None
            await self._file.unpin(page)
