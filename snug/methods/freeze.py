"""Freeze tuning: only the top decoder layers (or named modules) train. Written here: peft has
no such method, and it is a few lines over module names."""

from __future__ import annotations

from fnmatch import fnmatch
from typing import TYPE_CHECKING

from snug.registry import Method, MethodConfig, register

if TYPE_CHECKING:
    from torch import nn


def apply_freeze(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    model.requires_grad_(False)
    if cfg.trainable_modules:
        chosen = [
            m
            for name, m in model.named_modules()
            if any(fnmatch(name, pattern) for pattern in cfg.trainable_modules)
        ]
    else:
        layers = model.get_decoder().layers
        chosen = list(layers[len(layers) - min(cfg.trainable_layers, len(layers)) :])
    chosen += [
        m
        for name, m in model.named_modules()
        if name and any(extra in name.split(".")[-1] for extra in cfg.extra_modules)
    ]
    if cfg.trainable_modules and not chosen:
        raise ValueError(
            "method.trainable_modules matched no module of the model; check the patterns."
        )
    for module in chosen:
        module.requires_grad_(True)
    return model


def unfreeze_progressively(model: nn.Module, cfg: MethodConfig, step: int) -> None:
    """With unfreeze_every: the top layer trains from the start, and one more layer (going down)
    joins every unfreeze_every steps. Layers not yet unfrozen keep requires_grad off, so they get
    no gradient and no optimizer update (AdamW skips parameters without a gradient)."""
    if cfg.unfreeze_every is None or cfg.trainable_modules:
        return
    layers = model.get_decoder().layers
    chosen = layers[len(layers) - min(cfg.trainable_layers, len(layers)) :]
    active = min(len(chosen), 1 + step // cfg.unfreeze_every)
    for i, layer in enumerate(chosen):
        layer.requires_grad_(i >= len(chosen) - active)


register(
    Method(
        "freeze",
        apply_freeze,
        output="model",
        mergeable=False,
        before_step=unfreeze_progressively,
        unmergeable_because="freeze tuning already writes a whole model (model/), with nothing "
        "to fold in",
        shardable=True,
        quality=6,
    )
)
