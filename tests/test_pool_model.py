"""The buffer pool against a model: a hypothesis state machine pins, writes, flags, unpins,
syncs, trickles, closes and reopens, and checks every page it sees against what the model says
the page may hold.

The model cannot see evictions (they depend on the replacement order), so it is written to be
sound whatever the pool evicted and when:

- ``cur[page]``: the contents the pool may return for the page when it is next pinned. A pinned
  page's contents are known exactly (it cannot be evicted or changed by anyone else), so pinning
  narrows this to what was seen.
- ``disk[page]``: the contents the page may have in the file. Only a dirty page can be written,
  only while unpinned, and its contents only change while pinned, so the disk can only take the
  contents a page had when its last pin went while it was (maybe) dirty.
- ``surely_dirty`` / ``maybe_dirty``: pages whose buffer is dirty for certain / perhaps. A page
  becomes surely dirty when it is marked dirty or created; eviction and trickle may then write
  any unpinned one, so after anything that may do so, unpinned pages are only "maybe" dirty.
  A batch writing dirty victims in the background may also write an unpinned one between two
  rules (``may_be_written``): the dirty count and a sync's outcome count only the pinned
  surely dirty pages not unpinned since they were made dirty; their content stays exact.
  A page read past the end of the file as it is on disk comes back dirty (it is created), so a
  pin of such a page makes it maybe dirty.

When the last pin of a page goes while the page is surely dirty, it cannot leave the cache
without its contents reaching the disk first, so it keeps its contents; otherwise it may be
evicted, and the next pin may return anything the disk may hold.

After a successful sync every page in the file is read back: each must be one of the contents
the model allows, and each page that was surely dirty must hold exactly its last contents.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import aiodbenv
from aiodbenv.errors import Incomplete, PageNotFound
from aiodbenv.mpool.hotpath import detach
from aiodbenv.mpool.page import PAGE_CLEAN, PAGE_DIRTY, PAGE_DISCARD, Page
from aiodbenv.region.remove import remove_environment

from .conftest import KEY_BASE

ENV_PAGE = 512
CACHE = 20 * 1024  # the minimum: 40 frames of 512 bytes


@dataclass(frozen=True)
class FileSpec:
    name: str
    page_size: int
    initial: int  # pages in the file when the machine starts
    limit: int  # page numbers the machine uses: 0 .. limit-1


FILES = (FileSpec("a.db", 512, 60, 100), FileSpec("b.db", 1024, 6, 24))
SPEC = {f.name: f for f in FILES}
#: Pins held at once at most: 8 pins of up to 1 KiB leave most of the 20 KiB cache free, so a
#: pin never finds every frame pinned (the pool runs fail-fast: CacheFull would be a bug).
MAX_PINS = 8

Key = tuple[str, int]


def initial_content(name: str, pgno: int) -> bytes:
    spec = SPEC[name]
    if pgno >= spec.initial:
        return bytes(spec.page_size)
    return f"{name} page {pgno} initial".encode().ljust(spec.page_size, bytes([pgno % 251]))


def version_bytes(name: str, pgno: int, version: int, length: int) -> bytes:
    return f"<{name}:{pgno}:v{version}>".encode().ljust(length, bytes([version % 251]))[:length]


@dataclass
class Handle:
    """One pin the machine holds."""

    name: str
    pgno: int
    page: Page
    flags: int = 0  # what mark_dirty/mark_clean/discard put on the Page, mirrored

    @property
    def key(self) -> Key:
        return (self.name, self.pgno)


@dataclass
class Model:
    cur: dict[Key, set[bytes]] = field(default_factory=dict)
    disk: dict[Key, set[bytes]] = field(default_factory=dict)
    npages: dict[str, int] = field(default_factory=dict)
    disk_pages_min: dict[str, int] = field(default_factory=dict)  # the file is at least this long
    surely_dirty: set[Key] = field(default_factory=set)
    maybe_dirty: set[Key] = field(default_factory=set)
    #: Surely dirty pages unpinned since they were last made dirty: a batch writing dirty
    #: victims in the background may have written them (clean now), their content kept.
    may_be_written: set[Key] = field(default_factory=set)

    def cur_of(self, key: Key) -> set[bytes]:
        if key not in self.cur:
            self.cur[key] = {initial_content(*key)}
        return self.cur[key]

    def disk_of(self, key: Key) -> set[bytes]:
        if key not in self.disk:
            self.disk[key] = {initial_content(*key)}
        return self.disk[key]


class PoolMachine(RuleBasedStateMachine):
    """Drives one environment through the pool's public API and checks it against Model."""

    loop_factory: Any = staticmethod(asyncio.new_event_loop)
    region = "file"
    #: "c": files keep the compiled get() when it is installed; "python": it is taken away
    #: (aiodbenv.mpool.hotpath.detach), so the model checks both hot paths.
    hot = "c"

    def __init__(self) -> None:
        super().__init__()
        self.loop = self.loop_factory()
        self.home = tempfile.mkdtemp(prefix="aiodbenv-model-")
        self.env: aiodbenv.Env | None = None
        self.files: dict[str, aiodbenv.PoolFile] = {}
        self.handles: list[Handle] = []
        self.model = Model()
        self.version = 0
        for spec in FILES:
            with open(os.path.join(self.home, spec.name), "wb") as fh:
                fh.write(b"".join(initial_content(spec.name, i) for i in range(spec.initial)))
            self.model.npages[spec.name] = spec.initial
            self.model.disk_pages_min[spec.name] = spec.initial
        try:
            self.env = self.run(
                aiodbenv.Env.open(
                    self.home,
                    create=True,
                    cache_size=CACHE,
                    page_size=ENV_PAGE,
                    region=self.region,
                    shm_key=KEY_BASE + 4090 if self.region == "system" else None,
                )
            )
            self.env.pool.fail_fast = True
            for spec in FILES:
                self.files[spec.name] = self._hot_path(
                    self.run(self.env.pool.open_file(spec.name, page_size=spec.page_size))
                )
        except BaseException:
            self.teardown()  # hypothesis only tears down machines it finished making
            raise

    # -- plumbing ---------------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _hot_path(self, f: aiodbenv.PoolFile) -> aiodbenv.PoolFile:
        if self.hot == "python":
            detach(f)
        return f

    def teardown(self) -> None:
        try:
            if self.env is not None and not self.env.closed:
                try:
                    for h in list(self.handles):
                        self.run(self.files[h.name].unpin(h.page))
                        self._released(h, h.flags)
                    self._after_may_write()
                    self._sync_and_check(None)
                    st_ = self.pool.stat()
                    event(f"evictions: {'some' if st_.rw_evict + st_.ro_evict else 'none'}")
                    event(f"dirty evictions: {'some' if st_.rw_evict else 'none'}")
                    for f in self.files.values():
                        self.run(f.close())
                finally:
                    self.run(self.env.close())
                self.run(aiodbenv.Env.remove(self.home))
        finally:
            try:
                if any(n.startswith("__db.") for n in os.listdir(self.home)):
                    remove_environment(self.home, force=True)
            finally:
                left = [n for n in os.listdir(self.home) if n.startswith("__db.")]
                shutil.rmtree(self.home, ignore_errors=True)
                self.loop.close()
        assert not left, f"region files left behind: {left}"

    @property
    def pool(self) -> aiodbenv.Pool:
        assert self.env is not None
        return self.env.pool

    def _pinned_keys(self) -> set[Key]:
        return {h.key for h in self.handles}

    def _after_may_write(self) -> None:
        """Eviction or trickle may have written (and so cleaned) any unpinned dirty page."""
        self.model.surely_dirty &= self._pinned_keys()

    def _known(self, key: Key) -> bytes:
        cur = self.model.cur_of(key)
        assert len(cur) == 1, f"pinned page {key} has no single known content: {cur}"
        return next(iter(cur))

    def _pinned(self, name: str, pgno: int, page: Page, *, created: bool) -> None:
        """Account for a pin that returned ``page``."""
        m = self.model
        key = (name, pgno)
        assert page.pinned and page.pgno == pgno
        got = bytes(page.data)
        assert len(got) == SPEC[name].page_size
        if created:
            assert got == bytes(len(got)), f"created page {key} is not zero-filled"
            m.cur[key] = {got}
            m.surely_dirty.add(key)
            m.maybe_dirty.add(key)
            m.may_be_written.discard(key)
        else:
            allowed = m.cur_of(key)
            assert got in allowed, (
                f"page {key} holds {got[:40]!r}..., the model allows {[a[:40] for a in allowed]}"
            )
            if len(allowed) > 1:
                event("pinned a page whose content the model could not know")
            m.cur[key] = {got}
            if pgno >= m.disk_pages_min[name]:
                m.maybe_dirty.add(key)  # read past the file's end on disk: created, dirty
        self.handles.append(Handle(name, pgno, page))
        self._after_may_write()

    def _released(self, h: Handle, flags: int) -> None:
        """Account for the unpin of ``h`` with page flags ``flags``."""
        m = self.model
        key = h.key
        assert not h.page.pinned
        with pytest.raises(ValueError):
            bytes(h.page.data)  # the view is released at unpin
        self.handles.remove(h)
        self._apply_flags(key, flags)
        if key in self._pinned_keys():
            return  # not the last pin
        content = self._known(key)
        if key in m.maybe_dirty:
            m.disk_of(key).add(content)
        if key not in m.surely_dirty:
            m.cur[key] = {content} | m.disk_of(key)
        else:
            m.may_be_written.add(key)

    def _apply_flags(self, key: Key, flags: int) -> None:
        m = self.model
        if flags & (PAGE_DIRTY | PAGE_CLEAN):
            m.may_be_written.discard(key)
        if flags & PAGE_DIRTY:
            m.surely_dirty.add(key)
            m.maybe_dirty.add(key)
        elif flags & PAGE_CLEAN:
            m.surely_dirty.discard(key)
            m.maybe_dirty.discard(key)

    def _dirty_now(self) -> set[Key]:
        """The pages whose buffer is surely dirty at this moment (not only in content)."""
        m = self.model
        return m.surely_dirty - m.may_be_written

    def _read_disk(self, name: str) -> list[bytes]:
        spec = SPEC[name]
        with open(os.path.join(self.home, name), "rb") as fh:
            data = fh.read()
        assert len(data) % spec.page_size == 0
        on_disk = len(data) // spec.page_size
        m = self.model
        m.disk_pages_min[name] = max(m.disk_pages_min[name], on_disk)
        n = max(on_disk, m.npages[name])  # pages past the end read as zeros
        data = data.ljust(n * spec.page_size, b"\0")
        return [data[i * spec.page_size : (i + 1) * spec.page_size] for i in range(n)]

    def _sync_and_check(self, name: str | None) -> None:
        """Sync everything (``name`` None) or one file; check the outcome and the disk."""
        m = self.model
        names = [s.name for s in FILES] if name is None else [name]
        pinned = self._pinned_keys()
        in_scope = {k for k in pinned if k[0] in names}
        must_fail = bool(in_scope & self._dirty_now())
        may_fail = bool(in_scope & m.maybe_dirty)
        was_surely = {k for k in m.surely_dirty if k[0] in names and k not in pinned}
        try:
            if name is None:
                self.run(self.pool.sync())
            else:
                self.run(self.files[name].sync())
            failed = False
        except Incomplete:
            failed = True
        event(f"sync: {'incomplete' if failed else 'complete'}")
        assert not (must_fail and not failed), "sync wrote around a pinned dirty page?"
        assert not (failed and not may_fail), "sync reported Incomplete with no dirty pin"
        # Everything unpinned (in scope) is clean now; pinned pages too if it succeeded.
        for k in list(m.maybe_dirty):
            if k[0] in names and (k not in pinned or not failed):
                m.maybe_dirty.discard(k)
                m.surely_dirty.discard(k)
        if name is None and not failed:
            assert self.pool.stat().page_dirty == 0
        for n in names:
            pages = self._read_disk(n)
            for pgno, actual in enumerate(pages):
                key = (n, pgno)
                allowed = m.disk_of(key)
                assert actual in allowed, (
                    f"page {key} on disk is {actual[:40]!r}..., the model allows "
                    f"{[a[:40] for a in allowed]}"
                )
                m.disk[key] = {actual}
                if key in was_surely:
                    assert actual == self._known(key), f"dirty page {key} was not written"

    # -- rules ------------------------------------------------------------------------------

    names = st.sampled_from([s.name for s in FILES])

    @precondition(lambda self: len(self.handles) < MAX_PINS)
    @rule(
        name=names,
        pgno=st.integers(0, 99),
        create=st.booleans(),
        how=st.sampled_from(["pin", "await-get", "aenter"]),
    )
    def pin(self, name: str, pgno: int, create: bool, how: str) -> None:
        spec = SPEC[name]
        pgno %= spec.limit
        f = self.files[name]
        m = self.model
        beyond = pgno >= m.npages[name]
        if beyond and not create:
            with pytest.raises(PageNotFound):
                self.run(f.pin(pgno))
            return
        if how == "pin":
            page = self.run(f.pin(pgno, create=create))
        elif how == "await-get":
            page = self.run(_await(f.get(pgno, create=create)))
        else:  # the synchronous hit path when cached
            page = self.run(f.get(pgno, create=create).__aenter__())
        if beyond:
            m.npages[name] = pgno + 1
        self._pinned(name, pgno, page, created=beyond)
        assert f.pages == m.npages[name]

    @precondition(lambda self: len(self.handles) < MAX_PINS)
    @rule(name=names)
    def new(self, name: str) -> None:
        m = self.model
        if m.npages[name] >= SPEC[name].limit:
            return
        f = self.files[name]
        page = self.run(f.pin(new=True))
        assert page.pgno == m.npages[name]
        m.npages[name] += 1
        self._pinned(name, page.pgno, page, created=True)

    @precondition(lambda self: len(self.handles) < MAX_PINS)
    @rule(name=names)
    def last(self, name: str) -> None:
        f = self.files[name]
        page = self.run(_await(f.last()))
        assert page.pgno == self.model.npages[name] - 1
        self._pinned(name, page.pgno, page, created=False)

    # Rules on held pins do nothing when none is held (rather than a precondition, which
    # makes hypothesis retry and sometimes give up on whole examples).

    @rule(
        i=st.integers(0, MAX_PINS - 1),
        start=st.integers(0, 1 << 16),
        length=st.integers(1, 1 << 16),
        whole=st.booleans(),
        mark=st.sampled_from(["set", "mark_dirty", "none"]),
    )
    def write(self, i: int, start: int, length: int, whole: bool, mark: str) -> None:
        if not self.handles:
            return
        h = self.handles[i % len(self.handles)]
        ps = SPEC[h.name].page_size
        old = self._known(h.key)
        if whole:
            start, length = 0, ps
        else:
            start %= ps
            length = 1 + (length - 1) % (ps - start)
        self.version += 1
        chunk = version_bytes(h.name, h.pgno, self.version, length)
        h.page.data[start : start + length] = chunk
        self.model.cur[h.key] = {old[:start] + chunk + old[start + length :]}
        if mark == "set":
            self.files[h.name].set(h.page, dirty=True)
            self._apply_flags(h.key, PAGE_DIRTY)
        elif mark == "mark_dirty":
            h.page.mark_dirty()
            h.flags = (h.flags & ~PAGE_CLEAN) | PAGE_DIRTY

    @rule(i=st.integers(0, MAX_PINS - 1), how=st.sampled_from(["dirty", "clean", "discard"]))
    def mark(self, i: int, how: str) -> None:
        if not self.handles:
            return
        h = self.handles[i % len(self.handles)]
        if how == "dirty":
            h.page.mark_dirty()
            h.flags = (h.flags & ~PAGE_CLEAN) | PAGE_DIRTY
        elif how == "clean":
            h.page.mark_clean()
            h.flags = (h.flags & ~PAGE_DIRTY) | PAGE_CLEAN
        else:
            h.page.discard()
            h.flags |= PAGE_DISCARD

    @rule(i=st.integers(0, MAX_PINS - 1), dirty=st.booleans())
    def set_flag(self, i: int, dirty: bool) -> None:
        if not self.handles:
            return
        h = self.handles[i % len(self.handles)]
        self.files[h.name].set(h.page, dirty=dirty, clean=not dirty)
        self._apply_flags(h.key, PAGE_DIRTY if dirty else PAGE_CLEAN)

    @rule(
        i=st.integers(0, MAX_PINS - 1),
        how=st.sampled_from(["plain", "dirty", "clean", "discard", "dirty-discard", "exit"]),
    )
    def unpin(self, i: int, how: str) -> None:
        if not self.handles:
            return
        h = self.handles[i % len(self.handles)]
        f = self.files[h.name]
        flags = h.flags
        if how == "exit":  # what an `async with` block's exit does
            ctx = f.get(h.pgno)
            ctx._page = h.page
            self.run(ctx.__aexit__(None, None, None))
        else:
            dirty = how in ("dirty", "dirty-discard")
            clean = how == "clean"
            discard = how in ("discard", "dirty-discard")
            self.run(f.unpin(h.page, dirty=dirty, clean=clean, discard=discard))
            if dirty:
                flags = (flags & ~PAGE_CLEAN) | PAGE_DIRTY
            elif clean:
                flags = (flags & ~PAGE_DIRTY) | PAGE_CLEAN
        self._released(h, flags)

    @rule()
    def sync(self) -> None:
        self._sync_and_check(None)

    @rule(name=names)
    def fsync(self, name: str) -> None:
        self._sync_and_check(name)

    @rule(pct=st.integers(1, 100))
    def trickle(self, pct: int) -> None:
        m = self.model
        written = self.run(self.pool.trickle(pct))
        event(f"trickle: {'wrote' if written else 'nothing'}")
        pinned = self._pinned_keys()
        assert 0 <= written <= len(m.maybe_dirty - pinned)
        self._after_may_write()
        st_ = self.pool.stat()
        target = (st_.pages * pct + 99) // 100
        if st_.page_clean < target:  # not enough: every dirty page left must be pinned
            assert st_.page_dirty <= len(m.maybe_dirty & pinned), (
                f"trickle({pct}) left {st_.page_clean} of {st_.pages} clean with unpinned "
                "dirty pages"
            )

    @rule(name=names)
    def close_and_reopen(self, name: str) -> None:
        if any(h.name == name for h in self.handles):
            return
        f = self.files[name]
        self.run(f.close())
        assert f.closed
        g = self._hot_path(self.run(self.pool.open_file(name, page_size=SPEC[name].page_size)))
        self.files[name] = g
        assert g.pages == self.model.npages[name]

    @rule(name=names, start=st.integers(0, 99), count=st.integers(1, 120), dirty=st.booleans())
    def pressure(self, name: str, start: int, count: int, dirty: bool) -> None:
        """Pin and unpin many pages (through ``async with``, the synchronous hit path when
        cached): evictions happen. With ``dirty``, each page is rewritten and marked dirty, so
        that evictions must write."""
        m = self.model
        f = self.files[name]
        n = m.npages[name]
        ps = SPEC[name].page_size
        first = self.version + 1
        self.version += count

        async def go() -> list[tuple[int, bytes, bytes | None]]:
            seen = []
            for j in range(count):
                pgno = (start + j) % n
                async with f.get(pgno) as page:
                    got = bytes(page.data)
                    new = None
                    if dirty:
                        new = version_bytes(name, pgno, first + j, ps)
                        page.data[:] = new
                        page.mark_dirty()
                seen.append((pgno, got, new))
            return seen

        for pgno, got, new in self.run(go()):
            key = (name, pgno)
            pinned = key in self._pinned_keys()
            if pinned:
                assert got == self._known(key)
            else:
                allowed = m.cur_of(key)
                assert got in allowed, f"page {key} read {got[:40]!r}, model {allowed}"
                if pgno >= m.disk_pages_min[name]:
                    m.maybe_dirty.add(key)  # read past the end of the file: created
            content = got
            if new is not None:
                content = new
                m.surely_dirty.add(key)
                m.maybe_dirty.add(key)
                m.may_be_written.discard(key)
            m.cur[key] = {content}
            if pinned:
                continue
            if key in m.maybe_dirty:
                m.disk_of(key).add(content)
            if key not in m.surely_dirty:
                m.cur[key] = {content} | m.disk_of(key)
            # Later pins of this run may have evicted (written) it again.
            m.surely_dirty.discard(key)
        self._after_may_write()

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def pinned_pages_hold_the_model_content(self) -> None:
        for h in self.handles:
            assert h.page.pinned
            assert bytes(h.page.data) == self._known(h.key), f"pinned page {h.key} changed"

    @invariant()
    def dirty_count_within_the_model_bounds(self) -> None:
        if self.env is None:
            return
        m = self.model
        dirty = self.pool.stat().page_dirty
        # A batch writing dirty victims in the background (started by an earlier miss) may
        # write an unpinned dirty page at any moment, between two rules: one unpinned with
        # discard at once, any other once enough later unpins make it old (may_be_written).
        # The content of every surely dirty page stays exact (written or cached, never
        # lost), which the pins and syncs check.
        surely = len(self._dirty_now() & self._pinned_keys())
        assert surely <= dirty <= len(m.maybe_dirty), (
            f"{dirty} dirty buffers; the model says {surely} surely (pinned), "
            f"{len(m.maybe_dirty)} at most"
        )

    @invariant()
    def page_counts(self) -> None:
        for name, f in self.files.items():
            assert f.pages == self.model.npages[name]


