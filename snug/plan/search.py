"""Candidates, their predicted peak and step time, and the search for the fastest that fits."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from snug.config import Config
from snug.config.overrides import with_overrides
from snug.core.registry import get_method, methods
from snug.plan.calibration import StepModel
from snug.plan.hardware import GIB, Device, host_shortfall
from snug.plan.simulate import PlanError, Simulation, simulate
from snug.plan.streamed import can_stream, grown_from_one, streamed_variants, weights_exceed
from snug.plan.timing import TYPICAL, device_model, precision_for
from snug.runtime.progress import PhaseFactory, quiet

# Terms between the peak of live tensors and what the device must hold; each carries its
# source into the plan's output. `snug calibrate` replaces the context and scales the
# allocator term by what it measured (plan/calibration.py).
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
CUDA_CONTEXT_SOURCE = (
    "CUDA context with torch: a typical 0.5 GiB; 0.511 GiB measured on an H200 with torch 2.11 "
    "(benchmarks/results/gpu-2026-11-27-H200.md)"
)
ALLOCATOR_SOURCE = (
    "what the CUDA caching allocator reserves beyond the peak of live tensors "
    "(max_memory_reserved - peak): its rules (512-byte blocks, 2 and 20 MiB segments, best "
    "fit, splitting, merging, no release) replayed over the storages the replay makes and "
    "frees, from loading through the first steps (snug/plan/allocator.py); within 2% of "
    "max_memory_reserved on 13 H200 runs (benchmarks/results/gpu-2026-11-27-H200-run2.md)"
)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "adafactor")


def quant_of() -> dict[str, str]:
    """Search labels of methods on a quantized base -> model.quant: "qlora" is LoRA on a 4-bit
    NF4 base, "qlora-8bit" LoRA on an LLM.int8 base (each method declares its own)."""
    return {label: quant for m in methods().values() for label, quant, _ in m.quantized}


def base_of(label: str) -> str:
    """The registered method a search label trains (lora for qlora)."""
    return next((m.name for m in methods().values() for q in m.quantized if q[0] == label), label)


def searched_methods() -> tuple[str, ...]:
    """What a search without --method tries: each method that says so, then its quantized
    variants."""
    return tuple(
        label
        for m in methods().values()
        if m.searched
        for label in (m.name, *(q[0] for q in m.quantized))
    )


BASE_BITS = {"8bit": 8, "4bit": 4}  # bits per base weight of each model.quant


def method_label(cfg: Config) -> str:
    """The method as the search names it: qlora for LoRA on a 4-bit base, qlora-8bit for LoRA
    on an 8-bit one."""
    for label, quant, _ in get_method(cfg.method.name).quantized:
        if quant == cfg.model.quant:
            return label
    return cfg.method.name


@dataclass
class Candidate:
    cfg: Config
    name: str
    sim: Simulation | None = None
    error: str | None = None
    reserved_terms: dict = field(default_factory=dict)
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    fits: bool | None = None
    calibration: str = TYPICAL  # where the step time and reserved terms come from
    # why it does not fit the machine's host memory (memory.offload_weights on a local run)
    host_short: str | None = None
    h2d: str | None = None  # memory.offload_weights: the rate the weights stream at, its source

    @property
    def peak_bytes(self) -> int | None:
        return self.sim.peak_bytes if self.sim else None

    @property
    def reserved_bytes(self) -> int | None:
        if not self.sim:
            return None
        return self.peak_bytes + sum(term["bytes"] for term in self.reserved_terms.values())

    def as_dict(self) -> dict:
        s = self.sim
        return {
            "name": self.name,
            "config": {
                "model": {"quant": self.cfg.model.quant},
                "method": {"name": self.cfg.method.name},
                "memory": {
                    "grad_checkpointing": self.cfg.memory.grad_checkpointing,
                    "offload_activations": self.cfg.memory.offload_activations,
                    "offload_weights": self.cfg.memory.offload_weights,
                    "chunked_loss": self.cfg.memory.chunked_loss,
                    "optimizer": self.cfg.memory.optimizer,
                },
                "train": {
                    "micro_batch": self.cfg.train.micro_batch,
                    "grad_accum": self.cfg.train.grad_accum,
                },
                "dist": {"strategy": self.cfg.dist.strategy, "nproc": self.cfg.dist.nproc},
            },
            "peak_bytes": self.peak_bytes,
            "reserved_bytes": self.reserved_bytes,
            "reserved_terms": self.reserved_terms,
            "fits": self.fits,
            "trainable_params": s.trainable_params if s else None,
            "total_params": s.total_params if s else None,
            "breakdown": s.breakdown if s else None,
            "weights_bytes": s.weights_bytes if s else None,
            "flops_per_step": s.flops_per_step if s else None,
            "ops_per_step": s.ops_per_step if s else None,
            "traffic_per_step": s.traffic_per_step if s else None,
            "quant_calls_per_step": s.quant_calls_per_step if s else None,
            "host_bytes": s.host_bytes if s else None,
            "streamed_bytes_per_step": s.streamed_bytes_per_step if s else None,
            "host_short": self.host_short,
            "h2d": self.h2d,
            "step_seconds": self.step_seconds,
            "tokens_per_second": self.tokens_per_second,
            "calibration": self.calibration,
            "error": self.error,
        }


def candidate_name(cfg: Config) -> str:
    m = cfg.memory
    gc = ("gc+offload" if m.offload_activations else "gc") if m.grad_checkpointing else "no-gc"
    gc += " stream" if m.offload_weights else ""
    label = method_label(cfg)
    said = get_method(cfg.method.name).search_label(cfg.method)  # lora: its rank, r8
    method = f"{label} {said}" if said else label
    d = cfg.dist
    ranks = f" {d.strategy}x{d.nproc}" if d.processes > 1 else ""
    return f"{method} {gc} {m.optimizer} mb{cfg.train.micro_batch}{ranks}"


def evaluate(
    cand: Candidate,
    config: PretrainedConfig,
    device: Device,
    seq_len: int,
    model: StepModel,
    padded: bool | None = None,
) -> Candidate:
    """`padded`: whether micro-batches carry a padding mask (simulate's; default unless
    data.packing)."""
    precision = precision_for(device, cand.cfg)
    try:
        cand.sim = simulate(cand.cfg, config, seq_len, device.type, precision, padded=padded)
    except PlanError as e:
        cand.error = str(e)
        return cand
    except Exception as e:  # a method/model pair the step cannot run: say so, keep searching
        cand.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return cand
    cand.calibration = model.source
    if cand.sim.streamed_bytes_per_step:
        cand.h2d = f"{model.h2d_gbs:,.1f} GB/s ({model.h2d_source})"
    if device.type == "cuda":
        allocator = cand.sim.reserved_bytes - cand.sim.peak_bytes
        context = {"bytes": CUDA_CONTEXT_BYTES, "source": CUDA_CONTEXT_SOURCE}
        allocator_term = {"bytes": allocator, "source": ALLOCATOR_SOURCE}
        if model.context_bytes is not None:
            context = {"bytes": model.context_bytes, "source": f"CUDA context, {model.source}"}
        if model.reserved_ratio is not None:  # the replayed reserve, scaled as measured
            scaled = round(cand.sim.reserved_bytes * model.reserved_ratio)
            allocator_term = {
                "bytes": max(scaled - cand.sim.peak_bytes, 0),
                "source": f"{ALLOCATOR_SOURCE}; times {model.reserved_ratio:.3f}, {model.source}",
            }
        cand.reserved_terms = {"cuda_context": context, "allocator": allocator_term}
    if device.memory_bytes is not None:
        on_device = cand.reserved_bytes + (cand.sim.host_bytes if device.type == "cpu" else 0)
        cand.fits = on_device <= device.memory_bytes
    on_host = cand.reserved_bytes if device.type == "cpu" else 0  # a CPU's tensors are in RAM
    cand.host_short = host_shortfall(device, cand.sim.host_bytes, on_host)
    if cand.host_short:
        cand.fits = False
    seconds = model.of(cand.sim, cand.cfg.memory.grad_checkpointing)
    if seconds:
        cand.step_seconds = seconds  # per rank; communication is not modelled
        train = cand.cfg.train
        tokens = train.micro_batch * train.grad_accum * seq_len * cand.cfg.dist.processes
        cand.tokens_per_second = tokens / seconds
    return cand


def plan_one(
    cfg: Config, config: PretrainedConfig, device: Device, seq_len: int, padded: bool | None = None
) -> Candidate:
    model = device_model(device, precision_for(device, cfg), streams=cfg.memory.offload_weights)
    return evaluate(Candidate(cfg, candidate_name(cfg)), config, device, seq_len, model, padded)


def _variants(cfg: Config, method: str, device: Device) -> list[Config]:
    """Memory settings to try for a method, cheapest in time first: checkpointing off, then on;
    the optimizer stays AdamW (for full and freeze the 8-bit ones and Adafactor come in when
    AdamW does not fit); activation offload comes in on a GPU when nothing else fits."""
    gcs = [(False, False)]
    if not get_method(base_of(method)).no_checkpointing_because:
        gcs.append((True, False))
    return [
        with_overrides(
            cfg,
            model={"quant": quant_of().get(method, "none")},
            method={"name": base_of(method)},
            memory={
                "grad_checkpointing": gc,
                "offload_activations": offload,
                "optimizer": "adamw",
                "chunked_loss": True,
            },
        )
        for gc, offload in gcs
    ]


def _variant_key(variant: Config) -> tuple:
    m, d = variant.memory, variant.dist
    return (m.grad_checkpointing, m.offload_activations, m.optimizer, d.strategy, d.nproc)


def _held_bytes(cand: Candidate, optimizer: bool = True) -> int:
    """A lower bound on the device memory of every variant of this candidate that changes only
    activation settings (checkpointing, offload) and, with `optimizer=False`, the optimizer: the
    weights, gradients (and optimizer state) its peak holds, plus the CUDA context."""
    if cand.sim is None:
        return 0
    parts = cand.sim.breakdown
    keys = ("weights", "trainable", "gradients") + (("optimizer",) if optimizer else ())
    context = cand.reserved_terms.get("cuda_context", {}).get("bytes", 0)
    return sum(parts.get(k, 0) for k in keys) + context


def _fallbacks(variant: Config, method: str, device: Device, static: int = 0) -> list[Config]:
    """What to try when a variant does not fit even at micro-batch 1 (`static`: the bytes of
    its peak that activation offload leaves in place)."""
    out = []
    if get_method(variant.method.name).output == "model" and variant.memory.optimizer == "adamw":
        out += [with_overrides(variant, memory={"optimizer": o}) for o in OPTIMIZERS[1:]]
    if (
        device.type == "cuda"
        and variant.memory.grad_checkpointing
        and not variant.memory.offload_activations
        and static <= device.memory_bytes
    ):
        out.append(with_overrides(variant, memory={"offload_activations": True}))
    return out


def _largest_fitting_micro_batch(
    variant: Config, config, device: Device, seq_len: int, model, effective: int, cap: int
) -> Candidate | None:
    """Peak is linear in the micro-batch (every activation scales with it): simulate the
    smallest micro-batch the stage takes (1; kto 2: Stage.min_rows) and twice that, take the
    largest power-of-two multiple the line says fits, then simulate that one to confirm
    (halving while it does not). Only micro-batches that divide the effective batch
    (micro_batch x grad_accum of the config) are tried, so every candidate trains with the
    user's effective batch."""
    from snug.core.registry import get_stage

    def at(b: int) -> Candidate:
        trial = with_overrides(variant, train={"micro_batch": b, "grad_accum": effective // b})
        return evaluate(Candidate(trial, candidate_name(trial)), config, device, seq_len, model)

    least = get_stage(variant.train.stage).min_rows
    base = least if effective % least == 0 else effective  # the config's own, if none divides
    cap = min(cap, effective)
    one = at(base)
    if one.error or not one.fits or cap < 2 * base or effective % (2 * base):
        return one
    if variant.memory.offload_weights:
        held = _held_bytes(one)
        return grown_from_one(one, held, at, base, cap, effective, device.memory_bytes)
    two = at(2 * base)
    if two.error or not two.fits:
        return one
    slope = (two.reserved_bytes - one.reserved_bytes) / base  # per row
    b = 2 * base
    while (
        b * 2 <= cap
        and effective % (b * 2) == 0
        and one.reserved_bytes + slope * (b * 2 - base) <= device.memory_bytes
    ):
        b *= 2
    cand = two
    while b > 2 * base:
        cand = at(b)
        if cand.fits:
            break
        b //= 2
    return two if b == 2 * base else cand


def search(
    cfg: Config,
    config: PretrainedConfig,
    device: Device,
    seq_len: int,
    methods: tuple[str, ...] | None = None,
    max_micro_batch: int = 64,
    num_gpus: int = 1,
    workers: int | None = None,
    phase: PhaseFactory = quiet,
) -> list[Candidate]:
    """The fastest fitting candidate per method (or the closest miss, to show why), fastest
    first. The chunked loss stays on (it never costs memory); the effective batch is kept:
    grad_accum shrinks as the micro-batch grows. With `num_gpus` above 1, each method that
    trains sharded is tried under FSDP and DDP (per-rank micro-batches; the global batch,
    micro_batch x grad_accum x num_gpus of the config, kept).

    Each method's search is independent of the others', so with several methods they run in
    `workers` processes (default: $SNUG_PLAN_WORKERS, else one per CPU core), forked from this
    one: the replay is Python bound to one core, and a 7B search on 2 cores takes half the time.
    The result is the same as one process's (tests/test_plan_search.py). `phase(title, total,
    unit)` (snug/runtime/progress.py) is told of each method searched."""
    if device.memory_bytes is None:
        raise PlanError("--search needs a memory budget: --gpu NAME or SIZE, or --device cpu.")
    model = device_model(device, precision_for(device, cfg), streams=cfg.memory.offload_weights)
    # streaming comes in when a method fits nowhere resident, on a GPU, one process
    streams = device.type == "cuda" and num_gpus == 1 and cfg.dist.strategy == "none"
    streaming = device_model(device, precision_for(device, cfg), streams=True) if streams else None
    methods = methods or searched_methods()
    job = (cfg, config, device, seq_len, model, max_micro_batch, num_gpus, streaming)
    workers = min(
        workers or int(os.environ.get("SNUG_PLAN_WORKERS") or os.cpu_count() or 1), len(methods)
    )
    found: list[Candidate | None] = [None] * len(methods)
    if workers > 1 and multiprocessing.current_process().daemon is False:
        # slowest replays first (DoRA's weight norm, the quantized stand-ins), so the workers
        # finish together; each takes the next method as it frees up
        order = sorted(range(len(methods)), key=lambda i: -_REPLAY_COST.get(methods[i], 1))
        # one thread each, as torch's DataLoader workers: OpenMP is not fork-safe. The workers
        # are forked before the progress starts (a thread of its own, when it prints lines).
        with multiprocessing.get_context("fork").Pool(workers, torch.set_num_threads, (1,)) as pool:
            jobs = [(i, (methods[i], *job)) for i in order]
            with phase("search", len(methods), "methods") as p:
                for i, cand in pool.imap_unordered(_search_one, jobs, 1):
                    found[i] = cand
                    p.advance(1)
    else:
        with phase("search", len(methods), "methods") as p:
            for i, m in enumerate(methods):
                found[i] = _search_method((m, *job))
                p.advance(1)
    return sorted((c for c in found if c is not None), key=speed_order)


# Relative replay cost per method (seconds per candidate of the 7B search, rounded): only the
# order in which the workers take the methods.
_REPLAY_COST = {"dora": 6, "qlora-8bit": 5, "qlora": 4, "lora": 4, "adapter": 3, "ia3": 2}


def _search_one(job: tuple[int, tuple]) -> tuple[int, Candidate | None]:
    """`_search_method` in a worker, its result with the method's place in the list."""
    return job[0], _search_method(job[1])


def _search_method(args: tuple) -> Candidate | None:
    """One method's search: its variants cheapest in time first, each at the largest
    micro-batch that fits, fallbacks (optimizer, offload) when nothing fits; the fastest fitting
    candidate, else the closest miss, else None (the method does not train sharded)."""
    from snug.plan.distributed import STRATEGIES
    from snug.train.dist import trains_sharded

    method, cfg, config, device, seq_len, model, max_micro_batch, num_gpus, streaming = args
    effective = cfg.train.micro_batch * cfg.train.grad_accum
    strategies = STRATEGIES if num_gpus > 1 else ("none",)
    if num_gpus > 1 and not trains_sharded(base_of(method), quant_of().get(method, "none")):
        return None  # trains on one device only (train/dist.py: check)
    best: Candidate | None = None
    queue = [
        with_overrides(v, dist={"strategy": s, "nproc": num_gpus if s != "none" else 1})
        for s in strategies
        for v in _variants(cfg, method, device)
    ]
    streams = streaming is not None and can_stream(base_of(method), quant_of().get(method, "none"))
    context = CUDA_CONTEXT_BYTES if model.context_bytes is None else model.context_bytes
    if num_gpus == 1 and weights_exceed(queue[0], config, device, context):
        # the weights alone do not fit: no resident setting does. Stream them; a method that
        # cannot is replayed once, in its smallest setting, to show how far it is
        queue = [] if streams else queue[-1:]
    # a fallback reached from two variants (8-bit AdamW with offload, from "offload" and from
    # "8-bit AdamW") is planned once
    queued = {_variant_key(v) for v in queue}
    while queue:
        variant = queue.pop(0)
        cand = _largest_fitting_micro_batch(
            variant, config, device, seq_len, model, effective, max_micro_batch
        )
        if cand.fits:
            if _faster(cand, best):
                best = cand
        else:
            best = cand if _closer(cand, best) else best
            if _held_bytes(cand, optimizer=False) > device.memory_bytes:
                break  # its weights and gradients alone: no other setting of it fits
            if not cand.error and not best.fits:
                for v in _fallbacks(variant, method, device, _held_bytes(cand)):
                    if _variant_key(v) not in queued:
                        queued.add(_variant_key(v))
                        queue.append(v)
    if streams and (best is None or not best.fits):  # slower than any resident setting
        for variant in streamed_variants(_variants(cfg, method, device)[-1], device):
            cand = _largest_fitting_micro_batch(
                variant, config, device, seq_len, streaming, effective, max_micro_batch
            )
            if cand.fits or _closer(cand, best):
                best = cand
            if cand.fits:
                break
    return best


def _closer(a: Candidate, b: Candidate | None) -> bool:
    """Whether miss `a` shows better than `b` how far a method is from fitting: planned rather
    than failed, then the smaller reserve."""
    if b is None or (b.error and not a.error):
        return True
    if a.error or b.fits:
        return False
    return a.reserved_bytes < b.reserved_bytes


def speed_order(c: Candidate) -> tuple:
    """Fitting first, then the fastest, then the smallest peak."""
    return (not c.fits, -(c.tokens_per_second or 0), c.peak_bytes or 0)


def _faster(a: Candidate, b: Candidate | None) -> bool:
    if b is None or not b.fits:
        return True
    return (a.tokens_per_second or 0) > (b.tokens_per_second or 0)
