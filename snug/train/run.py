"""The loop over optimizer steps of one run: position, checkpoints, signals, NaN checks and the
out-of-memory fallback around THE step (train/step.py). What happens is told as events
(core/events.py); the loop knows no metric names and no sink."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from snug.config import Config
from snug.core.events import Checkpoint, Eval, Reporter, Step
from snug.core.registry import get_method
from snug.errors import RunError
from snug.train import dist
from snug.train.checkpoint import (
    COMPLETE,
    CheckpointLoadError,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
)
from snug.train.evaluate import eval_metrics
from snug.train.memory import (
    StepPeaks,
    model_tensors,
    optimizer_tensors,
    peak_memory_report,
    peak_rss_bytes,
)
from snug.train.optim import build_optimizer, build_scheduler, warmup_too_long
from snug.train.resume import Signals, TrainingStopped
from snug.train.schedule import Schedule, sample_lengths, split_window, window_batches
from snug.train.step import StepOptions, train_step


class NonFiniteError(RunError):
    """The loss or gradient norm of a step was NaN/inf (the update was not applied)."""


class OutOfMemory(RunError):
    """Out of memory at micro-batch 1: nothing left to halve."""


@dataclass
class Position:
    """Where the loop is: saved in every checkpoint, so a resume continues exactly there."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    window: int = 0  # steps done within the epoch (index of the next window)
    micro_step: int = 0  # micro-batches done within the window: 0, checkpoints fall between steps
    tokens_seen: int = 0
    seconds: float = 0.0  # time spent in steps, for tokens/s
    rows_per_micro_batch: int = 0  # below train.micro_batch after an out-of-memory fallback
    nonfinite_skipped: list[int] = field(default_factory=list)
    oom_changes: list[dict] = field(default_factory=list)
    train_loss_first: float | None = None
    best: dict | None = None  # output.keep_best: {"step", "eval_loss"} of the lowest so far


