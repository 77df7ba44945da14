"""Preference records -> tokenized pairs (dpo, orpo, simpo) or labelled completions (kto).

Paired layouts, told apart by their keys (a record with `chosen` and `rejected`):
- TRL: `prompt` (a string, or a message list ending on a user turn) with `chosen` and
  `rejected` given as strings, single message objects or message lists; or no `prompt` and
  `chosen`/`rejected` as whole conversations sharing their turns up to the answer (TRL's
  "implicit prompt");
- LLaMA-Factory's sharegpt ranking layout: `conversations` ending on a user turn (and an
  optional `system`), `chosen` and `rejected` single messages `{"from": "gpt", "value": ...}`;
  the same with OpenAI-style `messages`;
- alpaca: `instruction`, optional `input`, `system` and `history`, with `chosen`/`rejected`;
- LLaMA-Factory v1: `chosen_messages` and `rejected_messages`, two whole conversations (typed
  content, data/formats.py: read_turn) sharing their turns up to the answer, as TRL's implicit
  prompt.

Unpaired layouts (a record with a boolean `label`): TRL's `prompt` + `completion`, a message
list ending on the assistant turn that is judged (LLaMA-Factory's kto layout, `messages` or
`conversations`), or alpaca's `instruction`/`input`/`output`.

The prompt is rendered by the chat template with the generation prompt and masked as in sft;
each answer is what the template adds after it. Truncation to data.cutoff_len keeps the system
turn and the last user turn: the earliest exchanges of the prompt go first, whole; then the
prompt and both answers are cut as in sft (data/tokenize.py: LLaMA-Factory's split, judged
with the longer answer; the prompt keeps its system turn and its end), both answers at the
same length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from snug.data.formats import SHAREGPT_ROLES, DataError, read_turn, refuse_media, to_canonical
from snug.data.render import TemplateError
from snug.data.tokenize import (
    CLIPPED,
    EMPTY,
    FULLY_MASKED,
    IGNORE,
    INVALID,
    KEPT,
    TRUNCATED,
    chat_segments,
    clip_messages,
    records_of,
    text_limit,
)
from snug.data.truncate import (
    cut_prompt,
    infer_seqlen,
    latest_fit,
    prompt_ids,
    with_default_system,
)

if TYPE_CHECKING:  # only for annotations: a config check must not load transformers
    from transformers import PreTrainedTokenizerBase

PAIR_KEYS = ("chosen", "rejected")
V1_PAIR_KEYS = ("chosen_messages", "rejected_messages")  # LLaMA-Factory v1's pairs
PAIR_COLUMNS = ("input_ids", "labels", "rejected_ids", "rejected_labels", "prompt_len")
UNPAIRED_COLUMNS = ("input_ids", "labels", "prompt_len", "desirable")


def is_pair(record: dict[str, Any]) -> bool:
    return any(all(record.get(k) is not None for k in keys) for keys in (PAIR_KEYS, V1_PAIR_KEYS))


def is_unpaired(record: dict[str, Any]) -> bool:
    return isinstance(record.get("label"), bool) and not is_pair(record)


def _message(value: Any, where: str, key: str, role: str) -> dict[str, str]:
    """A string, `{"role", "content"}` or `{"from", "value"}` -> one message of `role`."""
    weight: dict[str, float] = {}  # "loss_weight": 0.0 for an assistant turn not trained
    if isinstance(value, str):
        content = value
    elif isinstance(value, dict) and ("content" in value or "value" in value):
        said = value.get("role", value.get("from"))
        if said is not None and SHAREGPT_ROLES.get(str(said).lower(), said) != role:
            raise DataError(f"{where}: field '{key}' is a '{said}' message; it must be {role}.")
        message = read_turn(value, role, where, f"field '{key}'")
        if "reasoning_content" in message:
            raise DataError(
                f"{where}: field '{key}' holds a 'reasoning' part; snug reads reasoning for "
                "train.stage=sft only."
            )
        content, weight = (
            message["content"],
            {k: message[k] for k in ("loss_weight",) if k in message},
        )
    else:
        raise DataError(
            f"{where}: field '{key}' must be a string or a message, not {type(value).__name__}."
        )
    if not isinstance(content, str) or not content.strip():
        raise DataError(f"{where}: field '{key}' has no text.")
    return {"role": role, "content": content, **weight}


def _turns(value: Any, where: str, key: str) -> list[dict[str, str]]:
    """A message list (OpenAI or sharegpt style) -> messages with roles system/user/assistant."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages.")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            raise DataError(f"{where}: field '{key}' item {i + 1} must be a message object.")
        said = t.get("role", t.get("from"))
        role = SHAREGPT_ROLES.get(str(said).lower())
        if role is None:
            raise DataError(f"{where}: field '{key}' item {i + 1} has unknown role {said!r}.")
        if role == "tool" or str(said).lower() == "function_call" or t.get("tool_calls"):
            raise DataError(
                f"{where}: field '{key}' item {i + 1} is a tool call or tool result; snug reads "
                "tool calls for train.stage=sft only."
            )
        out.append(_message(t, where, key, role))
    return out


