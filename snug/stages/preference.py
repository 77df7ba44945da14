"""What the preference stages (dpo, orpo, simpo, kto) share: pair data, one concatenated
forward, per-sequence log-probs computed in chunks of positions, the reference, the metrics.

- Data (snug/data/preference.py): a pair is the prompt with the chosen answer (`input_ids`,
  `labels`, the prompt masked) and with the rejected one (`rejected_ids`, `rejected_labels`).
  Collate puts the chosen rows of a micro-batch first and the rejected rows after them, so the
  policy runs one forward over both.
- Log-probs: the summed log-probability of each row's answer tokens. The LM head and
  log-softmax run over chunks of target positions under activation checkpointing, so the
  `[tokens, vocab]` logits never exist whole, in forward or backward (the chunked loss of
  snug/train/loss.py applied to log-probs).
- The reference (dpo, kto): for a method that leaves the base untouched and is saved by peft,
  the same model with its adapter disabled (no second copy); otherwise (`pref.reference:
  copy`) a frozen copy of the model as loaded, made before training.
- A stage's loss is summed over its pairs (or completions, kto); the step divides by their
  count. Metrics (summed the same way, so each is a mean per pair): rewards of the chosen and
  rejected answers, their margin, the preference accuracy (share of pairs whose implicit reward
  prefers the chosen answer), and the log-probs of both answers.

Written here: the losses are a few lines of formulas from the papers (snug/stages/pref_losses.py,
cited at each), and the chunked log-probs are snug's memory technique; peft gives the adapter
switch.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from snug.core.registry import pref_losses
from snug.stages.base import BaseStage
from snug.stages.pref_losses import PairLoss

if TYPE_CHECKING:
    import torch
    from torch import nn

# The settings the preference stages share: pref.reference's doc, a check of a share below half.
REFERENCE_HELP = (
    "The frozen model the policy is compared with. auto: the base with the adapter switched "
    "off for peft adapter methods (no second copy), else copy; adapter_off; copy: a frozen copy "
    "of the model as loaded, in the compute dtype."
)
HALF = (lambda v: 0 <= v < 0.5, "at least 0 and below 0.5")


CHUNK_POSITIONS = 1024  # target positions per chunk of logits at most (snug/train/loss.py's)


# -- log-probs -------------------------------------------------------------------------------
def _row_of_targets(batch: dict) -> torch.Tensor:
    """The row of each flat target position of `labels[:, 1:]`."""
    return batch["target_positions"] // (batch["input_ids"].shape[1] - 1)


def sequence_logps(model: nn.Module, batch: dict, chunked: bool = True) -> torch.Tensor:
    """(rows,) summed log-probability of each row's target tokens (labels != -100)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from snug.train.loss import chunk_positions, final_hidden, model_inputs, vocab_rows
    from snug.train.wrapped import causal_lm

    ids, labels = batch["input_ids"], batch["labels"]
    rows = ids.shape[0]
    rows_of = _row_of_targets(batch)
    y = labels[:, 1:].reshape(-1).index_select(0, batch["target_positions"])
    if not chunked:
        logits = model(**model_inputs(batch)).logits[:, -ids.shape[1] :, :]
        flat = (
            logits[:, :-1].reshape(-1, logits.shape[-1]).index_select(0, batch["target_positions"])
        )
        picked = F.log_softmax(flat.float(), -1).gather(1, y[:, None]).squeeze(1)
        return torch.zeros(rows, device=ids.device).index_add(0, rows_of, picked)
    lm = causal_lm(model)
    hidden = final_hidden(model, batch)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["target_positions"])

    def chunk(hc: torch.Tensor, yc: torch.Tensor, rc: torch.Tensor) -> torch.Tensor:
        logits = head(hc).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        picked = F.log_softmax(logits, -1).gather(1, yc[:, None]).squeeze(1)
        return torch.zeros(rows, device=hc.device).index_add(0, rc, picked)

    total = torch.zeros(rows, device=ids.device)
    size = min(CHUNK_POSITIONS, chunk_positions(vocab_rows(head, lm.config)))
    for start in range(0, h.shape[0], size):
        sl = slice(start, start + size)
        total = total + checkpoint(chunk, h[sl], y[sl], rows_of[sl], use_reentrant=False)
    return total


