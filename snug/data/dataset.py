"""Convert, tokenize, mix and split datasets (each source read by snug/data/sources.py).

Reading files and caching tokenized results is left to `datasets` (its map cache is keyed
by a fingerprint of the raw data and of everything that changes the tokens).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets import Dataset, concatenate_datasets
from rich.console import Console
from rich.markup import escape
from transformers import PreTrainedTokenizerBase

from snug.core.registry import get_stage
from snug.data.formats import FORMATS, DataError, detect_format
from snug.data.locate import Locator
from snug.data.parallel import in_memory_cache, processes, run_map
from snug.data.placeholders import count_placeholders, placeholder_warning
from snug.data.preference import refuse_preference_records
from snug.data.registry import open_source
from snug.data.sources import RawSource
from snug.data.templates import TemplateError, resolve_template
from snug.data.tokenize import (
    CLIPPED,
    EMPTY,
    FULLY_MASKED,
    INVALID,
    KEPT,
    TRUNCATED,
    first_record,
    text_limit,
    tokenize_records,
)
from snug.runtime.progress import Phase

# snug.config.DataConfig: not imported, since the stages (snug/stages/) that call this module
# sit below snug.config, which registers them.
DataConfig = Any

CACHE_VERSION = "3"  # bump when tokenization changes, to invalidate cached maps
MAX_PROBLEMS = 20  # problems listed in summary.json; the counts cover them all
# Records per batch of the tokenizing map: progress is told once a batch. Neither this nor the
# progress costs measurable time against datasets' default of 1,000 records and no progress
# (`python benchmarks/tokenize_bombs.py progress data/corpus/corpus.jsonl pt`).
MAP_BATCH = 100
# What to do about a record of each dropped status, in the message that stops a strict run.
FIXES = {
    INVALID: "fix the record, or set data.on_error: skip to drop such records",
    EMPTY: "fix the record, or set data.on_error: skip to drop such records",
    FULLY_MASKED: "raise data.cutoff_len, or set data.on_error: skip to drop such samples",
}


@dataclass
class DataStats:
    """Counts of train samples (trained, dropped and why), and the first problems of train and
    eval data alike, each naming file, line or row, and field. The sources are counted as
    tokenized (each record read is usable or dropped for one reason); `kept` is what data.mix
    made of their usable samples (`mixed`): the samples training draws from."""

    kept: int = 0  # after data.mix: what is trained (and what data.val_size splits)
    usable: int = 0  # the sources' samples before data.mix (= kept for concat)
    dropped: int = 0  # fully_masked + empty + invalid
    truncated: int = 0  # of the usable ones
    clipped: int = 0  # of the truncated: a message or text was cut before tokenizing
    fully_masked: int = 0
    empty: int = 0
    invalid: int = 0  # unreadable lines and records with a missing, mistyped or bad field
    eval_dropped: int = 0  # eval samples dropped for the same reasons
    problems: list[str] = field(default_factory=list)

    labels: list[str] | None = None  # class names, for train.stage=cls (index = class id)
    # Records of train and eval data holding each {{placeholder}} (data/placeholders.py).
    placeholders: Counter = field(default_factory=Counter)

    def add(self, counts: Counter, problems: list[str], train: bool = True) -> None:
        """`counts`: tokenize_source's, samples of each status and records of each
        placeholder ("{{name}}")."""
        self.placeholders.update({k: n for k, n in counts.items() if k.startswith("{{")})
        dropped = counts[FULLY_MASKED] + counts[EMPTY] + counts[INVALID]
        if train:
            usable = counts[KEPT] + counts[TRUNCATED] + counts[CLIPPED]
            self.usable += usable
            self.kept += usable  # until `mixed` says what data.mix made of them
            self.truncated += counts[TRUNCATED] + counts[CLIPPED]
            self.clipped += counts[CLIPPED]
            self.fully_masked += counts[FULLY_MASKED]
            self.empty += counts[EMPTY]
            self.invalid += counts[INVALID]
            self.dropped += dropped
        else:
            self.eval_dropped += dropped
        self.problems += problems[: MAX_PROBLEMS - len(self.problems)]

    def mixed(self, samples: int) -> None:
        """The train sources mixed into `samples` samples (data.mix: interleave stops at the
        first source that runs out, interleave_over repeats the shorter ones)."""
        self.kept = samples

    def as_dict(self) -> dict[str, int | list[str] | dict[str, int]]:
        return {
            "kept": self.kept,
            "usable": self.usable,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "clipped": self.clipped,
            "fully_masked": self.fully_masked,
            "empty": self.empty,
            "invalid": self.invalid,
            "eval_dropped": self.eval_dropped,
            "problems": self.problems,
            "placeholders": dict(self.placeholders.most_common()),
        }


def _as_list(spec: str | list[str] | None) -> list[str]:
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase, template: str | None) -> str:
    """A short hash of the tokenizer and chat template, for a stage's `source.map` cache key:
    another tokenizer or template tokenizes anew."""
    h = hashlib.sha256()
    h.update(repr((tok.name_or_path, len(tok), tok.bos_token, tok.eos_token, template)).encode())
    h.update(repr(sorted(tok.get_vocab().items())[:: max(1, len(tok) // 512)]).encode())
    return h.hexdigest()[:16]


def tokenize_source(
    spec: str,
    cfg: DataConfig,
    tok: PreTrainedTokenizerBase,
    stage: Any,
    model_name: str,
    labels: list[str] | None = None,
    console: Console | None = None,
    own: Any = None,
    seed: int = 0,
) -> tuple[Dataset, Counter, list[str]]:
    """One source -> its usable samples, the count of each status, and the first problems of
    the dropped ones (unreadable lines count as invalid), tokenized as the stage (a
    snug.stages.base.Stage, or its name) says. Under data.on_error=strict the first problem
    stops the run here instead. `console` shows the records tokenized as they are (a
    snug.runtime.progress.Phase) and the counts. `own`: the stage's own settings (Stage.own; None:
    their defaults). A name of data.dataset_dir's registry is read with its own format and
    columns (snug/data/registry.py); `seed` draws its num_samples."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    started = time.monotonic()
    src, cfg = open_source(spec, cfg, stage, seed)
    if "text" not in stage.formats:
        refuse_plain_text(src, spec, stage.name, stage.needs)
    raw = src.records
    if cfg.max_samples is not None:
        raw = raw.select(range(min(cfg.max_samples, len(raw))))
    if len(raw) == 0:
        lost = f" (the first unreadable line: {src.unreadable[0]})" if src.unreadable else ""
        raise DataError(f"{spec}: holds no records{lost}.")
    placeholders = count_placeholders(raw)
    if placeholders and console is not None:
        console.print(f"[yellow]{escape(placeholder_warning(spec, placeholders))}[/yellow]")
    own = own if own is not None else stage.own(None)
    source = Source(raw, src.where, spec, cfg, tok, model_name, labels, own)
    if console is None:
        ds, counts, problems = stage.tokenize(source)
    else:
        with Phase(console, f"tokenizing {spec}", len(raw), "records") as phase:
            source.progress = Counted(phase.advance)
            ds, counts, problems = stage.tokenize(source)
            phase.advance(len(raw) - source.progress.done)  # records read from the cache
    counts[INVALID] += len(src.unreadable)
    counts.update(placeholders)  # counted apart from the statuses: DataStats.add
    if console is not None:
        dropped = counts[FULLY_MASKED] + counts[EMPTY] + counts[INVALID]
        console.print(
            f"tokenized {spec}: {len(ds):,} samples, {dropped:,} dropped "
            f"({time.monotonic() - started:.1f} s)"
        )
    return ds, counts, src.unreadable + problems


