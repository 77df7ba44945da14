"""What a fine-tuning method is: the `Method` record a method module declares and registers
(snug/core/registry.py), with the peft helpers most methods share. Imports nothing of snug's
but the bottom layer; torch and peft are imported inside the helpers that need them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn


def save_pretrained(model: nn.Module, path: Path) -> None:
    """peft adapters (adapter_config.json + adapter_model.safetensors) or a whole HF model."""
    model.save_pretrained(str(path))


def load_peft(base: nn.Module, path: Path) -> nn.Module:
    """base + a saved peft adapter: the one place a peft adapter is loaded (safetensors only)."""
    from peft import PeftModel

    if not (Path(path) / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, a pickle: snug loads safetensors only
        raise ValueError(f"{path}: no adapter_model.safetensors (snug loads safetensors only).")
    return PeftModel.from_pretrained(base, str(path))


def peft_task(model: nn.Module) -> str:
    """peft's task type for the model: classifiers get their head trained and saved too."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


@dataclass(frozen=True)
class TrainedLayers:
    """Which decoder layers a method trains or adapts, as the planner's replay needs it
    (snug/plan/simulate.py): the top `top` layers differ from a plain frozen layer, each one
    below is alike, so two short replays (top+1 and top+2 layers) extend to the whole depth."""

    top: int
    # The layers are picked by name (patterns) and may be any: the whole depth is replayed.
    anywhere: bool = False


def every_layer_alike(cfg: Any) -> TrainedLayers | None:
    """The default `Method.trained_layers`: every decoder layer trains or is adapted alike."""
    return None


def one_group(model: nn.Module, cfg: Any, lr: float, weight_decay: float) -> list[dict]:
    """The default `Method.param_groups`: every trainable weight in one group, at train.lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "lr": lr, "weight_decay": weight_decay}]


def no_search_label(cfg: Any) -> str:
    """The default `Method.search_label`: a candidate is named by its method alone."""
    return ""


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[nn.Module, Any], nn.Module]  # (base model, MethodConfig) -> model to train
    output: Literal["adapter", "model"]  # written to output.dir/adapter/ or output.dir/model/
    mergeable: bool
    save: Callable[[nn.Module, Path], None] = save_pretrained
    load: Callable[[nn.Module, Path], nn.Module] = load_peft  # base + saved adapter -> model
    # Called by the loop before optimizer step `step` (0-based), for methods whose trainable
    # set changes during training (freeze with progressive unfreezing).
    before_step: Callable[[nn.Module, Any, int], None] | None = None
    # Why `snug merge` cannot fold this method into the base (shown to the user); "" if it can.
    unmergeable_because: str = ""
    # The peft_type its adapter_config.json names (None: not saved by peft), and the key of
    # that file that tells it from another method of the same peft_type (dora: use_dora).
    peft_type: str | None = None
    peft_flag: str | None = None
    # peft's tuner: adapters of the same tuner can share one PeftModel in `snug chat`.
    tuner: str | None = None
    # Adds virtual tokens or prefixes (one set per row): it cannot pack samples.
    virtual_tokens: bool = False
    # Trained and tested under dist.strategy ddp and fsdp.
    shardable: bool = False
    # Why it cannot train under gradient checkpointing ("" if it can).
    no_checkpointing_because: str = ""
    # Why it cannot train a classifier stage such as train.stage=cls ("" if it can).
    no_classifier_because: str = ""
    # The planner: its rank when the search recommends among fitting candidates (lower is
    # better; from benchmarks/results/methods-2026-11-25.md), whether a search without
    # --method tries it, and the quantized bases it is also tried on: (search label,
    # model.quant, rank).
    quality: int = 100
    searched: bool = True
    quantized: tuple[tuple[str, str, int], ...] = ()
    # Keys of its own in the `method:` section: a dataclass whose fields are declared with
    # snug.core.settings.setting (default, doc, check); validated and documented with the others,
    # read in `apply` as `cfg.own` (None: no keys of its own).
    settings: type | None = None
    # Checks across sections for this method (e.g. freeze's head-only needs a classifier
    # stage): (config, its source for the error) -> raises snug.errors.ConfigError.
    check: Callable[[Any, str], None] | None = None
    # Checks a saved adapter before anything is allocated from it (snug/methods/saved.py):
    # (adapter directory, the base's config.json as a dict, {} when unknown) -> raises
    # snug.errors.UserError naming the file and key where the config's numbers disagree with
    # its weights' shapes (read from the header) or with the base.
    check_saved: Callable[[Path, dict], None] | None = None
    # Checks its keys against the model before anything is tokenized or loaded (lora:
    # method.targets names modules the model has): (the base model as the stage builds it, on
    # the meta device: names and shapes, no weights; the method section) -> raises
    # snug.errors.ConfigError naming the key. Called by `snug train` and `snug plan`.
    check_model: Callable[[nn.Module, Any], None] | None = None
    # Hooks the core calls instead of reading this method's keys; each gets the method
    # section (cfg.method) and has a default. Which decoder layers train, for the planner's
    # replay depth (None: every layer alike):
    trained_layers: Callable[[Any], TrainedLayers | None] = every_layer_alike
    # The optimizer's parameter groups: (the model after `apply`, method section, train.lr,
    # train.weight_decay) -> torch parameter groups (dicts with "params" and any of "lr",
    # "weight_decay", ...), every trainable weight in exactly one (LoRA+: the B matrices at a
    # higher lr). The optimizer takes train.lr and train.weight_decay for a group naming none;
    # the log's `lr` is the first group's (so put the group at train.lr first).
    param_groups: Callable[[nn.Module, Any, float, float], list[dict]] = one_group
    # What a planner candidate's name adds after the method's (lora: its rank, "r8"; "":
    # nothing), so that candidates of one method with different keys are told apart.
    search_label: Callable[[Any], str] = no_search_label

    def own(self, cfg: Any) -> Any:
        """This method's own settings in `cfg`, the method section (snug.core.sections.MethodConfig,
        not named here: it names the methods) (their defaults when the config has none)."""
        return cfg.own if cfg.own is not None else self.settings()
