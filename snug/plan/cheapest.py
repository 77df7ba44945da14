"""When nothing fits: why (the real cause, named), and the cheapest changes that do fit, each
planned again so that its device peak, host memory and step time are the planner's own.

The changes, cheapest first in what they ask of the user: (a) stream the frozen weights from
host memory (memory.offload_weights), unless the plan tried that already; (b) a shorter
sequence (data.cutoff_len), the largest of the asked length halved that fits; (c) the same
config on N cards with FSDP, the smallest N of 2, 4, 8 whose per-rank plan fits; (d) the
smallest card of the bundled table that fits the config as asked. A smaller micro-batch is no
change to offer: every candidate that misses is planned at the smallest the stage takes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import PretrainedConfig

from snug.config.overrides import with_overrides
from snug.plan.hardware import GIB, Device, find_gpu, gpu_table
from snug.plan.search import BASE_BITS, Candidate, plan_one
from snug.plan.streamed import can_stream, streamed_variants
from snug.train.dist import trains_sharded

FSDP_CARDS = (2, 4, 8)
SHORTEST = 16  # tokens: no cutoff below this is offered


@dataclass
class Change:
    change: str  # what to set, in the user's keys and flags
    cand: Candidate  # the candidate planned with the change
    device: Device  # the device it was planned for (a card of the table, N cards)
    seq_len: int

    def as_dict(self) -> dict:
        c = self.cand
        return {
            "change": self.change,
            "candidate": c.name,
            "device": self.device.name,
            "num_gpus": self.device.count,
            "seq_len": self.seq_len,
            "peak_bytes": c.peak_bytes,
            "reserved_bytes": c.reserved_bytes,
            "host_bytes": c.sim.host_bytes if c.sim else None,
            "step_seconds": c.step_seconds,
            "fits": c.fits,
        }

    def line(self) -> str:
        c = self.cand
        host = f", host {c.sim.host_bytes / GIB:.2f} GiB" if c.sim.host_bytes else ""
        step = f", step {c.step_seconds:.2f} s" if c.step_seconds else ""
        return (
            f"{self.change}: {c.name}, reserved {c.reserved_bytes / GIB:.2f} GiB of "
            f"{self.device.memory_bytes / GIB:.2f}{host}{step}"
        )


def _weights_label(c: Candidate) -> str:
    bits = BASE_BITS.get(c.cfg.model.quant)
    return f"{bits}-bit weights" if bits else "weights"


def why_nothing_fits(cands: list[Candidate], device: Device, seq_len: int) -> str:
    """The cause, named: the frozen weights of the smallest-weight resident candidate when they
    alone exceed the device, else the closest candidate's reserve at this sequence length."""
    planned = [c for c in cands if c.sim is not None]
    if not planned:
        return "nothing fits this device"
    usable = f"{device.memory_bytes / GIB:.2f} GiB usable"
    resident = [c for c in planned if not c.cfg.memory.offload_weights]
    if resident:
        light = min(resident, key=lambda c: c.sim.breakdown.get("weights", 0))
        weights = light.sim.breakdown.get("weights", 0)
        if weights > device.memory_bytes:
            said = (
                f"the {_weights_label(light)} alone are {weights / GIB:.2f} GiB of {usable} "
                f"({light.name})"
            )
            if not any(c.cfg.memory.offload_weights for c in planned):
                return said
            return said + "; streamed from host memory, what stays still does not fit"
    closest = min(planned, key=lambda c: c.reserved_bytes)
    return (
        f"the closest, {closest.name}, needs {closest.reserved_bytes / GIB:.2f} GiB of {usable} "
        f"at {seq_len} tokens per sample"
    )


