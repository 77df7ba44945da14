"""A preference loss that lives outside snug/ (tests/test_extending.py loads it as a plug-in
through $SNUG_PLUGINS): robust DPO (Chowdhury et al. 2024, eq. 10), DPO's loss unbiased for
pairs whose labels flip with probability e = pref.label_smoothing. Chosen with
`train.stage: dpo` and `pref.loss: robust`; its fields take pref.beta and pref.label_smoothing.
It uses nothing but snug's public registration API (docs/extending.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from snug.core.registry import register_pref_loss


@dataclass(frozen=True)
class RobustDPOLoss:
    name: ClassVar[str] = "robust"
    uses_reference: ClassVar[bool] = True
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __call__(
        self,
        policy_chosen,  # (P,) summed log-probs of the chosen answers
        policy_rejected,  # (P,) of the rejected answers
        reference_chosen,  # (P,) the same under the reference
        reference_rejected,
        chosen_tokens,  # (P,) target tokens per answer (unused here)
        rejected_tokens,
    ):
        chosen = policy_chosen - reference_chosen
        rejected = policy_rejected - reference_rejected
        d, e = self.beta * (chosen - rejected), self.label_smoothing
        losses = (-F.logsigmoid(d) * (1 - e) + F.logsigmoid(-d) * e) / (1 - 2 * e)
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


register_pref_loss(RobustDPOLoss)