def _prompt(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The messages before the judged answer, ending on a user turn."""
    if "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        turns = _turns(record[key], where, key)
        if record.get("system"):
            turns = [_message(record["system"], where, "system", "system"), *turns]
    elif "instruction" in record:
        alpaca = {**record, "output": "-"}  # the answer is chosen/rejected: a placeholder here
        turns = to_canonical(alpaca, "alpaca", where)["messages"][:-1]
    elif "prompt" in record:
        value = record["prompt"]
        turns = (
            [_message(value, where, "prompt", "user")]
            if isinstance(value, str)
            else _turns(value, where, "prompt")
        )
    else:
        raise DataError(
            f"{where}: no prompt: expected 'prompt', 'conversations', 'messages' or "
            "'instruction' beside the answers."
        )
    if turns[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn.")
    return turns


def _answer(value: Any, where: str, key: str) -> str:
    """An answer given as a string, a message, or a list whose last message is the answer."""
    if isinstance(value, list):
        turns = _turns(value, where, key)
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}' must end with an assistant message.")
        return turns[-1]["content"]
    return _message(value, where, key, "assistant")["content"]


def _implicit_pair(record: dict[str, Any], where: str, keys: tuple[str, str]) -> dict[str, Any]:
    """TRL's implicit prompt (and LLaMA-Factory v1's pairs): two whole conversations, under
    `keys`, sharing all but the answer."""
    chosen, rejected = (_turns(record[k], where, k) for k in keys)
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise DataError(
            f"{where}: without 'prompt', '{keys[0]}' and '{keys[1]}' must be conversations "
            "that differ only in their last (assistant) message."
        )
    prompt = chosen[:-1]
    if prompt[-1]["role"] != "user" or chosen[-1]["role"] != "assistant":
        raise DataError(f"{where}: the answers must follow a user turn.")
    if any(turns[-1].get("loss_weight") == 0 for turns in (chosen, rejected)):
        raise DataError(f"{where}: an answer has loss_weight 0; the judged answers train.")
    return {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def canonical_pair(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A paired record -> {"prompt": messages, "chosen": text, "rejected": text}."""
    if not is_pair(record):
        raise DataError(f"{where}: a preference pair needs 'chosen' and 'rejected'.")
    refuse_media(record, where)
    if all(record.get(k) is not None for k in V1_PAIR_KEYS):
        return _implicit_pair(record, where, V1_PAIR_KEYS)
    implicit = not any(k in record for k in ("prompt", "conversations", "messages", "instruction"))
    if implicit and not all(isinstance(record[k], list) for k in PAIR_KEYS):
        raise DataError(
            f"{where}: no prompt: expected 'prompt', 'conversations', 'messages' or "
            "'instruction' beside the answers, or 'chosen' and 'rejected' as whole conversations."
        )
    if implicit:
        return _implicit_pair(record, where, PAIR_KEYS)
    prompt = _prompt(record, where)
    return {
        "prompt": prompt,
        "chosen": _answer(record["chosen"], where, "chosen"),
        "rejected": _answer(record["rejected"], where, "rejected"),
    }


def canonical_unpaired(record: dict[str, Any], where: str) -> dict[str, Any]:
    """An unpaired record -> {"prompt": messages, "completion": text, "desirable": bool}."""
    if not isinstance(record.get("label"), bool):
        raise DataError(f"{where}: field 'label' must be true or false.")
    refuse_media(record, where)
    if "completion" in record:
        completion = _answer(record["completion"], where, "completion")
        prompt = _prompt(record, where)
    elif "output" in record and "instruction" in record:
        completion = _answer(record["output"], where, "output")
        prompt = _prompt(record, where)
    else:
        key = next((k for k in ("messages", "conversations") if k in record), None)
        if key is None:
            raise DataError(
                f"{where}: a labelled record needs 'prompt' and 'completion', a message list "
                "('messages' or 'conversations') ending on the judged answer, or alpaca fields."
            )
        turns = _turns(record[key], where, key)
        if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
            raise DataError(f"{where}: field '{key}' must end with a user and an assistant turn.")
        prompt, completion = turns[:-1], turns[-1]["content"]
        if record.get("system"):
            prompt = [_message(record["system"], where, "system", "system"), *prompt]
    return {"prompt": prompt, "completion": completion, "desirable": record["label"]}


