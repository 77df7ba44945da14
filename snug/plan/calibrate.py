"""`snug calibrate`: a short, fixed series of real training steps on this machine's device,
measured against snug's plan of the same steps, and what the plan should learn from them.

Each configuration of the series is a catalog model with random weights (built on the device,
nothing downloaded; on the CPU shrunk to two layers, most also narrow), LoRA or a full fine-tune, a
batch of random token ids. It is planned exactly as `snug plan` would (the fake-tensor replay,
which also counts the step's FLOPs and ops), then the same step (snug's own: the method, the
loss, the optimizer, `train_step`) runs for real: a warm-up step, then timed steps. On a GPU
one configuration at a time, its steps in a row (their median); on a CPU every configuration is
built first and timed in rounds over the series, each row the fastest of its steps (a shared
machine's speed drifts; calibrate() says why).

Measured:
- step time: on a CPU `seconds = flops / rate + traffic / bandwidth + ops x op_seconds`, on a
  GPU `max(flops / rate + traffic / bandwidth, ops x op_seconds) + quant_calls x
  quant_call_seconds` (the host queues kernels while the device works; plan/calibration.py),
  the bandwidth measured (a large copy), `rate` and `op_seconds` fitted to the timed steps
  without 4-bit weights (relative least squares over the series; the rate at most one large
  matmul's), so `rate` is the FLOP rate whole steps achieve and `op_seconds` what each
  dispatched op costs beyond its arithmetic and its memory traffic; `quant_call_seconds` what
  is left of the QLoRA step's seconds per 4-bit matmul; printed with each configuration's
  fitted-vs-measured error;
- on CUDA, the context (`torch.cuda.mem_get_info` before and after initialisation, less what
  other processes held, read with nvidia-smi), `max_memory_reserved` against the plan's
  replayed reserve (their ratio, its median and spread), and `max_memory_allocated` against the
  plan's peak (reported, not learned: the replay is exact or it is a bug);
- the device's best case: one large matmul's FLOP rate (a cap on the fitted rate);
- the rate memory.offload_weights streams weights at (`h2d_gbs`): on a GPU a large pinned
  host-to-device copy on a side stream, on a CPU a large clone (the copy streaming makes there;
  device_probe.py).

The result goes to the calibration file (plan/calibration.py), one entry per device, which
`snug plan` and `memory.auto_fit` then use and name.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from snug.config import load_config
from snug.data.collate import target_positions
from snug.errors import UserError, first_line
from snug.models.load import resolve_dtype
from snug.plan.calibration import Calibration
from snug.plan.device_probe import (
    copy_bandwidth,
    cuda_context,
    h2d_bandwidth,
    matmul_rate,
    sync,
)
from snug.plan.fitting import fit_model, quant_rows
from snug.plan.hardware import Device, cpu_device, device_key, find_gpu, model_config
from snug.plan.simulate import PlanError, simulate, with_depth
from snug.runtime.progress import PhaseFactory, quiet
from snug.train.optim import build_optimizer
from snug.train.prepare import prepare_for_training, step_options
from snug.train.step import train_step

# (catalog model, method, gradient checkpointing, tokens, micro-batch, quantization): steps from
# launch-bound (a small model, short rows) to compute-bound, so the fit can tell the two costs
# apart, and on a GPU one QLoRA step, whose bitsandbytes matmuls cost more than their ops.
GPU_SERIES = (
    ("Qwen/Qwen2.5-0.5B", "lora", False, 256, 1, "none"),
    ("Qwen/Qwen2.5-0.5B", "full", False, 1024, 2, "none"),
    ("meta-llama/Llama-3.2-1B", "lora", True, 2048, 2, "none"),
    ("meta-llama/Llama-3.2-1B", "lora", True, 4096, 4, "none"),
    ("Qwen/Qwen2.5-3B", "lora", True, 4096, 2, "none"),
    ("meta-llama/Llama-3.2-1B", "lora", True, 2048, 2, "4bit"),
)
CPU_SERIES = (
    ("Qwen/Qwen2.5-0.5B", "lora", False, 32, 1, "none"),
    ("Qwen/Qwen2.5-0.5B", "lora", True, 256, 2, "none"),
    ("Qwen/Qwen2.5-0.5B", "full", False, 128, 2, "none"),
    ("meta-llama/Llama-3.2-1B", "lora", False, 384, 2, "none"),
    ("meta-llama/Llama-3.2-1B", "lora", True, 64, 1, "none"),
)
# On a CPU, two steps of catalog models at their own width (two layers, the whole vocabulary):
# a CPU's matmul rate grows with the matrices' size, and the narrow steps below alone fitted a
# rate too low for models of realistic width (`python benchmarks/plan_accuracy.py` on this
# project's AVX-512 Xeon, 2026-11-29: every configuration 14-69% long; with these two rows, 17 of
# 21 within 20%, median 12.5%: benchmarks/results/plan-2026-11-29{,-speed}.md).
CPU_WIDE_SERIES = (
    ("Qwen/Qwen2.5-0.5B", "lora", True, 256, 1, "none"),
    ("meta-llama/Llama-3.2-1B", "lora", False, 128, 1, "none"),
)
# The CPU series' narrow models: the catalog architecture at a width and depth this CPU runs in
# a fraction of a second.
CPU_SHRINK = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 8192,
}
TIMED_STEPS = 4  # per configuration on a GPU, in a row
# On a CPU: rounds over the whole series, one timed step of each configuration per round
CPU_ROUNDS = 6


def device_for(kind: str, gpu: str | None) -> Device:
    """The device calibrated: this machine's GPU (named as the table names it, or `gpu`) or CPU."""
    if kind == "cpu":
        return cpu_device()
    if not torch.cuda.is_available():
        raise PlanError("snug calibrate --device cuda: torch sees no CUDA device here.")
    name = gpu or torch.cuda.get_device_name(0)
    try:
        return find_gpu(name)
    except PlanError:
        if gpu:
            raise
        # a card the table lacks: its own name, its memory, no table rates
        total = torch.cuda.get_device_properties(0).total_memory
        return Device(name=name, type="cuda", memory_bytes=total)


