"""Load, convert, tokenize, mix and split datasets (files, directories or hub datasets).

Reading files and caching tokenized results is left to `datasets` (its map cache is keyed
by a fingerprint of the raw data and of everything that changes the tokens).
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from snug.config import DataConfig
from snug.data.formats import FORMATS, DataError, detect_format
from snug.data.templates import resolve_template
from snug.data.tokenize import (
    EMPTY,
    FULLY_MASKED,
    KEPT,
    TRUNCATED,
    tokenize_classes,
    tokenize_records,
)
from snug.errors import first_line

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
CACHE_VERSION = "1"  # bump when tokenization changes, to invalidate cached maps


@dataclass
class DataStats:
    kept: int = 0
    dropped: int = 0
    truncated: int = 0
    fully_masked: int = 0
    empty: int = 0

    labels: list[str] | None = None  # class names, for train.stage=cls (index = class id)

    def add(self, counts: Counter) -> None:
        self.kept += counts[KEPT] + counts[TRUNCATED]
        self.truncated += counts[TRUNCATED]
        self.fully_masked += counts[FULLY_MASKED]
        self.empty += counts[EMPTY]
        self.dropped += counts[FULLY_MASKED] + counts[EMPTY]

    def as_dict(self) -> dict[str, int]:
        return {
            "kept": self.kept,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "fully_masked": self.fully_masked,
            "empty": self.empty,
        }


def _as_list(spec: str | list[str] | None) -> list[str]:
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)


def load_raw(spec: str, split: str) -> Dataset:
    """One data source -> a `datasets.Dataset` of raw records."""
    path = Path(spec)
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{spec}: unsupported file type '{path.suffix}' (use {', '.join(BUILDERS)})."
            )
        return _load(builder, data_files=str(path), where=spec)
    if path.is_dir():
        if (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: pick the split
            saved = datasets.load_from_disk(str(path))
            if split not in saved:
                raise DataError(f"{spec}: has splits {list(saved)}, not data.split={split}.")
            return saved[split]
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in BUILDERS)
        if not files:
            raise DataError(f"{spec}: the directory holds no {', '.join(BUILDERS)} files.")
        kinds = {BUILDERS[p.suffix.lower()] for p in files}
        if len(kinds) > 1:
            raise DataError(
                f"{spec}: the directory mixes file types {sorted(kinds)}; use one per directory."
            )
        return _load(kinds.pop(), data_files=[str(p) for p in files], where=spec)
    looks_like_file = path.suffix.lower() in BUILDERS or spec.startswith((".", "/", "~"))
    if spec.count("/") == 1 and not looks_like_file:
        return _load(spec, split=split, where=spec)  # a hub dataset id
    raise DataError(f"{spec}: no such file or directory.")


def _load(builder: str, where: str, data_files=None, split: str = "train") -> Dataset:
    try:
        return datasets.load_dataset(builder, data_files=data_files, split=split)
    except Exception as e:  # datasets raises many types; all mean "this source cannot be read"
        raise DataError(f"{where}: cannot read the data ({first_line(e)}).") from None


def _tokenizer_fingerprint(tok: PreTrainedTokenizerBase, template: str | None) -> str:
    h = hashlib.sha256()
    h.update(repr((tok.name_or_path, len(tok), tok.bos_token, tok.eos_token, template)).encode())
    h.update(repr(sorted(tok.get_vocab().items())[:: max(1, len(tok) // 512)]).encode())
    return h.hexdigest()[:16]


def tokenize_source(
    spec: str,
    cfg: DataConfig,
    tok: PreTrainedTokenizerBase,
    stage: str,
    model_name: str,
    labels: list[str] | None = None,
) -> tuple[Dataset, Counter]:
    raw = load_raw(spec, cfg.split)
    if cfg.max_samples is not None:
        raw = raw.select(range(min(cfg.max_samples, len(raw))))
    if len(raw) == 0:
        raise DataError(f"{spec}: holds no records.")
    if stage == "cls":
        return _tokenize_classes(raw, spec, cfg, tok, labels)
    fmt = cfg.format if cfg.format != "auto" else detect_format(raw[0], f"{spec} row 1")
    if stage == "pt" and fmt != "text":
        raise DataError(
            f"{spec}: train.stage=pt needs plain text records ({{'text': ...}}), found {fmt}."
        )
    if stage == "sft" and fmt == "text":
        raise DataError(
            f"{spec}: train.stage=sft needs conversations; for plain text use train.stage=pt."
        )
    assert fmt in FORMATS
    template = resolve_template(tok, cfg.template, model_name) if fmt != "text" else None
    fn = functools.partial(
        tokenize_records,
        tok=tok,
        template=template,
        fmt=fmt,
        cutoff_len=cfg.cutoff_len,
        train_on_prompt=cfg.train_on_prompt,
        source=spec,
    )
    key = (fmt, _tokenizer_fingerprint(tok, template), cfg.cutoff_len, cfg.train_on_prompt, stage)
    return _map_cached(raw, fn, key, spec)


def _map_cached(raw: Dataset, fn, key: tuple, spec: str) -> tuple[Dataset, Counter]:
    """Tokenize `raw` with `fn` through datasets' map cache (keyed by the raw data and `key`,
    everything that changes the tokens), count each sample's status, keep the usable ones."""
    fingerprint = hashlib.sha256(repr((CACHE_VERSION, raw._fingerprint, key)).encode()).hexdigest()
    ds = raw.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        new_fingerprint=fingerprint[:32],
        desc=f"tokenizing {spec}",
    )
    counts = Counter(ds["status"])
    ds = ds.filter(lambda s: s in (KEPT, TRUNCATED), input_columns="status")
    return ds.remove_columns("status"), counts


