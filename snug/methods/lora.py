"""LoRA and DoRA through peft (rsLoRA is a flag of both)."""

from peft import LoraConfig, get_peft_model
from torch import nn

from snug.config import MethodConfig
from snug.methods import Method, peft_task, register


def _lora_config(model: nn.Module, cfg: MethodConfig, use_dora: bool) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets,
        use_rslora=cfg.rslora,
        use_dora=use_dora,
        task_type=peft_task(model),
    )


def apply_lora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    return get_peft_model(model, _lora_config(model, cfg, use_dora=False))


def apply_dora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    return get_peft_model(model, _lora_config(model, cfg, use_dora=True))


register(Method("lora", apply_lora, output="adapter", mergeable=True))
register(Method("dora", apply_dora, output="adapter", mergeable=True))
