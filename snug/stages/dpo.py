"""dpo: direct preference optimisation on pairs (Rafailov et al. 2023), with the IPO and hinge
losses, label smoothing (conservative DPO) and an SFT term on the chosen answer (pref.ftx, as
LLaMA-Factory's pref_ftx / RPO). The reference is the model before training: the base with the
adapter switched off for peft methods, a frozen copy for full and freeze (pref.reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from snug.core.registry import register_stage
from snug.core.settings import NON_NEGATIVE, POSITIVE, setting
from snug.stages.preference import HALF, REFERENCE_HELP, PreferenceStage


@dataclass
class DPOSettings:
    """Settings of train.stage=dpo."""

    loss: Literal["sigmoid", "ipo", "hinge"] = setting(
        "sigmoid",
        "sigmoid: DPO; ipo: IPO on log-ratios averaged per token; hinge: SLiC's hinge.",
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
    help = "direct preference optimisation on pairs (pref.loss: sigmoid, ipo, hinge)"
    settings = DPOSettings

    def configured(self, cfg):
        bound = super().configured(cfg)
        bound.kind = bound._settings.loss
        return bound

    def check(self, cfg, source):
        super().check(cfg, source)
        s = self.own(cfg)
        if s.label_smoothing and s.loss != "sigmoid":
            from snug.errors import ConfigError

            raise ConfigError(
                f"{source}: pref.label_smoothing applies to pref.loss=sigmoid, not {s.loss}."
            )


register_stage(DPO())
