"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snug.core.method import Method
from snug.core.registry import register
from snug.core.sections import MethodConfig

if TYPE_CHECKING:
    from torch import nn


def apply_full(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    model.requires_grad_(True)
    return model


register(
    Method(
        "full",
        apply_full,
        output="model",
        mergeable=False,
        unmergeable_because="a full fine-tune already writes a whole model (model/), with "
        "nothing to fold in",
        shardable=True,
        quality=5,
    )
)
