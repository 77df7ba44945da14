"""How samples become rows, micro-batches and optimizer steps, and how one step's rows become
the tensors it trains on."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from snug.config import Config
from snug.data.collate import real_tokens
from snug.data.packing import micro_batches, pack


@dataclass
class Schedule:
    """How samples become rows, micro-batches and optimizer steps."""

    rows: list[list[int]]  # sample indices of each batch row: one sample, or several if packed
    micro_batch: int
    grad_accum: int
    seed: int
    row_tokens: list[int] | None = None  # given: length-grouped micro-batches
    # The fewest rows a micro-batch may hold: each rank's share at least the stage's min_rows
    least: int = 1

    @classmethod
    def build(cls, lengths: list[int], cfg: Config, world: int = 1) -> Schedule:
        """With `world` ranks, each micro-batch is global (micro_batch x world rows) and each
        rank trains its share (train/dist.py: share)."""
        from snug.core.registry import get_stage

        d, t = cfg.data, cfg.train
        rows = pack(lengths, d.cutoff_len) if d.packing else [[i] for i in range(len(lengths))]
        tokens = [sum(lengths[i] for i in r) for r in rows] if d.group_by_length else None
        least = get_stage(t.stage).min_rows * world
        return cls(rows, t.micro_batch * world, t.grad_accum, t.seed, tokens, least)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.rows) / self.micro_batch) / self.grad_accum)

    def windows(self, epoch: int) -> list[list[list[list[int]]]]:
        """Rows for each optimizer step of `epoch`: [step][micro-batch][row][sample]."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        micro = micro_batches(len(self.rows), self.micro_batch, g, self.row_tokens)
        micro = [[self.rows[r] for r in mb] for mb in micro]
        order = [row for mb in micro for row in mb]
        for mb in micro:
            # A short last micro-batch would leave a rank without rows (its collectives out of
            # step with the others') or kto with one completion: fill it with the epoch's first
            # rows again, as torch's DistributedSampler pads its shares.
            mb += [order[i % len(order)] for i in range(max(self.least - len(mb), 0))]
        return [micro[i : i + self.grad_accum] for i in range(0, len(micro), self.grad_accum)]


def sample_lengths(train_ds) -> list[int]:
    """Each sample's tokens: of its longer answer, for a preference pair."""
    lengths = [len(ids) for ids in train_ds["input_ids"]]
    if "rejected_ids" in train_ds.column_names:
        lengths = [max(a, len(b)) for a, b in zip(lengths, train_ds["rejected_ids"], strict=True)]
    return lengths


def split_window(window: list[list[list[int]]], rows: int, least: int = 1) -> list[list[list[int]]]:
    """The same rows, in the same order, in micro-batches of at most `rows` rows: what an
    out-of-memory fallback trains instead of `window` (the gradient is the same, since the
    step divides by the targets of the whole window). A last piece of a micro-batch shorter
    than `least` (the stage's min_rows) joins the piece before it."""
    out = []
    for mb in window:
        pieces = [mb[i : i + rows] for i in range(0, len(mb), rows)]
        if len(pieces) > 1 and len(pieces[-1]) < least:
            last = pieces.pop()
            pieces[-1] = pieces[-1] + last
        out += pieces
    return out


def window_batches(
    train_ds, window: list[list[list[int]]], pad_id: int, packed: bool, device, stage
) -> tuple[list[dict], int]:
    """The step's micro-batches on `device`, collated as the stage does, and how many of their
    tokens are not padding."""
    batches, tokens = [], 0
    for mb in window:
        rows = [[train_ds[i] for i in row] for row in mb]
        if packed:
            batch = stage.collate_packed(rows, pad_id)
        else:
            batch = stage.collate([r[0] for r in rows], pad_id)
        batches.append({k: v.to(device) for k, v in batch.items()})
        tokens += real_tokens(rows)
    return batches, tokens