def _split(
    tok: PreTrainedTokenizerBase, template: str, prompt: list[dict], answer: str, where: str
) -> tuple[str, str]:
    """The rendered prompt (with the generation prompt) and the answer after it, as the
    template renders them."""
    segments = chat_segments(
        tok, template, [*prompt, {"role": "assistant", "content": answer}], where
    )
    return "".join(p + a for p, a in segments[:-1]) + segments[-1][0], segments[-1][1]


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _fit(
    tok: PreTrainedTokenizerBase,
    template: str,
    prompt: list[dict],
    texts: list[str],
    cutoff: int,
    where: str,
) -> tuple[list[int], list[list[int]], bool]:
    """The prompt's and the answers' token ids within `cutoff` (module docstring), and whether
    any was cut."""
    parts = [_split(tok, template, prompt, t, where) for t in texts]
    if any(p[0] != parts[0][0] for p in parts[1:]):
        raise DataError(f"{where}: the template renders the prompt differently per answer.")
    src, answers = _ids(tok, parts[0][0]), [_ids(tok, p[1]) for p in parts]
    longest = max(len(a) for a in answers)
    if len(src) + longest <= cutoff:
        return src, answers, False
    # The earliest exchanges go first, judged with the longer answer (data/tokenize.py).
    judged = {"role": "assistant", "content": texts[[len(a) for a in answers].index(longest)]}
    prompt = latest_fit(tok, template, [*prompt, judged], cutoff, where)[:-1]
    before = _split(tok, template, prompt, judged["content"], where)[0]
    src, head, header = prompt_ids(tok, template, prompt, before, where)
    keep_src, keep_answer = infer_seqlen(len(src), longest, cutoff)
    return cut_prompt(src, head, header, keep_src), [a[:keep_answer] for a in answers], True


def _status(answers: list[list[int]], cut: bool) -> str:
    if any(not a for a in answers):
        return FULLY_MASKED
    return TRUNCATED if cut else KEPT


def tokenize_pairs(
    records: dict[str, list[Any]],
    indices: list[int],
    *,
    tok: PreTrainedTokenizerBase,
    template: str,
    cutoff_len: int,
    paired: bool,
    where: Callable[[int], str],
    default_system: str | None = None,
) -> dict[str, list]:
    """Batched `datasets.map` function: raw records -> the columns of PAIR_COLUMNS (or
    UNPAIRED_COLUMNS), `status` and `problem`, one row per record; a prompt without a system
    turn gets `default_system` (data.default_system)."""
    columns = PAIR_COLUMNS if paired else UNPAIRED_COLUMNS
    out: dict[str, list] = {c: [] for c in (*columns, "status", "problem")}
    limit = text_limit(tok, cutoff_len)  # longer texts are cut first (data/tokenize.py)
    for record, index in zip(records_of(records), indices, strict=True):
        at = where(index)
        row: dict[str, Any] = {"input_ids": [], "labels": [], "prompt_len": 0}
        if paired:
            row.update(rejected_ids=[], rejected_labels=[])
        else:
            row["desirable"] = 0
        try:
            if paired:
                canon = canonical_pair(record, at)
                texts = [canon["chosen"], canon["rejected"]]
            else:
                canon = canonical_unpaired(record, at)
                texts = [canon["completion"]]
                row["desirable"] = int(canon["desirable"])
            prompt, clipped = clip_messages(canon["prompt"], limit)
            prompt = with_default_system(prompt, default_system)
            clipped = clipped or any(len(t) > limit for t in texts)
            texts = [t[:limit] for t in texts]
            src, answers, cut = _fit(tok, template, prompt, texts, cutoff_len, at)
            status = _status(answers, cut)
            status = CLIPPED if clipped and status in (KEPT, TRUNCATED) else status
            problem = (
                f"{at}: an answer leaves no token to train on after truncation to "
                f"data.cutoff_len={cutoff_len}."
                if status == FULLY_MASKED
                else ""
            )
            masked = [IGNORE] * len(src)
            row["input_ids"], row["labels"] = src + answers[0], masked + answers[0]
            if paired:
                row["rejected_ids"], row["rejected_labels"] = src + answers[1], masked + answers[1]
            row["prompt_len"] = len(src)
            if not answers[0] and not src:
                status = EMPTY
        except TemplateError:
            raise  # the template itself cannot render: no record's problem, it stops the run
        except DataError as e:
            status, problem = INVALID, str(e)
        for c in columns:
            out[c].append(row[c])
        out["status"].append(status)
        out["problem"].append(problem)
    return out


def refuse_preference_records(record: dict, spec: str, stage: str) -> None:
    """Preference data is never trained as something else: pairs and labelled completions
    given to a stage that reads neither are an error naming the file."""
    if is_pair(record):
        keys = PAIR_KEYS if all(record.get(k) is not None for k in PAIR_KEYS) else V1_PAIR_KEYS
        raise DataError(
            f"{spec}: holds preference pairs ('{keys[0]}' and '{keys[1]}'); train.stage={stage} "
            "would not compare them: use train.stage=dpo, orpo or simpo."
        )
    if is_unpaired(record):
        raise DataError(
            f"{spec}: holds labelled completions (a boolean 'label'); train.stage={stage} would "
            "train on the undesirable ones too: use train.stage=kto."
        )
