"""Chat templates: the tokenizer's own, or a built-in one per model family, by LLaMA-Factory's name.

Built-ins are Jinja strings in the format `tokenizer.apply_chat_template` takes, so training and
generation render conversations through one code path. Each ends assistant turns with the end
marker the model must learn to emit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from snug.data.render import ChatTemplate, TemplateError

if TYPE_CHECKING:  # only for annotations: a config check must not load transformers
    from transformers import PreTrainedTokenizerBase

# The built-ins, one for each model family in snug/models/catalog/models/, named as LLaMA-Factory
# names its templates (src/llamafactory/data/template.py) so that its `template:` key carries
# over. Each renders the text LLaMA-Factory's format strings give for the same conversation
# (tests/test_templates.py holds those texts), written as Jinja so that training, masking and
# generation go through one code path. Where LLaMA-Factory's text depends on more than the
# messages (a default system prompt, an empty thinking block), the Jinja does the same.
# Differences from the models' own templates are named in docs/design.md ("Built-in templates").

_FIRST_SYSTEM = "(messages and messages[0]['role'] == 'system')"


def _chatml(
    default_system: str = "",
    answer: str = "{{ m['content'] }}",
    reply: str = "",
    tools: bool = False,
) -> str:
    """ChatML turns (<|im_start|>role\n...<|im_end|>\n): `default_system` when the
    conversation has none, `answer` renders an assistant's content, `reply` follows the
    assistant header of the generation prompt (and of every assistant turn); with `tools`,
    Qwen's tool calling (`_QWEN_TOOLS`)."""
    default = (
        f"{{% if messages and not {_FIRST_SYSTEM} %}}<|im_start|>system\n{default_system}"
        "<|im_end|>\n{% endif %}"
        if default_system
        else ""
    )
    calls, tool = "", ""
    if tools:
        system = f"messages[0]['content'] if {_FIRST_SYSTEM} else {default_system!r}"
        default = (
            f"{{% if tools %}}<|im_start|>system\n{{{{ {system} }}}}{_QWEN_TOOLS}<|im_end|>\n"
            f"{{% else %}}{default}{{% endif %}}"
        )
        calls, tool = _QWEN_CALLS, _QWEN_RESULT
    return (
        f"{default}{{% for m in messages %}}"
        + ("{% if loop.first and m['role'] == 'system' and tools %}{% el" if tools else "{% ")
        + f"if m['role'] == 'assistant' %}}<|im_start|>assistant\n{reply}{answer}{calls}"
        f"<|im_end|>\n{tool}"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        f"{{% endfor %}}{{% if add_generation_prompt %}}<|im_start|>assistant\n{reply}{{% endif %}}"
    )


# Qwen 2.5's and 3's tool calling, as LLaMA-Factory's qwen tool format writes it (its
# tool_utils.QwenToolUtils; the text of Qwen's own templates, less the grouping of a system
# turn): the function specs in the system turn (after the system text, the default one where
# the conversation has none), each call as <tool_call> JSON after the answer's text, and tool
# results in a user turn as <tool_response>, consecutive results in one turn.
_QWEN_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for t in tools %}{{ '\\n' }}{{ t | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML "
    'tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_QWEN_CALLS = (
    "{% if m['tool_calls'] %}{% if m['content'] %}{{ '\\n' }}{% endif %}{% for c in m['tool_calls'] %}"
    "<tool_call>\n{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']}"
    " | tojson }}\n</tool_call>{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}{% endif %}"
)
_QWEN_RESULT = (
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
)


# Reasoning models' answers (LLaMA-Factory's ReasoningTemplate, thinking enabled): an answer
# that carries no <think> block gets an empty one, trained as part of the answer.
_THINK_OR_EMPTY = (
    "{% if '<think>' in m['content'] or '</think>' in m['content'] %}{{ m['content'] }}"
    "{% else %}<think>\n\n</think>\n\n{{ m['content'] }}{% endif %}"
)
# Qwen 3 without thinking: the empty block belongs to the prompt (as Qwen3's template renders
# it with enable_thinking=False), and a thought in the data is dropped, as LLaMA-Factory does.
_THOUGHT_DROPPED = "{{ m['content'].split('</think>')[-1].lstrip('\n') }}"

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)

