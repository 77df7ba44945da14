"""Checks of what a config names that need no torch: the model directory and the data files.

The command line runs them right after the config is read, before torch and transformers are
imported (10-20 s on a cold start), so a typo in a path is reported in a moment. Loading
checks the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from snug.config.dataset_info import DatasetEntry, registered, registry_folder
from snug.config.paths import NOT_A_FILE_BECAUSE, looks_like_hub_id, special_data_file
from snug.errors import UserError, read_utf8

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(UserError):
    """The model or tokenizer named in model.name_or_path cannot be loaded."""


class MissingData(UserError):
    """A data file or directory named in the config does not exist."""


def check_model_dir(name_or_path: str, key: str = "model.name_or_path") -> None:
    """A local model directory that can be loaded: config.json, a tokenizer, safetensors
    weights; a path that exists nowhere and is no hub id is refused. Hub ids pass (they are
    checked when downloaded)."""
    path = Path(name_or_path)
    where = f"{key}={name_or_path}"
    if not path.exists():
        if path.is_absolute() or not looks_like_hub_id(name_or_path):
            raise ModelLoadError(
                f"{where}: no such directory, and it is not a hub id (those look like org/name)."
            )
        return
    if not path.is_dir():
        raise ModelLoadError(f"{where} is a file; give the model's directory.")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{where}: the directory holds no config.json, so it is not a transformers model "
            "(save_pretrained writes one)."
        )
    text = read_utf8(path / "config.json", "the model's config", ModelLoadError)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{path / 'config.json'} line {e.lineno}: not valid JSON ({e.msg})."
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'}: holds no JSON object.")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{where}: the directory holds no tokenizer (tokenizer.json or tokenizer_config.json); "
            "save it beside the model with tokenizer.save_pretrained."
        )
    if not any(path.glob("*.safetensors")):
        if any(path.glob("pytorch_model*.bin")):
            raise ModelLoadError(
                f"{where}: the directory holds weights only as pickled pytorch_model*.bin files, "
                "and snug loads safetensors only (unpickling can run code); if you trust them, "
                "convert once with from_pretrained then save_pretrained."
            )
        raise ModelLoadError(f"{where}: the directory holds no weights (*.safetensors).")


class NotAFile(UserError):
    """A data path names a named pipe, a socket or a device, or a directory holding one."""


def check_data_paths(data) -> None:
    """Every local entry of data.train and data.eval exists (hub dataset ids pass) and is a
    regular file or a directory of them: a named pipe would hang the reader."""
    for key in ("train", "eval"):
        value = getattr(data, key)
        for spec in [] if value is None else [value] if isinstance(value, str) else value:
            if (entry := registered(spec, data.dataset_dir)) is not None:
                check_entry(entry, key)
                continue
            if special := special_data_file(spec):
                found, what = special
                where = "is" if found == Path(spec) else f"holds {found},"
                raise NotAFile(f"data.{key}={spec} {where} {what}, {NOT_A_FILE_BECAUSE}.")
            if why := registry_folder(Path(spec)):
                raise MissingData(f"data.{key}: {why}")
            if Path(spec).exists() or (
                not Path(spec).is_absolute() and looks_like_hub_id(spec, dataset=True)
            ):
                continue
            raise MissingData(f"data.{key}={spec}: no such file or directory.")


def check_entry(entry: DatasetEntry, key: str) -> None:
    """The file or folder a dataset_info.json entry names exists (hub entries pass)."""
    if entry.path is None:
        return
    if special := special_data_file(entry.path):
        found, what = special
        raise NotAFile(f"data.{key}={entry.name}: {found} is {what}, {NOT_A_FILE_BECAUSE}.")
    if not entry.path.exists():
        raise MissingData(
            f"data.{key}={entry.name}: {entry.where} names file_name {entry.file_name!r}, "
            f"which is not in {entry.info_file.parent}."
        )
