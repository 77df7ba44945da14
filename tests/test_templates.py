"""The built-in chat templates against texts snug did not make: LLaMA-Factory's format strings
for the template of the same name, and, where found, the model's own chat template.

LF below is what LLaMA-Factory's templates give for CONVERSATION, written out by hand from the
`register_template` calls in src/llamafactory/data/template.py of hiyouga/LLaMA-Factory at
commit ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30: the prefix, system, user and assistant slots of
each (`Template._encode`, `Llama2Template._encode` where the system joins the first user turn,
`ReasoningTemplate` for the empty thinking block), one pair per template: the prompt its
encoder gives for the last turn (the text up to the last answer, which is what
add_generation_prompt renders) and that answer's slot. {bos} and {eos} are the tokenizer's.
"""

from __future__ import annotations

import pytest

from snug.data.render import render_chat
from snug.data.templates import BUILTIN, TemplateError, resolve_template
from snug.data.tokenize import IGNORE, encode_chat

from conftest import TINY_BASE

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Blue."},
]

_CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
    "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "Blue.<|im_end|>\n",
)
_GEMMA = (
    "{bos}<start_of_turn>user\nBe brief.\n\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    "Red.<end_of_turn>\n<start_of_turn>user\nAnother?<end_of_turn>\n<start_of_turn>model\n",
    "Blue.<end_of_turn>\n",
)
_PHI = (
    "<|system|>\nBe brief.<|end|>\n<|user|>\nName a colour.<|end|>\n<|assistant|>\nRed.<|end|>\n"
    "<|user|>\nAnother?<|end|>\n<|assistant|>\n",
    "Blue.<|end|>\n",
)
_EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
LF = {
    "chatml": _CHATML,
    "yi": _CHATML,
    "qwen": _CHATML,  # its default system prompt only shows without a system turn (below)
    # ReasoningTemplate with enable_thinking (LLaMA-Factory's default): an empty thought,
    # trained, before every answer that has none.
    "qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        f"<|im_start|>assistant\n{_EMPTY_THOUGHT}Red.<|im_end|>\n<|im_start|>user\nAnother?"
        "<|im_end|>\n<|im_start|>assistant\n",
        f"{_EMPTY_THOUGHT}Blue.<|im_end|>\n",
    ),
    # LLaMA-Factory's `qwen3` with enable_thinking: false (the thought goes to the prompt);
    # its own `qwen3_nothink` has no thought at all (for Qwen3-*-2507 Instruct: use chatml).
    "qwen3_nothink": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        f"<|im_start|>assistant\n{_EMPTY_THOUGHT}Red.<|im_end|>\n<|im_start|>user\nAnother?"
        f"<|im_end|>\n<|im_start|>assistant\n{_EMPTY_THOUGHT}",
        "Blue.<|im_end|>\n",
    ),
    "llama2": (
        "{bos}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST]Red.{eos}"
        "{bos}[INST] Another? [/INST]",
        "Blue.{eos}",
    ),
    "llama3": (
        "{bos}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnother?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "Blue.<|eot_id|>",
    ),
    "mistral": (
        "{bos}[INST] Be brief.\n\nName a colour.[/INST] Red.{eos}[INST] Another?[/INST]",
        " Blue.{eos}",
    ),
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "phi": _PHI,
    "phi3": _PHI,
    "phi4": (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Name a colour."
        "<|im_end|><|im_start|>assistant<|im_sep|>Red.<|im_end|><|im_start|>user<|im_sep|>"
        "Another?<|im_end|><|im_start|>assistant<|im_sep|>",
        "Blue.<|im_end|>",
    ),
    "deepseekr1": (
        f"{{bos}}Be brief.<｜User｜>Name a colour.<｜Assistant｜>{_EMPTY_THOUGHT}Red.{{eos}}"
        "<｜User｜>Another?<｜Assistant｜>",
        f"{_EMPTY_THOUGHT}Blue.{{eos}}",
    ),
    # format_system is the bare content (the default system prompt ends with "\n\n").
    "alpaca": (
        "Be brief.### Instruction:\nName a colour.\n\n### Response:\nRed.{eos}\n\n"
        "### Instruction:\nAnother?\n\n### Response:\n",
        "Blue.{eos}\n\n",
    ),
    "default": (
        "System: Be brief.{eos}\nHuman: Name a colour.{eos}\nAssistant:Red.{eos}\n"
        "Human: Another?{eos}\nAssistant:",
        "Blue.{eos}\n",
    ),
}


def _text(tokenizer, text: str) -> str:
    return text.replace("{bos}", tokenizer.bos_token).replace("{eos}", tokenizer.eos_token)


