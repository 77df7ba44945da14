"""Tokenize canonical records into (input_ids, labels), prompt tokens masked with -100.

A conversation is rendered through its chat template one prefix at a time, so each assistant
turn's tokens are known exactly: for turn k, render(messages[:k], add_generation_prompt) is
the prompt and render(messages[:k+1]) ends with the answer. Label masks therefore follow the
real template, whatever it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from snug.data.formats import ANSWER_FIELD, DataError
from snug.data.render import TemplateRefused, render_chat

IGNORE = -100

# Status of a record after tokenization, counted in summary.json["data"]. The last three are
# dropped (data.on_error=skip) or stop the run (strict); each comes with a `problem` message.
KEPT, TRUNCATED = "kept", "truncated"
EMPTY, FULLY_MASKED, INVALID = "empty", "fully_masked", "invalid"
COLUMNS = ("input_ids", "labels", "status", "prompt_len", "problem")  # what the map functions give
# The one column of raw records that snug read itself: each record's exact JSON text
# (data/dataset.py), where `datasets` would have coerced or merged fields.
RAW_JSON = "__json__"


def records_of(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A batch of raw columns as one dict per record."""
    if RAW_JSON in columns:
        return [json.loads(text) for text in columns[RAW_JSON]]
    names = list(columns)
    count = len(columns[names[0]]) if names else 0
    return [{c: columns[c][j] for c in names} for j in range(count)]


def first_record(raw) -> dict[str, Any]:
    """The first record of a raw `datasets.Dataset`."""
    return records_of(raw[:1])[0]


def column_names(raw) -> list[str]:
    """The fields of a raw dataset's records (all of them, for records snug read itself)."""
    if RAW_JSON not in raw.column_names:
        return raw.column_names
    return list(dict.fromkeys(k for r in records_of(raw[:]) for k in r))


def chat_segments(
    tok: PreTrainedTokenizerBase, template: str, messages: list[dict], where: str
) -> list[tuple[str, str]]:
    """[(prompt_text, answer_text), ...], one pair per assistant turn, concatenating to the whole."""
    pairs, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tok, template, messages[:k], True, where)
        full = render_chat(tok, template, messages[: k + 1], False, where)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix by prefix, so "
                "answer tokens cannot be located; set data.template to a built-in template."
            )
        pairs.append((prompt[len(done) :], full[len(prompt) :]))
        done = full
    return pairs


