"""Causal-LM cross-entropy, summed over target tokens (the step normalises it).

The chunked form runs the LM head and the loss over chunks of positions under activation
checkpointing, so only one chunk's fp32 logits (chunk x vocab) exist at a time, in forward and
in backward; it equals the plain loss and gradients to float tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from snug.data.tokenize import IGNORE

CHUNK_POSITIONS = 1024  # rows of logits per chunk: 1024 x 152k vocab x 4 B = 0.6 GB in fp32


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens in a (B, T) label batch; position 0 is never predicted."""
    return (labels[:, 1:] != IGNORE).sum()


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = logits.float()
    if softcap:  # gemma-2 style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def plain_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # The model's own forward already applies any final-logit soft-capping.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    v = logits.shape[-1]
    return _ce_sum(logits[:, :-1].reshape(-1, v), batch["labels"][:, 1:].reshape(-1), softcap=None)


def chunked_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # (B, T, C)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (N, C): position t predicts t+1
    y = batch["labels"][:, 1:].reshape(-1)  # (N,)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], CHUNK_POSITIONS):
        sl = slice(start, start + CHUNK_POSITIONS)
        total = total + checkpoint(
            lambda hc, yc: _ce_sum(head(hc), yc, softcap), h[sl], y[sl], use_reentrant=False
        )
    return total
