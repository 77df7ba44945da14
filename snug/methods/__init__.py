"""Fine-tuning methods: one module each, registering itself in one line
(`register(Method(...))`, snug/core/registry.py, the one source of method facts) when snug's
plug-in module (snug/builtin.py) imports it through the registry's door.

A method turns a loaded base model into the model that trains: it chooses which weights train
and adds any new ones. `apply_method` is the single entry point for `snug train` and `snug plan`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from snug.core.method import peft_task
from snug.core.registry import get_method

if TYPE_CHECKING:  # torch is imported when a method is applied, not when a config is checked
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from snug.core.sections import Config, MethodConfig

__all__ = ["apply_method", "check_against_model", "count_params", "logical_numel"]


def check_against_model(cfg: Config, config: PretrainedConfig | None = None) -> None:
    """The method's keys checked against the model `cfg` trains (`Method.check_model`: lora's
    targets), built from `config` (default: the base's config.json) on the meta device, so
    cheaply and before anything is tokenized; a base whose config cannot be read is left to
    loading, which says why."""
    check = get_method(cfg.method.name).check_model
    if check is None:
        return
    from snug.models.load import base_config, meta_model  # torch: imported when used

    config = config if config is not None else base_config(cfg.model)
    if config is not None:
        check(meta_model(cfg, config), cfg.method)


def apply_method(
    model: nn.Module, cfg: MethodConfig, trainable_dtype: torch.dtype | None = None
) -> nn.Module:
    """Apply the method, then keep every trainable weight in `trainable_dtype`: fp32 master
    weights under fp32 and mixed precision, bf16 under bf16-true (peft creates adapters in
    fp32 even on a bf16 base, so a cast is needed either way). Default: fp32."""
    import torch

    trainable_dtype = trainable_dtype or torch.float32
    classifier = peft_task(model) == "SEQ_CLS"
    model = get_method(cfg.name).apply(model, cfg)
    if classifier and get_method(cfg.name).peft_type is None:
        # the new head always trains (peft methods train and save it themselves)
        model.score.requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad and p.dtype != trainable_dtype:
            p.data = p.data.to(trainable_dtype)
    return model


def logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter holds; bitsandbytes 4-bit packs two per byte and keeps the real shape
    in its quant_state."""
    from bitsandbytes.nn import Params4bit

    return (
        math.prod(p.quant_state.shape) if isinstance(p, Params4bit) and p.quant_state else p.numel()
    )


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) weights count once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
