"""Record formats -> one canonical form: `{"messages": [{"role", "content"}, ...]}` or `{"text"}`.

alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}
messages: {"messages": [{"role": "system"|"user"|"assistant", "content"}]}  (OpenAI style)
text:     {"text"}  (plain language modelling, train.stage=pt)
"""

from __future__ import annotations

from typing import Any

from snug.errors import UserError

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


def _check_turns(messages: list[dict[str, str]], where: str, field: str) -> list[dict[str, str]]:
    """System first (optional), then user/assistant alternating, ending with the assistant."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DataError(f"{where}: field '{field}' has no user/assistant turns.")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(
                f"{where}: field '{field}' turn {i + 1} is from '{m['role']}' where "
                f"'{expected}' was expected (roles must alternate user, assistant)."
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
        if isinstance(t, dict):
            _no_tools(t, str(t.get("from")).lower(), where, "conversations", i)
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
        messages.append({"role": role, "content": _text(t["value"], where, "conversations")})
    return _check_turns(messages, where, "conversations")


TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")


def _no_tools(turn: dict[str, Any], role: Any, where: str, field: str, i: int) -> None:
    """Tool calls and results have no text turn to train on (yet): say so, not 'missing'."""
    if turn.get("tool_calls") or turn.get("function_call") or role in TOOL_ROLES:
        raise DataError(
            f"{where}: field '{field}' turn {i + 1} is a tool call or tool result; snug trains "
            "on the text turns of system, user and assistant only."
        )


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
        _no_tools(t, t.get("role"), where, "messages", i)
        if t.get("role") is None or "content" not in t:
            raise DataError(f"{where}: field 'messages' turn {i + 1} needs 'role' and 'content'.")
        if t["role"] not in ("system", "user", "assistant"):
            raise DataError(
                f"{where}: field 'messages' turn {i + 1} has unknown role {t['role']!r}."
            )
        content = t["content"]
        if content is None or not isinstance(content, str):
            kind = "null" if content is None else f"a {type(content).__name__}"
            raise DataError(
                f"{where}: field 'messages' turn {i + 1} has {kind} content, where its text "
                "should be."
            )
        messages.append({"role": t["role"], "content": _text(content, where, "messages")})
    return _check_turns(messages, where, "messages")


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}


def to_canonical(record: dict[str, Any], fmt: str, where: str) -> dict[str, Any]:
    """One raw record -> {"messages": [...]} or {"text": str}."""
    if fmt == "text":
        return {"text": _text(record.get("text"), where, "text")}
    return {"messages": CONVERTERS[fmt](record, where)}
