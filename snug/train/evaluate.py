"""Held-out evaluation: mean loss per target token, and exact match by greedy generation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from snug.data.collate import collate
from snug.data.tokenize import chat_segments


@torch.no_grad()
def eval_metrics(
    model: nn.Module,
    data: Dataset,
    opts,
    micro_batch: int,
    pad_id: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    reference=None,
) -> dict[str, float]:
    """Mean loss per count (target token, sample, or pair) under `opts` (snug.train.options.
    StepOptions: the stage's collate, loss and count), and the stage's metrics, each a mean per
    the same count; `reference` is what the stage's loss compares with, if anything;
    `progress(n)` hears of every n samples."""
    model.eval()
    total, counted, sums = 0.0, 0, {}
    starts = list(range(0, len(data), micro_batch))
    if len(starts) > 1 and len(data) - starts[-1] < opts.stage.min_rows:
        starts.pop()  # a short last micro-batch (kto: one completion) joins the one before
    for start, end in zip(starts, [*starts[1:], len(data)], strict=True):
        rows = [data[i] for i in range(start, end)]
        batch = {k: v.to(device) for k, v in opts.stage.collate(rows, pad_id).items()}
        with opts.forward_context():
            summed, _, metrics = opts.loss_fn(model, batch, reference)
        total += summed.item()
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value.item()
        counted += opts.count(batch).item()
        if progress is not None:
            progress(len(rows))
    model.train()
    n = max(counted, 1)
    return {"loss": total / n, **{name: value / n for name, value in sums.items()}}


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def end_of_turn(tok: PreTrainedTokenizerBase, template: str) -> str:
    """The text a template puts after an assistant answer, e.g. "<|im_end|>\n"."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    return chat_segments(tok, template, probe, "the chat template")[0][1].split("ok", 1)[1]


def stop_token_ids(model: nn.Module, tok: PreTrainedTokenizerBase, template: str) -> list[int]:
    """eos of the tokenizer and of the generation config, and the template's end-of-turn token
    (base models' generation configs often stop only at end-of-text, not end-of-turn)."""
    gen = model.generation_config.eos_token_id
    ids = {tok.eos_token_id, *(gen if isinstance(gen, list) else [gen])}
    marker = tok(end_of_turn(tok, template), add_special_tokens=False)["input_ids"]
    ids.update(t for t in marker[:1] if t in tok.all_special_ids)
    return sorted(i for i in ids if i is not None)


def answer_text(tok: PreTrainedTokenizerBase, ids: list[int], marker: str) -> str:
    """Decoded answer, cut at the end-of-turn marker when it is plain text."""
    text = tok.decode(ids, skip_special_tokens=True)
    return text.split(marker.strip(), 1)[0] if marker.strip() else text


def prompt_learning(model: nn.Module) -> bool:
    """Whether a peft prompt-learning adapter (prefix, prompt, p-tuning) is active. peft (0.21,
    with transformers 5) generates such a model's answers wrong from a left-padded batch (the
    virtual tokens go before the padding) and from a KV cache (prompt tuning's answer drifts
    from its greedy forward after the first token): generate one prompt at a time, uncached."""
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    template: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers for token-id prompts, batched with left padding: greedy, or sampled at
    `temperature` > 0 with nucleus `top_p` (seed torch's generator first to repeat a draw).
    Under peft prompt learning the prompts go one at a time, without a cache (see
    `prompt_learning`)."""
    alone = prompt_learning(model)
    batch_size = 1 if alone else batch_size
    # top_k=0: no top-k cut (transformers would add top_k=50), the draw is what these two say
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    model.eval()
    stops = stop_token_ids(model, tok, template)
    marker = end_of_turn(tok, template)
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
            **(sampling if temperature > 0 else {"do_sample": False}),
            use_cache=not alone,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
        for row, i in enumerate(chunk):
            answers[i] = answer_text(tok, out[row, longest:].tolist(), marker)
        if progress is not None:
            progress(len(chunk))
    model.train()
    return answers


def exact_match(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    template: str,
    data: Dataset,
    limit: int,
    max_new_tokens: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, list[dict]]:
    """Share of held-out final answers reproduced exactly (case and spacing ignored)."""
    rows = [data[i] for i in range(min(limit, len(data)))]
    rows = [r for r in rows if 0 < r["prompt_len"] < len(r["input_ids"])]
    if not rows:
        raise ValueError("no held-out sample has a prompt and an answer to score by generation.")
    marker = end_of_turn(tok, template)
    prompts = [r["input_ids"][: r["prompt_len"]] for r in rows]
    expected = [answer_text(tok, r["input_ids"][r["prompt_len"] :], marker) for r in rows]
    answers = generate_answers(
        model, tok, template, prompts, max_new_tokens, device, progress=progress
    )
    samples = [
        {"prompt": tok.decode(p), "expected": e, "answer": a}
        for p, e, a in zip(prompts, expected, answers, strict=True)
    ]
    hits = sum(normalize(a) == normalize(e) for a, e in zip(answers, expected, strict=True))
    return hits / len(rows), samples


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: Dataset,
    micro_batch: int,
    pad_id: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> float:
    """train.stage=cls: share of held-out samples whose highest-scoring class is the label."""
    model.eval()
    hits = 0
    for start in range(0, len(data), micro_batch):
        rows = [data[i] for i in range(start, min(start + micro_batch, len(data)))]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).logits
        hits += int((logits.argmax(-1) == batch["labels"]).sum())
        if progress is not None:
            progress(len(rows))
    model.train()
    return hits / len(data)
