"""The model inside its wrappers: DDP's, and peft's."""

from __future__ import annotations

from peft import PeftModel
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 wraps in place: the model is itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a DDP wrapper and/or a peft model."""
    model = unwrap(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model
