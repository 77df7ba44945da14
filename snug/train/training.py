"""`snug train`: data -> model -> method -> steps -> eval -> outputs, snug's own loop, no Trainer.

Split by idea: train/build.py prepares a run without touching output.dir, train/schedule.py
turns samples into steps, train/run.py is the loop over optimizer steps, core/events.py with
train/sinks.py tell the console, metrics.jsonl/TensorBoard, status.json (from the start:
train/status.py) and any sink of the caller what happens, and train/finish.py ends a run (the
evaluation after, the final adapter or model, summary.json). Here: the run from start to end,
and when output.dir becomes the run's."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from snug.config import Config
from snug.core.events import Phase, Reporter, Start
from snug.models.load import resolve_device
from snug.train import dist
from snug.train.build import build_run
from snug.train.finish import end, finish
from snug.train.metrics import MetricsLog
from snug.train.outputs import commit, newest_checkpoint, own_output_dir
from snug.train.resume import TrainingStopped
from snug.train.run import Run
from snug.train.sinks import ConsoleSink, MetricsSink, StatusSink
from snug.train.status import RunStatus


def run_training(
    cfg: Config,
    console: Console | None = None,
    fresh: bool = False,
    allow_config_change: bool = False,
    resume_command: str = "the same command",
    sinks: list | tuple = (),
    planner: Callable | None = None,
    status: RunStatus | None = None,
) -> dict:
    """Train as `cfg` says, write everything into output.dir, return summary.json's content.
    Resumes the newest complete checkpoint in output.dir unless `fresh`; a checkpoint of a
    different run (guarded keys, data) is refused unless `allow_config_change`.

    `sinks`: more watchers of the run (a web UI, a test), told what happens after the
    console, metrics.jsonl and status.json are; each has the methods of core/events.py it
    cares about (on_phase, on_start, on_step, on_eval, on_checkpoint, on_end). Only the main
    rank of a distributed run calls them.

    `status`: output.dir's status file, when the caller began it before (`snug train` does,
    before the heavy imports); else the main rank begins it once the lock is held. Closed
    here, however the run ends.

    `planner`: what memory.auto_fit asks for the fastest settings that fit, `(cfg, device type,
    seq_len) -> (cfg, report)` (snug.plan.autofit.auto_fit): the planner replays this layer's
    step, so it sits above it and the caller hands it in.

    Rank 0 holds output.dir's lock throughout (or checks that the torchrun launcher holding it
    for the ranks does: train/lock.py). Nothing in output.dir changes until the run has proven
    it can start, its first optimizer step included (train/outputs.py): an error before that
    leaves an earlier run's files as they were and its own status saying how it ended
    (train/status.py: status.json, or status.starting.json beside an earlier run's), writes no
    summary and sends phases only (no start, no end); after it, the earlier run's
    outputs wait in previous/ until the run completes."""
    # soft_wrap: a line is never broken at the terminal width (80 columns in a pipe), so a
    # log keeps each path and message whole for grep
    console = console or Console(soft_wrap=True)
    started = time.perf_counter()
    ctx, device = dist.setup(cfg, resolve_device(cfg))
    if not ctx.main:  # one voice: rank 0 prints, logs and writes the summary
        console = Console(quiet=True)
    with own_output_dir(cfg, fresh, lock=ctx.main) as out:
        resume_path = None if fresh else newest_checkpoint(out / "checkpoints")
        summary: dict = {"status": "failed", "steps": 0}
        if ctx.main and status is None:
            status = RunStatus(out)  # closed in the `finally` below
        told = [ConsoleSink(console, cfg.train.log_every), StatusSink(status), *sinks]
        reporter = Reporter(told if ctx.main else [])
        take_over: TakeOver | None = None
        reason: str | None = None  # why a run stopped or was interrupted (End.reason)
        try:
            reporter.phase(Phase("validating", detail=f"device {device}; output.dir {out}"))
            run = dist.agree(
                lambda: build_run(
                    cfg,
                    ctx,
                    device,
                    resume_path,
                    allow_config_change=allow_config_change,
                    console=console,
                    summary=summary,
                    planner=planner,
                    reporter=reporter,
                    resume_command=resume_command,
                ),
                device,
            )
            take_over = TakeOver(run, ctx, out, resume_path, reporter, summary)
            reporter.phase(Phase("training", run.pos.step, run.total_steps))
            run.train(take_over)
            if not take_over.done:  # nothing was left to train (a finished run, resumed)
                take_over()
            finish(run, out, ctx, console, summary)
            summary["status"] = "completed"
        except TrainingStopped as e:
            summary["status"] = "stopped"
            reason = str(e)
            raise
        except Exception as e:  # the reason, in the summary too
            summary["error"] = f"{type(e).__name__}: {e}"
            _ended_before_take_over(status, take_over, e)
            raise
        except KeyboardInterrupt as e:
            summary["status"] = "interrupted"
            reason = "interrupted (a second Ctrl-C, or one outside the steps): nothing saved"
            _ended_before_take_over(status, take_over, e)
            raise
        finally:
            summary["wall_seconds"] = round(time.perf_counter() - started, 2)
            try:
                if take_over is not None and take_over.done:
                    end(out, summary, reporter, run.last_checkpoint, console, ctx.main, reason)
            finally:
                if status is not None:
                    status.close()
                dist.teardown()
    return summary


def _ended_before_take_over(
    status: RunStatus | None, take_over: TakeOver | None, e: BaseException
) -> None:
    """A run that `e` ends before taking output.dir over: its status says failed (with the
    reason) or interrupted, and stays (train/status.py); after the take-over the end event
    says it."""
    if status is not None and (take_over is None or not take_over.done):
        status.ended_by(e)


@dataclass
class TakeOver:
    """Called after the first optimizer step (every rank): output.dir becomes this run's
    (train/outputs.py commit, by rank 0), metrics.jsonl's sink joins, and `start` tells the
    sinks (status.json becomes this run's: train/status.py)."""

    run: Run
    ctx: dist.Dist
    out: Path
    resume_path: Path | None
    reporter: Reporter
    summary: dict
    done: bool = False

    def __post_init__(self) -> None:
        # a resumed run's metrics.jsonl keeps the steps up to its checkpoint
        self.keep_until = self.run.pos.step if self.resume_path is not None else None

    def __call__(self) -> None:
        run, resuming = self.run, self.resume_path is not None
        if self.ctx.main:
            commit(run.cfg, resuming=resuming)
            self.done = True  # the folder is this run's: summary.json follows, whatever comes
        dist.barrier()
        self.done = True
        if resuming:  # recover() put a checkpoint moved aside back
            name = self.resume_path.name.removeprefix(".old-")
            run.last_checkpoint = self.out / "checkpoints" / name
        if self.ctx.main:
            plot = self.out / "loss.png" if run.cfg.output.plot_loss else None
            log = MetricsLog(self.out, self.keep_until)
            self.reporter.attach(MetricsSink(log, run.cfg.train.log_every, plot))
        predicted = self.summary.get("auto_fit", {}).get("predicted_peak_bytes")
        self.reporter.start(Start(run.total_steps, run.pos.step, predicted, run.last_checkpoint))
