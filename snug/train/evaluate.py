"""Held-out evaluation: mean loss per target token, and exact match by greedy generation."""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from snug.data.collate import collate
from snug.data.tokenize import IGNORE
from snug.train.loss import count_targets
from snug.train.step import StepOptions


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    data: Dataset,
    opts: StepOptions,
    micro_batch: int,
    pad_id: int,
    device: torch.device,
) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(data), micro_batch):
        rows = [data[i] for i in range(start, min(start + micro_batch, len(data)))]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        with opts.forward_context():
            total += opts.loss_fn(model, batch).item()
        tokens += count_targets(batch["labels"]).item()
    model.train()
    return total / max(tokens, 1)


def answer_span(labels: list[int]) -> tuple[int, int] | None:
    """[start, end) of the last run of target tokens: the final answer of a conversation."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return (start, end) if 0 < start < end else None


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def stop_token_ids(model: nn.Module, tok: PreTrainedTokenizerBase) -> list[int]:
    """eos of the tokenizer and of the generation config (chat models end turns differently)."""
    ids = {tok.eos_token_id}
    gen = model.generation_config.eos_token_id
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers for token-id prompts, batched with left padding."""
    model.eval()
    stops = stop_token_ids(model, tok)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), longest), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, longest - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
        for row, i in enumerate(chunk):
            answers[i] = tok.decode(out[row, longest:], skip_special_tokens=True)
    model.train()
    return answers


def exact_match(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    data: Dataset,
    limit: int,
    max_new_tokens: int,
    device: torch.device,
) -> tuple[float, list[dict]]:
    """Share of held-out answers reproduced exactly (case and spacing ignored)."""
    prompts, refs = [], []
    for i in range(min(limit, len(data))):
        row = data[i]
        span = answer_span(row["labels"])
        if span is None:
            continue
        prompts.append(row["input_ids"][: span[0]])
        refs.append(tok.decode(row["input_ids"][span[0] : span[1]], skip_special_tokens=True))
    if not prompts:
        return math.nan, []
    answers = generate_answers(model, tok, prompts, max_new_tokens, device)
    samples = [
        {"prompt": tok.decode(p, skip_special_tokens=False), "reference": r, "answer": a}
        for p, r, a in zip(prompts, refs, answers, strict=True)
    ]
    hits = sum(normalize(a) == normalize(r) for a, r in zip(answers, refs, strict=True))
    return hits / len(prompts), samples
