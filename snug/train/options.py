"""How the step computes, resolved from the config once before training (train/prepare.py:
step_options): precision, clipping, the loss form, offload, the stage, the process count."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from snug.core.registry import get_stage
from snug.core.stage import LossOut, Stage

LossFn = Callable[..., LossOut]  # (model, batch, reference) -> (summed loss, count, metrics)


@dataclass(frozen=True)
class StepOptions:
    device_type: str  # "cpu" | "cuda"
    autocast_dtype: torch.dtype | None  # bf16/fp16 for *-mixed; None for fp32 and bf16-true
    max_grad_norm: float  # 0: no clipping
    chunked_loss: bool
    offload_activations: bool
    # What is learnt (train.stage): its loss, its count, its collate. The default is sft, a
    # causal LM on next tokens.
    stage: Stage = field(default_factory=lambda: get_stage("sft"))
    world: int = 1  # processes whose gradients DDP/FSDP average: the loss is scaled back by it

    @property
    def loss_fn(self) -> LossFn:
        return self.stage.loss_fn(self.chunked_loss)

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What a micro-batch's loss is summed over: the accumulated batch's loss (and
        metrics) are divided by the sum of these."""
        return self.stage.count(batch)

    def forward_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device_type, dtype=self.autocast_dtype))
        if self.offload_activations:
            # Tensors saved for backward go to host memory and come back when backward needs them.
            stack.enter_context(
                torch.autograd.graph.save_on_cpu(pin_memory=self.device_type == "cuda")
            )
        return stack
