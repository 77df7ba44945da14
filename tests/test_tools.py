"""Tool calling (issue 35 point 3): sharegpt function_call / observation turns (LLaMA-Factory's
glaive_toolcall layout) and OpenAI tool_calls / tool messages read into one canonical form,
rendered with the record's tools, the calls trained and the tool results masked."""

import json

import pytest

from snug.config import DataConfig
from snug.data.dataset import build_datasets
from snug.data.formats import DataError, to_canonical
from snug.data.render import TemplateError
from snug.data.templates import BUILTIN
from snug.data.tokenize import IGNORE, encode_chat

from conftest import write_jsonl

SPEC = {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object"}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
GLAIVE = {  # LLaMA-Factory's glaive_toolcall layout: JSON strings in the record
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "tools": json.dumps([SPEC]),
}
OPENAI = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ],
    "tools": [{"type": "function", "function": SPEC}],
}


def _strip(canon):
    return [{k: v for k, v in m.items() if k != "tool_call_id"} for m in canon["messages"]]


def test_both_layouts_read_into_one_canonical_form():
    glaive = to_canonical(GLAIVE, "sharegpt", "g.json row 1")
    openai = to_canonical(OPENAI, "messages", "o.jsonl line 1")
    assert _strip(glaive) == _strip(openai)
    assert glaive["tools"] == openai["tools"] == [{"type": "function", "function": SPEC}]
    assert glaive["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": CALL}],
    }
    assert glaive["messages"][2] == {"role": "tool", "content": '{"temp": 21}'}


@pytest.mark.parametrize("template", ["qwen", "qwen3", "qwen3_nothink"])
@pytest.mark.parametrize("record, fmt", [(GLAIVE, "sharegpt"), (OPENAI, "messages")])
def test_call_and_answer_train_and_the_result_is_masked(tokenizer, template, record, fmt):
    canon = to_canonical(record, fmt, "r")
    ids, labels, status, _ = encode_chat(
        tokenizer, BUILTIN[template], canon["messages"], 4096, False, "r", tools=canon["tools"]
    )
    assert status == "kept"
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    masked = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert call in trained and "It is 21 degrees." in trained
    assert '{"temp": 21}' not in trained and "<tool_response>" in masked
    assert '"name": "get_weather", "description"' in masked  # the spec, in the system turn
    assert "Weather in Paris?" in masked


def test_qwen_renders_lf_qwen_text(tokenizer):
    from snug.data.render import render_chat

    canon = to_canonical(GLAIVE, "sharegpt", "r")
    text = render_chat(tokenizer, BUILTIN["qwen"], canon["messages"], False, "r", canon["tools"])
    spec = json.dumps({"type": "function", "function": SPEC})
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        f"query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{spec}\n</tools>"
    )
    assert (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        f"{json.dumps(CALL)}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n"
        '{"temp": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 21 degrees.'
        "<|im_end|>\n"
    ) in text


def test_a_template_without_tools_is_refused_in_one_line(tmp_path, tokenizer):
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps([GLAIVE]))
    cfg = DataConfig(train=str(path), template="chatml", on_error="skip")
    with pytest.raises(TemplateError) as e:
        build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert "\n" not in str(e.value) and "glaive.json" in str(e.value)
    assert "data.template=chatml does not render" in str(e.value)


def test_a_template_that_names_tools_but_drops_the_call_is_refused(tokenizer):
    canon = to_canonical(OPENAI, "messages", "r")
    dropping = "{# tools tool_calls #}" + BUILTIN["chatml"]
    with pytest.raises(TemplateError, match="does not render the tools' spec 'get_weather'"):
        encode_chat(tokenizer, dropping, canon["messages"], 4096, False, "r", tools=canon["tools"])


def test_tool_data_trains_through_build_datasets(tmp_path, tokenizer):
    for name, record in (("openai.jsonl", OPENAI), ("glaive.jsonl", GLAIVE)):
        path = write_jsonl(tmp_path / name, [record])
        cfg = DataConfig(train=str(path), template="qwen")
        train, _, stats = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
        assert len(train) == 1 and stats.invalid == 0


@pytest.mark.parametrize(
    "turns, message",
    [
        (
            [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{oops"}],
            "not valid JSON",
        ),
        (
            [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f"}'}],
            "needs a 'name' and 'arguments'",
        ),
        (
            [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}],
            "'assistant' was expected",
        ),
        (
            [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": json.dumps(CALL)},
                {"from": "human", "value": "q"},
            ],
            "'tool' was expected",
        ),
    ],
)
def test_malformed_tool_turns_are_named(turns, message):
    with pytest.raises(DataError, match=message):
        to_canonical({"conversations": turns + [{"from": "gpt", "value": "a"}]}, "sharegpt", "r")


def test_a_tool_exchange_over_the_cutoff_is_cut_not_dropped(tokenizer):
    canon = to_canonical(GLAIVE, "sharegpt", "r")
    args = (tokenizer, BUILTIN["qwen"], canon["messages"])
    whole, _, _, _ = encode_chat(*args, 4096, False, "r", tools=canon["tools"])
    cutoff = len(whole) - 20
    ids, labels, status, _ = encode_chat(*args, cutoff, False, "r", tools=canon["tools"])
    assert status == "truncated" and 0 < len(ids) <= cutoff
    assert any(lab != IGNORE for lab in labels)
    assert ids[:5] == whole[:5]  # the system turn (with the tools) keeps its start


def test_preference_data_with_tool_turns_is_refused(tmp_path, tokenizer):
    pair = {
        "conversations": GLAIVE["conversations"][:3],
        "chosen": {"from": "gpt", "value": "21."},
        "rejected": {"from": "gpt", "value": "No idea."},
    }
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair])
    with pytest.raises(DataError, match="item 2 is a tool call or tool result"):
        build_datasets(DataConfig(train=str(path), template="qwen"), tokenizer, "dpo", 0, "tiny")
