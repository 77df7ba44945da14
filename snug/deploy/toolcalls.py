"""Tool calls in a generated answer -> OpenAI's `tool_calls`, for the chat templates that
write them (snug/data/templates.py): the answer text each format puts a call in, read back.

qwen:    text, then each call as <tool_call>\\n{"name", "arguments"}\\n</tool_call>
llama3:  the whole answer one JSON {"name", "parameters"}, or a list of them
mistral: the whole answer [TOOL_CALLS] and a JSON list of {"name", "arguments"} (the marker
         is a special token in Mistral's tokenizers, so the decoded answer may lack it)

No library reads these formats back (transformers renders them; vLLM's parsers are part of
its server), so this is snug's own, as small as the three formats.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_MISTRAL = "[TOOL_CALLS]"


@dataclass(frozen=True)
class ToolFormat:
    """How one family of templates writes calls: `held(text)` is where the part of a
    streamed answer that may be a call begins (its text is kept back until the end);
    `parse(text)` -> (the answer's text, its calls)."""

    name: str

    def held(self, text: str) -> int:
        if self.name == "qwen":  # from the call's marker, or a start of it, and the space before
            at = text.find("<tool_call>")
            at = at if at >= 0 else len(text) - _prefix_at_end(text, "<tool_call>")
            return len(text[:at].rstrip())
        stripped = text.lstrip()
        start = len(text) - len(stripped)
        if not stripped or stripped[0] in "{[":  # (mistral's [TOOL_CALLS] starts with "[" too)
            return start
        return len(text)

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if self.name == "qwen":
            found = [_call(m, "arguments") for m in _QWEN_CALL.findall(text)]
            if found and all(found):
                return text[: text.find("<tool_call>")].rstrip(), found
            return text, []
        body = text.strip()
        if self.name == "mistral":  # [TOOL_CALLS] is a special token in Mistral's own
            body = body.removeprefix(_MISTRAL)  # tokenizers: decoding drops it
        key = "parameters" if self.name == "llama3" else "arguments"
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        items = value if isinstance(value, list) else [value]
        found = [_call(item, key) for item in items]
        if found and all(found):
            return "", found
        return text, []


def _call(item: Any, key: str) -> dict[str, Any] | None:
    """{"name", key: object} (or its JSON text) -> an OpenAI tool call; None if it is not one."""
    if isinstance(item, str):
        try:
            item = json.loads(item)
        except json.JSONDecodeError:
            return None
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get(key, {})
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def _prefix_at_end(text: str, marker: str) -> int:
    """The length of the longest start of `marker` that `text` ends with."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


# the built-in templates (snug/data/templates.py) that render tools, by the format they write
BY_TEMPLATE = {
    "qwen": "qwen",
    "qwen3": "qwen",
    "qwen3_nothink": "qwen",
    "llama3": "llama3",
    "mistral": "mistral",
}


def tool_format(template_name: str | None, source: str) -> ToolFormat | None:
    """The format a session's template writes calls in: by its built-in name, or for a
    tokenizer's own template by what it writes (Qwen's <tool_call>); None when unknown (the
    answer then comes back as text)."""
    if template_name in BY_TEMPLATE:
        return ToolFormat(BY_TEMPLATE[template_name])
    if "<tool_call>" in source:
        return ToolFormat("qwen")
    return None
