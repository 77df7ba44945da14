"""The preference losses as formulas of summed log-probs (snug/stages/preference.py computes
the log-probs): each from its paper, cited where it is written; tests/test_preference.py
compares them with TRL's on the same inputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def pair_losses(
    kind: str,
    policy: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor] | None,
    lengths: tuple[torch.Tensor, torch.Tensor],
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) from summed log-probs of the chosen and
    rejected answers (`policy`, `reference`) and their token counts (`lengths`).

    - sigmoid: DPO, Rafailov et al. 2023, eq. 7, with label smoothing as conservative DPO
      (Mitchell 2023): -(1-e) log s(b d) - e log s(-b d), d = the difference of log-ratios;
    - hinge: SLiC-style, Zhao et al. 2023: max(0, 1 - b d);
    - ipo: Azar et al. 2023, eq. 17, on log-ratios averaged per answer token (as TRL does, with
      the IPO authors): (d_avg - 1/(2b))^2;
    - simpo: Meng et al. 2024, eq. 6: no reference, length-normalised log-probs and a margin
      g: -log s(b (avg_c - avg_r) - g), label smoothing as above;
    - orpo: Hong et al. 2024, eq. 6-7: the chosen answer's NLL per token minus b log s(log odds
      ratio), odds from the per-token average probability.
    Rewards: b x (log-ratio) for dpo losses, b x (average log-prob) for simpo and orpo."""
    import torch
    import torch.nn.functional as F

    (pc, pr), (nc, nr) = policy, lengths
    if kind in ("simpo", "orpo"):
        ac, ar = pc / nc, pr / nr
        if kind == "simpo":
            d = beta * (ac - ar) - gamma
            losses = -F.logsigmoid(d) * (1 - label_smoothing) - F.logsigmoid(-d) * label_smoothing
        else:
            log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
            losses = -ac - beta * F.logsigmoid(log_odds)
        return losses, beta * ac.detach(), beta * ar.detach()
    rc, rr = reference
    chosen, rejected = pc - rc, pr - rr
    if kind == "sigmoid":
        d = beta * (chosen - rejected)
        losses = -F.logsigmoid(d) * (1 - label_smoothing) - F.logsigmoid(-d) * label_smoothing
    elif kind == "hinge":
        losses = torch.relu(1 - beta * (chosen - rejected))
    elif kind == "ipo":
        losses = (chosen / nc - rejected / nr - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    kl: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-completion loss, reward) of KTO, Ethayarajh et al. 2024, eq. 7-8: with r the
    log-ratio and z the reference point (the batch's KL estimate, clamped at 0, no gradient),
    a desirable answer costs w_d (1 - s(b (r - z))), an undesirable one w_u (1 - s(b (z - r)))."""
    import torch

    r = policy - reference
    z = kl.detach().clamp(min=0)
    good = desirable.bool()
    losses = torch.where(
        good,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - r))),
    )
    return losses, beta * r.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurately on both sides of -log 2 (Maechler 2012)."""
    import torch

    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
