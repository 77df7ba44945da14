"""Causal-LM cross-entropy, summed over target tokens (the step normalises it): the loss of the
sft and pt stages (snug/stages/), and of any stage that builds on next-token prediction.

The chunked form runs the LM head and the loss over chunks of positions under activation
checkpointing, so only one chunk's fp32 logits (chunk x vocab) exist at a time, in forward and
in backward, and only over positions that carry loss; it equals the plain loss and gradients to
float tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from snug.data.tokenize import IGNORE
from snug.train.wrapped import causal_lm

CHUNK_POSITIONS = 1024  # rows of logits per chunk at most
CHUNK_BYTES = 2**28  # one chunk's fp32 logits at most: 256 MiB, whatever the vocabulary


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk of logits: as many as keep one chunk's fp32 logits within
    CHUNK_BYTES (its log-softmax and, in backward, its gradient are as large again), a multiple
    of 128 (the head's matmul tiles), from 128 to CHUNK_POSITIONS: 1,024 for a 32k vocabulary,
    512 for Llama 3's 128,256, 384 for Qwen2.5's 151,936 (1,024 of those would be 622 MB),
    256 for Gemma's 256,000. Smaller chunks cost some time on a CPU (`python
    benchmarks/chunk_speed.py`, a 128,256-token head, AVX-512 kind: 512 positions 1.05x the
    time of 1,024, 384 1.16x, 256 1.12x, medians of 5 whose runs spread up to 20%)."""
    fits = CHUNK_BYTES // (4 * max(vocab_size, 1)) // 128 * 128
    return max(min(CHUNK_POSITIONS, fits), min(128, CHUNK_POSITIONS))


def vocab_rows(head: nn.Module, config) -> int:
    """The LM head's output rows (the vocabulary it scores), from the layer or the config."""
    rows = getattr(head, "out_features", None)
    return int(rows) if rows else int(config.vocab_size)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens in a (B, T) label batch; position 0 is never predicted."""
    return (labels[:, 1:] != IGNORE).sum()


def count_samples(labels: torch.Tensor) -> torch.Tensor:
    """Classification: every sample carries one target."""
    return (labels != IGNORE).sum()


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model reads of a batch: packed batches carry position_ids and no attention mask.
    No KV cache: transformers keeps packed samples apart only when there is none."""
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch} | {"use_cache": False}


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = logits.float()
    if softcap:  # gemma-2 style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def plain_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # The model's own forward already applies any final-logit soft-capping. Prompt-learning
    # methods (prompt, ptuning) prepend virtual positions: the last T are the sample's.
    ids = batch["input_ids"]
    logits = model(**model_inputs(batch)).logits[:, -ids.shape[1] :]
    v = logits.shape[-1]
    return _ce_sum(logits[:, :-1].reshape(-1, v), batch["labels"][:, 1:].reshape(-1), softcap=None)


def final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden state (after its final norm), (B, T, C), taken by a hook while
    the whole model runs forward, so that whatever a method adds (virtual tokens, prefixes)
    takes part; the head then runs on one position only (logits_to_keep=1)."""
    captured: list[torch.Tensor] = []
    hook = (
        causal_lm(model)
        .get_decoder()
        .register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    )
    try:
        ids = batch["input_ids"]
        model(**model_inputs(batch), logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1][:, -ids.shape[1] :]


def chunked_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    lm = causal_lm(model)
    hidden = final_hidden(model, batch)  # (B, T, C)
    head = lm.get_output_embeddings()
    # gemma-2 style soft-capping lives in the model's forward, which the chunks bypass.
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (N, C): position t predicts t+1
    y = batch["labels"][:, 1:].reshape(-1)  # (N,)
    if "target_positions" in batch:
        # Masked positions (prompt, padding) add nothing to the loss: drop them before the head,
        # whose matmul with a large vocabulary is most of the loss's cost. The indices come from
        # the collate step on the host, so the shapes here depend on no device values.
        h, y = (
            h.index_select(0, batch["target_positions"]),
            y.index_select(0, batch["target_positions"]),
        )
    total = h.new_zeros((), dtype=torch.float32)
    size = chunk_positions(vocab_rows(head, lm.config))
    for start in range(0, h.shape[0], size):
        sl = slice(start, start + size)
        total = total + checkpoint(
            lambda hc, yc: _ce_sum(head(hc), yc, softcap), h[sl], y[sl], use_reentrant=False
        )
    return total
