"""State that is not weights (optimizer, scheduler, grad scaler, RNGs, the loop's position) as
two files no loader can run code from: a JSON skeleton and a safetensors file of its tensors.

`torch.save` writes pickles; even `torch.load(weights_only=True)` reads them through a
restricted unpickler, and torch.distributed.checkpoint's file-system reader unpickles its
metadata outright. A checkpoint directory is something people download and share, so snug
writes none of that: no library turns a nested state dict into JSON plus safetensors, hence
this small codec. Decoding only builds dicts, lists, tuples, numbers, strings and tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = 2  # checkpoints of snug before this format were state.pt pickles


def encode(value: Any, tensors: dict[str, torch.Tensor], seen: dict | None = None) -> Any:
    """A JSON-able skeleton of `value`; tensors move into `tensors` under generated names (one
    tensor held in several places, as bitsandbytes' shared quantization maps, is stored once)."""
    seen = {} if seen is None else seen
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen[id(value)] = name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous()
        return {"$tensor": seen[id(value)]}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, dict):
        pairs = [[encode(k, tensors, seen), encode(v, tensors, seen)] for k, v in value.items()]
        return {"$dict": pairs}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, tensors, seen) for v in value]}
    if isinstance(value, list):
        return [encode(v, tensors, seen) for v in value]
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")  # a bug in snug


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"$tensor"}:
        return tensors[value["$tensor"]]
    if set(value) == {"$float"}:
        return float(value["$float"])
    if set(value) == {"$tuple"}:
        return tuple(decode(v, tensors) for v in value["$tuple"])
    if set(value) == {"$dict"}:
        return {decode(k, tensors): decode(v, tensors) for k, v in value["$dict"]}
    raise ValueError(f"unknown entry {sorted(value)[:3]}")


def tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples, each storage counted
    once (tied weights, a tensor held in several places: written once)."""
    seen: dict[tuple, int] = {}

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            where = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            seen[where] = v.numel() * v.element_size()
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)
        elif isinstance(v, list | tuple):
            for item in v:
                visit(item)

    visit(value)
    return sum(seen.values())


def save_state(value: Any, stem: Path) -> list[Path]:
    """`value` as STEM.json and STEM.safetensors; returns the files written."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {"format": FORMAT, "value": encode(value, tensors)}
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    json_path.write_text(json.dumps(skeleton))
    save_file(tensors, str(tensor_path))
    return [json_path, tensor_path]


def load_state(stem: Path) -> Any:
    """What `save_state` wrote; ValueError or OSError when the files are damaged or missing."""
    skeleton = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    if not isinstance(skeleton, dict) or skeleton.get("format") != FORMAT:
        raise ValueError(
            f"{stem.with_suffix('.json').name} is not a snug state file of format {FORMAT}"
        )
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return decode(skeleton["value"], tensors)
