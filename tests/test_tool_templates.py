"""Tool calling in the llama3 and mistral built-ins, against texts snug did not make.

The call and tool-spec texts are the expected strings of LLaMA-Factory's own tests
(tests/data/test_formatter.py: test_llama3_function_formatter,
test_llama3_multi_function_formatter, test_llama3_tool_formatter and the same three for mistral)
for the same FUNCTION and TOOLS,
at commit ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30 of hiyouga/LLaMA-Factory; the turns around
them are the slots of its `register_template` calls for llama3 and mistral (format_function,
format_observation, format_system, and `Template._encode` / `Llama2Template._encode` that put
the tools after the system text), written out by hand. {bos} and {eos} are the tokenizer's.
"""

from __future__ import annotations

import json

import pytest

from snug.data.formats import to_canonical
from snug.data.render import TemplateRefused, render_chat
from snug.data.templates import BUILTIN
from snug.data.tokenize import IGNORE, encode_chat

# LLaMA-Factory's test inputs (tests/data/test_formatter.py)
FUNCTION = {"name": "tool_name", "arguments": {"foo": "bar", "size": 10}}
TOOLS = [
    {
        "name": "test_tool",
        "description": "tool_desc",
        "parameters": {
            "type": "object",
            "properties": {
                "foo": {"type": "string", "description": "foo_desc"},
                "bar": {"type": "number", "description": "bar_desc"},
            },
            "required": ["foo"],
        },
    }
]
WRAPPED = {"type": "function", "function": TOOLS[0]}

# The expected strings of LLaMA-Factory's formatter tests, copied from them.
LF_CALL = {
    "llama3": '{"name": "tool_name", "parameters": {"foo": "bar", "size": 10}}<|eot_id|>',
    "mistral": '[TOOL_CALLS] [{"name": "tool_name", "arguments": {"foo": "bar", "size": 10}}]{eos}',
}
LF_CALLS = {  # two calls in one turn
    "llama3": '[{"name": "tool_name", "parameters": {"foo": "bar", "size": 10}}, '
    '{"name": "tool_name", "parameters": {"foo": "bar", "size": 10}}]<|eot_id|>',
    "mistral": '[TOOL_CALLS] [{"name": "tool_name", "arguments": {"foo": "bar", "size": 10}}, '
    '{"name": "tool_name", "arguments": {"foo": "bar", "size": 10}}]{eos}',
}


def lf_tools(template: str, date: str) -> str:
    if template == "mistral":
        return (
            "[AVAILABLE_TOOLS] " + json.dumps([WRAPPED], ensure_ascii=False) + "[/AVAILABLE_TOOLS]"
        )
    return (
        f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
        "You have access to the following functions. "
        "To call a function, please respond with JSON for a function call. "
        'Respond in the format {"name": function name, "parameters": dictionary of argument '
        "name and its value}. "
        f"Do not use variables.\n\n{json.dumps(WRAPPED, indent=4, ensure_ascii=False)}\n\n"
    )


def lf_text(template: str, system: str, call: str, date: str) -> str:
    """LLaMA-Factory's text of system, user, function (`call`), observation, assistant."""
    tools = lf_tools(template, date)
    if template == "llama3":
        return (
            "{bos}<|start_header_id|>system<|end_header_id|>\n\n" + system + tools + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWeather?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n" + call + "<|start_header_id|>"
            'ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>'
            "<|start_header_id|>assistant<|end_header_id|>\n\nWarm.<|eot_id|>"
        )
    return (
        "{bos}[INST] " + system + tools + "\n\nWeather?[/INST]" + call + "[TOOL_RESULTS] "
        '{"content": {"temp": 21}}[/TOOL_RESULTS] Warm.{eos}'
    )


def record(call: object, system: str) -> dict:
    """LLaMA-Factory's glaive_toolcall layout, with its test's FUNCTION and TOOLS."""
    turns = [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "Warm."},
    ]
    return {"conversations": turns, "system": system, "tools": json.dumps(TOOLS)}


def _tokens(text: str, bos: str, eos: str) -> str:
    return text.replace("{bos}", bos).replace("{eos}", eos)


class Tokens:  # the tokens a tokenizer gives a template (render_chat reads no more)
    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>"}


def _render(template: str, canon: dict) -> tuple[str, set[str]]:
    """The text, and the date it holds: llama3 writes Llama 3.1's default date, where
    LLaMA-Factory writes today's (its tests' expected text takes the date as a value)."""
    text = render_chat(Tokens(), BUILTIN[template], canon["messages"], False, "r", canon["tools"])
    return text, {"26 Jul 2024"}


@pytest.mark.parametrize("template", ["llama3", "mistral"])
@pytest.mark.parametrize("calls", [LF_CALL, LF_CALLS])
@pytest.mark.parametrize("system", ["", "Be brief."])
def test_renders_lf_text(template, calls, system):
    call = FUNCTION if calls is LF_CALL else [FUNCTION, FUNCTION]
    text, dates = _render(template, to_canonical(record(call, system), "sharegpt", "r"))
    expected = {
        _tokens(lf_text(template, system, calls[template], d), "<s>", "</s>") for d in dates
    }
    assert text in expected


@pytest.mark.parametrize("template", ["llama3", "mistral"])
def test_openai_layout_renders_as_sharegpt(template):
    glaive = to_canonical(record(FUNCTION, ""), "sharegpt", "r")
    openai = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {
                            "name": "tool_name",
                            "arguments": '{"foo": "bar", "size": 10}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "Warm."},
        ],
        "tools": [WRAPPED],
    }
    ours, _ = _render(template, to_canonical(openai, "messages", "r"))
    theirs, _ = _render(template, glaive)
    assert ours == theirs


@pytest.mark.parametrize("template", ["llama3", "mistral"])
def test_the_call_trains_and_the_result_and_spec_are_masked(tokenizer, template):
    canon = to_canonical(record(FUNCTION, ""), "sharegpt", "r")
    ids, labels, status, _ = encode_chat(
        tokenizer, BUILTIN[template], canon["messages"], 4096, False, "r", tools=canon["tools"]
    )
    assert status == "kept"
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    masked = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    call = _tokens(LF_CALL[template], "", tokenizer.eos_token or "")
    assert call in trained and "Warm." in trained
    assert '{"temp": 21}' in masked and '{"temp": 21}' not in trained
    assert '"name": "test_tool"' in masked and "test_tool" not in trained
    assert "Weather?" in masked


@pytest.mark.parametrize("template", ["llama3", "mistral"])
def test_text_beside_a_call_is_refused(template):
    canon = to_canonical(record(FUNCTION, ""), "sharegpt", "r")
    canon["messages"][1]["content"] = "Let me look."
    with pytest.raises(TemplateRefused, match="text beside its tool calls"):
        render_chat(Tokens(), BUILTIN[template], canon["messages"], False, "r", canon["tools"])


@pytest.mark.parametrize("template", ["llama3", "mistral"])
def test_without_tools_the_text_is_unchanged(template):
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    with_none = render_chat(Tokens(), BUILTIN[template], plain, False, "r", None)
    assert "Cutting Knowledge" not in with_none and "AVAILABLE_TOOLS" not in with_none
    assert "Be brief." in with_none and with_none.endswith(
        "Hello.<|eot_id|>" if template == "llama3" else " Hello.</s>"
    )
