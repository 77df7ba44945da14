"""A loaded base -> the model that trains, and the options of its step: shared by `snug train`
(train/training.py), `snug plan` (plan/simulate.py, on a meta-device model) and `snug calibrate`."""

from __future__ import annotations

import torch

from snug.config import Config
from snug.core.registry import get_stage
from snug.methods import apply_method
from snug.models.load import compute_dtype
from snug.train.activations import enable_checkpointing
from snug.train.options import StepOptions


def step_options(cfg: Config, device: torch.device, precision: str) -> StepOptions:
    mixed = precision.endswith("-mixed")
    return StepOptions(
        device_type=device.type,
        autocast_dtype=compute_dtype(precision) if mixed else None,
        max_grad_norm=cfg.train.max_grad_norm,
        chunked_loss=cfg.memory.chunked_loss,
        offload_activations=cfg.memory.offload_activations,
        stage=get_stage(cfg.train.stage).configured(cfg),
    )


def prepare_for_training(model: torch.nn.Module, cfg: Config, precision: str) -> torch.nn.Module:
    """The loaded base -> the model that trains: the method, then checkpointing (and offload).
    `snug plan` prepares its meta-device model with this same function."""
    trainable = torch.bfloat16 if precision == "bf16-true" else torch.float32
    model = apply_method(model, cfg.method, trainable_dtype=trainable)
    if cfg.memory.grad_checkpointing:
        enable_checkpointing(model, offload=cfg.memory.offload_activations)
    model.train()
    return model
