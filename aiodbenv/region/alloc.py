"""The allocator of offsets inside a region.

Shared structures that are not at fixed offsets (the pool's file table, its buffers, later the
log) are carved out of a region's arena by this allocator. It is first-fit over a free list kept
in address order, splitting a chunk when the rest is worth keeping and coalescing neighbours on
free, which is all a region needs: as in Berkeley DB, steady-state allocation is rare because
buffers are reused in place.

Crash safety: the chunks can always be walked by their sizes from the arena's start to its end,
because every split and merge changes sizes in an order that keeps the walk valid at each store.
If a process dies inside an allocation, the next locker's :meth:`Allocator.repair` rebuilds the
free list from that walk; if the walk itself is broken the environment is panicked. The caller
holds the region's allocator mutex around every call.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CacheFull, CorruptRegion, InvalidArgument, RunRecovery
from .layout import ALLOC_CHUNK, REGION_HEADER, WORD

__all__ = ["ALIGN", "AllocStats", "Allocator"]

#: Chunk alignment; payloads start at a chunk's offset plus the header, so are aligned too.
ALIGN = 16
_HDR = ALLOC_CHUNK.size
#: Split a chunk only if the rest can hold a header and this many bytes.
_MIN_REST = 64


@dataclass(frozen=True)
class AllocStats:
    """A region allocator's figures: arena bytes, bytes in use (headers included), free bytes,
    the largest free chunk's payload, the number of free chunks, and the call counters."""

    arena: int
    used: int
    free: int
    largest_free: int
    free_chunks: int
    allocs: int
    frees: int
    failures: int


def _free_chunk(w: memoryview, offset: int, size: int, next_free: int) -> None:
    """Write the header of a free chunk of ``size`` bytes at ``offset``, linked to
    ``next_free``."""
    c = offset // WORD
    w[c + ALLOC_CHUNK.word.size] = size
    w[c + ALLOC_CHUNK.word.next_free] = next_free
    w[c + ALLOC_CHUNK.word.in_use] = 0
    w[c + ALLOC_CHUNK.word.tag] = 0