def _builtin(tokenizer, name: str) -> str:
    return resolve_template(tokenizer, name, str(TINY_BASE))


def test_every_builtin_is_compared_with_llamafactory():
    assert sorted(LF) == sorted(BUILTIN)


@pytest.mark.parametrize("name", sorted(LF))
def test_a_builtin_renders_what_llamafactory_renders(tokenizer, name):
    prompt, answer = (_text(tokenizer, t) for t in LF[name])
    template = _builtin(tokenizer, name)
    assert render_chat(tokenizer, template, CONVERSATION, False) == prompt + answer
    assert render_chat(tokenizer, template, CONVERSATION[:4], True) == prompt


@pytest.mark.parametrize("name", sorted(LF))
def test_labels_fall_exactly_on_the_answers_and_their_end_markers(tokenizer, name):
    last = _text(tokenizer, LF[name][1])
    first = last.replace("Blue.", "Red.")
    ids, labels, status, _ = encode_chat(
        tokenizer, _builtin(tokenizer, name), CONVERSATION, 1024, False, name
    )
    targets = [t for t, y in zip(ids, labels, strict=True) if y != IGNORE]
    want = tokenizer(first, add_special_tokens=False)["input_ids"]
    want += tokenizer(last, add_special_tokens=False)["input_ids"]
    assert status == "kept" and targets == want
    assert tokenizer.decode(targets) == first + last


@pytest.mark.parametrize(
    ("name", "system"),
    [
        ("qwen", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
         "assistant.<|im_end|>\n"),
        ("alpaca", "Below is an instruction that describes a task. Write a response that "
         "appropriately completes the request.\n\n"),
    ],
)  # fmt: skip
def test_the_default_system_prompt_comes_only_without_a_system_turn(tokenizer, name, system):
    """LLaMA-Factory's default_system (`system or self.default_system`), as Qwen2.5's own
    template does for qwen."""
    template = _builtin(tokenizer, name)
    alone = render_chat(tokenizer, template, CONVERSATION[1:2], True)
    assert alone.startswith(system) and alone.count(system) == 1
    assert system not in render_chat(tokenizer, template, CONVERSATION[:2], True)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_nothink"])
def test_qwen3_renders_one_turn_as_its_own_template_does(tokenizer, name):
    """Qwen/Qwen3-0.6B's template on [user Hi, assistant Hello], as recorded in
    tyler-griggs/SkyRL skyrl-train/skyrl_train/utils/templates/README.md (commit eaeb4a83):
    its last answer gets an empty thought. (Its earlier answers get none, which cannot be
    masked prefix by prefix: snug's built-ins give every answer the same block.)"""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    qwen3_own = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
    assert render_chat(tokenizer, _builtin(tokenizer, name), chat, False) == qwen3_own


def test_qwen3_keeps_a_thought_in_the_data_and_nothink_drops_it(tokenizer):
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello"},
    ]
    think = render_chat(tokenizer, _builtin(tokenizer, "qwen3"), chat, False)
    nothink = render_chat(tokenizer, _builtin(tokenizer, "qwen3_nothink"), chat, False)
    assert think.endswith("assistant\n<think>\nGreet back.\n</think>\n\nHello<|im_end|>\n")
    assert nothink.endswith(f"assistant\n{_EMPTY_THOUGHT}Hello<|im_end|>\n")


def test_an_unknown_template_name_lists_the_names(tokenizer):
    with pytest.raises(TemplateError, match="data.template=qwen4 is unknown") as e:
        resolve_template(tokenizer, "qwen4", "m")
    assert all(name in str(e.value) for name in ("qwen3_nothink", "llama2", "deepseekr1", "phi4"))


def test_data_template_takes_a_llamafactory_name(tmp_path, tokenizer):
    """data.template=qwen3_nothink (refused before) trains the answer, not the thought."""
    from snug.config import DataConfig
    from snug.data.dataset import build_datasets

    from conftest import write_jsonl

    rows = [{"instruction": "Name a colour.", "output": "Red."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(path), template="qwen3_nothink")
    train, _, stats = build_datasets(cfg, tokenizer, "sft", 0, str(TINY_BASE))
    row = train[0]
    targets = [t for t, y in zip(row["input_ids"], row["labels"], strict=True) if y != IGNORE]
    assert stats.kept == 1 and tokenizer.decode(targets) == "Red.<|im_end|>\n"
    assert tokenizer.decode(row["input_ids"]).endswith(
        f"assistant\n{_EMPTY_THOUGHT}Red.<|im_end|>\n"
    )