def refuse_plain_text(src: RawSource, spec: str, stage: str, needs: str) -> None:
    """A .txt file given to a stage that reads no plain text: one error naming both."""
    if src.plain_text:
        raise DataError(
            f"{spec}: a .txt file is plain text (one document a line), which only "
            f"train.stage=pt reads; train.stage={stage} "
            + (f"needs {needs}." if needs else "reads other records.")
        )


@dataclass
class Counted:
    """A progress callback that also keeps the count it was given."""

    advance: Callable[[int], None]
    done: int = 0

    def __call__(self, n: int) -> None:
        self.done += n
        self.advance(n)


@dataclass
class Source:
    """One data source as a stage's `tokenize` sees it: the raw records and where each is
    (file and line, for problems), and what the config says of it."""

    raw: Dataset
    where: Locator
    spec: str  # as data.train / data.eval names it
    data: DataConfig
    tok: PreTrainedTokenizerBase
    model_name: str
    labels: list[str] | None  # the stage's classes, when it has any (Stage.labels)
    own: Any = None  # the stage's own settings (its section's keys), when it has any
    progress: Callable[[int], None] | None = None  # hears the records tokenized, batch by batch

    def map(self, fn: Callable, key: tuple) -> tuple[Dataset, Counter, list[str]]:
        """Tokenize the records with the batched function `fn(records, indices)`, which gives
        each sample `input_ids`, `labels`, `prompt_len`, `status` and `problem`
        (snug/data/tokenize.py: COLUMNS), through datasets' cache keyed by `key` (everything
        that changes the tokens); keep the usable samples as data.on_error says."""
        return map_cached(
            self.raw,
            fn,
            key,
            self.spec,
            self.data.on_error,
            self.progress,
            self.data.num_proc,
            self.where,
        )


