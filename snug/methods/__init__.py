"""Fine-tuning methods: one module each, registered here in one line.

A method turns a loaded base model into the model that trains: it chooses which weights train
and adds any new ones. `apply_method` is the single entry point for `snug train` and `snug plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from snug.config import MethodConfig


def save_pretrained(model: nn.Module, path: Path) -> None:
    """peft adapters (adapter_config.json + adapter_model.safetensors) or a whole HF model."""
    model.save_pretrained(str(path))


def load_peft(base: nn.Module, path: Path) -> nn.Module:
    from peft import PeftModel

    if not (Path(path) / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, a pickle: snug loads safetensors only
        raise ValueError(f"{path}: no adapter_model.safetensors (snug loads safetensors only).")
    return PeftModel.from_pretrained(base, str(path))


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[nn.Module, MethodConfig], nn.Module]
    output: Literal["adapter", "model"]  # written to output.dir/adapter/ or output.dir/model/
    mergeable: bool
    save: Callable[[nn.Module, Path], None] = save_pretrained
    load: Callable[[nn.Module, Path], nn.Module] = load_peft  # base + saved adapter -> model
    # Called by the loop before optimizer step `step` (0-based), for methods whose trainable
    # set changes during training (freeze with progressive unfreezing).
    before_step: Callable[[nn.Module, MethodConfig, int], None] | None = None
    # Why `snug merge` cannot fold this method into the base (shown to the user); "" if it can.
    unmergeable_because: str = ""


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> None:
    REGISTRY[method.name] = method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(
            f"method.name={name} is not available yet; choose one of {', '.join(sorted(REGISTRY))}."
        )
    return REGISTRY[name]


def peft_task(model: nn.Module) -> str:
    """peft's task type for the model: classifiers get their head trained and saved too."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def apply_method(
    model: nn.Module, cfg: MethodConfig, trainable_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Apply the method, then keep every trainable weight in `trainable_dtype`: fp32 master
    weights under fp32 and mixed precision, bf16 under bf16-true (peft creates adapters in
    fp32 even on a bf16 base, so a cast is needed either way)."""
    classifier = peft_task(model) == "SEQ_CLS"
    model = get_method(cfg.name).apply(model, cfg)
    if classifier and cfg.name in ("full", "freeze", "adapter"):
        model.score.requires_grad_(
            True
        )  # the new head always trains (peft methods do it themselves)
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


from snug.methods import (  # noqa: E402,F401  (each module registers itself)
    adapter,
    freeze,
    full,
    ia3,
    llama_adapter,
    lora,
    virtual_tokens,
)
