"""Record formats -> one canonical form: `{"messages": [{"role", "content"}, ...]}` or `{"text"}`.

alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
sharegpt: {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation",
           "value"}], "system"?, "tools"?}
messages: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content",
           "tool_calls"?}], "tools"?}  (OpenAI style)
text:     {"text"}  (plain language modelling, train.stage=pt)

Tool calling is read into OpenAI's form, once, here, so that one path renders both layouts: a
sharegpt `function_call` turn (its value a JSON {"name", "arguments"}, or a list of them, as in
LLaMA-Factory's glaive_toolcall data) becomes an assistant message with `tool_calls` and empty
content, an `observation` a `tool` message; a record's `tools` (a JSON string or a list of
function specs) becomes the canonical record's "tools", each spec as {"type": "function",
"function": spec}: what `apply_chat_template(messages, tools=...)` takes.

A message's content is a string or a list of typed parts (`read_turn`): OpenAI's
`{"type": "text", "text"}` and LLaMA-Factory v1's `{"type": "text", "value"}`, v1's
`reasoning` parts and per-message `loss_weight`. A record carrying images, videos or audios is
refused: snug trains on text only.
"""

from __future__ import annotations

import json
from typing import Any

from snug.errors import UserError

# Columns of LLaMA-Factory's multimodal records: a record that fills one is never trained as
# text (its "<image>" markers would be learned as words).
MEDIA_COLUMNS = ("images", "videos", "audios")

FORMATS = ("alpaca", "sharegpt", "messages", "text")
# The field that holds what a record trains on, named when nothing of it is left to train on.
ANSWER_FIELD = {
    "alpaca": "output",
    "sharegpt": "conversations",
    "messages": "messages",
    "text": "text",
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # its value is the call (`_sharegpt_turn`)
    "observation": "tool",
    "tool": "tool",
}


class DataError(UserError):
    """A problem with one record, worded with its file, row and field."""


def _format_of(keys: set[str]) -> str | None:
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    return "text" if "text" in keys else None


def detect_format(record: dict[str, Any], where: str) -> str:
    """The format of `record`, told by the fields it fills, else by all its keys (`datasets`
    gives every record each column of the file, None where the record lacks it)."""
    filled = {k for k, v in record.items() if v is not None}
    fmt = _format_of(filled) or _format_of(set(record))
    if fmt is None:
        raise DataError(
            f"{where}: cannot tell the format from the keys {sorted(record)}; expected alpaca "
            "(instruction, output), sharegpt (conversations), messages, or text; or set "
            "data.format."
        )
    return fmt


def _text(value: Any, where: str, key: str, allow_empty: bool = False) -> str:
    if value is None and allow_empty:
        return ""
    if value is None:  # `datasets` fills a field that a record lacks with None
        raise DataError(f"{where}: field '{key}' is missing.")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, not {type(value).__name__}.")
    if not value.strip() and not allow_empty:
        raise DataError(f"{where}: field '{key}' is empty.")
    return value


def _check_turns(messages: list[dict[str, Any]], where: str, field: str) -> list[dict[str, Any]]:
    """System first (optional), then user and assistant alternating, ending with the assistant;
    an assistant turn that calls tools is followed by their results (tool turns), and then by
    the assistant again."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DataError(f"{where}: field '{field}' has no user/assistant turns.")
    for i, m in enumerate(body):
        before = body[i - 1] if i else None
        if before is None:
            expected = ("user",)
        elif before["role"] == "assistant":
            expected = ("tool",) if before.get("tool_calls") else ("user",)
        elif before["role"] == "tool":
            expected = ("tool", "assistant")
        else:
            expected = ("assistant",)
        if m["role"] not in expected:
            raise DataError(
                f"{where}: field '{field}' turn {i + 1} is from '{m['role']}' where "
                f"'{' or '.join(expected)}' was expected (roles must alternate user, assistant; "
                "a tool call is followed by its results)."
            )
    if body[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{field}' must end with an assistant turn.")
    return messages


def _alpaca(r: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = []
    system = _text(r.get("system"), where, "system", allow_empty=True)
    if system:
        messages.append({"role": "system", "content": system})
    for i, pair in enumerate(r.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{where}: field 'history' item {i + 1} must be [user, assistant].")
        messages.append({"role": "user", "content": _text(pair[0], where, "history")})
        messages.append({"role": "assistant", "content": _text(pair[1], where, "history")})
    prompt = _text(r.get("instruction"), where, "instruction")
    extra = _text(r.get("input"), where, "input", allow_empty=True)
    messages.append(
        {"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt}
    )
    messages.append({"role": "assistant", "content": _text(r.get("output"), where, "output")})
    return messages


def _sharegpt(r: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = r.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'conversations' must be a list of turns.")
    messages = []
    system = r.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system, where, "system")})
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") is None or t.get("value") is None:
            raise DataError(
                f"{where}: field 'conversations' turn {i + 1} needs 'from' and 'value'."
            )
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise DataError(
                f"{where}: field 'conversations' turn {i + 1} has unknown role '{t['from']}' "
                f"(known: {', '.join(SHAREGPT_ROLES)})."
            )
        value = _text(t["value"], where, "conversations")
        if str(t["from"]).lower() == "function_call":
            label = f"field 'conversations' turn {i + 1}"
            messages.append(
                {"role": role, "content": "", "tool_calls": _calls(value, where, label)}
            )
        else:
            messages.append({"role": role, "content": value})
    return _check_turns(messages, where, "conversations")


def _json(value: Any, where: str, label: str) -> Any:
    """`value`, read as JSON when it is a string (LLaMA-Factory keeps calls and tools as JSON
    text), else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: {label} is not valid JSON ({e.msg} at column {e.colno})."
        ) from None