def tokenize_formatted(source: Source, stage: Any) -> tuple[Dataset, Counter, list[str]]:
    """Records of a known format (data.format, or detected) that `stage` reads (its
    `formats`): chat records through the chat template, plain text as it is."""
    cfg, tok, spec = source.data, source.tok, source.spec
    refuse_preference_records(first_record(source.raw), spec, stage.name)  # data/preference.py
    fmt = (
        cfg.format
        if cfg.format != "auto"
        else detect_format(first_record(source.raw), source.where(0))
    )
    if fmt not in stage.formats:
        raise DataError(
            f"{spec}: train.stage={stage.name} needs {stage.needs} (found {fmt} records)."
        )
    assert fmt in FORMATS
    template = None
    if fmt != "text":  # not a problem of one record: stops the run whatever data.on_error says
        try:
            template = resolve_template(tok, cfg.template, source.model_name)
        except TemplateError as e:
            raise TemplateError(f"{spec}: {fmt} records need a chat template, but {e}") from None
    fn = functools.partial(
        tokenize_records,
        tok=tok,
        template=template,
        fmt=fmt,
        cutoff_len=cfg.cutoff_len,
        train_on_prompt=cfg.train_on_prompt,
        max_chars=text_limit(tok, cfg.cutoff_len),
        where=source.where,
        mask_history=cfg.mask_history,
        default_system=cfg.default_system,
    )
    key = (
        fmt,
        tokenizer_fingerprint(tok, template),
        cfg.cutoff_len,
        cfg.train_on_prompt,
        stage.name,
        cfg.mask_history,
        cfg.default_system,
    )
    return source.map(fn, key)


