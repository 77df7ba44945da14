"""LLaMA-Factory's dataset registry: a folder's `dataset_info.json`, which names datasets and
says, for each, where its records are and how to read them (data.dataset_dir).

Each entry is read with LLaMA-Factory's schema and defaults (its data/README.md): `file_name`
(a file or folder inside the data folder) or `hf_hub_url` (a hub dataset, with `subset`,
`folder` and `split`), `formatting` (alpaca | sharegpt), `ranking` (preference pairs),
`num_samples`, `columns` (the record's field for each part) and `tags` (sharegpt: the keys of a
turn and the names of its roles). Pure Python, no torch: the config checks names before the
heavy imports. snug/data/registry.py reads the records an entry names.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snug.config.paths import resolve
from snug.errors import ConfigError

INFO_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
# LLaMA-Factory's default column of each part, by formatting (None: not read unless mapped).
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}
COLUMN_KEYS = (
    "prompt", "query", "response", "history", "messages", "system", "tools",
    "images", "videos", "audios", "chosen", "rejected", "kto_tag",
)  # fmt: skip
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# Keys snug reads; the others of LLaMA-Factory's schema it refuses (ms_hub_url and om_hub_url
# are alternatives to hf_hub_url, so they are ignored where hf_hub_url or file_name is given).
KNOWN_KEYS = (
    "file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "subset", "folder", "split",
    "num_samples", "formatting", "ranking", "columns", "tags", "file_sha1",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a dataset_info.json, with LLaMA-Factory's defaults filled in."""

    name: str
    info_file: Path  # the dataset_info.json that names it
    file_name: str | None = None  # inside info_file's folder
    hf_hub_url: str | None = None
    subset: str | None = None
    folder: str | None = None
    split: str = "train"
    num_samples: int | None = None
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.info_file} entry {self.name!r}"

    @property
    def path(self) -> Path | None:
        """The local file or folder of the records, when the entry names one."""
        return None if self.file_name is None else self.info_file.parent / self.file_name


def read_registry(dataset_dir: str | Path) -> dict[str, Any]:
    """The entries of `dataset_dir`/dataset_info.json as written, by name. Each is checked
    only when named (`registered`): LLaMA-Factory's own file lists entries of ModelScope's hub
    and scripts that snug does not read, which must not stop the others."""
    info_file = Path(dataset_dir) / INFO_FILE
    if not info_file.is_file():
        raise ConfigError(
            f"data.dataset_dir={dataset_dir}: holds no {INFO_FILE}; name the folder that "
            "holds it (LLaMA-Factory's data/ folder)."
        )
    try:
        raw = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{info_file}: cannot read the file ({e}).") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{info_file} line {e.lineno}: not valid JSON ({e.msg}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{info_file}: must hold one JSON object of named datasets.")
    return raw


def _entry(name: str, value: Any, info_file: Path) -> DatasetEntry:
    where = f"{info_file} entry {name!r}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be an object (with file_name or hf_hub_url).")
    unknown = [k for k in value if k not in KNOWN_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: snug does not read {', '.join(map(repr, unknown))} (it reads "
            f"{', '.join(KNOWN_KEYS)}); remove it or load the data another way."
        )
    if value.get("file_name") is None and value.get("hf_hub_url") is None:
        raise ConfigError(
            f"{where}: has neither file_name nor hf_hub_url, the two sources snug loads "
            "(ModelScope and Modelers hubs are not read)."
        )
    formatting = value.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise ConfigError(f"{where}: formatting is {formatting!r}; use alpaca or sharegpt.")
    columns, tags = value.get("columns") or {}, value.get("tags") or {}
    for key, given, known in (("columns", columns, COLUMN_KEYS), ("tags", tags, DEFAULT_TAGS)):
        if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
            raise ConfigError(f"{where}: {key} must map names to field names (strings).")
        if bad := [k for k in given if k not in known]:
            raise ConfigError(
                f"{where}: {key} has no key {bad[0]!r}{near(bad[0], known)} (LLaMA-Factory's "
                f"{key}: {', '.join(known)})."
            )
    num_samples = value.get("num_samples")
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        raise ConfigError(f"{where}: num_samples is {num_samples!r}; give a whole count >= 1.")
    return DatasetEntry(
        name=name,
        info_file=info_file,
        file_name=value.get("file_name"),
        hf_hub_url=None if value.get("file_name") else value.get("hf_hub_url"),
        subset=value.get("subset"),
        folder=value.get("folder"),
        split=value.get("split", "train"),
        num_samples=num_samples,
        formatting=formatting,
        ranking=bool(value.get("ranking", False)),
        columns={**DEFAULT_COLUMNS[formatting], **columns},
        tags={**DEFAULT_TAGS, **tags},
    )


def near(name: str, names) -> str:
    """' (did you mean a, b?)' for the names close to `name`, else ''."""
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def registered(spec: str, dataset_dir: str | None) -> DatasetEntry | None:
    """The entry `spec` names in data.dataset_dir's registry, or None (a path or a hub id)."""
    if dataset_dir is None:
        return None
    found = read_registry(dataset_dir)
    if spec not in found:
        return None
    return _entry(spec, found[spec], Path(dataset_dir) / INFO_FILE)


def unknown_name(where: str, spec: str, dataset_dir: str) -> ConfigError:
    """The error for a name of data.train / data.eval that is neither registered nor a path."""
    names = read_registry(dataset_dir)
    info_file = Path(dataset_dir) / INFO_FILE
    listed = near(spec, names) or f" (it names {', '.join(list(names)[:8])}" + (
        ", ...)" if len(names) > 8 else ")"
    )
    return ConfigError(
        f"{where}: {spec!r} is not a dataset of {info_file}{listed}, nor a file or directory; "
        "add it there or give its path."
    )


def resolve_data(spec: str, where: str, folder: Path, dataset_dir: str | None) -> str:
    """An entry of data.train / data.eval as the config keeps it: a name registered in
    data.dataset_dir as it is, else the path or hub id it is (snug/config/paths.py: resolve);
    with data.dataset_dir set, a value that is none of these is an unknown name."""
    if registered(spec, dataset_dir) is not None:
        return spec
    found = resolve(spec, folder, "dataset")
    if dataset_dir is not None and not Path(found).exists() and found != spec:
        raise unknown_name(where, spec, dataset_dir)
    return found


def registry_folder(path: Path) -> str | None:
    """Why `path`, given as data, is a LLaMA-Factory data folder rather than data: it holds
    dataset_info.json but no state.json (`datasets`' save_to_disk writes both); None if not."""
    if not (path / INFO_FILE).is_file() or (path / "state.json").exists():
        return None
    try:
        names = list(read_registry(path))
    except ConfigError:
        names = []
    shown = (
        f" (it names {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
    )
    return (
        f"{path} is a LLaMA-Factory data folder ({INFO_FILE} without the state.json of a "
        f"saved dataset): set data.dataset_dir={path} and name its datasets in data.train"
        f"{shown}."
    )