def _config(
    model: str, method: str, gc: bool, tokens: int, mb: int, precision: str, quant: str = "none"
):
    return load_config(
        None,
        [
            f"model.name_or_path={model}",
            f"model.quant={quant}",
            f"method.name={method}",
            f"memory.grad_checkpointing={str(gc).lower()}",
            f"train.precision={precision}",
            "train.stage=pt",
            f"data.cutoff_len={tokens}",
            f"train.micro_batch={mb}",
            "train.grad_accum=1",
        ],
    )


def _build(config, cfg, where: torch.device, precision: str):
    """A random-weight model of `config` on the device; a quantized base as `snug train` loads
    one: written to a temporary folder in the compute dtype and loaded back through snug's
    loader, bitsandbytes quantizing it (the peak and reserve counted from that load on)."""
    with where:
        model = AutoModelForCausalLM.from_config(
            config, dtype=resolve_dtype(cfg, where, precision), attn_implementation="sdpa"
        )
    if cfg.model.quant == "none":
        return model
    from snug.models.load import load_weights

    with tempfile.TemporaryDirectory(prefix="snug-calibrate-") as tmp:
        model.save_pretrained(tmp)
        del model
        if where.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # sdpa as the other rows (flash-attn, where installed, would change more than 4-bit)
        model_cfg = dataclasses.replace(cfg.model, name_or_path=tmp, attn="sdpa")
        return load_weights(dataclasses.replace(cfg, model=model_cfg), where, precision)


@dataclasses.dataclass
class Trial:
    """One configuration of the series, planned, built on the device and warmed up:
    `timed_step()` runs one more real step on a fresh batch and keeps its seconds (the batch
    made before the clock starts); `row()` is what the series records of it."""

    row_keys: dict  # the configuration and its plan (flops, ops, traffic, quant_calls)
    batch: Callable[[], list]  # a fresh micro-batch of random ids, on the device
    step: Callable[[list], None]  # one real training step on it, synchronised
    device: torch.device
    sim: object  # the plan (peak and reserve, compared on CUDA)
    times: list[float] = dataclasses.field(default_factory=list)

    def timed_step(self) -> float:
        b = self.batch()
        sync(self.device)
        started = time.perf_counter()
        self.step(b)
        self.times.append(time.perf_counter() - started)
        return self.times[-1]

    def row(self, fastest: bool) -> dict:
        """The measured row: `seconds` the median of the timed steps, or their fastest when
        `fastest` (the CPU's interleaved series, calibrate() says why)."""
        seconds = min(self.times) if fastest else statistics.median(self.times)
        row = {**self.row_keys, "seconds": seconds}
        row["seconds_spread"] = [min(self.times), max(self.times)]
        if self.device.type == "cuda":
            row.update(
                planned_peak=self.sim.peak_bytes,
                measured_peak=torch.cuda.max_memory_allocated(),
                planned_reserved=self.sim.reserved_bytes,
                measured_reserved=torch.cuda.max_memory_reserved(),
            )
        return row


