"""Streamed weights (memory.offload_weights) in the search (search.py): which methods can
stream, the settings tried when nothing fits resident, the micro-batch of a streamed candidate,
and the count that sends a method to streaming without a replay (plan/bound.py)."""

from __future__ import annotations

from snug.config import Config
from snug.config.overrides import with_overrides
from snug.core.registry import get_method
from snug.plan.hardware import Device
from snug.plan.timing import precision_for


def can_stream(method: str, quant: str) -> bool:
    """Whether `method` on a `quant` base may train with memory.offload_weights (config/checks.py
    says why not): it streams frozen weights, so not full (freeze streams its frozen layers),
    not an LLM.int8 base, and a quantized base only with checkpointing."""
    base = get_method(method)
    if base.no_checkpointing_because and quant != "none":  # a quantized base streams with it
        return False
    return (base.output != "model" or base.name == "freeze") and quant != "8bit"


def streamed_variants(variant: Config, device: Device) -> list[Config]:
    """What is tried when nothing fits resident: the frozen weights streamed from host memory,
    with checkpointing (streaming needs it on a quantized base, and a model too large for the
    device has activations to match), then on a GPU with activation offload too; a method that
    cannot checkpoint (prefix) streams without it."""
    gc = not get_method(variant.method.name).no_checkpointing_because
    streamed = with_overrides(
        variant,
        memory={"offload_weights": True, "grad_checkpointing": gc, "offload_activations": False},
    )
    out = [streamed]
    if device.type == "cuda" and gc:
        out.append(with_overrides(streamed, memory={"offload_activations": True}))
    return out


def grown_from_one(one, held: int, at, base: int, cap: int, effective: int, budget: int):
    """The largest micro-batch a streamed candidate fits at, from one replay and a confirming
    one (a streamed replay costs more than a resident one: plan/simulate.py replays it at 3 and
    4 layers). Peak is affine in the micro-batch, F + s x rows, with F at least what is held
    whatever the rows (_held_bytes); so held + (peak at `base` - held) x rows / base is never
    below it: the line picks a micro-batch, a replay confirms (halving while it does not fit)."""
    per_row = (one.reserved_bytes - held) / base
    b = base
    while (
        b * 2 <= cap
        and effective % (b * 2) == 0
        and (one.reserved_bytes + per_row * (b * 2 - base) <= budget)
    ):
        b *= 2
    while b > base:
        cand = at(b)
        if cand.fits:
            return cand
        b //= 2
    return one


def weights_exceed(variant: Config, config, device: Device, context: int) -> bool:
    """Whether the weights `variant` loads, with the CUDA context, exceed the device: a count
    on the meta device (plan/bound.py), no replay."""
    from snug.plan.bound import weights_bytes

    if device.type != "cuda":
        return False
    held = weights_bytes(variant, config, device.type, precision_for(device, variant))
    return held + context > device.memory_bytes
