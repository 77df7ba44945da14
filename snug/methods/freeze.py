"""Freeze tuning: only the top decoder layers (or named modules) train. Written here: peft has
no such method, and it is a few lines over module names."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

from snug.core.method import Method, TrainedLayers
from snug.core.registry import get_stage, register
from snug.core.sections import MethodConfig
from snug.core.settings import AT_LEAST_1, NON_NEGATIVE
from snug.core.settings import setting as _f
from snug.errors import ConfigError
from snug.methods.targets import check_patterns

if TYPE_CHECKING:
    from torch import nn


@dataclass
class FreezeSettings:
    """Only the top decoder layers (or the modules named by pattern) train."""

    trainable_layers: int = _f(
        2,
        "The last N decoder layers train (0 with a classifier stage such as train.stage=cls: "
        "the head only).",
        NON_NEGATIVE,
    )
    trainable_modules: list[str] | None = _f(
        None, "Train the modules whose names match these glob patterns instead."
    )
    unfreeze_every: int | None = _f(
        None,
        "Progressive unfreezing: start with the top layer and add the next one down every N "
        "steps, up to trainable_layers.",
        AT_LEAST_1,
    )
    extra_modules: list[str] = _f(
        [], "Also train modules whose names contain these (e.g. embed_tokens, lm_head, norm)."
    )


def check_freeze(cfg: Any, source: str) -> None:
    m = cfg.method
    if m.trainable_layers == 0 and not get_stage(cfg.train.stage).classifier:
        raise ConfigError(
            f"{source}: method.trainable_layers=0 (head only) needs a classifier stage "
            "(train.stage=cls)."
        )
    if m.unfreeze_every is not None and m.trainable_modules:
        raise ConfigError(
            f"{source}: method.unfreeze_every unfreezes by layers (trainable_layers), not "
            "with trainable_modules."
        )
    if m.unfreeze_every is not None and cfg.dist.strategy != "none":
        raise ConfigError(
            f"{source}: method.unfreeze_every changes the trainable set during training, which "
            "DDP and FSDP fix at wrapping; leave it unset with dist.strategy."
        )
    if m.unfreeze_every is not None and cfg.output.keep_best:
        raise ConfigError(
            f"{source}: method.unfreeze_every changes the trainable set during training, so the "
            "checkpoint output.keep_best goes back to lacks the layers unfrozen after it; set "
            "one of them."
        )


def check_freeze_patterns(model: nn.Module, cfg: MethodConfig) -> None:
    check_patterns(model, cfg.trainable_modules, "method.trainable_modules")


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


def trained_layers(cfg: MethodConfig) -> TrainedLayers:
    """The top trainable_layers train; modules picked by pattern may be in any layer."""
    return TrainedLayers(cfg.trainable_layers, anywhere=bool(cfg.trainable_modules))


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
        settings=FreezeSettings,
        check=check_freeze,
        check_model=check_freeze_patterns,
        trained_layers=trained_layers,
    )
)
