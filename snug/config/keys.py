"""The keys a config may hold, and what a key that is not one of them is told: its section when
it sits in another (by its own name or, through ALIASES, the name another tool gives it), the
stage section that declares it, else the nearest key of its section. build.py builds configs
with these; docs.py documents the same keys."""

from __future__ import annotations

import dataclasses
import difflib
import typing

from snug.config.choosers import METHOD, STAGE
from snug.core.sections import SECTIONS, Config
from snug.errors import ConfigError

# Names other fine-tuning tools give these keys (Hugging Face TrainingArguments, PEFT,
# LLaMA-Factory), for the suggestion when one of them is used here.
ALIASES = {
    "learning_rate": "lr",
    "lr_scheduler_type": "scheduler",
    "warmup_ratio": "warmup",
    "warmup_steps": "warmup",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch",
    "batch_size": "micro_batch",
    "gradient_accumulation_steps": "grad_accum",
    "max_steps": "max_steps",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "save_total_limit": "keep_last",
    "output_dir": "dir",
    "model_name_or_path": "name_or_path",
    "gradient_checkpointing": "grad_checkpointing",
    "lora_rank": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target": "targets",
    "target_modules": "targets",
    "finetuning_type": "name",
    "dataset": "train",
    "template": "template",
    "cutoff": "cutoff_len",
    "max_length": "cutoff_len",
    "max_seq_length": "cutoff_len",
    "optim": "optimizer",
    "bf16": "precision",
    "fp16": "precision",
}


def section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def user_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _every_key() -> dict[str, list[str]]:
    """Each key of a config -> the sections that declare it: snug's own sections, every
    method's keys (method:) and every stage's (its own section)."""
    places: dict[str, list[str]] = {}
    found = [(name, list(user_fields(cls))) for name, cls in section_types().items()]
    found.append(("method", list(METHOD.owners("method"))))
    found += [(place, list(STAGE.owners(place))) for place in STAGE.sections()]
    for section, keys in found:
        for key in keys:
            if section not in places.setdefault(key, []):
                places[key].append(section)
    return places


def placed_elsewhere(word: str, besides: str = "") -> str:
    """'a.k' (or 'a.k' or 'b.k') for a key of another section than `besides` named `word`, by
    its own name or another tool's (ALIASES), "" where none is."""
    places = _every_key()
    for key in (word, ALIASES.get(word)):
        found = [f"'{section}.{key}'" for section in places.get(key, []) if section != besides]
        if found:
            return " or ".join(found)
    return ""


def nearest(word: str, choices: list[str]) -> str:
    """'; did you mean X?' for the choice that shares most of the key's own words (its parts
    between underscores), then the closest spelling; else the valid keys."""
    if ALIASES.get(word) in choices:
        return f"; did you mean '{ALIASES[word]}'?"
    words = set(word.lower().split("_"))

    def score(choice: str) -> tuple[int, float]:
        shared = len(words & set(choice.split("_")))
        return shared, difflib.SequenceMatcher(None, word.lower(), choice).ratio()

    best = max(choices, key=score)
    shared, ratio = score(best)
    if shared or ratio >= 0.6:
        return f"; did you mean '{best}'?"
    return f"; valid keys: {', '.join(choices)}."


def unknown_key(where: str, section: str, key: str, choices: list[str]) -> ConfigError:
    """An unknown key: the stage section that declares it, when one does (`data.label_column`:
    `cls.label_column`; `train.cls_head`: `cls.head`), else the nearest of `choices`."""
    for place, owners in ((p, STAGE.owners(p)) for p in STAGE.sections() if p != section):
        for name in (key, key.removeprefix(f"{place}_")):
            if name in owners:
                return ConfigError(
                    f"{where}: unknown key '{section}.{key}'; did you mean '{place}.{name}' "
                    f"(a key of {STAGE.path}={', '.join(owners[name])})?"
                )
    elsewhere = "" if ALIASES.get(key) in choices else placed_elsewhere(key, section)
    hint = f"; did you mean {elsewhere}?" if elsewhere else nearest(key, choices)
    return ConfigError(f"{where}: unknown key '{section}.{key}'" + hint)
