"""Chat templates: the tokenizer's own, or a small built-in set for tokenizers that lack one.

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

BUILTIN = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set sys = messages[0]['content'] + '\n\n' if messages and "
        "messages[0]['role'] == 'system' else '' %}{% for m in messages if m['role'] != 'system' %}"
        "{% if m['role'] == 'user' %}[INST] {{ sys if loop.first else '' }}{{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% set sys = messages[0]['content'] + '\n\n' if messages and "
        "messages[0]['role'] == 'system' else '' %}{% for m in messages if m['role'] != 'system' %}"
        "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ sys if loop.first else '' }}{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
        "{% else %}{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
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
            f"data.template={name} is unknown; use auto or one of {', '.join(BUILTIN)}."
        )
    return ChatTemplate(BUILTIN[name], f"data.template={name}")
