"""A training stage that lives outside snug/ (tests/test_extending.py loads it as a plug-in
through $SNUG_PLUGINS): raw prompt/completion pairs, no chat template, loss on the completion's
tokens only. It reports one metric of its own, `token_accuracy` (the share of completion tokens
the model predicted as its top choice), and has keys of its own in a section of its own,
`completion:`. It uses nothing but snug's public API (docs/extending.md)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from snug.core.registry import register_stage
from snug.core.settings import setting
from snug.data.tokenize import COLUMNS, IGNORE, INVALID, KEPT, TRUNCATED, records_of
from snug.stages.base import BaseStage


@dataclass
class CompletionSettings:
    """Settings of train.stage=completion."""

    separator: str = setting("\n", "Text put between the prompt and the completion.")
    min_completion_tokens: int = setting(
        1,
        "Completions shorter than this many tokens are dropped.",
        (lambda v: v >= 1, "at least 1"),
    )


def tokenize_pairs(records, indices, *, tok, separator, cutoff_len, min_tokens, where):
    out = {c: [] for c in COLUMNS}
    for record, index in zip(records_of(records), indices, strict=True):
        prompt, completion = record.get("prompt"), record.get("completion")
        problem = ""
        if not isinstance(prompt, str) or not isinstance(completion, str):
            problem = f"{where(index)}: needs text fields 'prompt' and 'completion'."
        ids = labels = []
        if not problem:
            head = tok(prompt + separator, add_special_tokens=True)["input_ids"]
            tail = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(tail) - 1 < min_tokens:
                problem = f"{where(index)}: the completion has fewer than {min_tokens} tokens."
            ids = (head + tail)[:cutoff_len]
            labels = ([IGNORE] * len(head) + tail)[:cutoff_len]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["prompt_len"].append(0)
        status = INVALID if problem else TRUNCATED if len(head) + len(tail) > cutoff_len else KEPT
        out["status"].append(status)
        out["problem"].append(problem)
    return out


class Completion(BaseStage):
    name = "completion"
    help = "raw prompt -> completion pairs, loss on the completion"
    settings = CompletionSettings
    section = "completion"

    def tokenize(self, source):
        own = source.own
        fn = functools.partial(
            tokenize_pairs,
            tok=source.tok,
            separator=own.separator,
            cutoff_len=source.data.cutoff_len,
            min_tokens=own.min_completion_tokens,
            where=source.where,
        )
        key = ("completion", source.tok.name_or_path, own.separator, own.min_completion_tokens)
        return source.map(fn, key + (source.data.cutoff_len,))

    def loss(self, model, batch, reference, chunked=True):
        import torch.nn.functional as F

        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits = logits.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        hits = ((logits.detach().argmax(-1) == labels) & (labels != IGNORE)).sum().float()
        return total, None, {"token_accuracy": hits}


register_stage(Completion())
