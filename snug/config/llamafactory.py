"""A LLaMA-Factory config (its flat YAML, or `llamafactory-cli train`'s flags) read as a snug
config: `snug train lf.yaml`, `snug train --stage sft --dataset a,b ...` and `snug convert`.

The keys and what each becomes are in llamafactory_keys.py; this module walks a config through
them; reading files and flags and writing the YAML is llamafactory_io.py's. Paths are read as LLaMA-Factory reads them, from the current directory, and written
absolute. Pure Python, no torch: it runs before the config is checked.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snug.config.llamafactory_keys import (
    ATTENTION,
    DATA_IF_DECLARED,
    OPTIMIZERS,
    REFUSED_UNLESS_DEFAULT,
    SCHEDULERS,
    SET_ASIDE,
    TEMPLATES,
)
from snug.core.sections import SECTIONS, Config
from snug.errors import ConfigError

# Keys only a LLaMA-Factory config has at its top level (a snug config has sections there).
MARKERS = ("model_name_or_path", "stage", "finetuning_type", "dataset", "output_dir", "do_train")


def is_llamafactory(raw: Any) -> bool:
    """Whether a YAML document is a LLaMA-Factory config: flat keys, one of them its own."""
    return isinstance(raw, dict) and any(k in raw for k in MARKERS) and not set(raw) & set(SECTIONS)


@dataclass
class Converted:
    """A LLaMA-Factory config as snug sections, with where each key came from."""

    source: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # 'section.key' -> line in the file
    origin: dict[str, str] = field(default_factory=dict)  # 'section.key' -> LLaMA-Factory key(s)
    set_aside: list[str] = field(default_factory=list)  # 'key (why)'
    said: list[str] = field(default_factory=list)  # lines to print before running


class _Walk:
    """One conversion: the keys not yet read, and what they became."""

    def __init__(
        self, raw: dict[str, Any], source: str, cwd: Path, gpu: bool, lines: dict[str, int]
    ) -> None:
        self.left, self.lines = dict(raw), lines
        self.cwd, self.gpu = cwd, gpu
        self.out = Converted(source)
        self.written = {k for k, v in raw.items() if v is not None}  # keys the config gives
        self.refused: list[str] = []

    def take(self, key: str, default: Any = None) -> Any:
        value = self.left.pop(key, None)
        return default if value is None else value

    def given(self, *keys: str) -> bool:
        return any(self.left.get(k) is not None for k in keys)

    def set(self, path: str, value: Any, *keys: str, note: str = "") -> None:
        """`path` ('section.key') gets `value`, converted from `keys` (the first is the one a
        default stands for); `note` replaces the comment that says so."""
        section, key = path.split(".")
        self.out.sections.setdefault(section, {})[key] = value
        given = [k for k in keys if k in self.written]
        if given and given[0] in self.lines:
            self.out.lines[path] = self.lines[given[0]]
        self.out.origin[path] = note or (
            f"from {', '.join(given)}" if given else f"LLaMA-Factory's default ({keys[0]})"
        )

    def refuse(self, key: str, why: str) -> None:
        self.refused.append(f"{key} ({why})")

    def path(self, value: str) -> str:
        """A path as LLaMA-Factory reads it (from the current directory), absolute."""
        return os.path.normpath(self.cwd / Path(value).expanduser())


def _comma_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def _model(w: _Walk) -> None:
    name = w.take("model_name_or_path")
    if name is None:
        w.refuse("model_name_or_path", "missing: name the base model")
    else:
        local = (w.cwd / Path(str(name)).expanduser()).exists()
        w.set("model.name_or_path", w.path(name) if local else str(name), "model_name_or_path")
    if w.given("trust_remote_code"):
        w.set("model.trust_remote_code", w.take("trust_remote_code"), "trust_remote_code")
    revision = w.take("model_revision", "main")
    if revision != "main":
        w.set("model.revision", revision, "model_revision")
    bits = w.take("quantization_bit")
    if bits is not None:
        if int(bits) in (4, 8):
            w.set("model.quant", f"{int(bits)}bit", "quantization_bit")
        else:
            w.refuse("quantization_bit", "snug quantizes to 4 or 8 bits (model.quant)")
    attn = w.take("flash_attn", "auto")
    if attn in ATTENTION:
        w.set("model.attn", ATTENTION[attn], "flash_attn")
    else:
        w.refuse("flash_attn", f"one of {', '.join(ATTENTION)}")
    if w.given("disable_gradient_checkpointing"):
        off = _flag(w.take("disable_gradient_checkpointing"))
        w.set("memory.grad_checkpointing", not off, "disable_gradient_checkpointing")


def _method(w: _Walk) -> None:
    kind = w.take("finetuning_type", "lora")
    dora = _flag(w.take("use_dora", False))
    if kind == "lora":
        w.set("method.name", "dora" if dora else "lora", "finetuning_type", "use_dora")
        rank = int(w.take("lora_rank", 8))
        w.set("method.r", rank, "lora_rank")
        # LLaMA-Factory: lora_alpha defaults to twice the rank
        alpha = w.take("lora_alpha")
        note = "" if alpha is not None else "lora_alpha unset: 2 x lora_rank, as LLaMA-Factory"
        w.set("method.alpha", alpha or 2 * rank, "lora_alpha", note=note)
        w.set("method.dropout", w.take("lora_dropout", 0.0), "lora_dropout")
        targets = _comma_list(w.take("lora_target", "all"))
        w.set("method.targets", "all-linear" if targets == ["all"] else targets, "lora_target")
        if _flag(w.take("use_rslora", False)):
            w.set("method.rslora", True, "use_rslora")
        if w.given("loraplus_lr_ratio"):
            w.set("method.lora_plus_ratio", w.take("loraplus_lr_ratio"), "loraplus_lr_ratio")
    elif kind == "freeze":
        w.set("method.name", "freeze", "finetuning_type")
        layers = int(w.take("freeze_trainable_layers", 2))
        if layers < 0:
            w.refuse("freeze_trainable_layers", "snug trains the last N layers: give N >= 0")
        w.set("method.trainable_layers", abs(layers), "freeze_trainable_layers")
        if w.given("freeze_extra_modules"):
            extra = _comma_list(w.take("freeze_extra_modules"))
            w.set("method.extra_modules", extra, "freeze_extra_modules")
    elif kind == "full":
        w.set("method.name", "full", "finetuning_type")
    else:
        w.refuse("finetuning_type", "snug has lora, freeze and full (and more: method.name)")
    if dora and kind != "lora":
        w.refuse("use_dora", "DoRA needs finetuning_type lora")


def _preference(w: _Walk, stage: str) -> None:
    """dpo (with pref_loss sigmoid, hinge, ipo, orpo or simpo) and kto, keys in `pref`."""
    beta, ftx = w.take("pref_beta", 0.1), w.take("pref_ftx", 0.0)
    smoothing = w.take("dpo_label_smoothing", 0.0)
    loss = w.take("pref_loss", "sigmoid") if stage == "dpo" else "kto"
    chosen = {"sigmoid": "dpo", "hinge": "dpo", "ipo": "dpo"}.get(loss, loss)
    if chosen not in ("dpo", "orpo", "simpo", "kto"):
        w.refuse("pref_loss", "snug's preference losses: sigmoid, hinge, ipo, orpo, simpo")
        return
    w.set("train.stage", chosen, "stage", "pref_loss")
    w.set("pref.beta", beta, "pref_beta")
    if chosen == "dpo":
        w.set("pref.loss", loss, "pref_loss")
    if chosen == "simpo":
        w.set("pref.gamma", w.take("simpo_gamma", 0.5), "simpo_gamma")
    if chosen == "kto":
        w.set("pref.desirable_weight", w.take("kto_chosen_weight", 1.0), "kto_chosen_weight")
        w.set("pref.undesirable_weight", w.take("kto_rejected_weight", 1.0), "kto_rejected_weight")
    if ftx:
        if chosen in ("dpo", "simpo"):
            w.set("pref.ftx", ftx, "pref_ftx")
        else:
            w.refuse("pref_ftx", f"snug's {chosen} has no added SFT loss")
    if smoothing:
        if chosen in ("dpo", "simpo"):
            w.set("pref.label_smoothing", smoothing, "dpo_label_smoothing")
        else:
            w.refuse("dpo_label_smoothing", f"snug's {chosen} has no label smoothing")


def _stage(w: _Walk) -> str:
    stage = w.take("stage", "sft")
    if stage in ("sft", "pt"):
        w.set("train.stage", stage, "stage")
    elif stage in ("dpo", "kto"):
        _preference(w, stage)
    else:
        w.refuse("stage", "snug's stages are sft, pt, dpo, kto (and orpo, simpo: pref_loss)")
    return stage


def _declared(path: str) -> bool:
    """Whether this snug declares the key `section.key` (some data keys come with other work)."""
    section, key = path.split(".")
    return key in {f.name for f in dataclasses.fields(typing.get_type_hints(Config)[section])}


def _data(w: _Walk, stage: str) -> None:
    names = w.take("dataset")
    if names is None:
        w.refuse("dataset", "missing: name the training data")
    else:
        w.set("data.train", _data_names(w, names), "dataset")
    if w.given("eval_dataset"):
        w.set("data.eval", _data_names(w, w.take("eval_dataset")), "eval_dataset")
    template = w.take("template")
    if template is not None:
        w.set("data.template", TEMPLATES.get(template, template), "template")
    w.set("data.cutoff_len", w.take("cutoff_len", 2048), "cutoff_len")
    for key in ("train_on_prompt", "val_size", "max_samples"):
        if w.given(key):
            w.set(f"data.{key}", w.take(key), key)
    neat = _flag(w.take("neat_packing", False))
    packing = w.take("packing")
    packing = (stage == "pt" or neat) if packing is None else _flag(packing)
    w.set("data.packing", packing, "packing", "neat_packing")
    if packing and not neat:
        w.out.said.append(
            "packing: snug packs samples with attention kept within each one (LLaMA-Factory's "
            "neat_packing); the loss equals the unpacked one."
        )
    for key, (path, default) in DATA_IF_DECLARED.items():
        given = w.given(key)
        if not _declared(path) and key in SET_ASIDE:
            continue  # set aside with the others, saying why
        value = w.take(key, default)
        if _declared(path):
            if key == "dataset_dir" and (given or (w.cwd / value).is_dir()):
                w.set(path, w.path(value), key)  # LLaMA-Factory reads ./data by default
            elif given:
                w.set(path, value, key)
        elif value != default:
            w.refuse(key, f"snug has no {path} yet")


def _data_names(w: _Walk, value: Any) -> str | list[str]:
    """Dataset names as they are (the dataset_info.json registry resolves them); a name that
    is a file or folder of the current directory, made absolute."""
    names = [w.path(n) if (w.cwd / n).exists() else n for n in _comma_list(value)]
    return names[0] if len(names) == 1 else names


def _precision(w: _Walk) -> None:
    bf16, fp16 = _flag(w.take("bf16", False)), _flag(w.take("fp16", False))
    pure = _flag(w.take("pure_bf16", False))
    if fp16 and (bf16 or pure):
        w.refuse("fp16", "it cannot be used with bf16 or pure_bf16: choose one")
        return
    wanted = "bf16-true" if pure else "bf16-mixed" if bf16 else "fp16-mixed" if fp16 else None
    if wanted is None:
        return
    given = "pure_bf16" if pure else "bf16" if bf16 else "fp16"
    if not w.gpu:
        w.out.said.append(
            f"{given}: no CUDA GPU is visible here and {wanted} needs one, so this runs with "
            f"train.precision=auto (fp32 on the CPU); on a GPU, train.precision={wanted}."
        )
        w.set("train.precision", "auto", given, note=f"from {given}: no GPU visible here")
        return
    w.set("train.precision", wanted, given)


def _steps(value: Any, key: str, w: _Walk) -> int | None:
    """A Hugging Face step count; below 1 it is a share of the run, which snug has not."""
    value = float(value)
    if 0 < value < 1:
        w.refuse(key, "give a whole number of steps")
        return None
    return int(value)


def _train(w: _Walk) -> None:
    if not _flag(w.take("do_train", True)):
        w.refuse("do_train", "snug train trains: set it true or leave it out; snug eval evaluates")
    w.set("train.lr", w.take("learning_rate", 5e-5), "learning_rate")
    w.set("train.epochs", w.take("num_train_epochs", 3.0), "num_train_epochs")
    max_steps = int(w.take("max_steps", -1))
    if max_steps > 0:
        w.set("train.max_steps", max_steps, "max_steps")
    w.set(
        "train.micro_batch", w.take("per_device_train_batch_size", 8), "per_device_train_batch_size"
    )
    w.set(
        "train.grad_accum", w.take("gradient_accumulation_steps", 1), "gradient_accumulation_steps"
    )
    scheduler = w.take("lr_scheduler_type", "linear")
    if scheduler in SCHEDULERS:
        w.set("train.scheduler", SCHEDULERS[scheduler], "lr_scheduler_type")
    else:
        w.refuse("lr_scheduler_type", f"snug's schedules: {', '.join(SCHEDULERS)}")
    steps, ratio = float(w.take("warmup_steps", 0)), float(w.take("warmup_ratio", 0.0))
    # Hugging Face: warmup_steps, when above 0, wins over warmup_ratio
    warmup = int(steps) if steps >= 1 else ratio
    w.set("train.warmup", warmup, "warmup_steps" if steps >= 1 else "warmup_ratio")
    for key, snug in (("weight_decay", "weight_decay"), ("max_grad_norm", "max_grad_norm")):
        if w.given(key):
            w.set(f"train.{snug}", w.take(key), key)
    if w.given("seed"):
        w.set("train.seed", w.take("seed"), "seed")
    optim = w.take("optim", "adamw_torch")
    if optim in OPTIMIZERS:
        w.set("memory.optimizer", OPTIMIZERS[optim], "optim")
    else:
        w.refuse("optim", f"snug's optimizers: {', '.join(OPTIMIZERS)}")
    if w.given("gradient_checkpointing"):
        w.set(
            "memory.grad_checkpointing",
            _flag(w.take("gradient_checkpointing")),
            "gradient_checkpointing",
        )
    _precision(w)
    if not _flag(w.take("predict_with_generate", False)):  # LLaMA-Factory scores by loss only
        w.set("train.eval_generate", 0, "predict_with_generate")
    log_every = _steps(w.take("logging_steps", 500), "logging_steps", w)
    if log_every:
        w.set("train.log_every", log_every, "logging_steps")
    strategy = w.take("eval_strategy") or w.take("evaluation_strategy") or "no"
    eval_steps = w.take("eval_steps")
    if strategy == "steps":
        every = _steps(eval_steps if eval_steps is not None else log_every or 500, "eval_steps", w)
        if every:
            w.set("train.eval_every", every, "eval_steps", "eval_strategy")
    elif strategy != "no":
        w.refuse("eval_strategy", "snug evaluates every N steps: eval_strategy steps")


def _output(w: _Walk) -> None:
    w.set("output.dir", w.path(w.take("output_dir", "trainer_output")), "output_dir")
    strategy = w.take("save_strategy", "steps")
    save_steps = w.take("save_steps", 500)
    if strategy == "steps":
        every = _steps(save_steps, "save_steps", w)
        if every:
            w.set("output.save_every", every, "save_steps")
    elif strategy != "no":
        w.refuse("save_strategy", "snug saves every N steps: save_strategy steps")
    # Hugging Face keeps every checkpoint unless save_total_limit is set; snug: keep_last 0
    w.set("output.keep_last", w.take("save_total_limit", 0), "save_total_limit")
    w.set("output.plot_loss", _flag(w.take("plot_loss", False)), "plot_loss")
    if _flag(w.take("load_best_model_at_end", False)):
        _keep_best(w)
    resume = w.take("resume_from_checkpoint")
    if resume is not None and resume is not False:
        w.refuse("resume_from_checkpoint", "snug resumes output.dir's newest checkpoint itself")


def _keep_best(w: _Walk) -> None:
    """load_best_model_at_end: snug keeps the best by held-out loss (Hugging Face's default
    metric, lower is better); another metric is refused."""
    metric = w.take("metric_for_best_model", "loss")
    if str(metric).removeprefix("eval_") != "loss":
        w.refuse(
            "metric_for_best_model",
            f"snug keeps the best checkpoint by eval_loss, not {metric}: set "
            "metric_for_best_model: eval_loss or remove it",
        )
    if w.given("greater_is_better") and _flag(w.take("greater_is_better")):
        w.refuse("greater_is_better", "a lower eval_loss is better: remove it")
    w.set("output.keep_best", True, "load_best_model_at_end", "metric_for_best_model")


def _leftovers(w: _Walk) -> None:
    for key, value in w.left.items():
        if key in REFUSED_UNLESS_DEFAULT:
            default, instead = REFUSED_UNLESS_DEFAULT[key]
            if value is None or value == default or str(value).lower() == str(default).lower():
                continue
            w.refuse(key, instead)
        elif key in SET_ASIDE:
            w.out.set_aside.append(f"{key} ({SET_ASIDE[key]})")
        else:
            w.refuse(key, "not a LLaMA-Factory key snug knows")


def convert(
    raw: dict[str, Any], source: str, cwd: Path, gpu: bool, lines: dict[str, int] | None = None
) -> Converted:
    """`raw` (a LLaMA-Factory config's keys) as snug sections; one ConfigError lists every key
    snug cannot honour."""
    w = _Walk(raw, source, cwd, gpu, lines or {})
    _model(w)
    _method(w)
    stage = _stage(w)
    _data(w, stage)
    _train(w)
    _output(w)
    _leftovers(w)
    if w.refused:
        raise ConfigError(
            f"{source}: snug cannot honour these LLaMA-Factory keys: {'; '.join(w.refused)}; "
            "change or remove them and run again."
        )
    if w.out.set_aside:
        w.out.said.append("set aside (no effect on what is learnt): " + "; ".join(w.out.set_aside))
    return w.out