async def _await(awaitable: Any) -> Any:
    return await awaitable


_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class AsyncioFileMachine(PoolMachine):
    region = "file"


class UvloopSystemMachine(PoolMachine):
    region = "system"

    @staticmethod
    def loop_factory() -> asyncio.AbstractEventLoop:
        import uvloop

        return uvloop.new_event_loop()


class AsyncioPrivateMachine(PoolMachine):
    region = "private"  # no pthread mutexes: the hot paths' other branch


class AsyncioFilePythonHotMachine(PoolMachine):
    region = "file"
    hot = "python"  # the Python PinContext over the cffi (or Python) hit and unpin


TestPoolModelAsyncioFile = AsyncioFileMachine.TestCase
TestPoolModelAsyncioFile.settings = _SETTINGS
TestPoolModelUvloopSystem = UvloopSystemMachine.TestCase
TestPoolModelUvloopSystem.settings = _SETTINGS
TestPoolModelAsyncioPrivate = AsyncioPrivateMachine.TestCase
TestPoolModelAsyncioPrivate.settings = settings(_SETTINGS, max_examples=25)
TestPoolModelAsyncioFilePythonHot = AsyncioFilePythonHotMachine.TestCase
TestPoolModelAsyncioFilePythonHot.settings = settings(_SETTINGS, max_examples=25)
