"""`BaseStage`: the stage a causal language model learning next tokens is, which a stage module
subclasses, overriding what differs, and registers (`register_stage(MyStage())`: snug/core/
registry.py). What each member means is the `Stage` protocol's (snug/core/stage.py).

A stage owns everything that depends on what is being learnt: its own keys (in a config section
of its own), the record formats it reads, tokenization and label masking, collate, the model
class it loads, its loss `(model, batch, reference) -> (summed loss, count, metrics)`, its
held-out evaluation and the fake batch `snug plan` replays. The defaults here are those of a causal language model trained
on next tokens (sft and pt use them as they are); a stage overrides what differs.

Light at import: torch, transformers and datasets are imported inside the functions, so that
checking a config imports none of them.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from torch import nn

    from snug.core.sections import Config, DataConfig
    from snug.data.dataset import Source

from snug.core.stage import LossOut, Stage


class BaseStage(Stage):
    """A training stage. Subclass it, set the class attributes, override what differs from a
    causal LM learning next tokens, and register one instance."""

    # The class attributes (name, help, settings, section, formats, ...) and their defaults
    # are the protocol's (snug/core/stage.py), where each is documented.

    def configured(self, cfg: Config) -> BaseStage:
        """The stage as the step runs it for `cfg` (a stage whose loss reads settings returns a
        copy holding them); itself by default."""
        return self

    def own(self, cfg: Config | None) -> Any:
        """This stage's own settings in `cfg` (their defaults when cfg sets none of them, is
        None, or is another stage's config); None for a stage without settings."""
        if self.settings is None:
            return None
        own = cfg.stage_section.own if cfg is not None else None
        return own if isinstance(own, self.settings) else self.settings()

    # -- config -------------------------------------------------------------------------------
    def check(self, cfg: Config, source: str) -> None:
        """Rules between this stage and other sections; raise ConfigError naming the keys."""
        fmt = cfg.data.format
        if self.formats and fmt != "auto" and fmt not in self.formats:
            from snug.errors import ConfigError

            raise ConfigError(
                f"{source}: data.format={fmt} is not read by train.stage={self.name}; "
                f"it needs {self.needs}."
            )

    # -- data ---------------------------------------------------------------------------------
    def labels(self, data: DataConfig, own: Any) -> list[str] | None:
        """The classes a classifier learns, read from the training data as its own settings
        (`own`: Stage.own) say (None: no classes)."""
        return None

    def tokenize(self, source: Source) -> tuple[Dataset, Counter, list[str]]:
        """A source -> its samples, the count of each status, the problems of the dropped."""
        from snug.data.dataset import tokenize_formatted

        return tokenize_formatted(source, self)

    def collate(self, samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        from snug.data.collate import collate

        return collate(samples, pad_id)

    def collate_packed(self, rows: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
        from snug.data.collate import collate_packed

        return collate_packed(rows, pad_id)

    # -- model --------------------------------------------------------------------------------
    def model_class(self, labels: list[str] | None, pad_id: int | None) -> tuple[type, dict]:
        """The transformers auto class to load the base with, and its extra arguments."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM, {}

    def after_load(self, model: nn.Module, cfg: Config, labels: list[str] | None, device) -> None:
        """Anything to add to the loaded base (a classifier's head) before the method."""

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
        return ds

    def frozen_models(self, reference: Any) -> list[nn.Module]:
        """The frozen models `reference` holds, which dist.strategy=fsdp shards as it shards the
        model (a preference stage's frozen copy); none by default."""
        return []

    def reference(self, model: nn.Module, cfg: Config) -> Any:
        """The frozen model its loss compares with (passed as `reference`), made from the
        prepared model before any step; None for a stage that compares with none."""
        return None

    # -- the step -----------------------------------------------------------------------------
    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the loss of a micro-batch is summed over (target tokens): the step divides the
        accumulated batch's loss by the sum of these."""
        from snug.train.loss import count_targets

        return count_targets(batch["labels"])

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
        from snug.train.loss import chunked_loss, plain_loss

        total = (chunked_loss if chunked else plain_loss)(model, batch)
        return total, None, {}

    def loss_fn(self, chunked: bool) -> Callable:
        """`(model, batch, reference) -> LossOut`, what the step calls."""
        return functools.partial(self.loss, chunked=chunked)

    def fake_batch(self, rows: int, seq_len: int, targets: int) -> dict[str, torch.Tensor]:
        """The micro-batch `snug plan` replays: `rows` rows of `seq_len` real tokens (no padding,
        so no mask) of which `targets` carry loss, as collate gives it."""
        import torch

        ids = torch.zeros((rows, seq_len), dtype=torch.long)
        return {
            "input_ids": ids,
            "labels": ids.clone(),
            "target_positions": torch.zeros(targets, dtype=torch.long),
        }

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, data: Dataset, job: Any, phase: Callable) -> dict:
        """Held-out metrics: the mean loss per count, and what else the stage scores. `job`
        (snug/train/build.py: EvalJob) gives the tokenizer, config, step options and device;
        `phase(title, total, unit)` is a context with `.advance(n)` for the progress shown.
        The key `metric` names the one summary.json reports before -> after (default loss)."""
        from snug.train.evaluate import eval_metrics

        with phase("loss", len(data), "samples") as p:
            loss = eval_metrics(
                model, data, job.opts, job.micro_batch, job.pad_id, job.device, p.advance
            )["loss"]
        return {"loss": loss}