def start_one(spec: tuple, device: Device, precision: str, narrow: bool = True) -> Trial | None:
    """Plan one configuration of the series, build it on the device and run its warm-up step;
    None when the plan says it would not fit the device (a small card runs the part of the
    series it holds). On a CPU the model has CPU_SHRINK's two layers, and its narrow width too
    when `narrow`."""
    name, method, gc_on, tokens, mb, quant = spec
    config = model_config(name)
    if device.type == "cpu":
        config = with_depth(config, CPU_SHRINK["num_hidden_layers"])
        for key, value in CPU_SHRINK.items() if narrow else ():
            setattr(config, key, value)
    cfg = _config(name, method, gc_on, tokens, mb, precision, quant)
    sim = simulate(cfg, config, tokens, device.type, precision, padded=False)  # whole rows
    if device.type == "cuda" and device.memory_bytes:
        free, _ = torch.cuda.mem_get_info()
        if sim.reserved_bytes > 0.9 * min(device.memory_bytes, free):
            return None
    where = torch.device(device.type)
    if where.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = _build(config, cfg, where, precision)
    model.config.use_cache = False
    model = prepare_for_training(model, cfg, precision)
    opts = step_options(cfg, where, precision)
    optimizer = build_optimizer(model, cfg.memory, cfg.train, cfg.method, where.type == "cuda")

    def batch() -> list:
        ids = torch.randint(0, config.vocab_size, (mb, tokens))
        out = {"input_ids": ids, "labels": ids.clone(), "target_positions": target_positions(ids)}
        return [{k: v.to(where) for k, v in out.items()}]

    def step(b: list) -> None:
        train_step(model, optimizer, b, opts)
        sync(where)

    step(batch())  # warm-up: kernel choice, workspaces
    keys = {
        "model": name,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "method": method,
        "checkpointing": gc_on,
        "tokens": tokens,
        "micro_batch": mb,
        "flops": sim.flops_per_step,
        "ops": sim.ops_per_step,
        "traffic": sim.traffic_per_step,
        "quant": quant,
        "quant_calls": sim.quant_calls_per_step,
    }
    return Trial(keys, batch, step, where, sim)


def measure_one(spec: tuple, device: Device, precision: str, narrow: bool = True) -> dict | None:
    """start_one, then TIMED_STEPS timed steps in a row: the row with their median (the GPU's
    series, one configuration on the card at a time)."""
    trial = start_one(spec, device, precision, narrow)
    if trial is None:
        return None
    for _ in range(TIMED_STEPS):
        trial.timed_step()
    return trial.row(fastest=False)


# What a 4-bit step raises where bitsandbytes' kernels are missing or broken on this machine
QUANT_FAILURES = (UserError, RuntimeError, OSError, ImportError)


def _skip_4bit(e: BaseException, where: torch.device, progress) -> None:
    """A 4-bit configuration failed: the rest of the series still calibrates the plan, without
    a 4-bit cost."""
    gc.collect()
    if where.type == "cuda":
        torch.cuda.empty_cache()
    if progress:
        progress(f"  skipped: the 4-bit step failed ({first_line(e)})")


def _time_in_rounds(
    trials: list[Trial], where: torch.device, progress, phase: PhaseFactory = quiet
) -> tuple:
    """CPU_ROUNDS rounds of one timed step of each trial, and one large matmul and one copy
    after each round: (each trial's row with its fastest step, the best matmul rate, the best
    copy bandwidth). A 4-bit trial that fails in a round is dropped, as at its warm-up."""
    matmul, bandwidth = matmul_rate(where), copy_bandwidth(where)
    title = f"calibrate: {CPU_ROUNDS} rounds of one step of each"
    with phase(title, CPU_ROUNDS * len(trials), "steps") as p:
        for done in range(CPU_ROUNDS if trials else 0):
            for trial in list(trials):
                try:
                    trial.timed_step()
                except QUANT_FAILURES as e:
                    if trial.row_keys["quant"] == "none":
                        raise
                    trials.remove(trial)
                    _skip_4bit(e, where, progress)
                    p.advance(CPU_ROUNDS - done - 1)  # its steps of the rounds left
                p.advance(1)
            matmul = max(matmul, matmul_rate(where))
            bandwidth = max(bandwidth, copy_bandwidth(where))
    return [trial.row(fastest=True) for trial in trials], matmul, bandwidth


