"""What a config holds: one small dataclass per section, and `Config`, the whole run.

The `doc` of every field is what `--help` and the README's config reference show; reading,
checking and writing a config is snug/config/build.py's (which re-exports these names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from snug.core.registry import get_method, methods, stages
from snug.core.settings import AT_LEAST_1, NON_NEGATIVE, POSITIVE
from snug.core.settings import setting as _f

# data.train and data.eval: a path, an id or a list of them; never nothing ([] or "")
SOME_DATA = (lambda v: len(v) > 0, "a file, directory or hub dataset id, or a list of them")


@dataclass(init=False)
class MethodConfig:
    """The fine-tuning method; each method's own keys follow."""

    # Each method declares its own keys (`Method.settings`), which sit flat beside `name` in
    # the `method:` section and are read as attributes of this section (`cfg.method.r`) or as
    # `cfg.method.own`; a key of another method is refused, naming the methods it belongs to.
    # In code: `MethodConfig(name="lora", r=4)` (the method's other keys take their defaults).

    name: str = _f(
        "lora",
        "Fine-tuning method (each one a module of snug/methods/).",
        choices=lambda: tuple(methods()),
    )
    # The chosen method's own keys (Method.settings), set when a config is built.
    own: Any = field(default=None, repr=False, metadata={"internal": True})

    def __init__(self, name: str = "lora", own: Any = None, **keys: Any) -> None:
        self.name, self.own = name, own
        settings = _method_or_none(name)
        if own is None and settings is not None:
            self.own = settings(**keys)  # TypeError names a key the method does not declare
        elif keys:
            raise TypeError(f"method {name!r} declares no keys {sorted(keys)} (or give own=)")

    def __getattr__(self, key: str) -> Any:
        # only reached for names that are not fields: the chosen method's own keys
        own = self.__dict__.get("own")
        if key.startswith("__") or own is None or not hasattr(own, key):
            raise AttributeError(
                f"method.{key}: not a key of method.name={self.__dict__.get('name')!r}"
            )
        return getattr(own, key)


def _method_or_none(name: str) -> type | None:
    found = methods()
    return found[name].settings if name in found else None


def with_method(section: MethodConfig, name: str) -> MethodConfig:
    """The method section switched to method `name` (a search trying another method): the own
    keys the two methods share keep their values (a LoRA rank for DoRA), the rest are the new
    method's defaults."""
    settings = _method_or_none(name)
    get_method(name)  # an unknown name: the error that lists the methods
    names = {f.name for f in dataclasses.fields(settings)} if settings else set()
    old = dataclasses.asdict(section.own) if section.own is not None else {}
    return MethodConfig(name=name, **{k: v for k, v in old.items() if k in names})


