"""LLaMA-Adapter (adaption prompts) through peft: gated learned prompts in the top layers'
attention. peft supports it for llama- and mistral-style attention."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snug.core.method import Method, TrainedLayers
from snug.core.registry import register
from snug.core.sections import MethodConfig
from snug.core.settings import AT_LEAST_1
from snug.core.settings import setting as _f
from snug.methods.saved import check_base_number, read_saved, refuse, whole_number

if TYPE_CHECKING:
    from torch import nn


@dataclass
class LlamaAdapterSettings:
    """Gated learned prompts in the top layers' attention (peft)."""

    num_virtual_tokens: int = _f(20, "Length of each layer's adaption prompt.", AT_LEAST_1)
    trainable_layers: int = _f(2, "Top decoder layers that get an adaption prompt.", AT_LEAST_1)


def apply_llama_adapter(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import (  # imported when used: a config check needs no torch
        AdaptionPromptConfig,
        get_peft_model,
    )

    layers = len(model.get_decoder().layers)
    config = AdaptionPromptConfig(
        adapter_len=cfg.num_virtual_tokens,
        task_type="CAUSAL_LM",
        adapter_layers=min(cfg.trainable_layers, layers),
    )
    return get_peft_model(model, config)


def check_saved_llama_adapter(adapter_dir: Path, base: dict) -> None:
    """peft gives each of the top adapter_layers layers a prompt of adapter_len tokens as wide
    as the base: as many layers as the weights have prompts, each of their length, and no more
    layers than the base has."""
    saved = read_saved(adapter_dir)
    if saved is None:
        return
    path, config, weights = saved.path, saved.config, saved.weights
    length = whole_number(path, config, "adapter_len")
    layers = whole_number(path, config, "adapter_layers")
    prompts = {n: s for n, s in saved.shapes.items() if n.endswith("adaption_prompt")}
    if "num_hidden_layers" in base and layers > base["num_hidden_layers"]:
        refuse(path, "adapter_layers", layers, f"the base has {base['num_hidden_layers']} layers")
    if layers != len(prompts):
        refuse(path, "adapter_layers", layers, f"{weights.name} holds {len(prompts)} prompts")
    for name, shape in prompts.items():
        if len(shape) != 3 or shape[1] != length:
            refuse(path, "adapter_len", length, f"{weights.name} holds {name} of {list(shape)}")
        check_base_number(weights, f"{name}'s width", shape[2], base, "hidden_size")


def adapted_layers(cfg: MethodConfig) -> TrainedLayers:
    """The top trainable_layers get an adaption prompt; the layers below are plain frozen ones."""
    return TrainedLayers(cfg.trainable_layers)


register(
    Method(
        "llama_adapter",
        apply_llama_adapter,
        output="adapter",
        mergeable=False,
        unmergeable_because="adaption prompts add a gated attention over learned prompts in the "
        "top layers, which no base weight can absorb",
        peft_type="ADAPTION_PROMPT",
        virtual_tokens=True,
        no_classifier_because="peft supports adaption prompts for causal LMs only",
        quality=12,
        searched=False,
        settings=LlamaAdapterSettings,
        check_saved=check_saved_llama_adapter,
        trained_layers=adapted_layers,
    )
)