def _start_series(
    series: list, device: Device, precision: str, interleaved: bool, progress, phase: PhaseFactory
) -> list:
    """Each configuration of the series started (interleaved: its Trial, built and warmed up)
    or measured (its row); those that do not fit the device, or whose 4-bit step fails, are
    left out."""
    made = []
    title = "calibrate: building and warming up" if interleaved else "calibrate: timing"
    with phase(title, len(series), "configurations") as p:
        for i, (spec, narrow) in enumerate(series):
            quant = "" if spec[5] == "none" else f", {spec[5]}"
            if progress:
                progress(
                    f"[{i + 1}/{len(series)}] {spec[0]}{'' if narrow else ' (its own width)'} "
                    f"{spec[1]}{quant}, {spec[4]} x {spec[3]} tokens"
                )
            try:
                one = (start_one if interleaved else measure_one)(spec, device, precision, narrow)
            except QUANT_FAILURES as e:
                if not quant:
                    raise
                _skip_4bit(e, torch.device(device.type), progress)
            else:
                if one is None and progress:
                    progress("  skipped: the plan says it would not fit this device")
                made.extend([one] if one is not None else [])
            p.advance(1)
    return made


def calibrate(
    kind: str, gpu: str | None = None, progress=None, phase: PhaseFactory = quiet
) -> Calibration:
    """Run the series on `kind` ("cuda" or "cpu") and return what it measured (unsaved).
    `progress(line)` hears what each configuration is; `phase(title, total, unit)`
    (snug/runtime/progress.py) counts the configurations built and the steps timed."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise PlanError("snug calibrate --device cuda: torch sees no CUDA device here.")
    context = cuda_context() if kind == "cuda" else None  # before anything else touches CUDA
    device = device_for(kind, gpu)
    where = torch.device(kind)
    precision = (
        "fp32" if kind == "cpu" else ("bf16-mixed" if device.supports_bf16 else "fp16-mixed")
    )
    series = [(spec, True) for spec in (GPU_SERIES if kind == "cuda" else CPU_SERIES)]
    if kind == "cpu":
        series += [(spec, False) for spec in CPU_WIDE_SERIES]  # at the models' own width
    # On a GPU one configuration at a time (the card holds one), its steps in a row, the row's
    # seconds their median. On a CPU every configuration is built first and then timed in
    # CPU_ROUNDS rounds over the series, the row's seconds the fastest of its steps, and the
    # large matmul and the copy measured each round, their best kept: a shared machine's CPU
    # speed drifts by tens of percent, over seconds and over minutes (this project's 2-core VMs,
    # `snug calibrate --device cpu` twice in a row on 2026-11-29: one narrow step 0.047 s in the
    # first and 0.026 s in the second, fitting 0.151 then 0.176 TFLOP/s one configuration at a
    # time; 0.178 and 0.176 in rounds). A step cannot run faster than the machine does, so the
    # fastest of steps spread over the series is the machine's own speed for every row alike; a
    # slow spell longer than the series slows all of it (benchmarks/plan_accuracy.py times its
    # configurations in two passes far apart for that).
    interleaved = kind == "cpu"
    started = _start_series(series, device, precision, interleaved, progress, phase)
    if interleaved:
        rows, matmul, bandwidth = _time_in_rounds(started, where, progress, phase)
        started.clear()  # the models and their optimizers, freed before the fit
    else:
        rows = started
    plain = [r for r in rows if not r["quant_calls"]]
    if len(plain) < 3:
        raise PlanError(
            f"snug calibrate: only {len(plain)} of the series' configurations fit {device.name}; "
            "three are needed to fit the step time."
        )
    if not interleaved:
        matmul, bandwidth = matmul_rate(where), copy_bandwidth(where)
    h2d = h2d_bandwidth(where)
    model = fit_model(rows, matmul, bandwidth, overlap=kind == "cuda")
    for r in rows:
        r["fitted_seconds"] = model.seconds(r["flops"], r["ops"], 0, r["traffic"], r["quant_calls"])
    errors = [r["fitted_seconds"] / r["seconds"] - 1 for r in rows]
    reserved_ratio = reserved_error = None
    if kind == "cuda":
        ratios = [r["measured_reserved"] / r["planned_reserved"] for r in rows]
        reserved_ratio = statistics.median(ratios)
        reserved_error = (min(ratios) - 1, max(ratios) - 1)
    import snug

    return Calibration(
        device=device_key(device),  # the key plan/timing.py:device_model looks up
        date=datetime.date.today().isoformat(),
        precision=precision,
        rate_flops=model.rate_flops,
        op_seconds=model.op_seconds,
        step_error=(min(errors), max(errors)),
        matmul_flops=matmul,
        bandwidth_gbs=bandwidth,
        traffic_gbs=bandwidth,
        context_bytes=context,
        overlap=model.overlap,
        quant_call_seconds=model.quant_call_seconds if quant_rows(rows) else None,
        h2d_gbs=h2d,
        reserved_ratio=reserved_ratio,
        reserved_error=reserved_error,
        steps=tuple(rows),
        versions={
            "torch": torch.__version__,
            "snug": getattr(snug, "__version__", "?"),
            "cuda": torch.version.cuda if kind == "cuda" else None,
        },
    )