@dataclass
class ModelConfig:
    """The base model."""

    name_or_path: str = _f("models/tiny", "Local model directory or Hugging Face hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto",
        "Storage dtype of frozen weights. auto: float32 on CPU; on GPU bfloat16 (float16 "
        "where bf16 is unsupported) for adapter methods and float32 for full tuning.",
    )
    attn: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _f(
        "auto", "Attention kernel. auto: flash_attention_2 when installed and on GPU, else sdpa."
    )
    quant: Literal["none", "4bit", "8bit"] = _f(
        "none", "Load frozen base weights quantized by bitsandbytes (4bit = NF4 + double quant)."
    )
    trust_remote_code: bool = _f(
        False, "Run model code shipped with a hub model. Off unless you trust its author."
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to load.")


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train: str | list[str] = _f(
        "data/train.jsonl",
        "Training data: a file (json, jsonl, csv, parquet, arrow), a directory, a hub dataset "
        "id, a dataset named in dataset_dir's dataset_info.json, or a list of these to mix.",
        SOME_DATA,
    )
    eval: str | list[str] | None = _f(None, "Held-out data, in the same forms as train.", SOME_DATA)
    dataset_dir: str | None = _f(
        None,
        "A folder with LLaMA-Factory's dataset_info.json: train and eval may then name its "
        "datasets, each read with its own formatting, columns and tags.",
    )
    mix: Literal["concat", "interleave", "interleave_over"] = _f(
        "concat",
        "How several train sources mix: concat (all of each); interleave (sample by sample, "
        "by mix_probs, until the first source runs out); interleave_over (until every source "
        "has run out, repeating the shorter ones).",
    )
    mix_probs: list[float] | None = _f(
        None,
        "With interleave: the chance of each train source, in order (summing to 1); unset: "
        "equal chances.",
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = _f(
        "auto", "Record format; auto detects it from the first record's keys."
    )
    template: str = _f(
        "auto",
        "Chat template: auto (the tokenizer's own, else an error), or a built-in one by "
        "LLaMA-Factory's name: chatml, yi, qwen, qwen3, qwen3_nothink, llama2, llama3, mistral, "
        "gemma, gemma2, gemma3, phi (or phi3), phi4, deepseekr1, alpaca, default.",
    )
    cutoff_len: int = _f(
        1024,
        "Longest sample in tokens; longer ones are truncated.",
        (lambda v: v >= 8, "at least 8 tokens"),
    )
    packing: bool = _f(
        False,
        "Pack several samples into rows of up to cutoff_len tokens, attention kept within each "
        "sample; the loss equals the unpacked one.",
    )
    group_by_length: bool = _f(
        False, "Put samples (or packed rows) of similar length in the same micro-batch."
    )
    val_size: float = _f(
        0.0,
        "Part of train held out for eval: a fraction below 1, or a count of samples.",
        (
            lambda v: 0 <= v < 1 or (v >= 1 and float(v).is_integer()),
            "a fraction from 0 to below 1, or a whole count of samples",
        ),
    )
    max_samples: int | None = _f(None, "Use at most this many samples of each dataset.", AT_LEAST_1)
    train_on_prompt: bool = _f(False, "Also compute the loss on prompt tokens.")
    mask_history: bool = _f(
        False,
        "Train only the last assistant turn of each conversation; the earlier answers are "
        "context, masked like prompts (LLaMA-Factory's mask_history).",
    )
    default_system: str | None = _f(
        None,
        "System prompt given to records that have none (LLaMA-Factory's template "
        "default_system); null: none.",
    )
    split: str = _f("train", "Split to read from a hub dataset.")
    num_proc: int | None = _f(
        None,
        "Processes that tokenize (LLaMA-Factory's preprocessing_num_workers), never more "
        "than the usable cores; 1: in this process; null: one per 1,000 records, at most 8 "
        "(fewer records gain less than a process takes to start).",
        AT_LEAST_1,
    )
    on_error: Literal["strict", "skip"] = _f(
        "strict",
        "A malformed record (bad JSON line, missing or mistyped field, empty sample, roles out "
        "of order, no label left after truncation): strict stops at preprocessing naming file, "
        "line or row and field; skip drops it and lists it in summary.json.",
    )


@dataclass
class TrainConfig:
    """The training loop."""

    stage: str = _f(
        "sft",
        "What is learnt: one of the registered stages (snug's own in snug/stages/, and the "
        "plug-ins'), listed below with what each learns and the section of its own keys.",
        choices=lambda: tuple(stages()),
    )
    epochs: float = _f(3, "Passes over the training data.", POSITIVE)
    max_steps: int | None = _f(
        None, "Stop after this many optimizer steps (overrides epochs).", AT_LEAST_1
    )
    micro_batch: int = _f(1, "Samples per forward/backward pass.", AT_LEAST_1)
    grad_accum: int = _f(8, "Micro-batches accumulated per optimizer step.", AT_LEAST_1)
    lr: float = _f(1.0e-4, "Peak learning rate.", POSITIVE)
    weight_decay: float = _f(0.0, "AdamW weight decay.", NON_NEGATIVE)
    scheduler: Literal["cosine", "linear", "constant"] = _f(
        "cosine", "Learning-rate schedule after warmup."
    )
    warmup: float = _f(
        0.03,
        "Warmup as a ratio of total steps (or a step count if >= 1).",
        (
            lambda v: 0 <= v < 1 or (v >= 1 and float(v).is_integer()),
            "a ratio of the steps from 0 to below 1, or a whole number of steps",
        ),
    )
    max_grad_norm: float = _f(
        1.0, "Clip the gradient norm to this value (0 turns it off).", NON_NEGATIVE
    )
    precision: Literal["auto", "bf16-mixed", "bf16-true", "fp16-mixed", "fp32"] = _f(
        "auto",
        "Compute precision. auto: bf16-mixed on a GPU with bf16, fp16-mixed on older GPUs, "
        "fp32 on CPU.",
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where to train; auto: cuda if present.")
    seed: int = _f(
        42,
        "Seed for initialisation, shuffling and dropout.",
        (lambda v: 0 <= v < 2**32, "between 0 and 4294967295 (the seeds numpy accepts)"),
    )
    skip_nonfinite: int = _f(
        0,
        "Steps whose loss or gradient norm is NaN/inf that may be skipped (no update) before "
        "the run stops; 0 stops at the first, naming the step and the last good checkpoint.",
        NON_NEGATIVE,
    )
    eval_every: int | None = _f(None, "Evaluate the loss on eval data every N steps.", AT_LEAST_1)
    eval_generate: int = _f(
        200,
        "Held-out samples scored by greedy generation (exact match) before and after "
        "training; 0 turns it off.",
        NON_NEGATIVE,
    )
    max_new_tokens: int = _f(64, "Longest generated answer when scoring by generation.", AT_LEAST_1)
    log_every: int = _f(10, "Log metrics every N optimizer steps.", AT_LEAST_1)


@dataclass
class MemoryConfig:
    """Memory-saving techniques."""

    grad_checkpointing: bool = _f(
        True, "Recompute each decoder layer's activations in backward instead of storing them."
    )
    offload_activations: bool = _f(
        False,
        "Keep activations in host memory until backward: each checkpointed layer's input (pinned, "
        "copied on a side stream on CUDA) and every other tensor saved for backward.",
    )
    offload_weights: bool = _f(
        False,
        "Keep the frozen weights of the decoder layers in host memory (pinned on CUDA) and "
        "stream each layer to the device for its forward, recomputation and backward, the next "
        "one copied while the current one computes; needs a method that leaves the base "
        "frozen (and grad_checkpointing with a quantized base).",
    )
    chunked_loss: bool = _f(
        True,
        "Compute the LM head and cross-entropy over chunks of positions that carry loss only, "
        "so the full fp32 logits never exist at once.",
    )
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "adafactor", "lion8bit"] = _f(
        "adamw", "Optimizer; the 8-bit ones come from bitsandbytes."
    )
    gpu: str | None = _f(None, 'GPU budget for plan / auto_fit, e.g. "RTX 4090" or "24GiB".')
    auto_fit: bool = _f(
        False,
        "Before training, adopt the fastest micro-batch, checkpointing, offload and optimizer "
        "that fit memory.gpu (else the device), keeping the method and effective batch.",
    )


@dataclass
class DistConfig:
    """Multi-GPU training."""

    strategy: Literal["none", "ddp", "fsdp"] = _f(
        "none",
        "How to spread training over processes: ddp replicates the model, fsdp shards "
        "parameters, gradients and optimizer state (PyTorch FSDP2, one unit per decoder layer).",
    )
    nproc: int = _f(
        1, "Processes (GPUs) on this node; above 1, snug train starts torchrun itself.", AT_LEAST_1
    )
    reshard_after_forward: bool = _f(
        True,
        "fsdp: free gathered layers after forward (ZeRO-3 like); false keeps them until backward "
        "(ZeRO-2 like: more memory, less communication).",
    )
    cpu_offload: bool = _f(False, "fsdp: keep parameter shards and optimizer state on the host.")
    reduce_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32",
        "fsdp under bf16-/fp16-mixed: dtype gradients are reduce-scattered in (float32 is exact "
        "to rounding; a half type halves the traffic).",
    )

    @property
    def processes(self) -> int:
        """How many processes share each step: nproc under ddp/fsdp, else 1."""
        return self.nproc if self.strategy != "none" else 1


@dataclass
class OutputConfig:
    """What a run writes."""

    dir: str = _f("runs/example", "Output directory of the run.")
    save_every: int | None = _f(None, "Write a checkpoint every N optimizer steps.", AT_LEAST_1)
    keep_last: int = _f(
        2, "Checkpoints to keep; older ones are deleted once a new one is complete.", NON_NEGATIVE
    )
    keep_best: bool = _f(
        False,
        "End with the weights of the lowest held-out loss seen at train.eval_every (Hugging "
        "Face's load_best_model_at_end by eval_loss): each new lowest is checkpointed, never "
        "deleted by keep_last, and becomes adapter/ or model/; needs eval data and "
        "train.eval_every.",
    )
    plot_loss: bool = _f(True, "Write loss.png at the end.")


@dataclass
class StageSection:
    """The chosen stage's own keys (Stage.settings), which live in a config section the stage
    names (Stage.section: `pref` for dpo, orpo, simpo and kto, `cls` for cls); set when a
    config is built, read as `stage.own(cfg)`."""

    name: str = ""  # the section's name in a config ("" for a stage without keys)
    own: Any = None  # the stage's settings (None: its defaults, or a stage without keys)


@dataclass
class Config:
    """A whole snug run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Not one of the sections above: the chosen stage's own section, whose name the stage gives
    # (snug/config/build.py builds it; to_dict writes it after `train`).
    stage_section: StageSection = field(default_factory=StageSection, metadata={"internal": True})
    # Not a section: for each path made absolute, what the user wrote and where
    # ('section.key' -> text); save_config writes it beside the absolute path.
    given_paths: dict[str, str] = field(
        default_factory=dict, repr=False, compare=False, metadata={"internal": True}
    )
    # Not a section: the lines saying which of the config file's keys were set aside because
    # the command line chose another method or stage (snug/config/switch.py); the command prints them.
    set_aside: list[str] = field(
        default_factory=list, repr=False, compare=False, metadata={"internal": True}
    )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Each section's keys and values, flat (a method's own keys beside the shared ones),
        and the chosen stage's section after `train` when it has one."""
        out = {}
        for name in SECTIONS:
            section = getattr(self, name)
            keys = {
                f.name: dataclasses.asdict(section)[f.name]
                for f in dataclasses.fields(section)
                if not f.metadata.get("internal")
            }
            own = section.own if name == "method" else None
            out[name] = {**keys, **(dataclasses.asdict(own) if own is not None else {})}
            stage = self.stage_section
            if name == "train" and stage.own is not None:
                out[stage.name] = dataclasses.asdict(stage.own)
        return out


SECTIONS: dict[str, type] = {
    f.name: f.type  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if not f.metadata.get("internal")
}
# Keys holding paths, and whether a value may instead be a hub id of a model or a dataset.
PATH_KEYS: dict[str, str | None] = {
    "model.name_or_path": "model",
    "data.dataset_dir": None,  # before train and eval, whose names it registers
    "data.train": "dataset",
    "data.eval": "dataset",
    "output.dir": None,
}
