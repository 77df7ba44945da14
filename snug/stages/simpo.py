"""simpo: SimPO (Meng et al. 2024): pairs without a reference model; the reward is the answer's
log-probability averaged per token, scaled by pref.beta, and the chosen answer must win by the
margin pref.gamma. Defaults from the paper's range (beta 2.0-2.5, gamma about half of beta)."""

from __future__ import annotations

from dataclasses import dataclass

from snug.core.registry import register_stage
from snug.core.settings import NON_NEGATIVE, POSITIVE, setting
from snug.stages.preference import HALF, PreferenceStage


@dataclass
class SimPOSettings:
    """Settings of train.stage=simpo."""

    beta: float = setting(2.0, "Scale of the length-normalised reward.", POSITIVE)
    gamma: float = setting(1.0, "Target reward margin of the chosen answer.", NON_NEGATIVE)
    label_smoothing: float = setting(0.0, "Share of pairs assumed mislabelled.", HALF)
    ftx: float = setting(
        0.0, "Weight of an SFT loss on the chosen answer added to the loss.", NON_NEGATIVE
    )


class SimPO(PreferenceStage):
    name = "simpo"
    help = "SimPO: pairs, no reference model, length-normalised reward and a margin"
    settings = SimPOSettings
    uses_reference = False

    def loss_name(self, settings):
        return "simpo"

    def sft_weight(self, settings):
        return settings.ftx


register_stage(SimPO())
