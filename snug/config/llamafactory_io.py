"""LLaMA-Factory configs in and out: a YAML file or `llamafactory-cli train`'s flags read
(snug train, snug convert), the snug YAML written with where each key came from, and the
converted config checked. The conversion itself is snug/config/llamafactory.py's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from snug.config.llamafactory import MARKERS, Converted, convert, is_llamafactory
from snug.config.yamlfile import read_mapping
from snug.core.sections import SECTIONS
from snug.errors import ConfigError


def to_yaml(conv: Converted, header: str = "") -> str:
    """The snug config as YAML, each key with the LLaMA-Factory key(s) it came from."""
    lines = [f"# {line}" for line in header.splitlines()]
    order = [*SECTIONS, "pref"]
    for name, keys in sorted(conv.sections.items(), key=lambda item: order.index(item[0])):
        lines.append(f"{name}:")
        for key, value in keys.items():
            text = yaml.safe_dump({key: value}, sort_keys=False).rstrip("\n").splitlines()
            text[0] += f"  # {conv.origin[f'{name}.{key}']}"  # LLaMA-Factory's key
            lines += ["  " + t for t in text]
    return "\n".join(lines) + "\n"


def _value(text: str) -> Any:
    """A flag's value as YAML would read it, and `5e-5` (which YAML 1.1 leaves a string) a
    number, as Hugging Face's argument parser makes it."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def flags_to_keys(tokens: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value` and bare `--switch` (true), with `-` or `_` in names, as
    Hugging Face's argument parser reads `llamafactory-cli train`'s flags."""
    raw: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(
                f"LLaMA-Factory flags: '{token}' follows no --key; write --key value."
            )
        name, eq, text = token[2:].partition("=")
        key = name.replace("-", "_")
        if eq:
            raw[key] = _value(text)
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            i += 1
            raw[key] = _value(tokens[i])
        else:
            raw[key] = True
        i += 1
    return raw


def has_flags(tokens: list[str]) -> bool:
    """Whether `snug train`'s arguments start with a LLaMA-Factory flag (`--stage`, ...)."""
    return bool(tokens) and tokens[0].lstrip("-").replace("-", "_").split("=")[0] in (
        *MARKERS,
        "model_name_or_path",
        "template",
        "dataset_dir",
    )


def gpu_visible() -> bool:
    """A CUDA GPU this process could use, seen without importing torch (seconds)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


def read_file(path: str, cwd: Path | None = None, gpu: bool | None = None) -> Converted | None:
    """The LLaMA-Factory config at `path` as snug sections; None for any other YAML (a snug
    config, or one load_config will refuse in its own words)."""
    if not Path(path).is_file():
        return None
    raw, lines = read_mapping(path, "the config", ConfigError)
    if not is_llamafactory(raw):
        return None
    cwd = cwd or Path.cwd()
    return convert(raw, str(path), cwd, gpu_visible() if gpu is None else gpu, lines)


def read_flags(tokens: list[str], cwd: Path | None = None, gpu: bool | None = None) -> Converted:
    """`llamafactory-cli train`'s flags as snug sections."""
    gpu = gpu_visible() if gpu is None else gpu
    return convert(flags_to_keys(tokens), "the LLaMA-Factory flags", cwd or Path.cwd(), gpu)


FLAGS_SOURCE = "the LLaMA-Factory flags"


def split_arguments(
    tokens: list[str], switches: tuple[str, ...], options: tuple[str, ...], is_override
) -> tuple[list[str], list[str]]:
    """`snug train`'s arguments parted into LLaMA-Factory's flags and snug's own: its
    `switches` (no value), `options` (one value) and section.key=value overrides."""
    flags: list[str] = []
    own: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name = token.split("=")[0]
        if token in switches or is_override(token) or token in ("-h", "--help"):
            own.append(token)
        elif name in options:
            take = 1 if "=" in token or i + 1 >= len(tokens) else 2
            own += tokens[i : i + take]
            i += take - 1
        else:
            flags.append(token)
            if token.startswith("--") and "=" not in token and i + 1 < len(tokens):
                value = tokens[i + 1]
                if not value.startswith("--") and not is_override(value):
                    flags.append(value)
                    i += 1
        i += 1
    return flags, own


def load_converted(converted: Converted, overrides: list[str] = ()):
    """The checked snug config of `converted`; an error about a snug key also names the
    LLaMA-Factory key it came from (`train.micro_batch (per_device_train_batch_size)`)."""
    import re

    from snug.config.build import load_config

    try:
        return load_config(converted.source, overrides, read=(converted.sections, converted.lines))
    except ConfigError as e:
        text = str(e)
        for path, origin in converted.origin.items():
            if origin.startswith("from "):
                text = re.sub(rf"\b{re.escape(path)}\b", f"{path} ({origin[5:]})", text, count=1)
        raise ConfigError(text) from None
