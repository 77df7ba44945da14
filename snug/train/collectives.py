"""The collective a loss needs (a sum over ranks), apart from snug/train/dist.py so that a stage
can use it without importing the launcher and the config (torch.distributed's all_reduce)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned), or the value itself in one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value