class Run:
    """The loop over optimizer steps of one run: schedule, position, checkpoints, signals,
    NaN checks and the out-of-memory fallback around THE step (train/step.py)."""

    def __init__(
        self,
        *,
        ctx: dist.Dist,
        model,
        tok,
        train_ds,
        eval_ds,
        cfg: Config,
        opts: StepOptions,
        device,
        precision,
        summary: dict,
        console: Console,
        identity: dict,
        reporter: Reporter,
        resume_command: str = "the same command",
        reference: object = None,
        evaluate: Callable[[str], dict] | None = None,
    ) -> None:
        """Everything by name (train/build.py makes the one Run of a run). `identity`: the
        config, adopted config, data hash and eval before, kept in every checkpoint;
        `resume_command`: what a stopped run tells the user to run; `reference`: the stage's
        frozen reference model, if it compares with one; `evaluate`: when there is eval data,
        when ("before"/"after") -> held-out metrics."""
        self.ctx = ctx
        self.model, self.tok, self.train_ds, self.eval_ds = model, tok, train_ds, eval_ds
        self.cfg, self.opts, self.device = cfg, opts, device
        self.out, self.summary, self.console = Path(cfg.output.dir), summary, console
        self.identity = identity
        self.reporter, self.resume_command = reporter, resume_command
        self.reference, self.evaluate = reference, evaluate
        # Called once the first optimizer step is done (given to train()): until then
        # output.dir is untouched.
        self._take_over: Callable[[], None] | None = None
        t = cfg.train
        self.schedule = Schedule.build(sample_lengths(train_ds), cfg, ctx.world)
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.schedule.steps_per_epoch)
        self.optimizer = build_optimizer(model, cfg.memory, t, cfg.method)
        self.peaks: StepPeaks | None = None  # set by train() on CPU
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps)
        if warning := warmup_too_long(t, self.total_steps):
            summary.setdefault("warnings", []).append(warning)
            console.print(f"[yellow]{warning}[/yellow]")
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
        self.method = get_method(cfg.method.name)
        self.pos = Position(rows_per_micro_batch=t.micro_batch)
        self.last_checkpoint: Path | None = None

    # -- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        state = {**dataclasses.asdict(self.pos), **self.identity}
        self.last_checkpoint = save_checkpoint(
            self.out / "checkpoints",
            self.pos.step,
            self.model,
            self.optimizer,
            self.scheduler,
            state,
            self.cfg.output.keep_last,
            self.scaler,
            self.ctx,
            best=self.pos.best["step"] if self.pos.best else None,
        )
        self.reporter.checkpoint(Checkpoint(self.pos.step, self.last_checkpoint))
        return self.last_checkpoint

    def restore(self, path: Path) -> None:
        if self.method.before_step is not None:  # the trainable set as it was when saved
            step = read_train_state(path)["step"]
            self.method.before_step(self.model, self.cfg.method, max(step - 1, 0))
        state = load_checkpoint(
            path, self.model, self.optimizer, self.scheduler, self.scaler, self.ctx
        )
        names = {f.name for f in dataclasses.fields(Position)}
        self.pos = Position(**{k: v for k, v in state.items() if k in names})
        self.last_checkpoint = path
        best = self.pos.best
        if self.cfg.output.keep_best and best is not None:
            found = [path.parent / f"{p}step-{best['step']}" for p in ("", ".old-")]
            if not any((f / COMPLETE).is_file() for f in found):
                raise CheckpointLoadError(
                    f"checkpoint {path} names {found[0]} as output.keep_best's best (held-out "
                    f"loss {best['eval_loss']:.4f}), which is gone; nothing was changed: run "
                    "with output.keep_best=false to go on without it, or --fresh to start over."
                )
        if not self.pos.oom_changes or self.pos.rows_per_micro_batch > self.cfg.train.micro_batch:
            # only an out-of-memory fallback carries over; else this run's micro_batch
            self.pos.rows_per_micro_batch = self.cfg.train.micro_batch

    # -- the loop -----------------------------------------------------------------------------
    def train(self, take_over: Callable[[], None] | None = None) -> None:
        """The steps left; `take_over` is called once, right after the first optimizer step."""
        self._take_over = take_over
        # On CPU the peak comes from snug's tensor tracker, on the steps that can set it.
        self.peaks = StepPeaks() if self.device.type == "cpu" else None
        if self.peaks is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        rss_before = peak_rss_bytes()
        loop_started = time.perf_counter()
        with Signals(self.console) as signals:
            while self.pos.step < self.total_steps:
                windows = self.schedule.windows(self.pos.epoch)
                while self.pos.window < len(windows) and self.pos.step < self.total_steps:
                    self._step(windows[self.pos.window])
                    self._after_step(signals)
                self.pos.epoch += 1
                self.pos.window = 0
        s = self.summary
        s["train_seconds"] = round(time.perf_counter() - loop_started, 2)  # the loop, no evals
        s["peak_memory"] = peak_memory_report(self.peaks, self.device, rss_before)
        if self.ctx.active:  # every rank's own peak (rank 0's is measured_bytes)
            own = torch.tensor([s["peak_memory"]["measured_bytes"]], dtype=torch.float64)
            peaks = [torch.zeros_like(own) for _ in range(self.ctx.world)]
            torch.distributed.all_gather(
                peaks, own.to(self.device) if self.device.type == "cuda" else own
            )
            s["peak_memory"]["per_rank_bytes"] = [int(p.item()) for p in peaks]
        if "auto_fit" in s:
            s["peak_memory"]["predicted_bytes"] = s["auto_fit"]["predicted_peak_bytes"]
        self._some_update_applied()

    def _some_update_applied(self) -> None:
        """A run whose every step was skipped as non-finite (each within train.skip_nonfinite,
        which counts skips, not updates) trained nothing: it fails, and nothing is saved."""
        pos = self.pos
        if pos.step == 0 or len(pos.nonfinite_skipped) < pos.step:
            return
        raise NonFiniteError(
            f"no update was applied: all {pos.step} steps had a non-finite loss or gradient "
            f"norm and were skipped (train.skip_nonfinite={self.cfg.train.skip_nonfinite}); "
            f"check the weights of model.name_or_path={self.cfg.model.name_or_path} and the "
            "data, or lower train.lr."
        )

    def _step(self, window: list[list[list[int]]]) -> None:
        pos = self.pos
        if self.method.before_step is not None:
            self.method.before_step(self.model, self.cfg.method, pos.step)
        tick = time.perf_counter()
        result, n_tokens = self._step_fitting(window)
        self.scheduler.step()
        if self._take_over is not None:
            self._take_over()
            self._take_over = None
        loss = result.loss.item()
        pos.seconds += time.perf_counter() - tick
        pos.step += 1
        pos.window += 1
        pos.tokens_seen += n_tokens
        if result.skipped:
            pos.nonfinite_skipped.append(pos.step)
        elif pos.train_loss_first is None:
            pos.train_loss_first = loss
        speed = pos.tokens_seen / max(pos.seconds, 1e-9)
        self.summary.update(
            steps=pos.step,
            train_loss_first=pos.train_loss_first,
            train_loss_last=loss,
            tokens_per_second=round(speed, 1),
            nonfinite_skipped=pos.nonfinite_skipped,
        )
        if pos.oom_changes:
            self.summary["oom_changes"] = pos.oom_changes
        self.reporter.step(
            Step(
                step=pos.step,
                total_steps=self.total_steps,
                epoch=round(pos.step / self.schedule.steps_per_epoch, 3),
                loss=loss,
                lr=self.scheduler.get_last_lr()[0],
                grad_norm=None if result.grad_norm is None else result.grad_norm.item(),
                tokens_per_second=speed,
                peak_memory_bytes=self._peak_so_far(),
                # the stage's own (cls: accuracy), by whatever names it gives them
                metrics={name: value.item() for name, value in result.metrics.items()},
            )
        )

    def _peak_so_far(self) -> int | None:
        if self.peaks is not None:
            return self.peaks.peak or None
        return torch.cuda.max_memory_allocated(self.device)

    def _step_fitting(self, window):
        """THE step on `window`; on running out of memory, the same rows again in micro-batches
        of half as many rows (twice the accumulation), down to one row (the stage's min_rows).
        A row is a sample: a preference pair keeps its chosen and rejected answers together."""
        mine = [dist.share(mb, self.ctx) for mb in window]  # this rank's rows
        while True:
            rows = self.pos.rows_per_micro_batch
            batches, n_tokens = window_batches(
                self.train_ds,
                split_window(mine, rows, self.opts.stage.min_rows),
                self.tok.pad_token_id,
                self.cfg.data.packing,
                self.device,
                self.opts.stage,
            )
            try:
                with self._tracked(batches):
                    result = train_step(
                        self.model,
                        self.optimizer,
                        batches,
                        self.opts,
                        self.scaler,
                        self._finite,
                        self.reference,
                    )
                if self.ctx.active:  # tokens/s of the whole run
                    n_tokens = int(dist.all_sum(torch.tensor(n_tokens, device=self.device)))
                return result, n_tokens
            except torch.OutOfMemoryError:
                pass  # handled below, once the failed step's tensors are released
            del batches
            if self.ctx.active:  # every rank would have to halve together: not attempted
                raise OutOfMemory(
                    f"out of memory on rank {self.ctx.rank} at step {self.pos.step + 1}; with "
                    "dist.strategy the micro-batch is not halved automatically: lower "
                    "train.micro_batch (and raise train.grad_accum). " + self._last_good()
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            least = self.opts.stage.min_rows
            if rows <= least:
                fewest = (
                    "one row"
                    if rows == 1
                    else f"{rows} rows, the fewest train.stage={self.opts.stage.name} takes"
                )
                raise OutOfMemory(
                    f"out of memory at step {self.pos.step + 1} with micro-batches of {fewest}: "
                    "nothing left to halve. "
                    + self._last_good()
                    + " Try memory.grad_checkpointing, memory.offload_activations, a shorter "
                    "data.cutoff_len, or `snug plan` with this config to see what fits."
                )
            self.pos.rows_per_micro_batch = max((rows + 1) // 2, least)
            change = {
                "step": self.pos.step + 1,
                "micro_batch": self.pos.rows_per_micro_batch,
                "grad_accum": len(
                    split_window(window, self.pos.rows_per_micro_batch, self.opts.stage.min_rows)
                ),
            }
            self.pos.oom_changes.append(change)
            self.console.print(
                f"[yellow]out of memory at step {change['step']}: retrying with micro-batches "
                f"of {change['micro_batch']} rows ({change['grad_accum']} per step), same "
                "samples and effective batch[/yellow]"
            )

    def _finite(self, result) -> bool:
        """Refuse the update of a step whose loss (or gradient norm, unless a grad scaler
        handles overflow itself) is NaN/inf: skip it if train.skip_nonfinite allows, else stop."""
        values = [result.loss]
        if result.grad_norm is not None and self.scaler is None:
            values.append(result.grad_norm)
        if bool(torch.isfinite(torch.stack([v.float() for v in values])).all()):
            return True
        step = self.pos.step + 1
        if len(self.pos.nonfinite_skipped) < self.cfg.train.skip_nonfinite:
            self.console.print(
                f"[yellow]step {step}: non-finite loss or gradient, skipped[/yellow]"
            )
            return False
        norm = "none" if result.grad_norm is None else f"{result.grad_norm.item():g}"
        raise NonFiniteError(
            f"step {step}: the loss is {result.loss.item():g} and the gradient norm {norm}; "
            "stopped before the optimizer step. "
            + self._last_good()
            + " train.skip_nonfinite: N skips up to N such steps."
        )

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "There is no checkpoint of this run (set output.save_every to keep some)."
        return f"The last good checkpoint is {self.last_checkpoint}; running again resumes it."

    def _tracked(self, batches: list[dict[str, torch.Tensor]]):
        if self.peaks is None:
            return contextlib.nullcontext()

        def persistent() -> list[torch.Tensor]:  # and this step's batches, made before it
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            inputs = [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]
            frozen = self.opts.stage.frozen_models(self.reference)  # a preference stage's copy
            copy = [t for m in frozen for t in model_tensors(m)]
            return [
                *model_tensors(self.model),
                *copy,
                *optimizer_tensors(self.optimizer),
                *grads,
                *inputs,
            ]

        return self.peaks.step([tuple(b["input_ids"].shape[:2]) for b in batches], persistent)

    def _after_step(self, signals: Signals) -> None:
        t, pos = self.cfg.train, self.pos
        if t.eval_every and self.eval_ds is not None and pos.step % t.eval_every == 0:
            value = eval_metrics(
                self.model,
                self.eval_ds,
                self.opts,
                t.micro_batch,
                self.tok.pad_token_id,
                self.device,
                reference=self.reference,
            )["loss"]
            self.reporter.eval(Eval(pos.step, value))
            new_best = self.cfg.output.keep_best and self._lowest(value)
        else:
            new_best = False
        every = self.cfg.output.save_every
        stop = dist.any_rank(signals.requested is not None, self.device)  # all ranks agree
        if (every and pos.step % every == 0) or stop or new_best:
            self.save()
        if stop:
            raise TrainingStopped(
                f"{signals.requested or 'a signal to another rank'}: stopped after step "
                f"{pos.step}, checkpoint {self.last_checkpoint}; to resume, run: "
                f"{self.resume_command}"
            )

    def _lowest(self, value: float) -> bool:
        """output.keep_best: is `value` (this step's held-out loss, rank 0's) the lowest so
        far? Then it is the best, and this step is checkpointed."""
        if self.ctx.active:  # rank 0's number on every rank: they all save, or none
            same = torch.tensor([value], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(same, src=0)
            value = same.item()
        best = self.pos.best
        if not math.isfinite(value) or (best is not None and value >= best["eval_loss"]):
            return False
        self.pos.best = {"step": self.pos.step, "eval_loss": value}
        return True
