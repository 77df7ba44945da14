"""Rows of samples: packing several samples into one row, and length-grouped ordering.

A *row* is a list of sample indices that share one line of the batch: a single sample when
unpacked, several when packed. Written here: these are a few lines over lengths, and `datasets`
has no bin packing of its own.
"""

from __future__ import annotations

import bisect

import torch


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest samples first, each into the fullest row it still fits
    (a new row if none); rows hold at most `capacity` tokens. Returned rows keep the samples in
    index order, rows in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row id), sorted: best fit = first that fits
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
        else:
            room, row = capacity, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return [sorted(r) for r in rows]


def micro_batches(
    n_rows: int,
    size: int,
    generator: torch.Generator,
    row_tokens: list[int] | None = None,
) -> list[list[int]]:
    """Shuffled row ids cut into micro-batches of `size`. With `row_tokens` (length grouping),
    rows are sorted by length inside mega-batches of 50 micro-batches (the usual size, as in
    transformers' LengthGroupedSampler) so that a micro-batch holds rows of similar length and
    little padding; then the micro-batches are shuffled."""
    order = torch.randperm(n_rows, generator=generator).tolist()
    chunk = 50 * size if row_tokens is not None else n_rows
    out: list[list[int]] = []
    for start in range(0, n_rows, max(chunk, 1)):
        part = order[start : start + chunk]
        if row_tokens is not None:
            part.sort(key=lambda r: -row_tokens[r])
        out += [part[i : i + size] for i in range(0, len(part), size)]
    if row_tokens is not None:
        out = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
    return out
