"""A saved adapter checked against its own weights and its base before anything is built from it.

peft (and snug's own adapter format) allocate an adapter from the numbers in its config file
(`r`, `num_virtual_tokens`, `bottleneck`, ...) and only then read the weights, whose shapes
would have told those numbers were wrong: an `adapter_config.json` that says `"r": 2000000`
makes `snug generate` allocate 9.5 GB (and `merge` ask for ~156 GB) before peft reports a size
mismatch. Each method states how its config's numbers size its weights (`Method.check_saved`);
the shapes come from the weights file's header (`safetensors.safe_open`: no tensor is read),
and the base's numbers from its `config.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from snug.errors import UserError, read_utf8

MAX_CONFIG_BYTES = 1 << 20  # an adapter's config file is a few kB


class SavedAdapterError(UserError):
    """A saved adapter whose config disagrees with its weights or its base (names the file and
    the key)."""


def saved_files(adapter_dir: Path, config: str, weights: str) -> tuple[Path, Path] | None:
    """The adapter's config and weights files, or None when one is missing (the loader says
    so, in its own words)."""
    paths = adapter_dir / config, adapter_dir / weights
    return paths if all(p.is_file() for p in paths) else None


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # peft's saved adapter


@dataclass(frozen=True)
class SavedAdapter:
    """A saved adapter as its check reads it: the config (and its file, for messages) and the
    shape of each tensor of its weights file (from the header alone)."""

    path: Path
    config: dict[str, Any]
    weights: Path
    shapes: dict[str, tuple[int, ...]]


def read_saved(adapter_dir: Path, files: tuple[str, str] = PEFT_FILES) -> SavedAdapter | None:
    """The adapter in `adapter_dir` (its config and weights file names: `files`), or None when
    one of them is missing (the loader says so, in its own words)."""
    found = saved_files(adapter_dir, *files)
    if found is None:
        return None
    path, weights = found
    return SavedAdapter(path, read_config(path), weights, weight_shapes(weights))


def read_config(path: Path) -> dict[str, Any]:
    """An adapter's JSON config (at most MAX_CONFIG_BYTES, read no further), the one reader of
    them all (merge, generate, eval, chat and each method's check)."""
    text = read_utf8(path, "the adapter config", SavedAdapterError, limit=MAX_CONFIG_BYTES)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise SavedAdapterError(
            f"{path} line {e.lineno}: not valid JSON ({e.msg}); save the adapter again."
        ) from None
    if not isinstance(config, dict):
        raise SavedAdapterError(f"{path}: holds a JSON {type(config).__name__}, not an object.")
    return config


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, read from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise SavedAdapterError(f"{path}: cannot read its header ({e}).") from None


def refuse(path: Path, key: str, value: Any, why: str) -> NoReturn:
    raise SavedAdapterError(
        f"{path}: {key} is {value!r}, but {why}; the config does not match the weights saved "
        "with it: save the adapter again."
    )


def whole_number(path: Path, config: dict[str, Any], key: str) -> int:
    """config[key], which must be a whole number of at least 1."""
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        refuse(path, key, value, "it must be a whole number of at least 1")
    return value


def check_base_number(
    path: Path, key: str, value: int, base: dict[str, Any], base_key: str
) -> None:
    """`value` (config[key], or a shape) must be the base's `base_key` where its config.json
    says it."""
    if base_key in base and base[base_key] != value:
        raise SavedAdapterError(
            f"{path}: {key} is {value!r}, but the base model's config.json has {base_key} "
            f"{base[base_key]}: the adapter belongs to another base; pass --model with the "
            "one it was trained on."
        )
