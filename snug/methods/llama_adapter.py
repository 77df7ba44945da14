"""LLaMA-Adapter (adaption prompts) through peft: gated learned prompts in the top layers'
attention. peft supports it for llama- and mistral-style attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from snug.fields import AT_LEAST_1
from snug.fields import setting as _f
from snug.registry import Method, MethodConfig, register

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
    )
)