def target_counts(batch: dict) -> torch.Tensor:
    """(rows,) answer tokens of each row."""
    from snug.data.tokenize import IGNORE

    return (batch["labels"][:, 1:] != IGNORE).sum(1).clamp(min=1)


# -- the reference ---------------------------------------------------------------------------
class Reference:
    """The frozen model the policy is compared with: `logps(model, batch)` gives its summed
    log-probs of the batch's rows (no gradient)."""

    def __init__(self, kind: str, frozen: nn.Module | None = None) -> None:
        self.kind = kind  # "adapter_off" | "copy" | "precompute"
        self.frozen = frozen

    def logps(self, model: nn.Module, batch: dict, chunked: bool) -> torch.Tensor:
        import torch

        if self.kind == "precompute":  # written into the data before training
            return batch["ref_logps"]
        with torch.no_grad():
            if self.frozen is not None:
                from torch.distributed.fsdp import FSDPModule

                logps = sequence_logps(self.frozen, batch, chunked)
                if isinstance(self.frozen, FSDPModule):  # FSDP keeps a root's weights gathered
                    self.frozen.reshard()  # after forward, for a backward that never comes
                return logps
            with adapter_off(model):
                return sequence_logps(model, batch, chunked)


def adapter_off(model: nn.Module):
    """The model as its base: peft's switch that bypasses every adapter layer."""
    from snug.train.wrapped import unwrap

    return unwrap(model).disable_adapter()  # make_reference checked the method is peft's


def make_reference(model: nn.Module, cfg: Any) -> Reference:
    """The reference pref.reference asks for (auto: adapter_off when the method can, else a
    copy; precompute: log-probs the data carries, see `precompute_reference`), made from the
    model before its first step."""
    from snug.core.registry import get_method, get_stage
    from snug.errors import ConfigError

    method = get_method(cfg.method.name)
    can_switch = method.output == "adapter" and method.peft_type is not None
    kind = get_stage(cfg.train.stage).own(cfg).reference
    if kind == "auto":
        kind = "adapter_off" if can_switch else "copy"
    if kind == "adapter_off" and not can_switch:
        raise ConfigError(
            f"pref.reference=adapter_off needs a peft adapter method; method.name="
            f"{cfg.method.name} changes the base itself: use pref.reference=copy."
        )
    if kind in ("adapter_off", "precompute"):
        return Reference(kind)
    from snug.train.wrapped import unwrap

    frozen = copy.deepcopy(unwrap(model))
    frozen.requires_grad_(False)
    frozen.eval()
    return Reference("copy", frozen)


def precompute_reference(
    ds, model: nn.Module, stage: Any, opts: Any, device, batch_rows: int, identity: str
):
    """`ds` with each pair's reference log-probs (`ref_chosen`, `ref_rejected`) computed once by
    `model` as it is now (before any step: the base as loaded), through datasets' map cache
    beside the tokenized data: a resume, or a second run on the same data and base, reads them
    back instead of computing them again (`identity` names the base and how it computes). The
    model is in eval mode, without gradients."""
    import hashlib

    import torch

    key = repr((ds._fingerprint, identity, str(opts.autocast_dtype), "ref-logps-1"))
    was_training = model.training
    model.eval()

    def add(rows: dict) -> dict:
        samples = [
            dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)
        ]
        batch = {k: v.to(device) for k, v in stage.collate(samples, 0).items()}
        with torch.no_grad(), opts.forward_context():
            logps = sequence_logps(model, batch, opts.chunked_loss).double().cpu()
        half = len(samples)
        return {"ref_chosen": logps[:half].tolist(), "ref_rejected": logps[half:].tolist()}

    try:
        return ds.map(
            add,
            batched=True,
            batch_size=batch_rows,
            new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
            desc="reference log-probs",
        )
    finally:
        model.train(was_training)


