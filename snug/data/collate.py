"""Micro-batches with dynamic padding: each is padded to its own longest sample."""

from __future__ import annotations

import torch

from snug.data.tokenize import IGNORE


def collate(samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding) and `attention_mask`, each (B, T)."""
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
        labels = torch.tensor([s["labels"] for s in samples])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
