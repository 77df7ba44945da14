"""What a training stage is, as the core sees it: the `Stage` protocol. A stage owns everything
that depends on what is being learnt: its own keys (in a config section of its own), the record
formats it reads, tokenization and label masking, collate, the model class it loads, its loss
`(model, batch, reference) -> (summed loss, count, metrics)`, its held-out evaluation and the
fake batch `snug plan` replays. snug/stages/base.py's `BaseStage` implements it for a causal language model
learning next tokens; a stage subclasses that and overrides what differs, then registers one
instance (snug/core/registry.py).

Types only: nothing here runs, and nothing of snug's above the bottom layer is imported."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from torch import nn

    from snug.core.sections import Config, DataConfig

# A source of records (snug.data.dataset.Source: a file, folder or hub id with its format): typed
# loosely here, since the data layer sits above this one.
Source = Any

# (summed loss, its count, metrics summed over the same count): the step divides the loss and
# the metrics by the count of the whole accumulated batch, so each metric is a mean per count.
# The count may be None, meaning `count(batch)`, which the step computes once before the
# micro-batches run: computing it again inside the loss would add a tensor to every replay of
# `snug plan` (12 bytes at the peak of the quickstart plan).
LossOut = tuple["torch.Tensor", "torch.Tensor | None", dict[str, "torch.Tensor"]]


class Stage(Protocol):
    """A training stage (snug/stages/base.py: BaseStage gives every method a default)."""

    name: str = ""
    help: str = ""  # one line for the train.stage reference
    # Keys of its own: a dataclass declared with snug.core.settings.setting, validated and
    # documented with the others, read as `stage.own(cfg)`; None: none.
    settings: type | None = None
    # The config section those keys live in (`pref` for dpo, orpo, simpo and kto; `cls` for cls):
    # only the chosen stage's section is accepted. Stages may share one (their keys are told
    # apart by which stage declares them); snug's own sections (train, data, ...) are not theirs.
    section: str = ""
    # The record formats (data.format) it reads; () when it reads named columns instead.
    formats: tuple[str, ...] = ()
    # What the records must be, for the error when a source holds another format
    # ("<spec>: train.stage=<name> needs <needs> (found <format> records).").
    needs: str = ""
    # Loads a sequence classifier (a new head over Stage.labels) instead of a causal LM.
    classifier: bool = False
    # Why samples cannot be packed into shared rows ("" if they can).
    no_packing_because: str = ""
    # Why `snug merge` / `snug chat` cannot take its result ("" if they can).
    not_a_chat_model_because: str = ""
    # The fewest samples a micro-batch may hold: train.micro_batch below it is refused (saying
    # min_rows_because), the out-of-memory fallback halves no further, and a short last
    # micro-batch of an epoch or of evaluation is filled or joined (kto: 2, for its KL estimate).
    min_rows: int = 1
    min_rows_because: str = ""

    def configured(self, cfg: Config) -> Stage:
        """The stage as the step runs it for `cfg` (a stage whose loss reads settings returns a
        copy holding them); itself by default."""
        ...

    def own(self, cfg: Config | None) -> Any:
        """This stage's own settings in `cfg` (their defaults when cfg sets none of them, is
        None, or is another stage's config); None for a stage without settings."""
        ...

    # -- config -------------------------------------------------------------------------------
    def check(self, cfg: Config, source: str) -> None:
        """Rules between this stage and other sections; raise ConfigError naming the keys."""
        ...

    # -- data ---------------------------------------------------------------------------------
    def labels(self, data: DataConfig, own: Any) -> list[str] | None:
        """The classes a classifier learns, read from the training data as its own settings
        (`own`: Stage.own) say (None: no classes)."""
        ...

    def tokenize(self, source: Source) -> tuple[Dataset, Counter, list[str]]:
        """A source -> its samples, the count of each status, the problems of the dropped."""
        ...

    def collate(self, samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]: ...

    def collate_packed(self, rows: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]: ...

    # -- model --------------------------------------------------------------------------------
    def model_class(self, labels: list[str] | None, pad_id: int | None) -> tuple[type, dict]:
        """The transformers auto class to load the base with, and its extra arguments."""
        ...

    def after_load(self, model: nn.Module, cfg: Config, labels: list[str] | None, device) -> None:
        """Anything to add to the loaded base (a classifier's head) before the method."""
        ...

    def with_reference(
        self,
        ds: Dataset | None,
        model: nn.Module,
        reference: Any,
        opts: Any,
        device,
        batch_rows: int,
        identity: str,
    ) -> Dataset | None:
        """The data with what the reference gives computed into it once before training
        (pref.reference=precompute; `identity` names the base and how it computes, for the
        cache), else as it is."""
        ...

    def frozen_models(self, reference: Any) -> list[nn.Module]:
        """The frozen models `reference` holds, which dist.strategy=fsdp shards as it shards the
        model (a preference stage's frozen copy); none by default."""
        ...

    def reference(self, model: nn.Module, cfg: Config) -> Any:
        """The frozen model its loss compares with (passed as `reference`), made from the
        prepared model before any step; None for a stage that compares with none."""
        ...

    # -- the step -----------------------------------------------------------------------------
    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the loss of a micro-batch is summed over (target tokens): the step divides the
        accumulated batch's loss by the sum of these."""
        ...

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        reference: nn.Module | None,
        chunked: bool = True,
    ) -> LossOut:
        """Summed loss, its count, and metrics summed over that count. `reference`: the frozen
        model a stage that compares with one gets (None for the others). Runs on the planner's
        fake tensors too: no `.item()`, no data-dependent shapes."""
        ...

    def loss_fn(self, chunked: bool) -> Callable:
        """`(model, batch, reference) -> LossOut`, what the step calls."""
        ...

    def fake_batch(self, rows: int, seq_len: int, targets: int) -> dict[str, torch.Tensor]:
        """The micro-batch `snug plan` replays: `rows` rows of `seq_len` real tokens (no padding,
        so no mask) of which `targets` carry loss, as collate gives it."""
        ...

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, data: Dataset, job: Any, phase: Callable) -> dict:
        """Held-out metrics: the mean loss per count, and what else the stage scores. `job`
        (snug/train/build.py: EvalJob) gives the tokenizer, config, step options and device;
        `phase(title, total, unit)` is a context with `.advance(n)` for the progress shown.
        The key `metric` names the one summary.json reports before -> after (default loss)."""
        ...
