"""PyTorch's CUDA caching allocator, replayed over the planner's allocations and frees: how much
device memory the allocator reserves (`torch.cuda.max_memory_reserved`) for a sequence of
tensor storages created and released in order.

Written here because no library models torch's allocator: torch's own is C++ that runs only
with a GPU (c10/cuda/CUDACachingAllocator.cpp). This follows its rules with the default
settings (no PYTORCH_CUDA_ALLOC_CONF: no expandable segments, no max_split_size, no rounding
to powers of two), for one device and one stream:

- every request is rounded up to a multiple of 512 bytes;
- requests of at most 1 MiB come from the small pool, larger ones from the large pool;
- a request takes the smallest cached free block of its pool that is large enough (ties: the
  lowest address); with none, a new segment is reserved (cudaMalloc): 2 MiB for the small
  pool, 20 MiB for large requests under 10 MiB, else the request rounded up to 2 MiB;
- the block is split when what remains is at least 512 bytes (small pool) or more than
  1 MiB (large pool); otherwise the request holds the whole block;
- a freed block merges with free neighbours of the same segment and goes back to its pool;
- segments are never released: torch does so only when a cudaMalloc fails (or on
  `empty_cache()`), which a run that fits never sees.

`tests/test_plan.py` checks the rules on hand-computed cases.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable

MIN_BLOCK = 512  # kMinBlockSize: every size is rounded up to a multiple of this
SMALL_SIZE = 1 << 20  # kSmallSize: the largest request of the small pool
SMALL_SEGMENT = 2 << 20  # kSmallBuffer: a small-pool segment
LARGE_SEGMENT = 20 << 20  # kLargeBuffer: the segment of a large request under 10 MiB
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: from here, a segment is the request itself
ROUND_LARGE = 2 << 20  # kRoundLarge: ... rounded up to 2 MiB


def round_size(nbytes: int) -> int:
    """The block size a request of `nbytes` takes (torch's `round_size`)."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """The bytes reserved for a new segment that must hold a block of `size` (rounded)."""
    if size <= SMALL_SIZE:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class Block:
    """A piece of a segment: allocated, or cached free in its pool. `prev`/`next` are the
    neighbouring pieces of the same segment."""

    __slots__ = ("addr", "size", "small", "free", "prev", "next")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr, self.size, self.small = addr, size, small
        self.free = False
        self.prev: Block | None = None
        self.next: Block | None = None


class CachingAllocator:
    """The allocator's bookkeeping without memory: `malloc` and `free` blocks, read
    `reserved` (bytes of all segments), `allocated` (bytes of allocated blocks, as
    `memory_allocated` counts them: whole blocks, unsplit remainders included) and their
    peaks."""

    def __init__(self) -> None:
        # Cached free blocks of each pool (small, large) as (size, addr, block), sorted: the
        # first entry at or after (size, 0) is the best fit.
        self._pools: dict[bool, list[tuple[int, int, Block]]] = {True: [], False: []}
        self._top = 0  # where the next segment starts: segments never touch
        self.reserved = self.peak_reserved = 0
        self.allocated = self.peak_allocated = 0
        self.segments = 0
        self._live: dict[int, Block] = {}  # the blocks of `run`'s handles

    def malloc(self, nbytes: int) -> Block:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        i = bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:
            block = self._new_segment(size, small)
        rest = block.size - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:
            remainder = Block(block.addr + size, rest, small)
            remainder.free = True
            remainder.prev, remainder.next = block, block.next
            if block.next is not None:
                block.next.prev = remainder
            block.next, block.size = remainder, size
            insort(pool, (rest, remainder.addr, remainder))
        block.free = False
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def _new_segment(self, size: int, small: bool) -> Block:
        nbytes = segment_size(size)
        block = Block(self._top, nbytes, small)
        self._top += nbytes
        self.reserved += nbytes  # segments are never released: reserved only grows
        self.peak_reserved = self.reserved
        self.segments += 1
        return block

    def free(self, block: Block) -> None:
        self.allocated -= block.size
        pool = self._pools[block.small]
        before, after = block.prev, block.next
        if before is not None and before.free:
            self._take(pool, before)
            block.addr, block.size = before.addr, before.size + block.size
            block.prev = before.prev
            if block.prev is not None:
                block.prev.next = block
        if after is not None and after.free:
            self._take(pool, after)
            block.size += after.size
            block.next = after.next
            if block.next is not None:
                block.next.prev = block
        block.free = True
        insort(pool, (block.size, block.addr, block))

    @staticmethod
    def _take(pool: list, block: Block) -> None:
        del pool[bisect_left(pool, (block.size, block.addr))]

    def run(self, events: Iterable[tuple[int, int]]) -> CachingAllocator:
        """Replay `events`: (handle, nbytes), a storage of nbytes made under a handle not in
        use, or, with nbytes -1, the storage of that handle freed. Empty storages take no
        memory, as on the device."""
        live = self._live
        for handle, nbytes in events:
            if nbytes < 0:
                block = live.pop(handle, None)
                if block is not None:
                    self.free(block)
            elif nbytes > 0:
                live[handle] = self.malloc(nbytes)
        return self


def run_reserved(
    load: list[tuple], first_step: list[tuple], step: list[tuple], max_steps: int = 8
) -> CachingAllocator:
    """The allocator after loading a model (`load`: its tensors as they reach the device) and
    training it: `first_step`, then `step` again until one reserves nothing new (or
    `max_steps` in all). A step frees all it makes, and freed blocks merge with free
    neighbours, so after a step the cached free blocks are the segments less what lives on
    (weights, optimizer state): a step that reserves nothing new leaves the pools as it found
    them, and so does every later one."""
    allocator = CachingAllocator().run(load).run(first_step)
    for _ in range(max_steps - 1):
        before = allocator.segments
        allocator.run(step)
        if allocator.segments == before:
            break
    return allocator
