"""`snug measure`: real steps of a config next to its plan: the peak over every step, the step
time over the steps after the warm-up."""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from snug.config import Config, load_config
from snug.plan.autofit import auto_fit
from snug.plan.hardware import cpu_device, model_config
from snug.plan.report import _gib, sequence_length
from snug.plan.simulate import PlanError, simulate
from snug.plan.timing import device_model
from snug.runtime.progress import Phase


def cmd_measure(args) -> int:
    if args.steps < 1 or args.warmup < 1:
        raise PlanError(
            f"--steps {args.steps} --warmup {args.warmup}: use 1 or more of each (the first "
            "step's time holds set-up that cannot be told apart from the step)."
        )
    cfg = load_config(args.config, args.overrides)
    seq_len, seq_source = sequence_length(args, cfg, True)
    # progress beside the result, or on stderr when stdout is JSON
    shown = Console(stderr=args.json, soft_wrap=True)
    result = measure(cfg, args.steps, seq_len, seq_source, args.warmup, shown)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"peak: predicted {_gib(result['predicted_peak_bytes'])} GiB, measured "
        f"{_gib(result['measured_peak_bytes'])} GiB ({100 * result['error']:+.2f}%), "
        f"{result['steps']} steps of {seq_len} tokens per sample ({seq_source}) on "
        f"{result['device']}; plan took {result['plan_seconds']} s"
    )
    timed = (
        f"median of {result['timed_steps']} steps after {result['warmup_steps']} warm-up steps, "
        "which are left out: the first step's one-time set-up"
        + (" and the memory tracker of the first two on a CPU" if result["device"] == "cpu" else "")
    )
    predicted = result["predicted_step_seconds"]
    print(
        "step: "
        + (f"predicted {predicted:.3f} s, " if predicted is not None else "")
        + f"measured {result['measured_step_seconds']:.3f} s ({timed})"
    )
    return 0


class _StepClock:
    """A sink of the run (core/events.py) that notes when each optimizer step ended, and
    counts it in `shown`."""

    def __init__(self, shown: Phase) -> None:
        self.ends: list[float] = []
        self.shown = shown

    def on_step(self, event) -> None:
        self.ends.append(time.perf_counter())
        self.shown.advance(1)


def measure(
    cfg: Config,
    steps: int,
    seq_len: int,
    seq_source: str = "given",
    warmup: int = 2,
    console: Console | None = None,
) -> dict:
    """`warmup` + `steps` real steps of the config; the measured peak (over all of them) and
    step time (the median of the `steps` after the warm-up) next to the plan's. The plan, the
    loading and the steps are shown on `console` as they go (nothing when None)."""
    from snug.models.load import resolve_device as train_device
    from snug.models.load import resolve_precision
    from snug.train.training import run_training

    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, max_steps=warmup + steps, eval_generate=0),
            data=dataclasses.replace(cfg.data, eval=None, val_size=0.0),
            output=dataclasses.replace(cfg.output, dir=str(Path(tmp) / "run"), save_every=None),
        )
        device = train_device(run_cfg)
        precision = resolve_precision(run_cfg, device)
        with Phase(console or Console(quiet=True), "measure", warmup + steps, "steps") as shown:
            shown.note("planning the step on fake tensors")
            started = time.perf_counter()
            predicted = simulate(
                run_cfg,
                model_config(cfg.model.name_or_path),
                seq_len,
                device.type,
                precision,
                extend=False,
            )
            plan_seconds = time.perf_counter() - started
            shown.note("loading the model and data, then the real steps")
            clock = _StepClock(shown)
            summary = run_training(run_cfg, Console(quiet=True), sinks=[clock], planner=auto_fit)
        streams = run_cfg.memory.offload_weights
        timing = (
            device_model(cpu_device(), "fp32", streams=streams) if device.type == "cpu" else None
        )
    # step i's time is from the end of step i-1 to its own end: the steps after the warm-up
    step_seconds = [b - a for a, b in itertools.pairwise(clock.ends[warmup - 1 :])]
    measured = summary["peak_memory"]
    result = {
        "steps": summary["steps"],
        "warmup_steps": warmup,
        "timed_steps": len(step_seconds),
        "seq_len": seq_len,
        "seq_len_from": seq_source,
        "device": measured["device"],
        "predicted_peak_bytes": predicted.peak_bytes,
        "measured_peak_bytes": measured["measured_bytes"],
        "error": (predicted.peak_bytes - measured["measured_bytes"]) / measured["measured_bytes"],
        "measured_reserved_bytes": measured.get("reserved_bytes"),
        "peak_rss_above_start_bytes": measured.get("peak_rss_bytes", 0)
        - measured.get("rss_before_training_bytes", 0)
        if "peak_rss_bytes" in measured
        else None,
        "plan_seconds": round(plan_seconds, 2),
        "tokens_per_second": summary.get("tokens_per_second"),
        "step_seconds": [round(s, 4) for s in step_seconds],
        "measured_step_seconds": statistics.median(step_seconds),
        "predicted_step_seconds": timing.of(predicted, run_cfg.memory.grad_checkpointing)
        if timing
        else None,
        "step_time_from": timing.source if timing else None,
    }
    return result
