"""`snug train`: data -> model -> method -> steps -> eval -> outputs, snug's own loop, no Trainer.

Split by idea: train/build.py prepares a run without touching output.dir, train/schedule.py
turns samples into steps, train/run.py is the loop over optimizer steps, and train/events.py
with train/sinks.py tell the console, metrics.jsonl/TensorBoard, status.json and any sink of
the caller what happens. Here: the run from start to end, when output.dir becomes the run's,
summary.json and the final adapter or model."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console

from snug.config import Config
from snug.files import aside, replace_dir, write_text_atomic
from snug.methods import get_method
from snug.models.fingerprint import base_record, write_base_record
from snug.models.load import resolve_device
from snug.train import dist
from snug.train.build import build_run
from snug.train.events import End, Reporter, Start
from snug.train.metrics import MetricsLog
from snug.train.outputs import check_output_dir, commit, newest_checkpoint
from snug.train.resume import TrainingStopped
from snug.train.run import NonFiniteError, OutOfMemory, Run
from snug.train.sinks import ConsoleSink, MetricsSink, StatusSink

# Imported from here by tests and benchmarks, from before the loop had its own module.
__all__ = ["NonFiniteError", "OutOfMemory", "Run", "run_training"]


def _json_safe(value):
    """NaN/inf -> null, so summary.json stays valid JSON whatever the loss did."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_training(
    cfg: Config,
    console: Console | None = None,
    fresh: bool = False,
    allow_config_change: bool = False,
    resume_command: str = "the same command",
    sinks: list | tuple = (),
) -> dict:
    """Train as `cfg` says, write everything into output.dir, return summary.json's content.
    Resumes the newest complete checkpoint in output.dir unless `fresh`; a checkpoint of a
    different run (guarded keys, data) is refused unless `allow_config_change`.

    `sinks`: more watchers of the run (a web UI, a test), told what happens after the
    console, metrics.jsonl and status.json are; each has the methods of train/events.py it
    cares about (on_start, on_step, on_eval, on_checkpoint, on_end). Only the main rank of a
    distributed run calls them.

    Nothing in output.dir changes until the run has proven it can start, its first optimizer
    step included (train/outputs.py): an error before that leaves an earlier run's files as
    they were, writes no summary and sends no event."""
    console = console or Console()
    started = time.perf_counter()
    ctx, device = dist.setup(cfg, resolve_device(cfg))
    if not ctx.main:  # one voice: rank 0 prints, logs and writes the summary
        console = Console(quiet=True)
    check_output_dir(cfg)
    out = Path(cfg.output.dir)
    resume_path = None if fresh else newest_checkpoint(out / "checkpoints")
    summary: dict = {"status": "failed", "steps": 0}
    reporter = Reporter([ConsoleSink(console, cfg.train.log_every), *sinks] if ctx.main else [])
    committed = False
    try:
        run = dist.agree(
            lambda: build_run(cfg, ctx, device, resume_path, allow_config_change, console, summary),
            device,
        )
        keep_until = run.pos.step if resume_path is not None else None

        def take_over() -> None:
            """After the first optimizer step (every rank): output.dir is now this run's, and
            the sinks that write into it join."""
            nonlocal committed
            if ctx.main:
                commit(run.cfg, resuming=resume_path is not None)
            dist.barrier()
            committed = True
            if resume_path is not None:  # recover() put a checkpoint moved aside back in place
                run.last_checkpoint = out / "checkpoints" / resume_path.name.removeprefix(".old-")
            if ctx.main:
                plot = out / "loss.png" if run.cfg.output.plot_loss else None
                log = MetricsLog(out, keep_until)
                reporter.attach(MetricsSink(log, run.cfg.train.log_every, plot), StatusSink(out))
            predicted = summary.get("auto_fit", {}).get("predicted_peak_bytes")
            reporter.start(Start(run.total_steps, run.pos.step, predicted, run.last_checkpoint))

        run.reporter = reporter
        run.take_over = take_over
        run.resume_command = resume_command
        run.train()
        if not committed:  # nothing was left to train (a finished run, resumed)
            take_over()
        cfg = run.cfg
        if run.evaluate:
            summary["eval"] = _eval_block(run.identity["eval_before"], run.evaluate("after"))
            console.print(_eval_line(summary["eval"]))
        target = _save_final(run.model, run.tok, cfg, out, ctx)
        summary["status"] = "completed"
        console.print(f"saved {target}")
    except TrainingStopped:
        summary["status"] = "stopped"
        raise
    except Exception as e:  # the reason, in the summary too
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise
    finally:
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        if ctx.main and committed:
            write_text_atomic(
                out / "summary.json",
                json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n",
            )
        if committed:  # after summary.json: a watcher told the run ended finds it there
            error = summary.get("error")
            peak = (summary.get("peak_memory") or {}).get("measured_bytes")
            reporter.end(
                End(
                    summary["status"],
                    error.splitlines()[0] if error else None,
                    peak,
                    run.last_checkpoint,
                )
            )
        dist.teardown()
    return summary


def _eval_block(before: dict, after: dict) -> dict:
    """summary.json's eval: the metric the stage names (cls: accuracy, sft: exact match by
    generation where scored), else the loss."""
    # (a checkpoint of an earlier snug holds no "metric": the one its keys show)
    metric = before.get("metric") or next(
        (m for m in ("accuracy", "exact_match") if m in before), "loss"
    )
    block = {
        "metric": metric,
        "before": before[metric],
        "after": after[metric],
        "loss_before": before["loss"],
        "loss_after": after["loss"],
    }
    # the stage's other held-out numbers (preference stages: rewards, chosen_match), if any
    also = {
        k: {"before": before[k], "after": v}
        for k, v in after.items()
        if k not in (metric, "loss", "metric") and isinstance(v, float) and k in before
    }
    if also:
        block["also"] = also
    if "samples" in after:
        block["examples_after"] = after["samples"]
    return block


def _eval_line(block: dict) -> str:
    line = f"held-out loss: {block['loss_before']:.4f} -> {block['loss_after']:.4f}"
    if block["metric"] != "loss":
        name = block["metric"].replace("_", " ")
        line = (
            f"held-out {name}: {100 * block['before']:.1f}% before -> "
            f"{100 * block['after']:.1f}% after training | " + line
        )
    return line


def _save_final(model, tok, cfg: Config, out: Path, ctx: dist.Dist | None = None) -> Path:
    """The adapter or model, written once (by rank 0) in the same format whatever the strategy
    (FSDP's shards are gathered to rank 0's host memory first): built in a hidden directory
    beside its place, then renamed there. An adapter records the base it was trained on
    (snug_base.json: path, revision and fingerprint), which merge/chat/eval/generate check."""
    ctx = ctx or dist.Dist()
    method = get_method(cfg.method.name)
    target = out / method.output  # adapter/ or model/
    model = dist.unwrap(model)
    state = dist.full_state(model, trainable_only=method.output == "adapter", ctx=ctx)
    if ctx.main:
        tmp = aside(target)
        model.config.use_cache = True  # the saved model is for inference
        if state is None:
            method.save(model, tmp)
        else:
            model.save_pretrained(str(tmp), state_dict=state)
        tok.save_pretrained(str(tmp))
        if method.output == "adapter":
            write_base_record(
                tmp, base_record(cfg.model, cfg.given_paths.get("model.name_or_path"))
            )
        replace_dir(tmp, target)
    dist.barrier()
    return target
