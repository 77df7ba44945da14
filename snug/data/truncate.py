"""Truncation to data.cutoff_len that keeps a conversation's system turns and its last
exchange (issue 35): the earliest exchanges go first, whole; an exchange that does not fit
alone is split between prompt and answer as LLaMA-Factory splits it, and its prompt keeps its
system turn and its end (the turn header the answer follows). Used by sft's encode_chat
(data/tokenize.py) and the preference stages' _fit (data/preference.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snug.data.render import TemplateRefused, render_chat

if TYPE_CHECKING:  # only for annotations: a config check must not load transformers
    from transformers import PreTrainedTokenizerBase


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt and answer tokens of one exchange fit in `cutoff_len`, split as
    LLaMA-Factory splits them (its processor_utils.infer_seqlen, so that a dataset truncates
    alike in both): an answer under half the budget is kept whole, else a prompt under half
    is, else both are cut in proportion to their lengths."""
    if 2 * target_len < cutoff_len:
        answer_room = cutoff_len
    elif 2 * source_len < cutoff_len:
        answer_room = cutoff_len - source_len
    else:
        answer_room = int(cutoff_len * (target_len / (source_len + target_len)))
    keep_target = min(answer_room, target_len)
    return min(max(cutoff_len - keep_target, 0), source_len), keep_target


def with_default_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` opened by a system turn of `system` (data.default_system) when they have none."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def split_exchanges(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """The leading system turns, and the exchanges after them: each the turns up to and
    including an assistant turn that answers (with the tool calls and results before it; turns after the last answer are left out: nothing of them
    is trained)."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    exchanges: list[list[dict]] = []
    turn: list[dict] = []
    for m in messages[lead:]:
        turn.append(m)
        if m["role"] == "assistant" and not m.get("tool_calls"):  # a call waits for its answer
            exchanges.append(turn)
            turn = []
    if turn and turn[-1]["role"] == "assistant":  # ends with a call
        exchanges.append(turn)
    return messages[:lead], exchanges


def latest_fit(
    tok: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    cutoff_len: int,
    where: str,
    tools: list[dict] | None = None,
) -> list[dict]:
    """`messages` less as many of their earliest exchanges as must go for the rest to fit in
    `cutoff_len` tokens; the system turns and the last exchange always stay. Searched from the
    end, doubling the exchanges tried and then halving the gap, so that only conversations up
    to about twice what fits are rendered (3,000 turns render no more than those)."""
    system, talk = split_exchanges(messages)

    def fits(first: int) -> bool:
        kept = system + [m for exchange in talk[first:] for m in exchange]
        text = render_chat(tok, template, kept, False, where, tools)
        return len(tok(text, add_special_tokens=False)["input_ids"]) <= cutoff_len

    good, step, bad = len(talk) - 1, 1, -1  # talk[good:] fits (the last is kept whatever)
    while good > 0:
        first = max(good - step, 0)
        if not fits(first):
            bad = first
            break
        good, step = first, 2 * step
    while good - bad > 1 and bad >= 0:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return system + [m for exchange in talk[max(good, 0) :] for m in exchange]


def prompt_ids(
    tok: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict],
    prompt: str,
    where: str,
    tools: list[dict] | None = None,
) -> tuple[list[int], int, int]:
    """The token ids of `prompt` (the rendered `messages` up to an answer); how many of its
    first ones a cut keeps: its system turn (rendered alone where the prompt starts with that,
    else up to the end of the system text, for templates that put it in the first user turn), else a leading special token (BOS); and how many
    of its last ones: the header after the last message's text, which the answer follows."""
    system = split_exchanges(messages)[0]
    head = ""
    if system:
        try:
            head = render_chat(tok, template, system, False, where, tools)
        except TemplateRefused:  # a template that renders no system turn alone
            head = ""
        text = system[-1]["content"]
        if not (
            prompt.startswith(head) and text in head
        ):  # the template holds it for the user turn
            found = prompt.find(text)
            head = prompt[: found + len(text)] if found >= 0 else ""
    last = prompt.rfind(messages[-1]["content"]) if messages else -1
    header = prompt[last + len(messages[-1]["content"]) :] if last >= len(head) else ""
    header_len = len(tok(header, add_special_tokens=False)["input_ids"]) if header else 0
    if not head:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        return ids, 1 if ids and ids[0] in tok.all_special_ids else 0, header_len
    first = tok(head, add_special_tokens=False)["input_ids"]
    rest = tok(prompt[len(head) :], add_special_tokens=False)["input_ids"]
    return first + rest, len(first), header_len


def cut_prompt(src: list[int], head: int, header: int, keep: int) -> list[int]:
    """`src` cut to `keep` tokens: its first `head` and its end (`prompt_ids`); the head loses
    its own end only where keeping it whole would cut into the last `header` tokens."""
    if keep >= len(src):
        return src
    if keep <= 1:
        return src[len(src) - keep :]
    tail = min(keep, max(keep - head, min(len(src) - head, header)))
    return src[: keep - tail] + src[len(src) - tail :]
