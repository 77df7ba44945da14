"""`snug train`: data -> model -> method -> steps -> eval -> outputs, snug's own loop, no Trainer.

Split by idea: train/build.py prepares a run without touching output.dir, train/schedule.py
turns samples into steps, train/run.py is the loop over optimizer steps, and train/events.py
with train/sinks.py tell the console, metrics.jsonl/TensorBoard, status.json and any sink of
the caller what happens. Here: the run from start to end, when output.dir becomes the run's,
summary.json and the final adapter or model."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from rich.console import Console

from snug.config import Config
from snug.files import (
    OutOfSpace,
    aside,
    check_space,
    disk_full,
    out_of_space,
    replace_dir,
    write_text_atomic,
)
from snug.methods import get_method
from snug.models.fingerprint import base_record, write_base_record
from snug.models.load import resolve_device
from snug.train import dist
from snug.train.build import build_run
from snug.train.events import End, Reporter, Start
from snug.train.metrics import MetricsLog
from snug.train.outputs import (
    PREVIOUS,
    commit,
    discard_previous,
    newest_checkpoint,
    own_output_dir,
)
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

    Rank 0 holds output.dir's lock throughout (train/lock.py). Nothing in output.dir changes
    until the run has proven it can start, its first optimizer step included
    (train/outputs.py): an error before that leaves an earlier run's files as they were,
    writes no summary and sends no event; the earlier run's outputs then wait in previous/
    until the run completes."""
    console = console or Console()
    started = time.perf_counter()
    ctx, device = dist.setup(cfg, resolve_device(cfg))
    if not ctx.main:  # one voice: rank 0 prints, logs and writes the summary
        console = Console(quiet=True)
    with own_output_dir(cfg, fresh, lock=ctx.main) as out:
        resume_path = None if fresh else newest_checkpoint(out / "checkpoints")
        summary: dict = {"status": "failed", "steps": 0}
        reporter = Reporter([ConsoleSink(console, cfg.train.log_every), *sinks] if ctx.main else [])
        committed = False
        try:
            run = dist.agree(
                lambda: build_run(
                    cfg, ctx, device, resume_path, allow_config_change, console, summary
                ),
                device,
            )
            keep_until = run.pos.step if resume_path is not None else None

            def take_over() -> None:
                """After the first optimizer step (every rank): output.dir is now this run's,
                and the sinks that write into it join."""
                nonlocal committed
                if ctx.main:
                    commit(run.cfg, resuming=resume_path is not None)
                dist.barrier()
                committed = True
                if resume_path is not None:  # recover() put a checkpoint moved aside back
                    name = resume_path.name.removeprefix(".old-")
                    run.last_checkpoint = out / "checkpoints" / name
                if ctx.main:
                    plot = out / "loss.png" if run.cfg.output.plot_loss else None
                    log = MetricsLog(out, keep_until)
                    writers = (MetricsSink(log, run.cfg.train.log_every, plot), StatusSink(out))
                    reporter.attach(*writers)
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
            try:
                if committed:
                    _end(out, summary, reporter, run.last_checkpoint, console, ctx.main)
            finally:
                dist.teardown()
    return summary


def _end(
    out: Path,
    summary: dict,
    reporter: Reporter,
    last_checkpoint: Path | None,
    console: Console,
    main: bool,
) -> None:
    """summary.json, then the sinks told the run ended (a watcher told finds summary.json in
    place); previous/ deleted once a completed run's outputs are all in place, or named. A run
    that is failing anyway keeps its own error should these writes fail too (a full disk)."""
    completed = summary["status"] == "completed"
    previous = out / PREVIOUS
    if main and not completed and previous.is_dir():
        summary["previous"] = str(previous)
        console.print(f"the earlier run's outputs are in {previous} until a run here completes")
    problems: list[OSError] = []
    if main:
        try:
            write_text_atomic(
                out / "summary.json",
                json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n",
            )
        except OSError as e:
            problems.append(e)
    error = summary.get("error")
    peak = (summary.get("peak_memory") or {}).get("measured_bytes")
    try:
        reporter.end(
            End(summary["status"], error.splitlines()[0] if error else None, peak, last_checkpoint)
        )
    except OSError as e:
        problems.append(e)
    if main and completed and not problems:
        discard_previous(out)
    if problems and completed:
        if disk_full(problems[0]):
            raise OutOfSpace(
                f"out of space: could not write {_what(problems[0], out)}; the run's outputs are "
                "in place, its summary may be missing: free some space there."
            ) from None
        raise problems[0]
    for e in problems:
        console.print(f"[yellow]could not write {_what(e, out)}[/yellow]")


def _what(e: OSError, out: Path) -> str:
    return f"{e.filename or out} ({e.strerror or e})"


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
    (snug_base.json: path, revision and fingerprint), which merge/chat/eval/generate check.
    Its weights' bytes must fit on the disk first; a write that fails anyway (a full disk)
    leaves no hidden directory behind."""
    ctx = ctx or dist.Dist()
    method = get_method(cfg.method.name)
    target = out / method.output  # adapter/ or model/
    model = dist.unwrap(model)
    state = dist.full_state(model, trainable_only=method.output == "adapter", ctx=ctx)
    if ctx.main:
        what = f"{target.name}/"
        needed = _weight_bytes(model, state, trainable_only=method.output == "adapter")
        check_space(out, needed, what, "free some space there and run again.")
        tmp = aside(target)
        try:
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
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not disk_full(e):
                raise
            raise OutOfSpace(
                f"{out_of_space(out, needed, what, e)}; free some space there and run again."
            ) from None
    dist.barrier()
    return target


def _weight_bytes(model, state: dict | None, trainable_only: bool) -> int:
    """The bytes of the weights an adapter or model directory holds: the gathered `state`,
    else the trainable parameters (an adapter) or every tensor once (a model; tied weights
    share one)."""
    if state is not None:
        return sum(t.numel() * t.element_size() for t in state.values())
    if trainable_only:
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    seen: dict[tuple, int] = {}
    for t in model.state_dict().values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = (
            t.numel() * t.element_size()
        )
    return sum(seen.values())
