"""The preference losses: one small object each (as torchtune's rlhf/loss/dpo.py), its
hyper-parameters its fields, each formula from its paper, cited where it is written;
tests/test_preference.py compares them with TRL's on the same inputs.

A pair loss is registered by name (`snug.core.registry.register_pref_loss`: snug's below, a
plug-in's the same way) and chosen by name from the stage's config (dpo: `pref.loss`; simpo and
orpo each use their own). It is a dataclass whose fields are its hyper-parameters: a stage
builds it with the values of its `pref:` keys of the same names (`beta`, `label_smoothing`,
`gamma`; snug.stages.preference.build_pair_loss), and a field the stage does not declare keeps
its default. `uses_reference`: whether it compares with a reference model (then the stage's
reference log-probs are given, else None). Every loss is called alike, on P pairs:

    loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
         chosen_tokens, rejected_tokens) -> (losses, chosen_rewards, rejected_rewards)

policy_* and reference_*: (P,) summed log-probs of each answer's target tokens under the model
and the reference (reference_* None for a loss without one); *_tokens: (P,) each answer's
target-token count; returns (P,) per-pair losses and the (P,) rewards of either answer, detached
(the metrics rewards_chosen, reward_margin, pref_accuracy, ... are summed from them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from snug.core.registry import register_pref_loss

if TYPE_CHECKING:
    import torch
    from torch import Tensor


class PairLoss(Protocol):
    """What a stage asks of a pair loss (the module's docstring gives the shapes)."""

    name: ClassVar[str]
    uses_reference: ClassVar[bool]

    def __call__(
        self,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor | None,
        reference_rejected: Tensor | None,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


def _sigmoid_loss(d: Tensor, label_smoothing: float) -> Tensor:
    """-(1-e) log s(d) - e log s(-d): the DPO loss of a margin d, with label smoothing as
    conservative DPO (Mitchell 2023)."""
    import torch.nn.functional as F

    return -F.logsigmoid(d) * (1 - label_smoothing) - F.logsigmoid(-d) * label_smoothing


@dataclass(frozen=True)
class DPOLoss:
    """DPO, Rafailov et al. 2023, eq. 7: -log s(b d), d the difference of the answers'
    log-ratios (policy minus reference), label smoothing as conservative DPO. Rewards: b x
    log-ratio."""

    name: ClassVar[str] = "sigmoid"
    uses_reference: ClassVar[bool] = True
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __call__(
        self,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor | None,
        reference_rejected: Tensor | None,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        chosen, rejected = policy_chosen - reference_chosen, policy_rejected - reference_rejected
        losses = _sigmoid_loss(self.beta * (chosen - rejected), self.label_smoothing)
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


@dataclass(frozen=True)
class IPOLoss:
    """IPO, Azar et al. 2023, eq. 17, on log-ratios averaged per answer token (as TRL does,
    with the IPO authors): (d_avg - 1/(2b))^2. Rewards: b x log-ratio."""

    name: ClassVar[str] = "ipo"
    uses_reference: ClassVar[bool] = True
    beta: float = 0.1

    def __call__(
        self,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor | None,
        reference_rejected: Tensor | None,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        chosen, rejected = policy_chosen - reference_chosen, policy_rejected - reference_rejected
        losses = (chosen / chosen_tokens - rejected / rejected_tokens - 1 / (2 * self.beta)) ** 2
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


@dataclass(frozen=True)
class HingeLoss:
    """SLiC's hinge, Zhao et al. 2023: max(0, 1 - b d). Rewards: b x log-ratio."""

    name: ClassVar[str] = "hinge"
    uses_reference: ClassVar[bool] = True
    beta: float = 0.1

    def __call__(
        self,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor | None,
        reference_rejected: Tensor | None,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        import torch

        chosen, rejected = policy_chosen - reference_chosen, policy_rejected - reference_rejected
        losses = torch.relu(1 - self.beta * (chosen - rejected))
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


@dataclass(frozen=True)
class SimPOLoss:
    """SimPO, Meng et al. 2024, eq. 6: no reference, log-probs averaged per token and a margin
    g: -log s(b (avg_c - avg_r) - g), label smoothing as DPO's. Rewards: b x average log-prob."""

    name: ClassVar[str] = "simpo"
    uses_reference: ClassVar[bool] = False
    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0

    def __call__(
        self,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor | None,
        reference_rejected: Tensor | None,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ac, ar = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
        losses = _sigmoid_loss(self.beta * (ac - ar) - self.gamma, self.label_smoothing)
        return losses, self.beta * ac.detach(), self.beta * ar.detach()


@dataclass(frozen=True)
class ORPOLoss:
    """ORPO, Hong et al. 2024, eq. 6-7: the chosen answer's NLL per token minus b log s(log
    odds ratio), odds from the per-token average probability. Rewards: b x average log-prob."""

    name: ClassVar[str] = "orpo"
    uses_reference: ClassVar[bool] = False
    beta: float = 0.1

    def __call__(
        self,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor | None,
        reference_rejected: Tensor | None,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        import torch.nn.functional as F

        ac, ar = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        losses = -ac - self.beta * F.logsigmoid(log_odds)
        return losses, self.beta * ac.detach(), self.beta * ar.detach()


for _loss in (DPOLoss, IPOLoss, HingeLoss, SimPOLoss, ORPOLoss):  # pref.loss lists them so
    register_pref_loss(_loss)


@dataclass(frozen=True)
class KTOLoss:
    """KTO, Ethayarajh et al. 2024, eq. 7-8, on N unpaired completions: with r the log-ratio
    and z the reference point (the batch's KL estimate, clamped at 0, no gradient), a
    desirable answer costs w_d (1 - s(b (r - z))), an undesirable one w_u (1 - s(b (z - r))).
    Not a pair loss (it is called otherwise): train.stage=kto builds it."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __call__(
        self, policy: Tensor, reference: Tensor, kl: Tensor, desirable: Tensor
    ) -> tuple[Tensor, Tensor]:
        """policy, reference: (N,) summed log-probs of each completion; kl: () the KL estimate;
        desirable: (N,) 1 for a wanted answer -> (N,) losses, (N,) rewards b x r (detached)."""
        import torch

        r = policy - reference
        z = kl.detach().clamp(min=0)
        losses = torch.where(
            desirable.bool(),
            self.desirable_weight * (1 - torch.sigmoid(self.beta * (r - z))),
            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z - r))),
        )
        return losses, self.beta * r.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurately on both sides of -log 2 (Maechler 2012)."""
    import torch

    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
