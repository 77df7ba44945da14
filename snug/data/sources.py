"""One data source read into raw records: a JSON or JSON Lines file, CSV, Parquet or Arrow, a
directory of one kind of them, a dataset saved by `datasets`, a hub dataset id, or a .txt file of
plain text (one document a line, for train.stage=pt, as LLaMA-Factory reads it). `datasets`
reads them; JSON it cannot read (or would coerce) is read here, line by line, so that a bad
line is named."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset, Json

from snug.config.dataset_info import registry_folder
from snug.config.paths import NOT_A_FILE_BECAUSE, special_data_file
from snug.data.formats import DataError
from snug.data.locate import Locator, check_json_file, check_utf8, holds_array, read_json
from snug.data.tokenize import RAW_JSON
from snug.errors import first_line

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


@dataclass
class RawSource:
    """One source's raw records, where each came from, and the lines left out (unreadable)."""

    records: Dataset
    where: Locator
    unreadable: list[str] = field(default_factory=list)  # only under data.on_error=skip
    plain_text: bool = False  # a .txt file: text records that only train.stage=pt reads


def load_raw(spec: str, split: str, on_error: str = "strict") -> RawSource:
    """One data source -> its raw records (a `datasets.Dataset`) and their locations."""
    path = Path(spec)
    if special := special_data_file(path):  # before anything opens it: a pipe would hang
        found, what = special
        where = "is" if found == path else f"holds {found},"
        raise DataError(f"{spec} {where} {what}, {NOT_A_FILE_BECAUSE}.")
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return _load_text(path, spec)
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{spec}: unsupported file type '{path.suffix}' (use {', '.join(BUILDERS)}, "
                "or .txt for train.stage=pt)."
            )
        if builder == "json":
            return _load_json([path], spec, on_error)
        if builder == "csv":
            check_utf8(path)
        return RawSource(_load(builder, data_files=str(path), where=spec), Locator(spec))
    if path.is_dir():
        if (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: pick the split
            saved = datasets.load_from_disk(str(path))
            if split not in saved:
                raise DataError(f"{spec}: has splits {list(saved)}, not data.split={split}.")
            return RawSource(saved[split], Locator(spec))
        if why := registry_folder(path):  # not save_to_disk's, which has a state.json too
            raise DataError(why)
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return RawSource(datasets.load_from_disk(str(path)), Locator(spec))
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in BUILDERS)
        if not files:
            raise DataError(f"{spec}: the directory holds no {', '.join(BUILDERS)} files.")
        kinds = {BUILDERS[p.suffix.lower()] for p in files}
        if len(kinds) > 1:
            raise DataError(
                f"{spec}: the directory mixes file types {sorted(kinds)}; use one per directory."
            )
        if kinds == {"json"}:
            return _load_json(files, spec, on_error)
        ds = _load(kinds.pop(), data_files=[str(p) for p in files], where=spec)
        return RawSource(ds, Locator(spec))
    looks_like_file = path.suffix.lower() in BUILDERS or spec.startswith((".", "/", "~"))
    if spec.count("/") == 1 and not looks_like_file:
        return RawSource(_load(spec, split=split, where=spec), Locator(spec))  # a hub dataset id
    raise DataError(f"{spec}: no such file or directory.")


def _load(builder: str, where: str, data_files=None, split: str = "train") -> Dataset:
    try:
        return datasets.load_dataset(builder, data_files=data_files, split=split)
    except Exception as e:  # datasets raises many types; all mean "this source cannot be read"
        raise DataError(f"{where}: cannot read the data ({first_line(e)}).") from None


def _load_text(path: Path, spec: str) -> RawSource:
    """A .txt file -> one {"text"} record a line, blank lines left out (they hold no
    document), through `datasets`' text loader (cached), as LLaMA-Factory reads .txt files."""
    check_utf8(path)
    lines = _load("text", data_files=str(path), where=spec)
    docs = lines.filter(lambda text: bool(text.strip()), input_columns="text")
    return RawSource(docs, Locator(spec, rows=len(docs), text_file=path), plain_text=True)


def _load_json(files: list[Path], spec: str, on_error: str) -> RawSource:
    """JSON or JSON Lines files through `datasets` (cached); when it fails, which names no line,
    or reads a field of mixed types (which it coerces), read them here: name the first
    unreadable line, or with data.on_error=skip leave such lines out and load the rest."""
    # The loader logs its failure (an ERROR naming no line) before raising: the message below
    # says more, so that log is muted while it reads.
    for path in files:
        check_json_file(path)
    quiet = logging.getLogger("datasets.packaged_modules.json.json")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        # A JSON array is read here always: `datasets` takes an array of strings for a "text"
        # column, where each item should be a record.
        if not any(holds_array(p) for p in files):
            ds = _load("json", data_files=[str(p) for p in files], where=spec)
            if not _mixed(ds.features):
                return RawSource(ds, Locator(spec, files, len(ds)))
    except DataError:
        pass  # read below, where each bad line is found and named
    finally:
        quiet.setLevel(level)
    known, records, unreadable = [], [], []
    for path in files:
        lines, recs, bad = read_json(path)
        known += [(str(path), n) for n in lines]
        records += recs
        unreadable += [f"{path} line {n}: {why}." for n, why in bad]
    if unreadable and on_error == "strict":
        raise DataError(
            f"{unreadable[0].removesuffix('.')}; fix the line, or set data.on_error: skip to "
            "drop such lines."
        )
    # Each record as its own JSON text, so that every value stays exactly as written (a
    # mistyped field is named, the string "4" stays a string) and no record gains the fields
    # of others; the tokenizers read it back (data/tokenize.py: records_of).
    ds = Dataset.from_dict({RAW_JSON: [json.dumps(r) for r in records]})
    return RawSource(ds, Locator(spec, files, len(ds), known), unreadable)


def _mixed(feature) -> bool:
    """Whether `datasets` read a field of several JSON types: its Json feature then decodes
    strings that look like JSON ("4", "true", "[1, 2]") as numbers, booleans and lists."""
    if isinstance(feature, Json):
        return True
    if isinstance(feature, dict):
        return any(_mixed(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_mixed(f) for f in feature)
    inner = getattr(feature, "feature", None)
    return inner is not None and _mixed(inner)
