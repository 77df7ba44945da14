"""The planner's replay of the CUDA caching allocator on cases computed by hand from torch's
rules (c10/cuda/CUDACachingAllocator.cpp: round_size, get_allocation_size, should_split,
get_free_block, free_block)."""

from __future__ import annotations

import pytest

from snug.plan.allocator import CachingAllocator, round_size, run_reserved, segment_size

MIB = 1 << 20


@pytest.mark.parametrize(
    "request_bytes,block,segment",
    [
        (1, 512, 2 * MIB),  # at least 512 bytes; small pool: 2 MiB segments
        (513, 1024, 2 * MIB),
        (MIB, MIB, 2 * MIB),  # 1 MiB is still small
        (MIB + 1, MIB + 512, 20 * MIB),  # large and under 10 MiB: a 20 MiB segment
        (10 * MIB - 512, 10 * MIB - 512, 20 * MIB),
        (10 * MIB, 10 * MIB, 10 * MIB),  # from 10 MiB: the request, rounded up to 2 MiB
        (11 * MIB + 1, 11 * MIB + 512, 12 * MIB),
    ],
)
def test_blocks_and_segments_are_sized_as_torch_sizes_them(request_bytes, block, segment):
    assert round_size(request_bytes) == block
    assert segment_size(block) == segment


def test_small_requests_share_a_2_mib_segment_until_it_is_full():
    a = CachingAllocator()
    for _ in range(4):
        a.malloc(512 * 1024)
    assert (a.segments, a.reserved, a.allocated) == (1, 2 * MIB, 2 * MIB)
    a.malloc(512)
    assert (a.segments, a.reserved) == (2, 4 * MIB)


def test_a_large_segment_is_split_and_its_remainder_reused():
    a = CachingAllocator()
    a.malloc(3 * MIB)  # a 20 MiB segment: 3 MiB handed out, 17 MiB cached
    a.malloc(5 * MIB)  # best fit: carved from the cached 17 MiB
    assert (a.segments, a.reserved, a.allocated) == (1, 20 * MIB, 8 * MIB)
    a.malloc(12 * MIB)  # the 12 MiB left hold it exactly
    assert (a.segments, a.reserved, a.allocated) == (1, 20 * MIB, 20 * MIB)


def test_a_remainder_of_1_mib_or_less_is_not_split_off():
    a = CachingAllocator()
    a.free(a.malloc(12 * MIB))  # a 12 MiB segment, cached
    a.malloc(11 * MIB + 512 * 1024)  # 0.5 MiB would remain: the whole block is taken
    assert (a.segments, a.allocated) == (1, 12 * MIB)


def test_the_smallest_cached_block_that_fits_is_taken():
    a = CachingAllocator()
    big, small = a.malloc(30 * MIB), a.malloc(12 * MIB)
    a.free(big)
    a.free(small)
    block = a.malloc(11 * MIB)
    assert block.size == 12 * MIB and a.segments == 2  # the 12 MiB segment, whole
    assert a.malloc(29 * MIB).size == 30 * MIB and a.segments == 2


def test_freed_neighbours_merge_and_a_hole_too_small_takes_a_new_segment():
    a = CachingAllocator()
    first, middle, last = (a.malloc(6 * MIB) for _ in range(3))  # 18 of one 20 MiB segment
    a.free(middle)
    a.malloc(8 * MIB)  # the 6 MiB hole and the 2 MiB tail are apart: a second segment
    assert (a.segments, a.reserved) == (2, 40 * MIB)
    a.free(last)  # merges with the hole before it and the 2 MiB tail after: 14 MiB free
    a.malloc(14 * MIB)
    assert (a.segments, a.reserved, a.peak_reserved) == (2, 40 * MIB, 40 * MIB)
    assert a.allocated == 6 * MIB + 8 * MIB + 14 * MIB


def test_a_run_replays_events_and_stops_once_a_step_reserves_nothing_new():
    # a 16 MiB weight; steps make and free a 4 MiB activation and a 12 MiB gradient
    load = [("w", 16 * MIB)]
    step = [("act", 4 * MIB), ("grad", 12 * MIB), ("act", -1), ("grad", -1)]
    first = [*step[:2], ("state", 12 * MIB), *step[2:]]  # the state is made in step 1's update
    a = run_reserved(load, first, step)
    # w: its own 16 MiB segment; act: a 20 MiB segment (16 MiB cached beside it); grad: from
    # those 16; state: 12 MiB of its own; then act and grad fit in the cached blocks
    assert (a.segments, a.peak_reserved, a.allocated) == (3, 48 * MIB, 28 * MIB)
