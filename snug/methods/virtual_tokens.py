"""Virtual-token methods through peft: prefix tuning (learned key/value prefixes in every layer),
prompt tuning (learned input embeddings), P-tuning (prompt embeddings from a small encoder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snug.core.method import Method, peft_task
from snug.core.registry import register
from snug.core.sections import MethodConfig
from snug.core.settings import AT_LEAST_1
from snug.core.settings import setting as _f
from snug.methods.saved import check_base_number, read_saved, refuse, whole_number

if TYPE_CHECKING:
    from torch import nn


@dataclass
class VirtualTokenSettings:
    """Learned key/value prefixes in every layer (prefix) or input embeddings (prompt), peft."""

    num_virtual_tokens: int = _f(20, "Virtual tokens (prefix positions) learned.", AT_LEAST_1)


@dataclass
class PTuningSettings(VirtualTokenSettings):
    """Prompt embeddings made by a small trained encoder (peft)."""

    bottleneck: int = _f(64, "Width of the prompt encoder (an MLP).", AT_LEAST_1)


def apply_prefix(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import (  # imported when used: a config check needs no torch
        PrefixTuningConfig,
        get_peft_model,
    )

    config = PrefixTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, task_type=peft_task(model)
    )
    return get_peft_model(model, config)


def apply_prompt(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import (  # imported when used: a config check needs no torch
        PromptTuningConfig,
        get_peft_model,
    )

    config = PromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, task_type=peft_task(model)
    )
    return get_peft_model(model, config)


def apply_ptuning(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import (  # imported when used: a config check needs no torch
        PromptEncoderConfig,
        get_peft_model,
    )

    config = PromptEncoderConfig(
        num_virtual_tokens=cfg.num_virtual_tokens,
        task_type=peft_task(model),
        encoder_hidden_size=cfg.bottleneck,
    )
    return get_peft_model(model, config)


def check_saved_virtual_tokens(adapter_dir: Path, base: dict) -> None:
    """peft makes the prompt embeddings num_virtual_tokens (x num_transformer_submodules) rows
    of token_dim (prompt, ptuning; the base's hidden_size) or num_virtual_tokens rows of
    num_layers x 2 x token_dim (prefix: keys and values of each of the base's layers). Loaded
    for inference, nothing else is allocated (the prompt encoder is not built)."""
    saved = read_saved(adapter_dir)
    if saved is None:
        return
    path, config, weights = saved.path, saved.config, saved.weights
    embeddings = saved.shapes.get("prompt_embeddings")
    tokens = whole_number(path, config, "num_virtual_tokens")
    dim = whole_number(path, config, "token_dim")
    if embeddings is None or len(embeddings) != 2:
        refuse(path, "num_virtual_tokens", tokens, f"{weights.name} holds no prompt_embeddings")
    if config.get("peft_type") == "PREFIX_TUNING":
        layers = whole_number(path, config, "num_layers")
        check_base_number(path, "num_layers", layers, base, "num_hidden_layers")
        rows, width, how = tokens, layers * 2 * dim, "num_layers x 2 x token_dim"
    else:
        check_base_number(path, "token_dim", dim, base, "hidden_size")
        rows = tokens * whole_number(path, config, "num_transformer_submodules")
        width, how = dim, "token_dim"
    if embeddings[0] != rows:
        refuse(path, "num_virtual_tokens", tokens, f"{weights.name} holds {embeddings[0]} of them")
    if embeddings[1] != width:
        refuse(path, "token_dim", dim, f"{weights.name} holds prompts {embeddings[1]} wide ({how})")


VIRTUAL = "learned virtual tokens are extra inputs to the model, not changes to any base weight"
register(
    Method(
        "prefix",
        apply_prefix,
        output="adapter",
        mergeable=False,
        unmergeable_because="prefix tuning adds learned keys and values to every attention "
        "layer: extra inputs, not changes to any base weight",
        peft_type="PREFIX_TUNING",
        no_checkpointing_because="prefix tuning feeds its learned keys and values through the "
        "attention cache, which transformers turns off under gradient checkpointing",
        virtual_tokens=True,
        quality=9,
        settings=VirtualTokenSettings,
        check_saved=check_saved_virtual_tokens,
    )
)
VIRTUAL_KEYS = dict(output="adapter", mergeable=False, virtual_tokens=True)
register(
    Method(
        "prompt",
        apply_prompt,
        **VIRTUAL_KEYS,
        unmergeable_because=VIRTUAL,
        peft_type="PROMPT_TUNING",
        quality=10,
        settings=VirtualTokenSettings,
        check_saved=check_saved_virtual_tokens,
    )
)
register(
    Method(
        "ptuning",
        apply_ptuning,
        **VIRTUAL_KEYS,
        unmergeable_because=VIRTUAL,
        peft_type="P_TUNING",
        quality=11,
        searched=False,
        settings=PTuningSettings,
        check_saved=check_saved_virtual_tokens,
    )
)
