"""Tokenize canonical records into (input_ids, labels), prompt tokens masked with -100.

A conversation is rendered through its chat template one prefix at a time, so each assistant
turn's tokens are known exactly: for turn k, render(messages[:k], add_generation_prompt) is
the prompt and render(messages[:k+1]) ends with the answer. Label masks therefore follow the
real template, whatever it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from snug.data.formats import ANSWER_FIELD, DataError
from snug.data.render import TemplateRefused, render_chat
from snug.data.rendered import check_tools_rendered, unrendered_reasoning
from snug.data.truncate import (
    cut_prompt,
    infer_seqlen,
    latest_fit,
    prompt_ids,
    split_exchanges,
    with_default_system,
)

if TYPE_CHECKING:  # only for annotations: a config check must not load transformers
    from transformers import PreTrainedTokenizerBase

IGNORE = -100

# Status of a record after tokenization, counted in summary.json["data"]. The first three are
# kept (clipped: truncated, and a text of it was cut before tokenizing, see `text_limit`); the
# last three are dropped (data.on_error=skip) or stop the run (strict), each with a `problem`.
KEPT, TRUNCATED, CLIPPED = "kept", "truncated", "clipped"
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
    tok: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    where: str,
    tools: list[dict] | None = None,
) -> list[tuple[str, str]]:
    """[(prompt_text, answer_text), ...], one pair per assistant turn, concatenating to the whole."""
    return list(segments(tok, template, messages, where, tools))


def segments(
    tok: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    where: str,
    tools: list[dict] | None = None,
) -> Iterator[tuple[str, str]]:
    """chat_segments one turn at a time: a caller that stops early renders no further turn
    (each turn renders the conversation up to it, so all of them take time in proportion to
    the square of the turns). A tool call is an assistant turn (its answer); tool results fall
    in the prompt of the turn after them, so they are masked."""
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tok, template, messages[:k], True, where, tools)
        full = render_chat(tok, template, messages[: k + 1], False, where, tools)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix by prefix, so "
                "answer tokens cannot be located; set data.template to a built-in template."
            )
        if tools or any(t.get("tool_calls") or t["role"] == "tool" for t in messages[: k + 1]):
            shown = (prompt[len(done) :], full[len(prompt) :], full)
            check_tools_rendered(template, messages[:k], m, shown, tools, where)
        yield prompt[len(done) :], full[len(prompt) :]
        done = full


def _encode_turns(
    tok: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
    where: str,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[int], int, bool] | None:
    """(input_ids, labels, prompt_len, cut) of the whole of `messages`, or None as soon as a
    turn does not fit in `cutoff_len` (no further turn is rendered). A conversation of one
    exchange that does not fit is cut instead (`infer_seqlen`, `cut_prompt`); an exchange of
    tool calls has several turns: each is cut to the room the turns before it leave, as
    LLaMA-Factory cuts its turns, and turns past the cutoff are left out."""
    ids: list[int] = []
    labels: list[int] = []
    prompt_len, cut = 0, False
    answers = [m for m in messages if m["role"] == "assistant"]
    turns = len(answers)
    exchanges = len(split_exchanges(messages)[1])
    for k, (prompt, answer) in enumerate(segments(tok, template, messages, where, tools)):
        src = tok(prompt, add_special_tokens=False)["input_ids"]
        tgt = tok(answer, add_special_tokens=False)["input_ids"]
        if len(ids) + len(src) + len(tgt) > cutoff_len:
            if exchanges > 1:
                return None
            if len(ids) >= cutoff_len:
                break
            if k == 0:
                asked = messages[: [m["role"] for m in messages].index("assistant")]
                src, head, header = prompt_ids(tok, template, asked, prompt, where, tools)
            else:  # a turn after a tool call: keep the end of its prompt
                head, header = 0, 0
            n_src, n_tgt = infer_seqlen(len(src), len(tgt), cutoff_len - len(ids))
            src, tgt, cut = cut_prompt(src, head, header, n_src), tgt[:n_tgt], True
        prompt_len = len(ids) + len(src)
        ids += src + tgt
        # masked: an earlier answer under mask_history, or one LLaMA-Factory v1 weighs 0
        masked = (mask_history and k < turns - 1) or answers[k].get("loss_weight") == 0
        labels += (src if train_on_prompt else [IGNORE] * len(src)) + (
            [IGNORE] * len(tgt) if masked else tgt
        )
    return ids, labels, prompt_len, cut


def encode_chat(
    tok: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    cutoff_len: int,
    train_on_prompt: bool,
    where: str,
    mask_history: bool = False,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[int], str, int]:
    """(input_ids, labels, status, prompt_len); the last answer starts at prompt_len.

    A conversation over `cutoff_len` keeps its system turns and its last exchange: its earliest
    exchanges go first, whole (`latest_fit`); an exchange that does not fit alone keeps its
    system turn and the end of its prompt, and the start of its answer (`infer_seqlen`, as
    LLaMA-Factory cuts). Rendering stops at the first turn that does not fit, and then renders
    only the conversation's end. With `mask_history`, only the last answer is trained. `tools`
    (OpenAI's function specs) go to the template as apply_chat_template's `tools`; tool calls
    train as answers, tool results are masked as prompts.
    """
    args = (cutoff_len, train_on_prompt, mask_history, where, tools)
    got = _encode_turns(tok, template, messages, *args)
    status = KEPT
    if got is None:  # the end that fits, less one more exchange should tokens not add up
        status = TRUNCATED
        kept = latest_fit(tok, template, messages, cutoff_len, where, tools)
        while (got := _encode_turns(tok, template, kept, *args)) is None:
            system, talk = split_exchanges(kept)
            kept = system + [m for exchange in talk[1:] for m in exchange]
    ids, labels, prompt_len, cut = got
    status = TRUNCATED if cut else status
    if not ids:
        return ids, labels, EMPTY, 0
    if all(x == IGNORE for x in labels[1:]):  # position 0 is never predicted
        return ids, labels, FULLY_MASKED, prompt_len
    return ids, labels, status, prompt_len


# Plain text (train.stage=pt) is tokenized this many characters at a time, cut after a line
# break, so that tokenizing a long document never holds the tokenizer's working data (a few
# hundred bytes a token) for all of it; a text record may hold at most MAX_TEXT_CHARS (its
# samples are held in memory as one batch: about 100 bytes a token).
TEXT_CHUNK = 1_000_000
MAX_TEXT_CHARS = 10_000_000


def _pieces(text: str, size: int) -> list[str]:
    """`text` in pieces of at most `size` characters, each ending after a line break (else
    before a space, which starts the next word's token; else where it must)."""
    pieces, start = [], 0
    while len(text) - start > size:
        window = text[start : start + size]
        cut = window.rfind("\n") + 1 or max(window.rfind(" "), 0) or size
        pieces.append(window[:cut])
        start += cut
    return [*pieces, text[start:]]


def _text_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """tok(text, add_special_tokens=True)'s ids, TEXT_CHUNK characters at a time: the special
    tokens the tokenizer adds around a text (found on a probe) go around the whole. A cut
    falls after a line break, where tokens end for the usual pre-tokenizers; one that marks the
    start of a text (sentencepiece's "▁") may tokenize the first word after a cut otherwise."""
    if len(text) <= TEXT_CHUNK:
        return tok(text, add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    probe = tok("a", add_special_tokens=True)["input_ids"]
    at = next(i for i in range(len(probe)) if probe[i : i + len(plain)] == plain)
    ids = probe[:at]
    for piece in _pieces(text, TEXT_CHUNK):
        ids += tok(piece, add_special_tokens=False)["input_ids"]
    return ids + probe[at + len(plain) :]


def encode_text(
    tok: PreTrainedTokenizerBase, text: str, cutoff_len: int
) -> list[tuple[list[int], list[int], str, int]]:
    """Plain text for train.stage=pt: bos? + text + eos, split into cutoff_len pieces (no
    token is thrown away)."""
    ids = _text_ids(tok, text)
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)
    if len(ids) < 2:
        return [(ids, list(ids), EMPTY, 0)]
    pieces = [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    if len(pieces) > 1 and len(pieces[-1]) < 2:  # a lone token predicts nothing
        pieces.pop()
    return [(p, list(p), KEPT, 0) for p in pieces]


# Characters a text may hold per token of data.cutoff_len, in tokens of the tokenizer's longest
# token: no token covers more characters than that, so a longer text holds more tokens than
# cutoff_len keeps; twice over, for normalizers that shrink text (Unicode composition).
CHARS_PER_LONGEST_TOKEN = 2


def text_limit(tok: PreTrainedTokenizerBase, cutoff_len: int) -> int:
    """Characters of one message (or classification text) that can reach a sample of
    `cutoff_len` tokens: a longer one is cut to this before it is rendered and tokenized, which
    changes no kept token of it (it was to be truncated anyway) and spares the memory and time
    of tokenizing what would be thrown away (a 30 MB instruction)."""
    longest = max(len(t) for t in tok.get_vocab())
    return CHARS_PER_LONGEST_TOKEN * cutoff_len * max(longest, 1)


def clip_messages(messages: list[dict], limit: int) -> tuple[list[dict], bool]:
    """`messages` with each content longer than `limit` characters cut to it, and whether any
    was: an answer keeps its start, any other turn its end (as tokens are truncated: the end of
    a prompt holds the header the answer follows)."""
    clipped = []
    for m in messages:
        text = m["content"]
        if len(text) > limit:
            text = text[:limit] if m["role"] == "assistant" else text[len(text) - limit :]
            m = {**m, "content": text}
        if len(m.get("reasoning_content", "")) > limit:  # rendered before the answer's text
            m = {**m, "reasoning_content": m["reasoning_content"][:limit]}
        clipped.append(m)
    return clipped, any(a is not b for a, b in zip(clipped, messages, strict=True))


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
    max_chars: int,
    mask_history: bool = False,
    default_system: str | None = None,
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
        if len(canon["text"]) > MAX_TEXT_CHARS:
            return invalid, (
                f"{at}: field 'text' holds {len(canon['text']):,} characters, more than the "
                f"{MAX_TEXT_CHARS:,} one record may hold; split it into several records."
            )
        return encode_text(tok, canon["text"], cutoff_len), ""
    if problem := unrendered_reasoning(canon["messages"], template, at):
        return invalid, problem
    messages, clipped = clip_messages(canon["messages"], max_chars)
    messages = with_default_system(messages, default_system)
    try:
        ids, labels, status, prompt_len = encode_chat(
            tok,
            template,
            messages,
            cutoff_len,
            train_on_prompt,
            at,
            mask_history,
            canon.get("tools"),
        )
    except TemplateRefused as e:
        return invalid, str(e)
    if clipped and status in (KEPT, TRUNCATED):
        status = CLIPPED
    return [(ids, labels, status, prompt_len)], ""


def tokenize_records(
    records: dict[str, list[Any]],
    indices: list[int],
    *,
    tok: PreTrainedTokenizerBase,
    template: str | None,
    fmt: str,
    cutoff_len: int,
    train_on_prompt: bool,
    max_chars: int,
    where: Callable[[int], str],
    mask_history: bool = False,
    default_system: str | None = None,
) -> dict[str, list]:
    """Batched `datasets.map` function: raw columns -> input_ids, labels, status, prompt_len,
    problem. A record that cannot train becomes one row with a status that drops it and a
    `problem` naming its file, line or row, and field; the caller decides whether to stop.
    A message over `max_chars` characters (`text_limit`) is cut to it first; a conversation
    without a system turn gets `default_system` (data.default_system)."""
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for record, index in zip(records_of(records), indices, strict=True):
        at = where(index)
        results, problem = _encode(
            record,
            at,
            tok,
            template,
            fmt,
            cutoff_len,
            train_on_prompt,
            max_chars,
            mask_history,
            default_system,
        )
        for ids, labels, status, prompt_len in results:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
            out["prompt_len"].append(prompt_len)
            out["problem"].append(problem or _problem(status, at, ANSWER_FIELD[fmt], cutoff_len))
    return out
