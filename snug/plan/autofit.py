"""`memory.auto_fit`: the planner's search (snug/plan/search.py) run inside `snug train` for
the config's own method, and, when nothing fits, the smallest change that would."""

from __future__ import annotations

import dataclasses

import torch

from snug.config import Config
from snug.core.registry import methods
from snug.plan.hardware import GIB, Device
from snug.plan.search import BASE_BITS, method_label, search
from snug.plan.simulate import PlanError


def auto_fit(cfg: Config, device_type: str, seq_len: int) -> tuple[Config, dict]:
    """`memory.auto_fit`: the user's method, the fastest micro-batch / checkpointing / offload /
    optimizer that fits (on a GPU, when nothing fits resident, with the frozen weights streamed
    from host memory: memory.offload_weights) the budget (memory.gpu, else the training device's memory), with the
    effective batch (micro_batch x grad_accum) kept. Returns the adopted config and what to
    report; raises PlanError with the smallest change that fits when nothing does."""
    from snug.plan.hardware import cpu_device, find_gpu, local_host, model_config, parse_memory

    budget = cfg.memory.gpu
    if device_type == "cuda":  # this machine trains: streamed weights must fit its RAM
        if budget:
            device = dataclasses.replace(find_gpu(budget), host=local_host())
        else:
            total = torch.cuda.get_device_properties(0).total_memory
            name = torch.cuda.get_device_name(0)
            device = Device(name=name, type="cuda", memory_bytes=total, host=local_host())
    else:
        memory = parse_memory(budget) if budget else None
        if budget and memory is None:
            raise PlanError(
                f"memory.gpu={budget!r}: training runs on the CPU here, so give a size (e.g. 8GiB)."
            )
        device = cpu_device(memory)
    config = model_config(cfg.model.name_or_path, cfg.model.trust_remote_code)
    effective = cfg.train.micro_batch * cfg.train.grad_accum
    cap = effective & -effective  # the largest power of two that divides it: batch kept exactly
    found = search(cfg, config, device, seq_len, (method_label(cfg),), cap)
    choice = next((c for c in found if c.fits), None)
    if choice is None:
        short = next((c.host_short for c in found if c.host_short), None)
        if (
            short and cfg.memory.offload_weights
        ):  # the user's streaming, not the search's  # no setting the search varies changes what streaming keeps on the host
            raise PlanError(
                f"memory.auto_fit: method {cfg.method.name} with memory.offload_weights=true "
                f"{short}; set memory.offload_weights=false, or train on a machine with more "
                "memory."
            )
        raise PlanError(_smallest_change(cfg, config, device, seq_len, found))
    m, t = choice.cfg.memory, choice.cfg.train
    report = {
        "device": device.name,
        "budget_bytes": device.memory_bytes,
        "seq_len": seq_len,
        "micro_batch": t.micro_batch,
        "grad_accum": t.grad_accum,
        "grad_checkpointing": m.grad_checkpointing,
        "offload_activations": m.offload_activations,
        "offload_weights": m.offload_weights,
        "optimizer": m.optimizer,
        "predicted_peak_bytes": choice.peak_bytes,
        "predicted_reserved_bytes": choice.reserved_bytes,
        "host_bytes": choice.sim.host_bytes,
        "calibration": choice.calibration,
        "why": f"the fastest setting of {cfg.method.name} that fits {device.name} "
        f"({choice.reserved_bytes / GIB:.2f} of {device.memory_bytes / GIB:.2f} GiB) with the "
        f"effective batch of {effective} kept",
    }
    return choice.cfg, report


def _smallest_change(cfg: Config, config, device: Device, seq_len: int, tried) -> str:
    from snug.plan.cheapest import cheapest_changes, why_nothing_fits

    miss = tried[0] if tried else None
    need = f"needs {miss.reserved_bytes / GIB:.2f} GiB at best" if miss and miss.sim else ""
    head = (
        f"memory.auto_fit: method {cfg.method.name} does not fit {device.name} "
        f"({device.memory_bytes / GIB:.2f} GiB) at {seq_len} tokens per sample"
        + (f"; it {need}" if need else "")
    )
    if device.type == "cuda":  # on a GPU: the cause, and each change planned (plan/cheapest.py)
        changes = cheapest_changes(tried, config, device, seq_len)
        head += f" ({why_nothing_fits(tried, device, seq_len)})"
        if changes:
            return f"{head}. Cheapest changes that fit: " + "; ".join(c.line() for c in changes)
    for shorter in (seq_len // 2, seq_len // 4):
        if shorter < 16:
            break
        found = search(cfg, config, device, shorter, (method_label(cfg),), 1)
        if any(c.fits for c in found):
            return f"{head}. It fits with data.cutoff_len={shorter}."
    # the best-ranked method that also trains on a quantized base, then its quantized variants
    # from the larger base (8-bit) to the smaller (4-bit)
    best = min(
        (m for m in methods().values() if m.searched and m.quantized), key=lambda m: m.quality
    )
    variants = sorted(best.quantized, key=lambda q: -BASE_BITS.get(q[1], 0))
    for other, change in (
        (best.name, f"method.name={best.name}"),
        *(
            (label, f"method.name={best.name} with model.quant={quant}")
            for label, quant, _ in variants
        ),
    ):
        if other == method_label(cfg):
            continue
        found = search(cfg, config, device, seq_len, (other,), 1)
        if any(c.fits for c in found):
            return f"{head}. {change} fits."
    return f"{head}. Nothing smaller fits either: a larger device is needed."