def _calls(value: Any, where: str, label: str) -> list[dict[str, Any]]:
    """A call, or a list of calls, as sharegpt's function_call value or OpenAI's `tool_calls`
    hold them -> OpenAI's [{"type": "function", "function": {"name", "arguments": dict}}]
    (arguments as a dict: chat templates write them with `tojson`)."""
    calls = _json(value, where, label)
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for j, call in enumerate(calls):
        call = call.get("function", call) if isinstance(call, dict) else call
        name = call.get("name") if isinstance(call, dict) else None
        if not isinstance(name, str) or not name or "arguments" not in call:
            raise DataError(
                f"{where}: {label} call {j + 1} needs a 'name' and 'arguments', as "
                '{"name": "get_weather", "arguments": {"city": "Paris"}}.'
            )
        args = _json(call["arguments"], where, f"{label} call {j + 1} 'arguments'")
        if not isinstance(args, dict):
            raise DataError(f"{where}: {label} call {j + 1} has 'arguments' that are no object.")
        out.append({"type": "function", "function": {"name": name, "arguments": args}})
    return out


def _tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """A record's `tools` (JSON text or a list of function specs, plain or OpenAI's
    {"type": "function", "function": spec}) -> OpenAI's form, or None when it has none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tools = _json(value, where, "field 'tools'")
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function", t).get("name"), str) for t in tools
    ):
        raise DataError(
            f"{where}: field 'tools' must be a list of function specs, each with a 'name'."
        )
    return [
        t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools
    ]


def _tool_turn(t: dict[str, Any], where: str, label: str) -> dict[str, Any]:
    """An OpenAI `tool` message -> {"role": "tool", "content", "tool_call_id"?, "name"?}."""
    content = t.get("content")
    if isinstance(content, list):
        content = read_turn(t, "user", where, label)["content"]
    message = {"role": "tool", "content": _text(content, where, "messages", allow_empty=True)}
    return message | {k: t[k] for k in ("tool_call_id", "name") if isinstance(t.get(k), str)}


def _assistant_calls(t: dict[str, Any], where: str, label: str) -> dict[str, Any]:
    """An OpenAI assistant message with `tool_calls` (its content may be null)."""
    message = read_turn({**t, "content": t.get("content") or ""}, "assistant", where, label)
    message["tool_calls"] = _calls(t["tool_calls"], where, f"{label} 'tool_calls'")
    return message


def _messages(r: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = r.get("messages")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'messages' must be a list of turns.")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(
                f"{where}: field 'messages' turn {i + 1} must be an object with 'role' and "
                f"'content', not a {type(t).__name__}."
            )
        label = f"field 'messages' turn {i + 1}"
        if t.get("role") == "tool":
            messages.append(_tool_turn(t, where, label))
            continue
        if t.get("role") == "assistant" and t.get("tool_calls"):
            messages.append(_assistant_calls(t, where, label))
            continue
        if t.get("role") is None or "content" not in t:
            raise DataError(f"{where}: field 'messages' turn {i + 1} needs 'role' and 'content'.")
        if t["role"] not in ("system", "user", "assistant"):
            raise DataError(
                f"{where}: field 'messages' turn {i + 1} has unknown role {t['role']!r} "
                "(known: system, user, assistant, tool)."
            )
        messages.append(read_turn(t, t["role"], where, f"field 'messages' turn {i + 1}"))
        messages[-1]["content"] = _text(messages[-1]["content"], where, "messages")
    return _check_turns(messages, where, "messages")


# Part types that hold media: a record with one is refused (snug trains on text only).
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url")
MEDIA_PARTS += ("file", "input_file")
TOOL_PARTS = ("tool_call", "tool_calls", "tools", "function_call")


def _parts(content: list[Any], where: str, label: str) -> tuple[str, str, set[Any]]:
    """Typed parts -> (their text, their reasoning, the loss weights they carry). Parts of a
    kind are joined with nothing between them, as OpenAI's API and LLaMA-Factory v1 join them."""
    texts, thoughts, weights = [], [], set()
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise DataError(
                f"{where}: {label} part {j + 1} must be an object with a 'type', such as "
                '{"type": "text", "text": "..."}.'
            )
        if kind in MEDIA_PARTS:
            raise DataError(
                f"{where}: {label} holds a part of type '{kind}'; snug trains on text only, so "
                "multimodal records are refused."
            )
        if kind in TOOL_PARTS:
            raise DataError(
                f"{where}: {label} holds a '{kind}' part; snug trains on the text turns of "
                "system, user and assistant only."
            )
        if kind not in ("text", "reasoning"):
            raise DataError(
                f"{where}: {label} part {j + 1} has type '{kind}'; snug reads 'text' and "
                "'reasoning' parts."
            )
        value = part.get("text", part.get("value"))  # OpenAI: "text"; LLaMA-Factory v1: "value"
        if not isinstance(value, str):
            raise DataError(
                f"{where}: {label} part {j + 1} needs its text as a string in 'text' or 'value'."
            )
        (texts if kind == "text" else thoughts).append(value)
        if part.get("loss_weight") is not None:
            weights.add(part["loss_weight"])
    return "".join(texts), "".join(thoughts), weights


