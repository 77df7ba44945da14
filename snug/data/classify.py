"""The records of train.stage=cls: the classes of data.train's label column, and each record
tokenized as a text and one class id (the stage's settings name the columns: cls.text_column,
cls.label_column). snug/stages/cls.py calls these; the rest of tokenizing is tokenize.py's and
dataset.py's."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from snug.core.registry import get_stage
from snug.data.dataset import _as_list, refuse_plain_text, tokenizer_fingerprint
from snug.data.formats import DataError
from snug.data.registry import open_source
from snug.data.tokenize import (
    CLIPPED,
    COLUMNS,
    INVALID,
    KEPT,
    TRUNCATED,
    column_names,
    records_of,
    text_limit,
)

if TYPE_CHECKING:  # only for annotations: a config check must not load transformers
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from snug.core.sections import DataConfig
    from snug.data.dataset import Source


def tokenize_classes_of(
    source: Source, text_column: str, label_column: str
) -> tuple[Dataset, Counter, list[str]]:
    """Records of a text and a class label (the cls stage's settings name their columns:
    cls.text_column, cls.label_column): its samples, one class id as the label of each."""
    cfg, spec, tok, labels = source.data, source.spec, source.tok, source.labels
    columns = column_names(source.raw)
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{spec}: has no column {missing[0]!r} (columns: {columns}); "
            "set cls.text_column / cls.label_column."
        )
    fn = functools.partial(
        tokenize_classes,
        tok=tok,
        text_column=text_column,
        label_column=label_column,
        label_ids={name: i for i, name in enumerate(labels)},
        cutoff_len=cfg.cutoff_len,
        max_chars=text_limit(tok, cfg.cutoff_len),
        where=source.where,
    )
    key = (
        "cls",
        tokenizer_fingerprint(tok, None),
        labels,
        text_column,
        label_column,
        cfg.cutoff_len,
    )
    return source.map(fn, key)


def class_labels(cfg: DataConfig, label_column: str) -> list[str]:
    """The classes of data.train's label column (cls.label_column), sorted (class id =
    position); a record without a label names none (it is dropped or stops the run when
    tokenized). Each entry is read as tokenizing reads it (snug/data/registry.py: a name of
    data.dataset_dir's registry too), every record of a registered one: its num_samples draw
    (by train.seed) takes no class the file lacks."""
    names: set[str] = set()
    stage = get_stage("cls")
    for spec in _as_list(cfg.train):
        src, _ = open_source(spec, cfg, stage, seed=None)
        refuse_plain_text(src, spec, "cls", "a text and a class label in named columns")
        raw = src.records
        if label_column not in column_names(raw):
            raise DataError(f"{spec}: has no column {label_column!r}; set cls.label_column.")
        values = (r.get(label_column) for r in records_of(raw[:]))
        names.update(str(v) for v in values if v is not None and not isinstance(v, (dict, list)))
    if len(names) < 2:
        raise DataError(
            f"data.train: the label column {label_column!r} holds {len(names)} class(es); "
            "classification needs at least 2."
        )
    return sorted(names)


def tokenize_classes(
    records: dict[str, list[Any]],
    indices: list[int],
    *,
    tok: PreTrainedTokenizerBase,
    text_column: str,
    label_column: str,
    label_ids: dict[str, int],
    cutoff_len: int,
    max_chars: int,
    where: Callable[[int], str],
) -> dict[str, list]:
    """Batched `datasets.map` function for train.stage=cls: text -> input_ids, label -> class id
    (a record without usable text or label: status invalid, as in `tokenize_records`; a text
    over `max_chars` characters keeps its start)."""
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for record, index in zip(records_of(records), indices, strict=True):
        text, label = record.get(text_column), record.get(label_column)
        problem = ""
        if not isinstance(text, str) or not text.strip():
            problem = f"{where(index)}: field '{text_column}' must be non-empty text."
        elif label is None:
            problem = f"{where(index)}: field '{label_column}' is missing."
        elif isinstance(label, (dict, list)):
            problem = f"{where(index)}: field '{label_column}' must be a class name or number, not {type(label).__name__}."
        elif str(label) not in label_ids:
            problem = (
                f"{where(index)}: field '{label_column}' holds {label!r}, "
                "a class that does not occur in data.train."
            )
        clipped = not problem and len(text) > max_chars
        ids = [] if problem else tok(text[:max_chars], add_special_tokens=True)["input_ids"]
        out["input_ids"].append(ids[:cutoff_len])
        out["labels"].append(label_ids.get(str(label), -1))
        cut = CLIPPED if clipped else TRUNCATED if len(ids) > cutoff_len else KEPT
        out["status"].append(INVALID if problem else cut)
        out["prompt_len"].append(0)
        out["problem"].append(problem)
    return out