def _round(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class Allocator:
    """Allocator over the arena of the region whose header is at offset 0.

    ``buf`` is the region as bytes, ``words`` the same memory as ``cast('Q')``.
    """

    __slots__ = ("_b", "_region_name", "_w")

    def __init__(self, buf: memoryview, words: memoryview, region_name: str = "region") -> None:
        self._b = buf
        self._w = words
        self._region_name = region_name

    @staticmethod
    def format(words: memoryview, arena_start: int, arena_end: int) -> None:
        """Make ``[arena_start, arena_end)`` one free chunk (the creator, before magic)."""
        start = _round(arena_start)
        end = arena_end & ~(ALIGN - 1)
        if end - start < _HDR + _MIN_REST:
            raise ValueError("region too small for its allocator arena")
        w = words
        w[REGION_HEADER.word.arena_start], w[REGION_HEADER.word.arena_end] = start, end
        _free_chunk(w, start, end - start, 0)
        w[REGION_HEADER.word.free_head] = start
        w[REGION_HEADER.word.bytes_used] = w[REGION_HEADER.word.allocs] = w[
            REGION_HEADER.word.frees
        ] = w[REGION_HEADER.word.failures] = 0

    def alloc(self, nbytes: int, tag: int = 0) -> int:
        """Allocate ``nbytes`` (zero-filled) and return the payload's offset in the region.

        Raises :class:`~aiodbenv.errors.CacheFull` (``ENOMEM``) when no free chunk fits.
        """
        if nbytes <= 0:
            raise ValueError("allocation size must be positive")
        need = _round(nbytes + _HDR)
        # The field names as locals: this runs on every frame a pool miss allocates.
        chunk, head = ALLOC_CHUNK.word, REGION_HEADER.word
        w = self._w
        start, end = self._arena()
        prev = 0
        cur = w[head.free_head]
        while cur:
            # The list is in address order: a link that does not go forward, leaves the arena
            # or names a chunk that does not fit is corruption (and would loop or overrun).
            c = cur // WORD
            if cur <= prev or cur < start or cur % ALIGN or cur + _HDR > end:
                raise self._corrupt(f"free list link {cur}")
            size = w[c + chunk.size]
            if size < _HDR or size % ALIGN or cur + size > end:
                raise self._corrupt(f"chunk at {cur} has size {size}")
            if size >= need:
                nxt = w[c + chunk.next_free]
                if size - need >= _HDR + _MIN_REST:
                    # Write the remainder's header inside the chunk first, then shrink the
                    # chunk: the size walk is valid before and after each store.
                    rest = cur + need
                    _free_chunk(w, rest, size - need, nxt)
                    w[c + chunk.size] = need
                    nxt = rest
                    size = need
                if prev:
                    w[prev // WORD + chunk.next_free] = nxt
                else:
                    w[head.free_head] = nxt
                w[c + chunk.next_free] = 0
                w[c + chunk.tag] = tag
                w[c + chunk.in_use] = 1
                payload: int = cur + _HDR
                self._zero(payload, size - _HDR)
                w[head.bytes_used] += size
                w[head.allocs] += 1
                return payload
            prev, cur = cur, w[c + chunk.next_free]
        w[head.failures] += 1
        raise CacheFull(f"unable to allocate {nbytes} bytes in {self._region_name}: region is full")

    def _arena(self) -> tuple[int, int]:
        """The arena's bounds, checked against the region's size."""
        w = self._w
        start, end = int(w[REGION_HEADER.word.arena_start]), int(w[REGION_HEADER.word.arena_end])
        if not REGION_HEADER.size <= start <= end <= len(w) * WORD:
            raise self._corrupt(f"arena [{start}, {end})")
        return start, end

    def _corrupt(self, what: str) -> CorruptRegion:
        return CorruptRegion(f"{self._region_name}: the allocator is corrupt: {what}")

    def _zero(self, offset: int, length: int) -> None:
        self._b[offset : offset + length] = bytes(length)

    def free(self, payload: int) -> None:
        """Return the chunk whose payload is at ``payload``; coalesces with free neighbours."""
        # The field names as locals: this runs on every frame a pool miss allocates.
        chunk, head = ALLOC_CHUNK.word, REGION_HEADER.word
        w = self._w
        start, end = self._arena()
        cur = payload - _HDR
        c = cur // WORD
        if cur < start or cur + _HDR > end or cur % ALIGN or w[c + chunk.in_use] != 1:
            # InvalidArgument is a ValueError: a caller's mistake, or an offset read from a
            # corrupt region.
            raise InvalidArgument(
                f"offset {payload} is not an allocated chunk of {self._region_name}"
            )
        size = w[c + chunk.size]
        if size < _HDR or size % ALIGN or cur + size > end:
            raise self._corrupt(f"chunk at {cur} has size {size}")
        if size > w[head.bytes_used]:
            raise self._corrupt(f"chunk at {cur} is larger than the bytes in use")
        w[c + chunk.in_use] = 0
        w[head.bytes_used] -= size
        w[head.frees] += 1
        # Find the free neighbours in the address-ordered free list.
        prev = 0
        nxt = w[head.free_head]
        while nxt and nxt < cur:
            if nxt <= prev or nxt < start or nxt % ALIGN:
                raise self._corrupt(f"free list link {nxt}")
            prev, nxt = nxt, w[nxt // WORD + chunk.next_free]
        if nxt and (nxt % ALIGN or nxt + _HDR > end):
            raise self._corrupt(f"free list link {nxt}")
        if prev and prev + w[prev // WORD + chunk.size] > cur:
            raise self._corrupt(f"free chunk at {prev} overlaps chunk {cur}")
        if nxt and cur + size == nxt:  # merge the following chunk into this one
            n = nxt // WORD
            w[c + chunk.size] = size = size + w[n + chunk.size]
            nxt = w[n + chunk.next_free]
        w[c + chunk.next_free] = nxt
        if prev and prev + w[prev // WORD + chunk.size] == cur:  # merge this into the preceding
            p = prev // WORD
            w[p + chunk.size] += size
            w[p + chunk.next_free] = nxt
        elif prev:
            w[prev // WORD + chunk.next_free] = cur
        else:
            w[head.free_head] = cur

    def set_tag(self, payload: int, tag: int) -> None:
        """Set the tag of the allocated chunk whose payload is at ``payload`` (one store; the
        caller holds whatever mutex guards the chunk's owner, not necessarily the allocator's)."""
        self._w[(payload - _HDR) // WORD + ALLOC_CHUNK.word.tag] = tag

    def tagged(self) -> list[tuple[int, int]]:
        """``(payload, tag)`` of every allocated chunk with a non-zero tag, by walking the
        chunks from the arena's start (caller holds the allocator mutex). The walk is bounded
        by the arena: a chunk whose size does not fit ends it."""
        w = self._w
        start, end = w[REGION_HEADER.word.arena_start], w[REGION_HEADER.word.arena_end]
        out = []
        cur = start
        while cur < end:
            c = cur // WORD
            size = w[c + ALLOC_CHUNK.word.size]
            if size < _HDR or size % ALIGN or cur + size > end:
                break  # corrupt: repair (or a panic) is someone else's business
            if w[c + ALLOC_CHUNK.word.in_use] and w[c + ALLOC_CHUNK.word.tag]:
                out.append((cur + _HDR, int(w[c + ALLOC_CHUNK.word.tag])))
            cur += size
        return out

    def repair(self) -> None:
        """Rebuild the free list and usage figures from the chunk walk.

        Called with the allocator mutex held after its previous holder died. Raises
        :class:`~aiodbenv.errors.RunRecovery` if the chunk sizes no longer tile the arena.
        """
        w = self._w
        try:
            start, end = self._arena()
        except CorruptRegion as err:
            raise RunRecovery(str(err)) from None
        cur = start
        head = prev_free = 0
        used = 0
        while cur < end:
            c = cur // WORD
            size = w[c + ALLOC_CHUNK.word.size]
            if size < _HDR or size % ALIGN or cur + size > end:
                raise RunRecovery(f"{self._region_name}: allocator chunk at {cur} is corrupt")
            if w[c + ALLOC_CHUNK.word.in_use]:
                used += size
            elif prev_free and prev_free + w[prev_free // WORD + ALLOC_CHUNK.word.size] == cur:
                w[prev_free // WORD + ALLOC_CHUNK.word.size] += size  # adjacent free chunks: merge
            else:
                w[c + ALLOC_CHUNK.word.next_free] = 0
                if prev_free:
                    w[prev_free // WORD + ALLOC_CHUNK.word.next_free] = cur
                else:
                    head = cur
                prev_free = cur
            cur += size
        if cur != end:
            raise RunRecovery(f"{self._region_name}: allocator chunks do not tile the arena")
        if prev_free:
            w[prev_free // WORD + ALLOC_CHUNK.word.next_free] = 0
        w[REGION_HEADER.word.free_head] = head
        w[REGION_HEADER.word.bytes_used] = used

    def stats(self) -> AllocStats:
        """The allocator's figures (read without the mutex: a consistent-enough snapshot)."""
        w = self._w
        free = largest = count = 0
        cur = w[REGION_HEADER.word.free_head]
        start, end = self._arena()
        prev = 0
        while cur:
            # Address order bounds the walk; a link torn by a concurrent change (no mutex is
            # held here) or a corrupt one ends it.
            if cur <= prev or cur < start or cur % ALIGN or cur + _HDR > end:
                break
            prev = cur
            size = w[cur // WORD + ALLOC_CHUNK.word.size]
            free += size
            largest = max(largest, size - _HDR)
            count += 1
            cur = w[cur // WORD + ALLOC_CHUNK.word.next_free]
        return AllocStats(
            arena=w[REGION_HEADER.word.arena_end] - w[REGION_HEADER.word.arena_start],
            used=w[REGION_HEADER.word.bytes_used],
            free=free,
            largest_free=largest,
            free_chunks=count,
            allocs=w[REGION_HEADER.word.allocs],
            frees=w[REGION_HEADER.word.frees],
            failures=w[REGION_HEADER.word.failures],
        )
