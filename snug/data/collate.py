"""Micro-batches with dynamic padding: each is padded to its own longest row.

Besides what the model reads, a batch carries `target_positions`: the flat indices of the
positions of `labels[:, 1:]` that carry loss, found here on the host so that the chunked loss can
skip masked positions before the LM head without a data-dependent step on the device.
"""

from __future__ import annotations

import torch

from snug.data.tokenize import IGNORE


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """A batch's `target_positions` for its (B, T) labels (see above), shape (N,)."""
    return (labels[:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)


def collate(samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding), each (B, T), and the
    `attention_mask` when there is padding."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        if not isinstance(s["labels"], int):
            labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    if isinstance(samples[0]["labels"], int):  # train.stage=cls: one class id per sample, (B,)
        return {
            "input_ids": ids,
            "labels": torch.tensor([s["labels"] for s in samples]),
            "attention_mask": mask,
        }
    batch = {"input_ids": ids, "labels": labels, "target_positions": target_positions(labels)}
    if not bool(mask.all()):
        # Without padding the mask says nothing; leaving it out lets attention use its causal
        # fast path (the planner replays a mask for padded batches only: simulate's padded).
        batch["attention_mask"] = mask
    return batch


def collate_packed(rows: list[list[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: each row is several samples back to back, `position_ids` restarting at 0 for
    each, and no attention mask, which tells transformers to keep attention inside each sample
    (a block-diagonal causal mask for sdpa/eager, varlen kernels for flash_attention_2). The
    first label of every sample is masked: unpacked, position 0 is never predicted either, so
    the loss equals the unpacked one. Padding at a row's end is one more segment without loss."""
    longest = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s["input_ids"])
            ids[i, at : at + n] = torch.tensor(s["input_ids"])
            labels[i, at + 1 : at + n] = torch.tensor(s["labels"][1:])
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(longest - at)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "target_positions": target_positions(labels),
    }


def real_tokens(rows: list[list[dict[str, list[int]]]]) -> int:
    """Tokens that are not padding, in rows of samples."""
    return sum(len(s["input_ids"]) for row in rows for s in row)
