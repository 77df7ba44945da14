"""Virtual-token methods through peft: prefix tuning (learned key/value prefixes in every layer),
prompt tuning (learned input embeddings), P-tuning (prompt embeddings from a small encoder)."""

from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from torch import nn

from snug.config import MethodConfig
from snug.methods import Method, peft_task, register


def apply_prefix(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    config = PrefixTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, task_type=peft_task(model)
    )
    return get_peft_model(model, config)


def apply_prompt(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    config = PromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, task_type=peft_task(model)
    )
    return get_peft_model(model, config)


def apply_ptuning(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    config = PromptEncoderConfig(
        num_virtual_tokens=cfg.num_virtual_tokens,
        task_type=peft_task(model),
        encoder_hidden_size=cfg.bottleneck,
    )
    return get_peft_model(model, config)


VIRTUAL = "learned virtual tokens are extra inputs to the model, not changes to any base weight"
register(
    Method(
        "prefix",
        apply_prefix,
        output="adapter",
        mergeable=False,
        unmergeable_because="prefix tuning adds learned keys and values to every attention "
        "layer: extra inputs, not changes to any base weight",
    )
)
register(
    Method("prompt", apply_prompt, output="adapter", mergeable=False, unmergeable_because=VIRTUAL)
)
register(
    Method("ptuning", apply_ptuning, output="adapter", mergeable=False, unmergeable_because=VIRTUAL)
)
