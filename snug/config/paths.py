"""Paths a user writes: a local path or a hub id, and relative to what.

A relative path in a config file means the file's folder, never the current directory: the
same config gives the same run from anywhere. A value that names nothing there and has the
shape of a hub id (`org/name`, or a bare name for models) is a hub id. Pure Python, no torch:
the command line checks paths before the heavy imports.
"""

from __future__ import annotations

import os
import re
import stat
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


# The endings of the data files snug reads (snug/data/sources.py reads them by these).
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")
_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
# Why such a file is refused as data, for the messages that name one.
NOT_A_FILE_BECAUSE = (
    "not a regular file: snug reads a data file more than once (to key its cache, to name a "
    "bad line), and opening a pipe waits for a writer; save the data to a file and name that"
)


def special_kind(path: str | Path) -> str | None:
    """What `path` is when it is neither a regular file nor a directory (following symlinks):
    'a named pipe (FIFO)', 'a socket', a device; None for a file, a directory or nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((what for test, what in _SPECIAL if test(mode)), None)


def special_data_file(path: str | Path) -> tuple[Path, str] | None:
    """`path` itself, or for a directory the first data file in it (by DATA_SUFFIXES), that is
    not a regular file, and what it is; None when there is none. Never opens anything."""
    what = special_kind(path)
    if what is not None:
        return Path(path), what
    if not Path(path).is_dir():
        return None
    for entry in sorted(Path(path).rglob("*")):
        if entry.suffix.lower() in DATA_SUFFIXES and (what := special_kind(entry)):
            return entry, what
    return None
