"""Paths a user writes: a local path or a hub id, and relative to what.

A relative path in a config file means the file's folder, never the current directory: the
same config gives the same run from anywhere. A value that names nothing there and has the
shape of a hub id (`org/name`, or a bare name for models) is a hub id. Pure Python, no torch:
the command line checks paths before the heavy imports.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_HUB_DATASET = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


# Endings of files, which no hub id has.
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".yaml", ".yml", ".txt")


def looks_like_hub_id(text: str, dataset: bool = False) -> bool:
    """`org/name` (or, for a model, a bare legacy name like `gpt2`); never `..`, a leading
    `.`, `/` or `~`, or a file's ending, which only paths have."""
    pattern = _HUB_DATASET if dataset else _HUB_ID
    return (
        bool(pattern.fullmatch(text))
        and ".." not in text
        and not text.lower().endswith(FILE_SUFFIXES)
    )


def absolute(path: str | Path, base: Path) -> str:
    """`path` (with ~ expanded) made absolute against `base`, normalised but with symlinks kept
    as written."""
    p = Path(path).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


class Ambiguous(ValueError):
    """A relative path that names nothing in the config's folder but exists in the current one."""


def resolve(value: str, base: Path, hub: str | None) -> str:
    """A config value that is a local path or, where `hub` is 'model' or 'dataset', maybe a hub
    id: an absolute path when it names something under `base`, else the hub id it looks like,
    else the absolute path under `base` (which does not exist; the caller says so)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return os.path.normpath(p)
    here = absolute(value, base)
    if Path(here).exists() or hub is None:
        return here
    if looks_like_hub_id(value, dataset=hub == "dataset"):
        if Path(value).exists() and Path.cwd().resolve() != base.resolve():
            raise Ambiguous(
                f"{value} is not in {base} (relative paths in a config are read from its own "
                f"folder), but {Path(value).resolve()} is; write that path, or the path relative "
                "to the config's folder"
            )
        return value
    return here


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies under it (both resolved)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents
