"""THE training step: one optimizer update over an accumulated batch of micro-batches.

`snug train` calls it on real tensors; `snug plan` calls the very same function on fake
tensors (no weights, no data) to read the peak memory and FLOPs. So it must stay free of
anything that needs real values: no `.item()`, no data-dependent shapes, no host syncs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from snug.train.collectives import all_sum
from snug.train.options import LossFn, StepOptions

__all__ = ["LossFn", "StepOptions", "StepResult", "train_step"]


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss per count (target token) of the whole accumulated batch
    grad_norm: torch.Tensor | None  # before clipping
    target_tokens: torch.Tensor  # what the loss was divided by: target tokens, or samples
    skipped: bool = False  # `check` refused the update: no optimizer step was taken
    # The stage's own metrics (cls: accuracy), each a mean per count over the whole
    # accumulated batch, as tensors: the loop logs whatever is here by name.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    opts: StepOptions,
    scaler: torch.amp.GradScaler | None = None,
    check: Callable[[StepResult], bool] | None = None,
    reference: nn.Module | None = None,
) -> StepResult:
    """`check` (the loop's; the planner passes none) sees the loss and gradient norm before
    the update and may refuse it (a NaN): the gradients are then dropped, nothing is updated.
    With `check` and no clipping, the gradient norm is still computed for it to see.
    `reference`: the frozen model the stage's loss compares with, if it uses one."""
    # Normalise by the target tokens of the whole accumulated batch (of every rank), not per
    # micro-batch: then 4 micro-batches of 1 give the same gradient as 1 batch of 4, whatever
    # their lengths, and 2 ranks the gradient of one process with their rows together.
    counted = sum(opts.count(b) for b in micro_batches)
    n_targets = all_sum(torch.as_tensor(counted)).clamp(min=1)
    total = torch.zeros((), device=n_targets.device)
    metrics: dict[str, torch.Tensor] = {}
    loss_fn = opts.loss_fn
    for i, batch in enumerate(micro_batches):
        with _gradient_sync(model, last=i == len(micro_batches) - 1):
            with opts.forward_context():
                summed, _, parts = loss_fn(model, batch, reference)
                loss = summed / n_targets
                del summed  # held through backward, it would raise the replay's peak too
            for name, value in parts.items():
                metrics[name] = metrics.get(name, 0) + value.detach().float() / n_targets
            scaled = loss * opts.world if opts.world > 1 else loss  # DDP/FSDP average over ranks
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
        # Drop this micro-batch's graph now, not when the next loss replaces it: tensors some
        # layers keep as attributes of their backward node (bitsandbytes' 8-bit inputs) live
        # as long as the graph does.
        del loss, scaled
    total = all_sum(total)
    metrics = {name: all_sum(value) for name, value in metrics.items()}

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = None
    if opts.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
    elif check is not None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if grad_norm is not None and hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded norm
        grad_norm = grad_norm.full_tensor()
    result = StepResult(loss=total, grad_norm=grad_norm, target_tokens=n_targets, metrics=metrics)
    if check is not None and not check(result):
        optimizer.zero_grad(set_to_none=True)
        result.skipped = True
        return result
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def _gradient_sync(model: nn.Module, last: bool):
    """DDP all-reduces gradients only after the last micro-batch of a step (no_sync before);
    FSDP reduce-scatters after each, which keeps only sharded gradients in memory."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()
