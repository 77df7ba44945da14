"""dpo: direct preference optimisation on pairs (Rafailov et al. 2023), with the IPO and hinge
losses, label smoothing (conservative DPO) and an SFT term on the chosen answer (pref.ftx, as
LLaMA-Factory's pref_ftx / RPO). The reference is the model before training: the base with the
adapter switched off for peft methods, a frozen copy for full and freeze (pref.reference)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from snug.core.registry import pref_losses, register_stage
from snug.core.settings import NON_NEGATIVE, POSITIVE, setting
from snug.stages.preference import HALF, REFERENCE_HELP, PreferenceStage


def reference_losses() -> tuple[str, ...]:
    """The registered preference losses that compare with a reference: pref.loss's choices."""
    return tuple(name for name, loss in pref_losses().items() if loss.uses_reference)


@dataclass
class DPOSettings:
    """Settings of train.stage=dpo."""

    loss: str = setting(
        "sigmoid",
        "sigmoid: DPO; ipo: IPO on log-ratios averaged per token; hinge: SLiC's hinge.",
        choices=reference_losses,
    )
    beta: float = setting(0.1, "Strength of the pull towards the reference.", POSITIVE)
    label_smoothing: float = setting(
        0.0, "Share of pairs assumed mislabelled (conservative DPO; sigmoid only).", HALF
    )
    ftx: float = setting(
        0.0, "Weight of an SFT loss on the chosen answer added to the loss (RPO).", NON_NEGATIVE
    )
    reference: Literal["auto", "adapter_off", "copy", "precompute"] = setting(
        "auto",
        REFERENCE_HELP
        + " precompute: its log-probs of every pair computed once before training (cached beside "
        "the tokenized data; no reference model in memory while training).",
    )


class DPO(PreferenceStage):
    name = "dpo"
    help = "direct preference optimisation on pairs (pref.loss picks the loss)"
    settings = DPOSettings

    def loss_name(self, settings):
        return settings.loss

    def sft_weight(self, settings):
        return settings.ftx

    def check(self, cfg, source):
        super().check(cfg, source)
        s = self.own(cfg)
        smoothed = [n for n in reference_losses() if _declares(n, "label_smoothing")]
        if s.label_smoothing and s.loss not in smoothed:
            from snug.errors import ConfigError

            raise ConfigError(
                f"{source}: pref.label_smoothing applies to pref.loss={', '.join(smoothed)}, "
                f"not {s.loss}."
            )


def _declares(loss: str, key: str) -> bool:
    """Whether the loss registered as `loss` has the hyper-parameter `key`."""
    return any(f.name == key for f in fields(pref_losses()[loss]))


register_stage(DPO())