def _tokenize_classes(
    raw: Dataset, spec: str, cfg: DataConfig, tok: PreTrainedTokenizerBase, labels: list[str]
) -> tuple[Dataset, Counter]:
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in raw.column_names]
    if missing:
        raise DataError(
            f"{spec}: has no column {missing[0]!r} (columns: {raw.column_names}); "
            "set data.text_column / data.label_column."
        )
    fn = functools.partial(
        tokenize_classes,
        tok=tok,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        label_ids={name: i for i, name in enumerate(labels)},
        cutoff_len=cfg.cutoff_len,
        source=spec,
    )
    key = (
        "cls",
        _tokenizer_fingerprint(tok, None),
        labels,
        cfg.text_column,
        cfg.label_column,
        cfg.cutoff_len,
    )
    return _map_cached(raw, fn, key, spec)


def class_labels(cfg: DataConfig) -> list[str]:
    """The classes of data.train's label column, sorted (class id = position)."""
    names: set[str] = set()
    for spec in _as_list(cfg.train):
        raw = load_raw(spec, cfg.split)
        if cfg.label_column not in raw.column_names:
            raise DataError(f"{spec}: has no column {cfg.label_column!r}; set data.label_column.")
        names.update(str(v) for v in raw[cfg.label_column])
    if len(names) < 2:
        raise DataError(
            f"data.train: the label column {cfg.label_column!r} holds {len(names)} class(es); "
            "classification needs at least 2."
        )
    return sorted(names)


def build_datasets(
    cfg: DataConfig, tok: PreTrainedTokenizerBase, stage: str, seed: int, model_name: str
) -> tuple[Dataset, Dataset | None, DataStats]:
    """(train, eval or None, stats). Several train sources are mixed (concatenated; the
    sampler shuffles); val_size holds out part of train when there is no eval data."""
    datasets.disable_progress_bars()
    stats = DataStats(labels=class_labels(cfg) if stage == "cls" else None)
    parts = []
    for spec in _as_list(cfg.train):
        ds, counts = tokenize_source(spec, cfg, tok, stage, model_name, stats.labels)
        stats.add(counts)
        parts.append(ds)
    train = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(train) == 0:
        raise DataError(f"data.train: no usable samples remain ({stats.as_dict()}).")
    evals = [
        tokenize_source(spec, cfg, tok, stage, model_name, stats.labels)[0]
        for spec in _as_list(cfg.eval)
    ]
    eval_ds = (concatenate_datasets(evals) if len(evals) > 1 else evals[0]) if evals else None
    if cfg.val_size > 0:  # config checks ensure there is no data.eval then
        size = cfg.val_size if cfg.val_size < 1 else int(cfg.val_size)
        held = round(size * len(train)) if size < 1 else size
        if not 0 < held < len(train):
            raise DataError(
                f"data.val_size={cfg.val_size} holds out {held} of {len(train)} samples; "
                "leave at least one on each side."
            )
        split = train.train_test_split(test_size=size, seed=seed)
        train, eval_ds = split["train"], split["test"]
    return train, eval_ds, stats