def _trained(weights: set[Any], role: str, where: str, label: str) -> bool:
    """Whether a turn trains, from the loss_weight it (or its parts) carry: an assistant turn
    trains unless its weight is 0; any other turn never does (its weight, if any, is 0)."""
    if len(weights) > 1:
        raise DataError(
            f"{where}: {label} carries several loss_weight values {sorted(map(str, weights))}; "
            "snug trains a turn whole or not at all: give it one loss_weight, 0 or 1."
        )
    weight = weights.pop() if weights else None
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
        raise DataError(f"{where}: {label} has loss_weight {weight!r}; use 0 or 1.")
    if role != "assistant":
        if weight:
            raise DataError(
                f"{where}: {label} is a {role} turn with loss_weight {weight}; snug trains on "
                "assistant turns only (data.train_on_prompt: true trains every prompt): use 0."
            )
        return False
    if weight not in (None, 0, 1):
        raise DataError(
            f"{where}: {label} has loss_weight {weight}; snug trains a turn whole or not at "
            "all: use 0 or 1."
        )
    return weight != 0


def read_turn(turn: dict[str, Any], role: str, where: str, label: str) -> dict[str, Any]:
    """One message whose role is known -> {"role", "content"}, with "reasoning_content" (the
    key chat templates with a thinking block read) when it has reasoning parts and
    "loss_weight": 0.0 when it is an assistant turn not to train on. Its content is a string
    or typed parts (`_parts`); `label` names it in errors ("field 'messages' turn 2")."""
    content = turn.get("content", turn.get("value"))
    if isinstance(content, list):
        text, thought, weights = _parts(content, where, label)
    elif isinstance(content, str):
        text, thought, weights = content, "", set()
    else:
        kind = "null" if content is None else f"a {type(content).__name__}"
        raise DataError(f"{where}: {label} has {kind} content, where its text should be.")
    if turn.get("loss_weight") is not None:
        weights.add(turn["loss_weight"])
    message: dict[str, Any] = {"role": role, "content": text}
    if thought and role != "assistant":
        raise DataError(
            f"{where}: {label} is a {role} turn with a 'reasoning' part; only "
            "assistant turns reason."
        )
    if thought:
        message["reasoning_content"] = thought
    if not _trained(weights, role, where, label) and role == "assistant":
        message["loss_weight"] = 0.0  # encode_chat masks its answer (data/tokenize.py)
    return message


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}


def refuse_media(record: dict[str, Any], where: str) -> None:
    """DataError for a record that carries images, videos or audios (LLaMA-Factory's
    multimodal columns): snug trains text models on text only."""
    for column in MEDIA_COLUMNS:
        if record.get(column):
            raise DataError(
                f"{where}: the record carries '{column}'; snug trains on text only, so "
                "multimodal records are refused."
            )


def to_canonical(record: dict[str, Any], fmt: str, where: str) -> dict[str, Any]:
    """One raw record -> {"messages": [...]} or {"text": str}."""
    refuse_media(record, where)
    if fmt == "text":
        return {"text": _text(record.get("text"), where, "text")}
    canon: dict[str, Any] = {"messages": CONVERTERS[fmt](record, where)}
    if tools := _tools(record.get("tools"), where):
        canon["tools"] = tools
    return canon