def cheapest_changes(
    cands: list[Candidate],
    config: PretrainedConfig,
    device: Device,
    seq_len: int,
    padded: bool | None = None,
) -> list[Change]:
    """The changes that make the closest candidates fit (see the module's docstring), each
    planned; empty when nothing was planned or the device has no budget."""
    planned = [c for c in cands if c.sim is not None and not c.fits]
    if not planned or device.memory_bytes is None:
        return []
    closest = min(planned, key=lambda c: c.reserved_bytes)
    resident = [c for c in planned if not c.cfg.memory.offload_weights]
    if resident:
        held = min(resident, key=lambda c: c.reserved_bytes)
    else:  # the config as asked streams: the same without streaming, for more cards
        cfg = with_overrides(closest.cfg, memory={"offload_weights": False})
        held = plan_one(cfg, config, device, seq_len, padded)
    out = []
    if device.type == "cuda" and device.count == 1 and not closest.cfg.memory.offload_weights:
        out += _streamed(held, config, device, seq_len, padded)
    out += _shorter(closest, config, device, seq_len, padded)
    if held.sim is not None:
        out += _sharded(held, config, device, seq_len, padded)
        out += _larger_card(held, config, device, seq_len, padded)
    return out


def _streamed(held: Candidate, config, device: Device, seq_len: int, padded) -> list[Change]:
    if (
        not can_stream(held.cfg.method.name, held.cfg.model.quant)
        or held.cfg.dist.strategy != "none"
    ):
        return []
    for variant in streamed_variants(held.cfg, device):
        cand = plan_one(variant, config, device, seq_len, padded)
        if cand.fits:
            what = "memory.offload_weights=true, grad_checkpointing=true"
            if variant.memory.offload_activations:
                what += ", offload_activations=true"
            return [Change(what, cand, device, seq_len)]
    return []


def _shorter(closest: Candidate, config, device: Device, seq_len: int, padded) -> list[Change]:
    """The largest of seq_len halved that fits. What stays (weights, gradients, state) does
    not shrink with the sequence and the rest about in proportion: the line picks the first
    length worth a plan; a plan confirms it (halving again while it does not fit)."""
    from snug.plan.search import _held_bytes

    fixed = _held_bytes(closest)
    if fixed >= device.memory_bytes:
        return []
    grows = closest.reserved_bytes - fixed
    n = seq_len // 2
    while n >= SHORTEST and fixed + grows * n / seq_len > device.memory_bytes:
        n //= 2
    while n >= SHORTEST:
        cand = plan_one(closest.cfg, config, device, n, padded)
        if cand.fits:
            return [Change(f"data.cutoff_len={n} (--seq-len {n})", cand, device, n)]
        if cand.sim is None:
            return []
        n //= 2
    return []


def _sharded(held: Candidate, config, device: Device, seq_len: int, padded) -> list[Change]:
    """The fewest cards of this kind over which FSDP fits; a count whose weights, sharded,
    with the rest unsharded, would not fit is not planned."""
    cfg = held.cfg
    if not trains_sharded(cfg.method.name, cfg.model.quant):
        return []
    from snug.plan.search import _held_bytes

    weights = _held_bytes(held) - held.reserved_terms.get("cuda_context", {}).get("bytes", 0)
    rest = held.reserved_bytes - weights
    for n in FSDP_CARDS:
        if n <= device.count or weights / n + rest > device.memory_bytes:
            continue
        ranks = with_overrides(cfg, dist={"strategy": "fsdp", "nproc": n})
        cards = dataclasses.replace(device, count=n, host=None)
        cand = plan_one(ranks, config, cards, seq_len, padded)
        if cand.fits:
            return [Change(f"{n} cards with FSDP (--num-gpus {n})", cand, cards, seq_len)]
    return []


def _larger_card(held: Candidate, config, device: Device, seq_len: int, padded) -> list[Change]:
    """The smallest card of the bundled table that fits `held` as it is (the next one up when
    the plan on it, in its own precision, does not)."""
    cards = sorted((find_gpu(row["name"]) for row in gpu_table()), key=lambda d: d.memory_bytes)
    tried = 0
    for card in cards:
        if card.memory_bytes < held.reserved_bytes or card.memory_bytes <= device.memory_bytes:
            continue
        cand = plan_one(held.cfg, config, card, seq_len, padded)
        if cand.fits:
            return [Change(f"--gpu '{card.name}'", cand, card, seq_len)]
        tried += 1
        if tried == 2:
            break
    return []
