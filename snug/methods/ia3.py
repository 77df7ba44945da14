"""IA3 through peft: learned vectors that rescale keys, values and the MLP's inner activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from snug.core.method import Method, peft_task
from snug.core.registry import register
from snug.core.sections import MethodConfig
from snug.core.settings import setting as _f
from snug.methods.targets import check_targets

if TYPE_CHECKING:
    from torch import nn

FEEDFORWARD = ("down_proj", "fc2", "w2", "c_proj")  # modules whose *input* IA3 rescales


@dataclass
class IA3Settings:
    """Learned vectors that rescale keys, values and the MLP's inner activations (peft)."""

    targets: str | list[str] = _f(
        "all-linear",
        "Modules that get IA3 vectors: all-linear (peft's choice per architecture: keys, values "
        "and the MLP's down projection), or a list of module names.",
    )


def apply_ia3(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import IA3Config, get_peft_model  # imported when used: a config check needs no torch

    # all-linear: peft's per-architecture defaults (k_proj, v_proj, down_proj for llama).
    targets = None if cfg.targets == "all-linear" else cfg.targets
    feedforward = None if targets is None else [t for t in targets if t in FEEDFORWARD]
    config = IA3Config(
        target_modules=targets, feedforward_modules=feedforward, task_type=peft_task(model)
    )
    return get_peft_model(model, config)


def check_ia3_targets(model: nn.Module, cfg: MethodConfig) -> None:
    check_targets(model, cfg.targets)


register(
    Method(
        "ia3",
        apply_ia3,
        output="adapter",
        mergeable=True,
        peft_type="IA3",
        tuner="ia3",
        quality=7,
        settings=IA3Settings,
        check_model=check_ia3_targets,
    )
)