def map_cached(
    raw: Dataset,
    fn,
    key: tuple,
    spec: str,
    on_error: str,
    progress: Callable[[int], None] | None = None,
    num_proc: int | None = 1,
    where: Locator | None = None,
) -> tuple[Dataset, Counter, list[str]]:
    """Tokenize `raw` with `fn` through datasets' map cache (keyed by the raw data, by `key`,
    everything that changes the tokens, by `spec`, named in the problems, and by the lines
    `where` names), in data.num_proc processes (snug/data/parallel.py, which also caches the
    result of records held in memory); count each sample's status, keep the usable ones.
    data.on_error acts after the map, so that strict and skip share one cached result: strict
    stops at the first dropped sample in row order, skip returns the first problems.
    `progress` hears the records of each batch tokenized (none when the cache holds the
    result)."""
    lines = where.known if where is not None else None
    fingerprint = hashlib.sha256(
        repr((CACHE_VERSION, raw._fingerprint, key, spec, lines)).encode()
    ).hexdigest()[:32]
    ds = run_map(
        raw,
        fn,
        processes(num_proc, len(raw)),
        progress,
        batched=True,
        batch_size=MAP_BATCH,
        with_indices=True,
        remove_columns=raw.column_names,
        new_fingerprint=fingerprint,
        cache_file_name=in_memory_cache(raw, fingerprint),
        desc=f"tokenizing {spec}",
    )
    statuses = ds["status"]
    counts = Counter(statuses)
    dropped = [i for i, status in enumerate(statuses) if status in FIXES]
    if dropped and on_error == "strict":
        first = ds[dropped[0]]
        raise DataError(f"{first['problem'].removesuffix('.')}; {FIXES[first['status']]}.")
    problems = list(ds.select(dropped[:MAX_PROBLEMS])["problem"]) if dropped else []
    if dropped:
        ds = ds.filter(lambda s: s in (KEPT, TRUNCATED, CLIPPED), input_columns="status")
    return ds.remove_columns(["status", "problem"]), counts, problems


def mix(parts: list[Dataset], cfg: DataConfig, seed: int) -> Dataset:
    """The train sources' samples as one dataset. concat: all of each, one after the other (the
    sampler shuffles them). interleave / interleave_over: `datasets.interleave_datasets`, which
    draws each next sample's source by data.mix_probs (equal chances if unset) with
    train.seed, until the first source runs out (LLaMA-Factory's interleave_under) or, for
    interleave_over, until every one has (the shorter ones repeated)."""
    if len(parts) == 1:
        return parts[0]
    if cfg.mix == "concat":
        return concatenate_datasets(parts)
    return datasets.interleave_datasets(
        parts,
        probabilities=cfg.mix_probs or [1 / len(parts)] * len(parts),
        seed=seed,
        stopping_strategy="all_exhausted" if cfg.mix == "interleave_over" else "first_exhausted",
    )


def build_datasets(
    cfg: DataConfig,
    tok: PreTrainedTokenizerBase,
    stage: Any,
    seed: int,
    model_name: str,
    console: Console | None = None,
    own: Any = None,
) -> tuple[Dataset, Dataset | None, DataStats]:
    """(train, eval or None, stats). Several train sources are mixed as data.mix says
    (`mix`); val_size holds out part of train when there is no eval data. `console`
    shows each source's progress (snug train's). `stage`: a snug.stages.base.Stage or its
    name (train.stage); `own`: its own settings (Stage.own; None: their defaults)."""
    datasets.disable_progress_bars()
    stage = get_stage(stage) if isinstance(stage, str) else stage
    own = own if own is not None else stage.own(None)
    stats = DataStats(labels=stage.labels(cfg, own))
    parts = []
    for spec in _as_list(cfg.train):
        ds, counts, problems = tokenize_source(
            spec, cfg, tok, stage, model_name, stats.labels, console, own, seed
        )
        stats.add(counts, problems)
        parts.append(ds)
    train = mix(parts, cfg, seed)
    stats.mixed(len(train))
    if len(train) == 0:
        raise DataError(
            f"data.train: no usable samples remain ({stats.dropped} dropped; the first: "
            f"{stats.problems[0]})"
        )
    evals = []
    for spec in _as_list(cfg.eval):
        ds, counts, problems = tokenize_source(
            spec, cfg, tok, stage, model_name, stats.labels, console, own, seed
        )
        stats.add(counts, problems, train=False)
        if len(ds) == 0:
            raise DataError(f"{spec}: no usable eval samples remain (the first: {problems[0]})")
        evals.append(ds)
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