def _budget(src: int, tgt: int, budget: int) -> tuple[int, int]:
    """Split `budget` tokens between prompt and answer, keeping part of a long answer."""
    if src + tgt <= budget:
        return src, tgt
    if tgt <= budget // 2:
        keep_tgt = tgt
    elif src <= budget // 2:
        keep_tgt = budget - src
    else:  # both long: share in proportion
        keep_tgt = max(1, budget * tgt // (src + tgt))
    return min(src, budget - keep_tgt), keep_tgt


def encode_chat(
    tok: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    cutoff_len: int,
    train_on_prompt: bool,
    where: str,
) -> tuple[list[int], list[int], str, int]:
    """(input_ids, labels, status, prompt_len); the last kept answer starts at prompt_len.

    A long first prompt loses its start but keeps a leading special token (BOS), since its end
    carries the turn header the answer follows; a long answer loses its end; a later turn that
    would lose part of its prompt is dropped whole rather than trained without its header.
    """
    ids: list[int] = []
    labels: list[int] = []
    status, prompt_len = KEPT, 0
    pairs = chat_segments(tok, template, messages, where)
    for k, (prompt, answer) in enumerate(pairs):
        src = tok(prompt, add_special_tokens=False)["input_ids"]
        tgt = tok(answer, add_special_tokens=False)["input_ids"]
        n_src, n_tgt = _budget(len(src), len(tgt), cutoff_len - len(ids))
        if (n_src, n_tgt) != (len(src), len(tgt)):
            status = TRUNCATED
            if k > 0 and n_src < len(src):
                break
        head = 1 if n_src < len(src) and n_src > 1 and src[0] in tok.all_special_ids else 0
        src, tgt = src[:head] + src[len(src) - n_src + head :], tgt[:n_tgt]
        prompt_len = len(ids) + len(src)
        ids += src + tgt
        labels += (src if train_on_prompt else [IGNORE] * len(src)) + tgt
        if len(ids) >= cutoff_len:
            status = TRUNCATED if k < len(pairs) - 1 else status
            break
    if not ids:
        return ids, labels, EMPTY, 0
    if all(x == IGNORE for x in labels[1:]):  # position 0 is never predicted
        return ids, labels, FULLY_MASKED, prompt_len
    return ids, labels, status, prompt_len


def encode_text(
    tok: PreTrainedTokenizerBase, text: str, cutoff_len: int
) -> list[tuple[list[int], list[int], str, int]]:
    """Plain text for train.stage=pt: bos? + text + eos, split into cutoff_len pieces (no
    token is thrown away)."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)
    if len(ids) < 2:
        return [(ids, list(ids), EMPTY, 0)]
    pieces = [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    if len(pieces) > 1 and len(pieces[-1]) < 2:  # a lone token predicts nothing
        pieces.pop()
    return [(p, list(p), KEPT, 0) for p in pieces]


def _problem(status: str, where: str, field: str, cutoff_len: int) -> str:
    """Why a sample of `status` cannot train ("" when it can)."""
    if status == EMPTY:
        return f"{where}: field '{field}' gives no tokens."
    if status == FULLY_MASKED:
        return (
            f"{where}: field '{field}' leaves no answer token to train on (all labels masked "
            f"after truncation to data.cutoff_len={cutoff_len}, or the template renders none)."
        )
    return ""


def _encode(
    record: dict[str, Any],
    at: str,
    tok: PreTrainedTokenizerBase,
    template: str | None,
    fmt: str,
    cutoff_len: int,
    train_on_prompt: bool,
) -> tuple[list[tuple[list[int], list[int], str, int]], str]:
    """One raw record's samples, and the problem that makes it invalid ("" if none): a bad
    field, or a conversation its chat template refuses."""
    from snug.data.formats import to_canonical  # local: keeps map's pickled closure small

    invalid = [([], [], INVALID, 0)]
    try:
        canon = to_canonical(record, fmt, at)
    except DataError as e:
        return invalid, str(e)
    if "text" in canon:
        return encode_text(tok, canon["text"], cutoff_len), ""
    try:
        return [encode_chat(tok, template, canon["messages"], cutoff_len, train_on_prompt, at)], ""
    except TemplateRefused as e:
        return invalid, str(e)


def tokenize_records(
    records: dict[str, list[Any]],
    indices: list[int],
    *,
    tok: PreTrainedTokenizerBase,
    template: str | None,
    fmt: str,
    cutoff_len: int,
    train_on_prompt: bool,
    where: Callable[[int], str],
) -> dict[str, list]:
    """Batched `datasets.map` function: raw columns -> input_ids, labels, status, prompt_len,
    problem. A record that cannot train becomes one row with a status that drops it and a
    `problem` naming its file, line or row, and field; the caller decides whether to stop."""
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for record, index in zip(records_of(records), indices, strict=True):
        at = where(index)
        results, problem = _encode(record, at, tok, template, fmt, cutoff_len, train_on_prompt)
        for ids, labels, status, prompt_len in results:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
            out["prompt_len"].append(prompt_len)
            out["problem"].append(problem or _problem(status, at, ANSWER_FIELD[fmt], cutoff_len))
    return out


def tokenize_classes(
    records: dict[str, list[Any]],
    indices: list[int],
    *,
    tok: PreTrainedTokenizerBase,
    text_column: str,
    label_column: str,
    label_ids: dict[str, int],
    cutoff_len: int,
    where: Callable[[int], str],
) -> dict[str, list]:
    """Batched `datasets.map` function for train.stage=cls: text -> input_ids, label -> class id
    (a record without usable text or label: status invalid, as in `tokenize_records`)."""
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for record, index in zip(records_of(records), indices, strict=True):
        text, label = record.get(text_column), record.get(label_column)
        problem = ""
        if not isinstance(text, str) or not text.strip():
            problem = f"{where(index)}: field '{text_column}' must be non-empty text."
        elif label is None:
            problem = f"{where(index)}: field '{label_column}' is missing."
        elif isinstance(label, (dict, list)):
            problem = f"{where(index)}: field '{label_column}' must be a class name or number, not {type(label).__name__}."
        elif str(label) not in label_ids:
            problem = (
                f"{where(index)}: field '{label_column}' holds {label!r}, "
                "a class that does not occur in data.train."
            )
        ids = [] if problem else tok(text, add_special_tokens=True)["input_ids"]
        out["input_ids"].append(ids[:cutoff_len])
        out["labels"].append(label_ids.get(str(label), -1))
        out["status"].append(INVALID if problem else TRUNCATED if len(ids) > cutoff_len else KEPT)
        out["prompt_len"].append(0)
        out["problem"].append(problem)
    return out
