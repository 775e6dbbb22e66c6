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

_C_SIZE = ALLOC_CHUNK.offset("size") // WORD
_C_NEXT = ALLOC_CHUNK.offset("next_free") // WORD
_C_USED = ALLOC_CHUNK.offset("in_use") // WORD
_C_TAG = ALLOC_CHUNK.offset("tag") // WORD

_H_START = REGION_HEADER.offset("arena_start") // WORD
_H_END = REGION_HEADER.offset("arena_end") // WORD
_H_FREE = REGION_HEADER.offset("free_head") // WORD
_H_USED = REGION_HEADER.offset("bytes_used") // WORD
_H_ALLOCS = REGION_HEADER.offset("allocs") // WORD
_H_FREES = REGION_HEADER.offset("frees") // WORD
_H_FAILS = REGION_HEADER.offset("failures") // WORD


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
        w[_H_START], w[_H_END] = start, end
        c = start // WORD
        w[c + _C_SIZE], w[c + _C_NEXT], w[c + _C_USED], w[c + _C_TAG] = end - start, 0, 0, 0
        w[_H_FREE] = start
        w[_H_USED] = w[_H_ALLOCS] = w[_H_FREES] = w[_H_FAILS] = 0

    def alloc(self, nbytes: int, tag: int = 0) -> int:
        """Allocate ``nbytes`` (zero-filled) and return the payload's offset in the region.

        Raises :class:`~aiodbenv.errors.CacheFull` (``ENOMEM``) when no free chunk fits.
        """
        if nbytes <= 0:
            raise ValueError("allocation size must be positive")
        need = _round(nbytes + _HDR)
        w = self._w
        start, end = self._arena()
        prev = 0
        cur = w[_H_FREE]
        while cur:
            # The list is in address order: a link that does not go forward, leaves the arena
            # or names a chunk that does not fit is corruption (and would loop or overrun).
            c = cur // WORD
            if cur <= prev or cur < start or cur % ALIGN or cur + _HDR > end:
                raise self._corrupt(f"free list link {cur}")
            size = w[c + _C_SIZE]
            if size < _HDR or size % ALIGN or cur + size > end:
                raise self._corrupt(f"chunk at {cur} has size {size}")
            if size >= need:
                nxt = w[c + _C_NEXT]
                if size - need >= _HDR + _MIN_REST:
                    # Write the remainder's header inside the chunk first, then shrink the
                    # chunk: the size walk is valid before and after each store.
                    rest = cur + need
                    r = rest // WORD
                    w[r + _C_SIZE], w[r + _C_NEXT], w[r + _C_USED], w[r + _C_TAG] = (
                        size - need,
                        nxt,
                        0,
                        0,
                    )
                    w[c + _C_SIZE] = need
                    nxt = rest
                    size = need
                if prev:
                    w[prev // WORD + _C_NEXT] = nxt
                else:
                    w[_H_FREE] = nxt
                w[c + _C_NEXT] = 0
                w[c + _C_TAG] = tag
                w[c + _C_USED] = 1
                payload = cur + _HDR
                self._zero(payload, size - _HDR)
                w[_H_USED] += size
                w[_H_ALLOCS] += 1
                return payload
            prev, cur = cur, w[c + _C_NEXT]
        w[_H_FAILS] += 1
        raise CacheFull(f"unable to allocate {nbytes} bytes in {self._region_name}: region is full")

    def _arena(self) -> tuple[int, int]:
        """The arena's bounds, checked against the region's size."""
        w = self._w
        start, end = int(w[_H_START]), int(w[_H_END])
        if not REGION_HEADER.size <= start <= end <= len(w) * WORD:
            raise self._corrupt(f"arena [{start}, {end})")
        return start, end

    def _corrupt(self, what: str) -> CorruptRegion:
        return CorruptRegion(f"{self._region_name}: the allocator is corrupt: {what}")

    def _zero(self, offset: int, length: int) -> None:
        self._b[offset : offset + length] = bytes(length)

    def free(self, payload: int) -> None:
        """Return the chunk whose payload is at ``payload``; coalesces with free neighbours."""
        w = self._w
        start, end = self._arena()
        cur = payload - _HDR
        c = cur // WORD
        if cur < start or cur + _HDR > end or cur % ALIGN or w[c + _C_USED] != 1:
            # InvalidArgument is a ValueError: a caller's mistake, or an offset read from a
            # corrupt region.
            raise InvalidArgument(
                f"offset {payload} is not an allocated chunk of {self._region_name}"
            )
        size = w[c + _C_SIZE]
        if size < _HDR or size % ALIGN or cur + size > end:
            raise self._corrupt(f"chunk at {cur} has size {size}")
        if size > w[_H_USED]:
            raise self._corrupt(f"chunk at {cur} is larger than the bytes in use")
        w[c + _C_USED] = 0
        w[_H_USED] -= size
        w[_H_FREES] += 1
        # Find the free neighbours in the address-ordered free list.
        prev = 0
        nxt = w[_H_FREE]
        while nxt and nxt < cur:
            if nxt <= prev or nxt < start or nxt % ALIGN:
                raise self._corrupt(f"free list link {nxt}")
            prev, nxt = nxt, w[nxt // WORD + _C_NEXT]
        if nxt and (nxt % ALIGN or nxt + _HDR > end):
            raise self._corrupt(f"free list link {nxt}")
        if prev and prev + w[prev // WORD + _C_SIZE] > cur:
            raise self._corrupt(f"free chunk at {prev} overlaps chunk {cur}")
        if nxt and cur + size == nxt:  # merge the following chunk into this one
            n = nxt // WORD
            w[c + _C_SIZE] = size = size + w[n + _C_SIZE]
            nxt = w[n + _C_NEXT]
        w[c + _C_NEXT] = nxt
        if prev and prev + w[prev // WORD + _C_SIZE] == cur:  # merge this into the preceding
            p = prev // WORD
            w[p + _C_SIZE] += size
            w[p + _C_NEXT] = nxt
        elif prev:
            w[prev // WORD + _C_NEXT] = cur
        else:
            w[_H_FREE] = cur

    def set_tag(self, payload: int, tag: int) -> None:
        """Set the tag of the allocated chunk whose payload is at ``payload`` (one store; the
        caller holds whatever mutex guards the chunk's owner, not necessarily the allocator's)."""
        self._w[(payload - _HDR) // WORD + _C_TAG] = tag

    def tagged(self) -> list[tuple[int, int]]:
        """``(payload, tag)`` of every allocated chunk with a non-zero tag, by walking the
        chunks from the arena's start (caller holds the allocator mutex). The walk is bounded
        by the arena: a chunk whose size does not fit ends it."""
        w = self._w
        start, end = w[_H_START], w[_H_END]
        out = []
        cur = start
        while cur < end:
            c = cur // WORD
            size = w[c + _C_SIZE]
            if size < _HDR or size % ALIGN or cur + size > end:
                break  # corrupt: repair (or a panic) is someone else's business
            if w[c + _C_USED] and w[c + _C_TAG]:
                out.append((cur + _HDR, int(w[c + _C_TAG])))
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
            size = w[c + _C_SIZE]
            if size < _HDR or size % ALIGN or cur + size > end:
                raise RunRecovery(f"{self._region_name}: allocator chunk at {cur} is corrupt")
            if w[c + _C_USED]:
                used += size
            elif prev_free and prev_free + w[prev_free // WORD + _C_SIZE] == cur:
                w[prev_free // WORD + _C_SIZE] += size  # adjacent free chunks: merge
            else:
                w[c + _C_NEXT] = 0
                if prev_free:
                    w[prev_free // WORD + _C_NEXT] = cur
                else:
                    head = cur
                prev_free = cur
            cur += size
        if cur != end:
            raise RunRecovery(f"{self._region_name}: allocator chunks do not tile the arena")
        if prev_free:
            w[prev_free // WORD + _C_NEXT] = 0
        w[_H_FREE] = head
        w[_H_USED] = used

    def stats(self) -> AllocStats:
        """The allocator's figures (read without the mutex: a consistent-enough snapshot)."""
        w = self._w
        free = largest = count = 0
        cur = w[_H_FREE]
        start, end = self._arena()
        prev = 0
        while cur:
            # Address order bounds the walk; a link torn by a concurrent change (no mutex is
            # held here) or a corrupt one ends it.
            if cur <= prev or cur < start or cur % ALIGN or cur + _HDR > end:
                break
            prev = cur
            size = w[cur // WORD + _C_SIZE]
            free += size
            largest = max(largest, size - _HDR)
            count += 1
            cur = w[cur // WORD + _C_NEXT]
        return AllocStats(
            arena=w[_H_END] - w[_H_START],
            used=w[_H_USED],
            free=free,
            largest_free=largest,
            free_chunks=count,
            allocs=w[_H_ALLOCS],
            frees=w[_H_FREES],
            failures=w[_H_FAILS],
        )
