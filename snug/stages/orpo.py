"""orpo: ORPO (Hong et al. 2024): pairs without a reference model; the SFT loss on the chosen
answer plus pref.beta times the log-odds-ratio loss that favours it over the rejected one."""

from __future__ import annotations

from dataclasses import dataclass

from snug.core.registry import register_stage
from snug.core.settings import POSITIVE, setting
from snug.stages.preference import PreferenceStage


@dataclass
class ORPOSettings:
    """Settings of train.stage=orpo."""

    beta: float = setting(0.1, "Weight of the odds-ratio loss beside the SFT loss.", POSITIVE)


class ORPO(PreferenceStage):
    name = "orpo"
    help = "ORPO: SFT on the chosen answer plus an odds-ratio preference loss, no reference"
    settings = ORPOSettings
    uses_reference = False

    def loss_name(self, settings):
        return "orpo"


register_stage(ORPO())
