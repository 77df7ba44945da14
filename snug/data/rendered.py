"""Whether a chat template renders what a record holds beyond plain turns: the tools and calls
of a tool-calling conversation, and the reasoning of a thinking model. A template that would
drop them is refused in one line, rather than train a record without them (tokenize.py calls
these)."""

from __future__ import annotations

from snug.data.render import TemplateError, origin_of


def check_tools_rendered(
    template: str,
    asked: list[dict],
    answer: dict,
    shown: tuple[str, str, str],
    tools: list[dict] | None,
    where: str,
) -> None:
    """TemplateError unless `template` renders what a conversation with tools holds: the
    template reads `tools` / `tool_calls` (the variables of `apply_chat_template`), and its
    text shows each tool's name, the name of each call `answer` makes (in the answer's text,
    which trains) and the content of each tool result just before it (in `prompt`, which is
    masked). Text, not the source alone: a template can name a variable and drop its value.
    `shown`: the turn's prompt text, its answer text, and the whole text up to the answer."""
    prompt, answer_text, full = shown
    names = [t["function"]["name"] for t in tools or ()]
    calls = [c["function"]["name"] for c in answer.get("tool_calls") or ()]
    results = []
    for m in reversed(asked):
        if m["role"] != "tool":
            break
        results.append(m["content"])
    needs = ("tools" if tools else "") + (" tool_calls" if calls else "")
    lost = (
        next((f"the tools' spec '{n}'" for n in names if n not in full), None)
        or next((f"the call of '{n}'" for n in calls if n not in answer_text), None)
        or next(("a tool result" for r in results if r not in prompt), None)
    )
    if all(v in template for v in needs.split()) and not lost:
        return
    missing = lost or f"the variable {' and '.join(needs.split())}"
    raise TemplateError(
        f"{where}: the record uses tools, and {origin_of(template)} does not render "
        f"{missing}; snug trains tool calls with a template that does: set data.template to "
        "qwen, qwen3, qwen3_nothink, llama3 or mistral, or auto with a tokenizer whose template "
        "renders tools."
    )


def unrendered_reasoning(messages: list[dict], template: str, at: str) -> str:
    """Why a conversation with reasoning parts cannot render through `template` ("" when it
    can): the template has no thinking block (it never reads `reasoning_content`, the key
    Qwen3's and DeepSeek-R1's templates render as one), so the reasoning would be lost."""
    if "reasoning_content" in template or not any("reasoning_content" in m for m in messages):
        return ""
    return (
        f"{at}: a 'reasoning' part needs a chat template with a thinking block (one that "
        f"renders reasoning_content, as Qwen3's does), and {origin_of(template)} has none: "
        "set data.template to one that has, or remove the reasoning parts."
    )
