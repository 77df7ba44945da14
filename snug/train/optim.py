"""Optimizers and learning-rate schedules (torch, bitsandbytes, transformers)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler

from snug.config import MemoryConfig, TrainConfig


def build_optimizer(
    model: nn.Module, mem: MemoryConfig, train: TrainConfig
) -> torch.optim.Optimizer:
    """Only trainable weights are handed over, so frozen ones never get optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the method left no trainable weights; check the method section.")
    lr, wd = train.lr, train.weight_decay
    if mem.optimizer == "adamw":
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused or None)
    if mem.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False)
    import bitsandbytes as bnb

    cls = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "lion8bit": bnb.optim.Lion8bit,
    }[mem.optimizer]
    return cls(params, lr=lr, weight_decay=wd)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    warmup = int(train.warmup) if train.warmup >= 1 else round(train.warmup * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        train.scheduler
    ]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
