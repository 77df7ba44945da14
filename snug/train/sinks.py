"""The sinks every run has (the protocol: core/events.py): the console, metrics.jsonl with
TensorBoard, and status.json. metrics.jsonl writes into output.dir, so run_training attaches
it only when the run takes output.dir over; status.json is there from the start (where it is
written before the take-over: train/status.py)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from snug.core.events import Checkpoint, End, Eval, Phase, Start, Step
from snug.train.metrics import MetricsLog
from snug.train.status import RunStatus


def _logged(step: int, total_steps: int, log_every: int) -> bool:
    """train.log_every: a row every `log_every` steps, and at the last step."""
    return step % log_every == 0 or step == total_steps


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


class ConsoleSink:
    """A live progress bar on a terminal; otherwise (a log, a pipe) a `step N/M ...` line on
    the steps train.log_every logs."""

    def __init__(self, console: Console, log_every: int) -> None:
        self.console, self.log_every = console, log_every
        self.bar: Progress | None = None

    def on_start(self, event: Start) -> None:
        if not self.console.is_terminal or event.steps_done >= event.total_steps:
            return
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        self.bar = Progress(*columns, console=self.console)
        self.bar.add_task("train", total=event.total_steps, completed=event.steps_done, info="")
        self.bar.start()

    def on_step(self, event: Step) -> None:
        info = (
            f"loss {event.loss:.4f} lr {event.lr:.2e} {event.tokens_per_second:,.0f} tok/s"
            + "".join(f" {name} {value:.4g}" for name, value in event.metrics.items())
        )
        if self.bar is not None:
            self.bar.update(self.bar.task_ids[0], advance=1, info=info)
            if event.step == event.total_steps:  # the evaluation after training has bars too
                self._close()
        elif _logged(event.step, event.total_steps, self.log_every):
            self.console.print(f"step {event.step}/{event.total_steps} {info}")

    def on_end(self, event: End) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class MetricsSink:
    """metrics.jsonl and TensorBoard (train/metrics.py): a row on the steps train.log_every
    logs and one per held-out loss; at the end, loss.png when `plot` names it."""

    def __init__(self, log: MetricsLog, log_every: int, plot: Path | None) -> None:
        self.log, self.log_every, self.plot = log, log_every, plot

    def on_step(self, event: Step) -> None:
        if not _logged(event.step, event.total_steps, self.log_every):
            return
        self.log.write(
            {
                "step": event.step,
                "epoch": event.epoch,
                "loss": event.loss,
                "lr": event.lr,
                "grad_norm": event.grad_norm,
                "tokens_per_second": event.tokens_per_second,
                **event.metrics,
            }
        )

    def on_eval(self, event: Eval) -> None:
        self.log.write({"step": event.step, "eval_loss": event.eval_loss})

    def on_end(self, event: End) -> None:
        self.log.close()
        if self.plot is not None and self.log.rows:
            self.log.plot(self.plot)


class StatusSink:
    """output.dir/status.json (train/status.py, made when the run starts): each phase as it
    comes, after steps at most once a second (the last step always), at the take-over, at
    each checkpoint and at the end."""

    def __init__(self, status: RunStatus) -> None:
        self.status = status

    def on_phase(self, event: Phase) -> None:
        if event.name == "training":  # counted in steps: the step fields say it
            self.status.update(step=event.done or 0, total_steps=event.total)
            self.status.phase(event.name, None, None, event.detail)
        else:
            self.status.phase(event.name, event.done, event.total, event.detail)

    def on_start(self, event: Start) -> None:
        self.status.take_over(
            total_steps=event.total_steps,
            predicted_peak_bytes=event.predicted_peak_bytes,
            last_checkpoint=_text(event.last_checkpoint),
        )

    def on_step(self, event: Step) -> None:
        self.status.update(
            step=event.step,
            epoch=event.epoch,
            loss=event.loss if math.isfinite(event.loss) else None,
            tokens_per_second=round(event.tokens_per_second, 1),
            peak_memory_bytes=event.peak_memory_bytes,
            force=event.step == event.total_steps,
        )

    def on_checkpoint(self, event: Checkpoint) -> None:
        self.status.update(force=True, last_checkpoint=str(event.path))

    def on_end(self, event: End) -> None:
        # a run that stopped before its loop ended keeps the peak measured so far
        kept = (
            {}
            if event.peak_memory_bytes is None
            else {"peak_memory_bytes": event.peak_memory_bytes}
        )
        self.status.end(
            event.state,
            event.error,
            detail=event.reason or "",
            last_checkpoint=_text(event.last_checkpoint),
            **kept,
        )
