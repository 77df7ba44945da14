"""Bottleneck adapters (Houlsby et al., 2019): after the attention and after the MLP of every
decoder layer, h -> h + up(act(down(h))), with `up` initialised to zero so training starts from
the base model. Written here because peft has no such method; saved in snug's own small format
(snug_adapter.json + snug_adapter.safetensors)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from snug.core.method import Method
from snug.core.registry import register
from snug.core.sections import MethodConfig
from snug.core.settings import AT_LEAST_1
from snug.core.settings import setting as _f
from snug.methods.saved import check_base_number, read_config, read_saved, refuse, whole_number

if TYPE_CHECKING:
    import torch
    from torch import nn

CONFIG_FILE, WEIGHTS_FILE = "snug_adapter.json", "snug_adapter.safetensors"


@dataclass
class AdapterSettings:
    """Bottleneck blocks after attention and MLP in every layer (snug's own)."""

    bottleneck: int = _f(64, "Bottleneck width of each adapter block.", AT_LEAST_1)


@cache
def _bottleneck() -> type:
    """The adapter block's class, made on first use (torch is imported then, not when snug
    checks a config)."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, hidden: int, width: int) -> None:
            super().__init__()
            self.down = nn.Linear(hidden, width)
            self.act = nn.GELU()
            self.up = nn.Linear(width, hidden)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
            return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)

    return Bottleneck


def _after_attention(layer: nn.Module, args, output):
    # HF attention modules return (attn_output, attn_weights, ...): adapt the first.
    return (layer.attn_adapter(output[0]), *output[1:])


def _after_mlp(layer: nn.Module, args, output):
    return layer.mlp_adapter(output)


def apply_adapter(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    return _add_adapters(model, cfg.bottleneck)


def _add_adapters(model: nn.Module, width: int) -> nn.Module:
    model.requires_grad_(False)
    hidden = model.config.hidden_size
    device = model.get_input_embeddings().weight.device
    for layer in model.get_decoder().layers:
        layer.attn_adapter = _bottleneck()(hidden, width).to(device)
        layer.mlp_adapter = _bottleneck()(hidden, width).to(device)
        # The hooks are registered on the sublayers and call the adapters kept on `layer`.
        layer.self_attn.register_forward_hook(
            lambda m, a, o, layer=layer: _after_attention(layer, a, o)
        )
        layer.mlp.register_forward_hook(lambda m, a, o, layer=layer: _after_mlp(layer, a, o))
    model.snug_adapter_config = {
        "method": "adapter",
        "bottleneck": width,
        "base_model": model.config.name_or_path,
    }
    return model


def save_adapter(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    # Every trainable weight: the adapters, and a classifier's new head.
    weights = {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }
    save_file(weights, path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(model.snug_adapter_config, indent=2) + "\n")


def check_saved_adapter(adapter_dir: Path, base: dict) -> None:
    """Each block is built `bottleneck` wide on the base's hidden size: the saved blocks must
    be that wide, on that hidden size."""
    saved = read_saved(adapter_dir, (CONFIG_FILE, WEIGHTS_FILE))
    if saved is None:
        return
    path, config, weights = saved.path, saved.config, saved.weights
    width = whole_number(path, config, "bottleneck")
    downs = {n: s for n, s in saved.shapes.items() if n.endswith("adapter.down.weight")}
    if not downs:
        refuse(path, "bottleneck", width, f"{WEIGHTS_FILE} holds no adapter blocks")
    for name, shape in downs.items():
        if len(shape) != 2 or shape[0] != width:
            refuse(path, "bottleneck", width, f"{WEIGHTS_FILE} holds {name} of {list(shape)}")
        check_base_number(weights, f"{name}'s input width", shape[1], base, "hidden_size")


def load_adapter(base: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    config = read_config(Path(path) / CONFIG_FILE)
    model = _add_adapters(base, config["bottleneck"])
    weights = load_file(Path(path) / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "_adapter." in k or k.startswith("score.")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: adapter weights do not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})."
        )
    return model


register(
    Method(
        "adapter",
        apply_adapter,
        output="adapter",
        mergeable=False,
        save=save_adapter,
        load=load_adapter,
        unmergeable_because="bottleneck adapters add a non-linear block (down, activation, up) "
        "after attention and MLP, which no base weight can absorb",
        quality=8,
        settings=AdapterSettings,
        check_saved=check_saved_adapter,
    )
)