_GEMMA = (
    "{{ bos_token }}{% set sys = messages[0]['content'] + '\n\n' if "
    + _FIRST_SYSTEM
    + " else '' %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ sys if loop.first else '' }}{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_PHI = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Llama 3.x's and Mistral's tool calling, as LLaMA-Factory's llama3 and mistral tool formats
# write it (its tool_utils.Llama3ToolUtils and MistralToolUtils, and the format_tools,
# format_function and format_observation slots of the llama3 and mistral templates). Each call
# is the whole answer: a JSON object, or a list of them, and nothing else, so an assistant
# message with both text and calls is refused (LLaMA-Factory's function turn is JSON only).
_TEXT_BESIDE_CALLS = (
    "{% if m['content'] %}{{ raise_exception('an assistant message with text beside its tool "
    "calls: this template writes the calls as the whole answer, as LLaMA-Factory does; put the "
    "text in a message of its own, or use a qwen template') }}{% endif %}"
)

# llama3: the specs after the system text (with nothing between, as LLaMA-Factory joins them)
# in the system turn, under a fixed date: Llama 3.1's own template's default, "26 Jul 2024"
# (LLaMA-Factory writes datetime.now(), so its text changes daily; a fixed one keeps a dataset's
# tokens, its cache and a resume's data check the same from one day to the next); a call as
# {"name", "parameters"} (one object, or a list of several); each result in an ipython turn.
_LLAMA3_TOOLS = (
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You have access to the following functions. To call a function, please respond with JSON "
    'for a function call. Respond in the format {"name": function name, "parameters": '
    'dictionary of argument name and its value}. Do not use variables.{{ "\\n\\n" }}'
    "{% for t in tools %}{{ t | tojson(indent=4) }}{{ '\\n\\n' }}{% endfor %}"
)
_LLAMA3_CALLS = (
    _TEXT_BESIDE_CALLS + "{% set several = m['tool_calls'] | length > 1 %}"
    "{% if several %}[{% endif %}{% for c in m['tool_calls'] %}"
    "{{ {'name': c['function']['name'], 'parameters': c['function']['arguments']} | tojson }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}{% if several %}]{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    f"{{{{ messages[0]['content'] if {_FIRST_SYSTEM} else '' }}}}{_LLAMA3_TOOLS}<|eot_id|>"
    "{% endif %}{% for m in messages %}"
    "{% if loop.first and m['role'] == 'system' and tools %}"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] %}"
    f"<|start_header_id|>assistant<|end_header_id|>\n\n{_LLAMA3_CALLS}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ 'ipython' if m['role'] == 'tool' else m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# mistral (LLaMA-Factory's Llama2Template: the system text joins the first user turn): the
# specs as [AVAILABLE_TOOLS] JSON after the system text, a call as [TOOL_CALLS] and a list of
# {"name", "arguments"}, each result as [TOOL_RESULTS] {"content": result} (the result
# written as it is, JSON or not, as LLaMA-Factory writes it).
_MISTRAL = (
    "{{ bos_token }}"
    f"{{% set sys = messages[0]['content'] if {_FIRST_SYSTEM} else '' %}}"
    "{% if tools %}{% set sys = sys + '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' %}"
    "{% endif %}{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
    "[INST] {{ sys + '\\n\\n' if loop.first and sys else '' }}{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'tool' %}[TOOL_RESULTS] {\"content\": {{ m['content'] }}{{ '}' }}"
    "[/TOOL_RESULTS]{% elif m['tool_calls'] %}"
    + _TEXT_BESIDE_CALLS
    + "[TOOL_CALLS] [{% for c in m['tool_calls'] %}"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

BUILTIN = {
    "chatml": _chatml(),
    "yi": _chatml(),
    "qwen": _chatml(QWEN_SYSTEM, tools=True),
    "qwen3": _chatml(answer=_THINK_OR_EMPTY, tools=True),
    "qwen3_nothink": _chatml(answer=_THOUGHT_DROPPED, reply="<think>\n\n</think>\n\n", tools=True),
    "llama2": (
        "{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' if "
        + _FIRST_SYSTEM
        + " else '' %}{% for m in messages if m['role'] != 'system' %}"
        "{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ sys if loop.first else '' }}"
        "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "phi": _PHI,
    "phi3": _PHI,  # snug's earlier name for `phi`
    "phi4": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_sep|>{{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}"
    ),
    "deepseekr1": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
        "{% else %}<｜Assistant｜>" + _THINK_OR_EMPTY + "{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
    ),
    "alpaca": (
        "{% if messages and not "
        + _FIRST_SYSTEM
        + " %}"
        + ALPACA_SYSTEM
        + "{% endif %}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
        "{% else %}{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    ),
    "default": (
        "{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}"
        "{{ eos_token }}\n{% elif m['role'] == 'user' %}Human: {{ m['content'] }}{{ eos_token }}"
        "\n{% else %}Assistant:{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}


# Where transformers reads a tokenizer's own chat template from, in the order it prefers them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def _origin(model_name: str) -> str:
    """The file a local model's chat template was read from, for errors."""
    folder = Path(model_name)
    found = [folder / f for f in TEMPLATE_FILES if (folder / f).is_file()]
    return str(found[0]) if found else f"the chat template of {model_name}"


def resolve_template(
    tokenizer: PreTrainedTokenizerBase, name: str, model_name: str
) -> ChatTemplate:
    """The Jinja chat template that `data.template=name` selects, knowing where it is from."""
    if name == "auto":
        if tokenizer.chat_template:
            return ChatTemplate(tokenizer.chat_template, _origin(model_name))
        raise TemplateError(
            f"the tokenizer of {model_name} has no chat template; set data.template to one of "
            f"{', '.join(BUILTIN)} (or train.stage=pt for plain text)."
        )
    if name not in BUILTIN:
        raise TemplateError(
            f"data.template={name} is unknown; use auto (the tokenizer's own) or one of "
            f"{', '.join(BUILTIN)}."
        )
    return ChatTemplate(BUILTIN[name], f"data.template={name}")