def build_pair_loss(name: str, settings: Any) -> PairLoss:
    """The preference loss registered as `name`, its hyper-parameters (its dataclass fields) the
    stage's `pref:` keys of the same names; a field the stage does not declare keeps its
    default."""
    loss = pref_losses()[name]
    given = {f.name for f in dataclasses.fields(settings)}
    return loss(
        **{f.name: getattr(settings, f.name) for f in dataclasses.fields(loss) if f.name in given}
    )


# -- the stages ------------------------------------------------------------------------------
class PreferenceStage(BaseStage):
    """A stage trained on pairs (chosen, rejected) of answers to one prompt; subclasses name
    their loss (`loss_name`, a registered snug.stages.pref_losses loss) and settings."""

    section = "pref"  # where each preference stage's keys (its settings) live
    formats = ()
    needs = "preference pairs (a prompt with 'chosen' and 'rejected' answers)"
    no_packing_because = "a pair's two answers are compared row by row"
    paired = True
    uses_reference = True
    pair_loss: PairLoss | None = None  # set by configured(): the loss its step computes
    _settings: Any = None  # set by configured()

    def loss_name(self, settings: Any) -> str:
        """The registered preference loss (snug.core.registry.pref_losses) its settings choose."""
        raise NotImplementedError

    def sft_weight(self, settings: Any) -> float:
        """The weight of an SFT loss on the chosen answer added to the loss (RPO / LLaMA-
        Factory's pref_ftx); 0 for a stage that declares none."""
        return 0.0

    def check(self, cfg, source):
        from snug.errors import ConfigError

        if cfg.data.packing:
            raise ConfigError(
                f"{source}: data.packing cannot be used with train.stage={self.name}: "
                f"{self.no_packing_because}."
            )
        if cfg.data.format not in ("auto",):
            raise ConfigError(
                f"{source}: train.stage={self.name} reads preference records; leave data.format "
                "at auto (the layout is told by the keys)."
            )

    # -- data
    def tokenize(self, source):
        import functools

        from snug.data.dataset import tokenizer_fingerprint
        from snug.data.formats import DataError
        from snug.data.preference import is_pair, is_unpaired, tokenize_pairs
        from snug.data.templates import TemplateError, resolve_template
        from snug.data.tokenize import first_record

        first = first_record(source.raw)
        if self.paired and not is_pair(first):
            hint = (
                "it holds labelled completions: use train.stage=kto"
                if is_unpaired(first)
                else "it holds no 'chosen'/'rejected' answers (SFT data? use train.stage=sft)"
            )
            raise DataError(f"{source.spec}: train.stage={self.name} needs {self.needs}; {hint}.")
        if not self.paired and not is_unpaired(first):
            hint = (
                "it holds pairs: use train.stage=dpo, orpo or simpo"
                if is_pair(first)
                else "it has no boolean 'label' (SFT data? use train.stage=sft)"
            )
            raise DataError(f"{source.spec}: train.stage={self.name} needs {self.needs}; {hint}.")
        try:
            template = resolve_template(source.tok, source.data.template, source.model_name)
        except TemplateError as e:
            raise TemplateError(
                f"{source.spec}: preference records need a chat template, but {e}"
            ) from None
        fn = functools.partial(
            tokenize_pairs,
            tok=source.tok,
            template=template,
            cutoff_len=source.data.cutoff_len,
            paired=self.paired,
            where=source.where,
            default_system=source.data.default_system,
        )
        key = (
            "pairs" if self.paired else "unpaired",
            tokenizer_fingerprint(source.tok, template),
            source.data.cutoff_len,
            source.data.default_system,
        )
        return source.map(fn, key)

    def collate(self, samples, pad_id):
        """Chosen rows first, then rejected rows: one forward for both."""
        import torch

        from snug.data.collate import collate

        rows = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples] + [
            {"input_ids": s["rejected_ids"], "labels": s["rejected_labels"]} for s in samples
        ]
        batch = collate(rows, pad_id)
        if "ref_chosen" in samples[0]:  # pref.reference=precompute
            logps = [s["ref_chosen"] for s in samples] + [s["ref_rejected"] for s in samples]
            batch["ref_logps"] = torch.tensor(logps, dtype=torch.float32)
        return batch

    def reference(self, model, cfg):
        return make_reference(model, cfg) if self.uses_reference else None

    def frozen_models(self, reference):
        return [reference.frozen] if reference is not None and reference.frozen is not None else []

    def with_reference(self, ds, model, reference, opts, device, batch_rows, identity):
        if ds is None or reference is None or reference.kind != "precompute":
            return ds
        return precompute_reference(ds, model, self, opts, device, batch_rows, identity)

    # -- the step
    def count(self, batch):
        import torch

        ids = batch["input_ids"]  # on the batch's device, as the token counts are
        return torch.tensor(ids.shape[0] // 2, device=ids.device)

    def loss(self, model, batch, reference, chunked=True):
        import torch

        s = self._settings
        logps = sequence_logps(model, batch, chunked)
        n = target_counts(batch)
        half = logps.shape[0] // 2
        policy = (logps[:half], logps[half:])
        lengths = (n[:half], n[half:])
        ref = (None, None)  # a loss without a reference gets none
        if self.uses_reference:
            r = reference.logps(model, batch, chunked)
            ref = (r[:half], r[half:])
        losses, chosen, rejected = self.pair_loss(*policy, *ref, *lengths)
        ftx = self.sft_weight(s)
        if ftx:  # the chosen answer's NLL per token, weighted
            losses = losses + ftx * (-policy[0] / lengths[0])
        metrics = {
            "rewards_chosen": chosen.sum(),
            "rewards_rejected": rejected.sum(),
            "reward_margin": (chosen - rejected).sum(),
            "pref_accuracy": (chosen > rejected).float().sum(),
            "logps_chosen": policy[0].detach().sum(),
            "logps_rejected": policy[1].detach().sum(),
        }
        return losses.sum(), torch.tensor(half, device=logps.device), metrics

    def configured(self, cfg: Any) -> PreferenceStage:
        """This stage with its settings in cfg, which its loss reads."""
        bound = copy.copy(self)
        bound._settings = self.own(cfg)
        if self.paired:  # kto's loss is called otherwise (snug/stages/kto.py)
            bound.pair_loss = build_pair_loss(self.loss_name(bound._settings), bound._settings)
        return bound

    def fake_batch(self, rows, seq_len, targets):
        import torch

        ids = torch.zeros((2 * rows, seq_len), dtype=torch.long)
        batch = {
            "input_ids": ids,
            "labels": ids.clone(),
            "target_positions": torch.arange(2 * targets, dtype=torch.long),
        }
        if self.uses_reference and self._settings.reference == "precompute":
            batch["ref_logps"] = torch.zeros(2 * rows)
        return batch

    # -- evaluation
    def evaluate(self, model, data, job, phase):
        """Held out: the mean loss per pair, the preference accuracy and the other metrics."""
        from snug.train.evaluate import eval_metrics

        with phase("preference", len(data), "pairs") as p:
            out = eval_metrics(
                model, data, job.opts, job.micro_batch, job.pad_id, job.device, p.advance,
                job.reference,
            )  # fmt: skip
        out["metric"] = "pref_accuracy" if "pref_accuracy" in out else "loss"
        t = job.cfg.train
        if self.paired and t.eval_generate > 0:
            # what the model answers now, against the chosen answer (sft's exact match: a row's
            # input_ids are the prompt and the chosen answer)
            from snug.data.templates import resolve_template
            from snug.train.evaluate import exact_match

            template = resolve_template(job.tok, job.cfg.data.template, job.cfg.model.name_or_path)
            with phase("answers by generation", min(t.eval_generate, len(data)), "pairs") as p:
                score, samples = exact_match(
                    model, job.tok, template, data, t.eval_generate, t.max_new_tokens,
                    job.device, p.advance,
                )  # fmt: skip
            out.update(chosen_match=score, samples=samples[:5])
        return out
