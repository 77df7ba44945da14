"""Gradient checkpointing per decoder layer, and offloading of the checkpointed layer inputs.

transformers runs each decoder layer through `_gradient_checkpointing_func`; with plain
(non-reentrant) checkpointing the layer's input stays on the GPU until backward recomputes the
layer: one (B, T, C) tensor per layer, the activations that remain. With offloading, that input
is copied to pinned host memory on a side stream during forward, the GPU copy is released, and
it comes back when backward recomputes the layer. Written here because torch's `save_on_cpu`
does not reach it: non-reentrant checkpointing keeps its inputs by reference, not as saved
tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _to_host(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of `hidden` and, on CUDA, the event that marks the copy done."""
    if hidden.device.type != "cuda":
        return hidden.detach().clone(), None  # already host memory: a copy keeps the semantics
    side = _SIDE_STREAMS.setdefault(hidden.device, torch.cuda.Stream(hidden.device))
    side.wait_stream(torch.cuda.current_stream(hidden.device))  # hidden is computed
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    with torch.cuda.stream(side):
        host.copy_(hidden.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    hidden.record_stream(side)  # its memory is not reused before the copy has read it
    return host, done


def offloaded_checkpoint(fn: Callable, *args):
    """`checkpoint(fn, hidden, *rest)` with the layer input `hidden` kept in host memory until
    backward (transformers passes the hidden states first and the rest by keyword)."""
    if not args or not isinstance(args[0], torch.Tensor):
        return checkpoint(fn, *args, use_reentrant=False)
    hidden, args = args[0], args[1:]
    host, done = _to_host(hidden)
    device, needs_grad = hidden.device, hidden.requires_grad
    first = {"hidden": hidden}  # dropped after the first call, so the device copy can be freed

    def run(host_copy: torch.Tensor, *rest):
        h = first.pop("hidden", None)
        if h is None:  # backward's recomputation: bring the input back
            if done is not None:
                torch.cuda.current_stream(device).wait_event(done)
            h = host_copy.to(device, non_blocking=True).requires_grad_(needs_grad)
        return fn(h, *rest)

    return checkpoint(run, host, *args, use_reentrant=False)


def enable_checkpointing(model: nn.Module, offload: bool) -> None:
    """Checkpoint every decoder layer (non-reentrant); with `offload`, inputs go to the host."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if offload:
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module._gradient_checkpointing_func = offloaded_checkpoint
