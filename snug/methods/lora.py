"""LoRA and DoRA through peft (rsLoRA is a flag of both)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from snug.fields import AT_LEAST_1, POSITIVE
from snug.fields import setting as _f
from snug.registry import Method, MethodConfig, peft_task, register

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn


@dataclass
class LoRASettings:
    """Low-rank adapters through peft; DoRA also learns each weight's magnitude."""

    r: int = _f(8, "LoRA/DoRA rank.", AT_LEAST_1)
    alpha: float = _f(
        16, "LoRA/DoRA scaling numerator: the update is scaled by alpha / r.", POSITIVE
    )
    dropout: float = _f(0.0, "Dropout on the LoRA/DoRA input.", (lambda v: 0 <= v < 1, "in [0, 1)"))
    targets: str | list[str] = _f(
        "all-linear", "Modules that get adapters: all-linear, or a list of module names."
    )
    rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead.")
    lora_plus_ratio: float | None = _f(
        None, "LoRA+: the B matrices learn this many times faster than A (e.g. 16).", POSITIVE
    )


def _lora_config(model: nn.Module, cfg: MethodConfig, use_dora: bool) -> LoraConfig:
    from peft import LoraConfig  # imported when used: a config check needs no torch

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets,
        use_rslora=cfg.rslora,
        use_dora=use_dora,
        task_type=peft_task(model),
    )


def apply_lora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import get_peft_model  # imported when used: a config check needs no torch

    return get_peft_model(model, _lora_config(model, cfg, use_dora=False))


def apply_dora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import get_peft_model  # imported when used: a config check needs no torch

    return get_peft_model(model, _lora_config(model, cfg, use_dora=True))


# QLoRA 8-bit measured 91.0% against LoRA's 89.5% (within that benchmark's noise): it ranks
# after LoRA, as a full-precision base is faster when it fits.
QUANTIZED = (("qlora", "4bit", 4), ("qlora-8bit", "8bit", 2))
LORA = dict(
    output="adapter",
    mergeable=True,
    peft_type="LORA",
    tuner="lora",
    shardable=True,
    settings=LoRASettings,
)
register(Method("lora", apply_lora, **LORA, quality=1, quantized=QUANTIZED))
register(Method("dora", apply_dora, **LORA, quality=3, peft_flag="use_dora"))
