"""LoRA and DoRA through peft (rsLoRA is a flag of both)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snug.core.method import Method, one_group, peft_task
from snug.core.registry import register
from snug.core.sections import MethodConfig
from snug.core.settings import AT_LEAST_1, POSITIVE
from snug.core.settings import setting as _f
from snug.methods.saved import read_saved, refuse, whole_number
from snug.methods.targets import check_targets

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


def _rank(name: str, shape: tuple[int, ...]) -> int | None:
    """The rank of a saved LoRA tensor: A is (r, in, ...), B is (out, r, ...)."""
    if "lora_A" in name or "lora_embedding_A" in name:
        return shape[0]
    if "lora_B" in name or "lora_embedding_B" in name:
        return shape[1] if len(shape) > 1 else None
    return None


def check_saved_lora(adapter_dir: Path, base: dict) -> None:
    """peft makes every targeted module's A and B of rank `r` (or its `rank_pattern` entry):
    each must be a rank the saved weights have, before peft allocates them."""
    saved = read_saved(adapter_dir)
    if saved is None:
        return
    path, config, weights = saved.path, saved.config, saved.weights
    ranks = {n: r for n, s in saved.shapes.items() if (r := _rank(n, s)) is not None}
    r = whole_number(path, config, "r")
    if not ranks:
        refuse(path, "r", r, f"{weights.name} holds no LoRA weights")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        refuse(path, "rank_pattern", pattern, "it must map module names to ranks")
    given = {"r": r, **{f"rank_pattern[{k!r}]": whole_number(path, pattern, k) for k in pattern}}
    name, largest = max(ranks.items(), key=lambda item: item[1])
    for key, value in given.items():
        if value > largest:
            refuse(path, key, value, f"{weights.name} holds ranks up to {largest} ({name})")
    for name, rank in ranks.items():
        if rank not in given.values():
            refuse(path, "r", r, f"{weights.name} holds {name} of rank {rank}")


def lora_plus_groups(model: nn.Module, cfg: MethodConfig, lr: float, weight_decay: float) -> list:
    """The optimizer's groups: with method.lora_plus_ratio, LoRA+ (Hayou et al. 2024) as peft
    groups it (the B matrices and 1-d weights at lr x ratio, peft's own weight decay of 0.0 on
    every group); else one group."""
    if cfg.lora_plus_ratio is None:
        return one_group(model, cfg, lr, weight_decay)
    from peft.optimizers import create_loraplus_optimizer

    class Groups:
        """peft makes LoRA+'s groups only inside its optimizer factory, handing them to the
        optimizer class it is given: this one keeps them (its 8-bit embedding override, for
        bitsandbytes classes only, concerns frozen embeddings under LoRA)."""

        def __init__(self, groups: list[dict], **defaults: object) -> None:
            self.groups = groups

    return create_loraplus_optimizer(
        model, Groups, lr=lr, loraplus_lr_ratio=cfg.lora_plus_ratio, weight_decay=weight_decay
    ).groups


def check_lora_targets(model: nn.Module, cfg: MethodConfig) -> None:
    check_targets(model, cfg.targets)


def rank_label(cfg: MethodConfig) -> str:
    """A search candidate's name says its rank (lora r8)."""
    return f"r{cfg.r}"


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
    check_saved=check_saved_lora,
    check_model=check_lora_targets,
    param_groups=lora_plus_groups,
    search_label=rank_label,
)
register(Method("lora", apply_lora, **LORA, quality=1, quantized=QUANTIZED))
register(Method("dora", apply_dora, **LORA, quality=3, peft_flag="use_dora"))
