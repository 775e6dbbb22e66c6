"""The region allocator against a model: no overlaps, nothing lost, repair is exact."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from aiodbenv import CacheFull
from aiodbenv.region.alloc import ALIGN, Allocator
from aiodbenv.region.layout import ALLOC_CHUNK, REGION_HEADER

SIZE = 16 * 1024


class AllocatorModel(RuleBasedStateMachine):
    chunks = Bundle("chunks")

    def __init__(self) -> None:
        super().__init__()
        self.mm = mmap.mmap(-1, SIZE)
        self.buf = memoryview(self.mm)
        self.words = self.buf.cast("Q")
        Allocator.format(self.words, REGION_HEADER.size, SIZE)
        self.alloc = Allocator(self.buf, self.words)
        self.live: dict[int, tuple[int, int]] = {}  # payload offset -> (size, fill byte)
        self.arena = self.alloc.stats().arena

    @rule(target=chunks, n=st.integers(1, 3000), fill=st.integers(1, 255))
    def allocate(self, n: int, fill: int) -> int:
        try:
            off = self.alloc.alloc(n)
        except CacheFull:
            # Legitimate only if no free chunk can hold it.
            assert self.alloc.stats().largest_free < n
            return -1
        assert off % ALIGN == 0 and REGION_HEADER.size <= off and off + n <= SIZE
        assert bytes(self.buf[off : off + n]) == bytes(n), "allocations start zeroed"
        self.buf[off : off + n] = bytes([fill]) * n
        self.live[off] = (n, fill)
        return off

    @rule(off=consumes(chunks))
    def free(self, off: int) -> None:
        if off < 0:
            return
        n, fill = self.live.pop(off)
        assert bytes(self.buf[off : off + n]) == bytes([fill]) * n, "someone wrote into it"
        self.alloc.free(off)

    @rule()
    def repair(self) -> None:
        before = self.alloc.stats()
        self.alloc.repair()
        after = self.alloc.stats()
        assert (after.used, after.free) == (before.used, before.free)
        assert after.free_chunks <= before.free_chunks

    @invariant()
    def accounting(self) -> None:
        s = self.alloc.stats()
        assert s.used + s.free == s.arena == self.arena
        spans = sorted((off, off + n) for off, (n, _) in self.live.items())
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, "allocations overlap"

    def teardown(self) -> None:
        for off in list(self.live):
            self.alloc.free(off)
        s = self.alloc.stats()
        assert s.free_chunks == 1 and s.used == 0, "freeing everything coalesces to one chunk"
        self.words.release()
        self.buf.release()
        self.mm.close()


TestAllocator = AllocatorModel.TestCase
TestAllocator.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_double_free_is_refused() -> None:
    mm = mmap.mmap(-1, SIZE)
    buf = memoryview(mm)
    words = buf.cast("Q")
    Allocator.format(words, REGION_HEADER.size, SIZE)
    a = Allocator(buf, words)
    off = a.alloc(10)
    a.free(off)
    with pytest.raises(ValueError):
        a.free(off)
    with pytest.raises(ValueError):
        a.free(off + ALLOC_CHUNK.size)
    words.release()
    buf.release()
    mm.close()
