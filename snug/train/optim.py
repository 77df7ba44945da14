"""Optimizers and learning-rate schedules (torch, bitsandbytes, transformers)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler

from snug.config import MemoryConfig, MethodConfig, TrainConfig
from snug.core.method import one_group
from snug.core.registry import get_method


def _optimizer_class(mem: MemoryConfig, on_cuda: bool) -> tuple[type, dict]:
    if mem.optimizer == "adamw":
        return torch.optim.AdamW, {"fused": True if on_cuda else None}
    if mem.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, {"scale_parameter": False, "relative_step": False}
    import bitsandbytes as bnb

    return {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "lion8bit": bnb.optim.Lion8bit,
    }[mem.optimizer], {}


def build_optimizer(
    model: nn.Module,
    mem: MemoryConfig,
    train: TrainConfig,
    method: MethodConfig | None = None,
    on_cuda: bool | None = None,
) -> torch.optim.Optimizer:
    """Only trainable weights are handed over, so frozen ones never get optimizer state. The
    method's `param_groups` hook groups them (snug/core/method.py; `method` None: one group at
    train.lr), e.g. LoRA+ gives the B matrices lr x method.lora_plus_ratio. AdamW is torch's
    fused one when the weights are on a GPU (`on_cuda`, default: where they are; the planner's
    fake weights say cpu for a GPU plan)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the method left no trainable weights; check the method section.")
    if on_cuda is None:
        on_cuda = all(p.is_cuda for p in params)
    cls, extra = _optimizer_class(mem, on_cuda)
    grouping = get_method(method.name).param_groups if method is not None else one_group
    groups = grouping(model, method, train.lr, train.weight_decay)
    return cls(groups, lr=train.lr, weight_decay=train.weight_decay, **extra)


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """train.warmup in steps: a ratio of the run's steps below 1, a number of steps from 1."""
    return int(train.warmup) if train.warmup >= 1 else round(train.warmup * total_steps)


def warmup_too_long(train: TrainConfig, total_steps: int) -> str | None:
    """What to tell the user when the warmup is as long as the run or longer (the learning rate
    then never reaches train.lr), else None. A warning, not a refusal: Hugging Face's Trainer
    and torchtune accept such a warmup, and a run shortened for a try (train.max_steps=10 on a
    config made for a long run) is common; but it is said, since a silent 2e-6 looks like a
    run that does not learn."""
    warmup = warmup_steps(train, total_steps)
    if warmup < total_steps or warmup == 0:
        return None

    def steps(n: int) -> str:
        return f"{n} step{'s' if n != 1 else ''}"

    reached = (  # the rate as the log shows it after the last step
        f"climbs to {train.lr * total_steps / warmup:.3g} at most, never to train.lr={train.lr:g}"
        if warmup > total_steps
        else f"reaches train.lr={train.lr:g} only after the last step"
    )
    return (
        f"train.warmup={train.warmup:g} is {steps(warmup)} of warmup, but the run has "
        f"{steps(total_steps)}: the learning rate {reached}; give a shorter warmup (a ratio "
        "below 1 follows the run's length)."
    )


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    warmup = warmup_steps(train, total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        train.scheduler
    ]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
