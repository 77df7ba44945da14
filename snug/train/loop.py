"""The training loop: data -> model -> method -> steps -> eval -> outputs. snug's own, no Trainer."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import set_seed

from snug.config import Config
from snug.data.collate import real_tokens
from snug.data.dataset import build_datasets
from snug.data.packing import micro_batches, pack
from snug.errors import RunError
from snug.files import aside, replace_dir, write_text_atomic
from snug.methods import count_params, get_method
from snug.models.fingerprint import base_record, write_base_record
from snug.models.load import (
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_precision,
)
from snug.progress import Phase
from snug.train import dist
from snug.train.checkpoint import load_checkpoint, read_train_state, save_checkpoint
from snug.train.evaluate import eval_loss
from snug.train.memory import StepPeaks, model_tensors, optimizer_tensors
from snug.train.metrics import MetricsLog, NoMetrics
from snug.train.optim import build_optimizer, build_scheduler
from snug.train.outputs import check_output_dir, commit, newest_checkpoint
from snug.train.prepare import prepare_for_training, step_options
from snug.train.resume import (
    ResumeError,
    Signals,
    TrainingStopped,
    config_drift,
    data_hash,
)
from snug.train.status import RunStatus
from snug.train.step import StepOptions, train_step


@dataclass
class Schedule:
    """How samples become rows, micro-batches and optimizer steps."""

    rows: list[list[int]]  # sample indices of each batch row: one sample, or several if packed
    micro_batch: int
    grad_accum: int
    seed: int
    row_tokens: list[int] | None = None  # given: length-grouped micro-batches

    @classmethod
    def build(cls, lengths: list[int], cfg: Config, world: int = 1) -> Schedule:
        """With `world` ranks, each micro-batch is global (micro_batch x world rows) and each
        rank trains its share (train/dist.py: share)."""
        d, t = cfg.data, cfg.train
        rows = pack(lengths, d.cutoff_len) if d.packing else [[i] for i in range(len(lengths))]
        tokens = [sum(lengths[i] for i in r) for r in rows] if d.group_by_length else None
        return cls(rows, t.micro_batch * world, t.grad_accum, t.seed, tokens)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.rows) / self.micro_batch) / self.grad_accum)

    def windows(self, epoch: int) -> list[list[list[list[int]]]]:
        """Rows for each optimizer step of `epoch`: [step][micro-batch][row][sample]."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        micro = micro_batches(len(self.rows), self.micro_batch, g, self.row_tokens)
        micro = [[self.rows[r] for r in mb] for mb in micro]
        return [micro[i : i + self.grad_accum] for i in range(0, len(micro), self.grad_accum)]


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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
) -> dict:
    """Train as `cfg` says, write everything into output.dir, return summary.json's content.
    Resumes the newest complete checkpoint in output.dir unless `fresh`; a checkpoint of a
    different run (guarded keys, data) is refused unless `allow_config_change`.

    Nothing in output.dir changes until the run has proven it can start, its first optimizer
    step included (train/outputs.py): an error before that leaves an earlier run's files as
    they were and writes no summary."""
    console = console or Console()
    started = time.perf_counter()
    ctx, device = dist.setup(cfg, resolve_device(cfg))
    if not ctx.main:  # one voice: rank 0 prints, logs and writes the summary
        console = Console(quiet=True)
    check_output_dir(cfg)
    out = Path(cfg.output.dir)
    resume_path = None if fresh else newest_checkpoint(out / "checkpoints")
    summary: dict = {"status": "failed", "steps": 0}
    metrics: MetricsLog | None = None
    status: RunStatus | None = None  # output.dir/status.json, once the run owns output.dir
    committed = False
    try:
        run = dist.agree(
            lambda: _prepare(cfg, ctx, device, resume_path, allow_config_change, console, summary),
            device,
        )
        keep_until = run.pos.step if resume_path is not None else None

        def take_over() -> None:
            """After the first optimizer step (every rank): output.dir is now this run's."""
            nonlocal committed, metrics, status
            if ctx.main:
                commit(run.cfg, resuming=resume_path is not None)
            dist.barrier()
            committed = True
            if resume_path is not None:  # recover() put a checkpoint moved aside back in place
                run.last_checkpoint = out / "checkpoints" / resume_path.name.removeprefix(".old-")
            metrics = MetricsLog(out, keep_until) if ctx.main else NoMetrics()
            run.metrics = metrics
            if ctx.main:
                predicted = summary.get("auto_fit", {}).get("predicted_peak_bytes")
                run.status = status = RunStatus(out, run.total_steps, predicted)
                run.status.update(force=True, last_checkpoint=_text(run.last_checkpoint))

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
        if status is not None:
            peak = (summary.get("peak_memory") or {}).get("measured_bytes")
            status.end(
                summary["status"],
                summary.get("error", "").splitlines()[0] if summary.get("error") else None,
                peak_memory_bytes=peak if peak is not None else status.fields["peak_memory_bytes"],
                last_checkpoint=_text(run.last_checkpoint),
            )
        if ctx.main and committed:
            write_text_atomic(
                out / "summary.json",
                json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n",
            )
        if metrics is not None:
            metrics.close()
            if cfg.output.plot_loss and metrics.rows:
                metrics.plot(out / "loss.png")
        dist.teardown()
    return summary


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _prepare(
    cfg: Config,
    ctx: dist.Dist,
    device,
    resume_path: Path | None,
    allow_config_change: bool,
    console: Console,
    summary: dict,
) -> Run:
    """Everything a run does before it may touch output.dir: data, model, method, optimizer,
    the checkpoint (read back into memory) and the evaluation before training."""
    given = cfg.to_dict()  # the user's config, before auto_fit or an OOM fallback change it
    precision = resolve_precision(cfg, device)
    set_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model)
    if not ctx.main:  # rank 0 tokenizes into the datasets cache first, the others read it
        dist.barrier()
    train_ds, eval_ds, stats = build_datasets(
        cfg.data,
        tok,
        cfg.train.stage,
        cfg.train.seed,
        cfg.model.name_or_path,
        console.print,
        train=cfg.train,
    )
    if ctx.main:
        dist.barrier()
    summary["data"] = stats.as_dict()
    console.print(
        f"data: {stats.kept} samples kept, {stats.dropped} dropped, "
        f"{stats.truncated} truncated; eval: {len(eval_ds) if eval_ds else 0}"
    )
    for problem in stats.problems[:3]:  # data.on_error=skip: what was dropped, and why
        console.print(f"[yellow]dropped: {problem}[/yellow]")
    hashed = data_hash(train_ds)
    resumed = None
    if resume_path is not None:
        resumed = _check_resume(resume_path, given, hashed, allow_config_change, console)
        if cfg.memory.auto_fit:  # keep what was adopted: the search need not run again
            cfg = _adopted(cfg, resumed["adopted"])
    if cfg.memory.auto_fit and resumed is None:
        cfg = _auto_fit(cfg, train_ds, device, console, summary)
    model = load_model(cfg, device, precision, stats.labels, tok.pad_token_id)
    # after loading: a hub model is in the cache now
    base = base_record(cfg.model, cfg.given_paths.get("model.name_or_path"))
    summary["base"] = base
    if resumed is not None and resumed["base"]["fingerprint"] != base["fingerprint"]:
        _refuse_or_warn(
            resume_path,
            [
                f"model: other weights than the checkpoint's ({resumed['base']['fingerprint']} -> "
                f"{base['fingerprint']})"
            ],
            allow_config_change,
            console,
        )
    model = prepare_for_training(model, cfg, precision)
    trainable, total = count_params(model)
    model = dist.wrap(model, cfg, ctx, precision, device)
    summary.update(
        trainable_params=trainable, total_params=total, device=str(device), precision=precision
    )
    console.print(
        f"model: {cfg.model.name_or_path} | method {cfg.method.name} | trainable "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%) | {device} {precision}"
        + (f" | {ctx.strategy} x {ctx.world} processes" if ctx.active else "")
    )
    opts = dataclasses.replace(step_options(cfg, device, precision), world=ctx.world)
    identity = {"config": given, "adopted": cfg.to_dict(), "data_hash": hashed, "base": base}
    run = Run(
        ctx,
        model,
        tok,
        train_ds,
        eval_ds,
        cfg,
        opts,
        device,
        precision,
        out_dir(cfg),
        summary,
        console,
        identity,
    )
    if eval_ds:
        run.evaluate = lambda when: _evaluate(
            dist.unwrap(model), tok, eval_ds, cfg, opts, device, console, when
        )
    if resume_path is not None:
        run.restore(resume_path)
    # before training; a resumed run kept it in its checkpoint (the model has moved on)
    before = (
        resumed["eval_before"] if resumed else (run.evaluate("before") if run.evaluate else None)
    )
    run.identity["eval_before"] = before
    return run


def out_dir(cfg: Config) -> Path:
    return Path(cfg.output.dir)


def _adopted(cfg: Config, adopted: dict) -> Config:
    """The current config with the memory settings auto_fit chose for the checkpoint's run
    (everything else as the user has it now)."""
    m, t = adopted["memory"], adopted["train"]
    memory = {k: m[k] for k in ("grad_checkpointing", "offload_activations", "optimizer")}
    return dataclasses.replace(
        cfg,
        memory=dataclasses.replace(cfg.memory, **memory),
        train=dataclasses.replace(
            cfg.train, micro_batch=t["micro_batch"], grad_accum=t["grad_accum"]
        ),
    )


def _check_resume(path: Path, given: dict, hashed: str, allow: bool, console: Console) -> dict:
    """The checkpoint's train state, if it belongs to this run; else a ResumeError listing
    what differs (or, with `allow`, a warning)."""
    state = read_train_state(path)
    changes = config_drift(state["config"], given)
    if state["data_hash"] != hashed:
        changes.append("data: the tokenized training set differs from the checkpoint's")
    _refuse_or_warn(path, changes, allow, console)
    console.print(f"resuming from {path} (step {state['step']})")
    return state


def _refuse_or_warn(path: Path, changes: list[str], allow: bool, console: Console) -> None:
    if changes and not allow:
        raise ResumeError(
            f"output.dir holds checkpoint {path} of a different run: "
            + "; ".join(changes)
            + ". Run with --fresh to start over, or --allow-config-change to resume anyway."
        )
    for line in changes:
        console.print(f"[yellow]resuming with a changed config: {line}[/yellow]")


def _micro_batches(
    train_ds, window: list[list[list[int]]], pad_id: int, packed: bool, device, stage
) -> tuple[list[dict], int]:
    """The step's micro-batches on `device`, collated as the stage does, and how many of their
    tokens are not padding."""
    batches, tokens = [], 0
    for mb in window:
        rows = [[train_ds[i] for i in row] for row in mb]
        if packed:
            batch = stage.collate_packed(rows, pad_id)
        else:
            batch = stage.collate([r[0] for r in rows], pad_id)
        batches.append({k: v.to(device) for k, v in batch.items()})
        tokens += real_tokens(rows)
    return batches, tokens


def split_window(window: list[list[list[int]]], rows: int) -> list[list[list[int]]]:
    """The same rows, in the same order, in micro-batches of at most `rows` rows: what an
    out-of-memory fallback trains instead of `window` (the gradient is the same, since the
    step divides by the targets of the whole window)."""
    return [mb[i : i + rows] for mb in window for i in range(0, len(mb), rows)]


def _auto_fit(cfg: Config, train_ds, device, console: Console, summary: dict) -> Config:
    """Adopt the planner's fastest fitting memory settings (snug/plan/search.py:auto_fit)."""
    from snug.plan.search import auto_fit

    seq_len = cfg.data.cutoff_len if cfg.data.packing else max(_lengths(train_ds))
    cfg, report = auto_fit(cfg, device.type, seq_len)
    summary["auto_fit"] = report
    console.print(
        f"auto_fit: micro_batch {report['micro_batch']} x grad_accum {report['grad_accum']}, "
        f"grad_checkpointing {report['grad_checkpointing']}, offload "
        f"{report['offload_activations']}, optimizer {report['optimizer']}: {report['why']} "
        f"(step time and reserved memory: {report['calibration']})"
    )
    return cfg


def _lengths(train_ds) -> list[int]:
    return [len(ids) for ids in train_ds["input_ids"]]


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


class Run:
    """The loop over optimizer steps of one run: schedule, position, checkpoints, signals,
    NaN checks and the out-of-memory fallback around THE step (train/step.py)."""

    def __init__(
        self,
        ctx: dist.Dist,
        model,
        tok,
        train_ds,
        eval_ds,
        cfg: Config,
        opts: StepOptions,
        device,
        precision,
        out: Path,
        summary: dict,
        console: Console,
        identity: dict,
    ) -> None:
        self.ctx = ctx
        self.model, self.tok, self.train_ds, self.eval_ds = model, tok, train_ds, eval_ds
        self.cfg, self.opts, self.device = cfg, opts, device
        self.out, self.summary, self.console = out, summary, console
        self.identity = identity  # config, adopted config, data hash, eval before: checkpointed
        self.metrics: MetricsLog | NoMetrics = NoMetrics()  # set once the run owns output.dir
        self.status: RunStatus | None = None  # likewise, on the main rank
        self.evaluate = None  # when there is eval data: when ("before"/"after") -> metrics
        self.resume_command = "the same command"  # what a stopped run tells the user to run
        # Called once the first optimizer step is done: until then output.dir is untouched.
        self.take_over: Callable[[], None] | None = None
        t = cfg.train
        self.schedule = Schedule.build(_lengths(train_ds), cfg, ctx.world)
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.schedule.steps_per_epoch)
        self.optimizer = build_optimizer(model, cfg.memory, t, cfg.method.lora_plus_ratio)
        self.peaks: StepPeaks | None = None  # set by train() on CPU
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps)
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
        )
        if self.status is not None:
            self.status.update(force=True, last_checkpoint=str(self.last_checkpoint))
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
        if not self.pos.oom_changes or self.pos.rows_per_micro_batch > self.cfg.train.micro_batch:
            # only an out-of-memory fallback carries over; else this run's micro_batch
            self.pos.rows_per_micro_batch = self.cfg.train.micro_batch

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> None:
        # On CPU the peak comes from snug's tensor tracker, on the steps that can set it.
        self.peaks = StepPeaks() if self.device.type == "cpu" else None
        if self.peaks is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        rss_before = _peak_rss_bytes()
        loop_started = time.perf_counter()
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        progress = Progress(*columns, console=self.console, disable=not self.console.is_terminal)
        with progress as bar, Signals(self.console) as signals:
            task = bar.add_task("train", total=self.total_steps, completed=self.pos.step, info="")
            while self.pos.step < self.total_steps:
                windows = self.schedule.windows(self.pos.epoch)
                while self.pos.window < len(windows) and self.pos.step < self.total_steps:
                    info = self._step(windows[self.pos.window])
                    bar.update(task, advance=1, info=info)
                    self._after_step(signals)
                self.pos.epoch += 1
                self.pos.window = 0
        s = self.summary
        s["train_seconds"] = round(time.perf_counter() - loop_started, 2)  # the loop, no evals
        s["peak_memory"] = _peak_memory(self.peaks, self.device, rss_before)
        if self.ctx.active:  # every rank's own peak (rank 0's is measured_bytes)
            own = torch.tensor([s["peak_memory"]["measured_bytes"]], dtype=torch.float64)
            peaks = [torch.zeros_like(own) for _ in range(self.ctx.world)]
            torch.distributed.all_gather(
                peaks, own.to(self.device) if self.device.type == "cuda" else own
            )
            s["peak_memory"]["per_rank_bytes"] = [int(p.item()) for p in peaks]
        if "auto_fit" in s:
            s["peak_memory"]["predicted_bytes"] = s["auto_fit"]["predicted_peak_bytes"]

    def _step(self, window: list[list[list[int]]]) -> str:
        pos, t = self.pos, self.cfg.train
        if self.method.before_step is not None:
            self.method.before_step(self.model, self.cfg.method, pos.step)
        tick = time.perf_counter()
        result, n_tokens = self._step_fitting(window)
        self.scheduler.step()
        if self.take_over is not None:
            self.take_over()
            self.take_over = None
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
        if self.status is not None:
            self.status.update(
                step=pos.step,
                epoch=round(pos.step / self.schedule.steps_per_epoch, 3),
                loss=loss if math.isfinite(loss) else None,
                tokens_per_second=round(speed, 1),
                peak_memory_bytes=self._peak_so_far(),
                force=pos.step == self.total_steps,
            )
        # The stage's own metrics (cls: accuracy), by whatever names it gives them.
        extra = {name: value.item() for name, value in result.metrics.items()}
        info = f"loss {loss:.4f} lr {self.scheduler.get_last_lr()[0]:.2e} {speed:,.0f} tok/s"
        info += "".join(f" {name} {value:.4g}" for name, value in extra.items())
        if pos.step % t.log_every == 0 or pos.step == self.total_steps:
            grad_norm = None if result.grad_norm is None else result.grad_norm.item()
            self.metrics.write(
                {
                    "step": pos.step,
                    "epoch": round(pos.step / self.schedule.steps_per_epoch, 3),
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_second": speed,
                    **extra,
                }
            )
            if not self.console.is_terminal:
                self.console.print(f"step {pos.step}/{self.total_steps} {info}")
        return info

    def _peak_so_far(self) -> int | None:
        if self.peaks is not None:
            return self.peaks.peak or None
        return torch.cuda.max_memory_allocated(self.device)

    def _step_fitting(self, window):
        """THE step on `window`; on running out of memory, the same rows again in micro-batches
        of half as many rows (twice the accumulation), down to one row."""
        mine = [dist.share(mb, self.ctx) for mb in window]  # this rank's rows
        while True:
            rows = self.pos.rows_per_micro_batch
            batches, n_tokens = _micro_batches(
                self.train_ds,
                split_window(mine, rows),
                self.tok.pad_token_id,
                self.cfg.data.packing,
                self.device,
                self.opts.stage,
            )
            try:
                with self._tracked(batches):
                    result = train_step(
                        self.model, self.optimizer, batches, self.opts, self.scaler, self._finite
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
            if rows == 1:
                raise OutOfMemory(
                    f"out of memory at step {self.pos.step + 1} with micro-batches of one row: "
                    "nothing left to halve. "
                    + self._last_good()
                    + " Try memory.grad_checkpointing, memory.offload_activations, a shorter "
                    "data.cutoff_len, or `snug plan` with this config to see what fits."
                )
            self.pos.rows_per_micro_batch = (rows + 1) // 2
            change = {
                "step": self.pos.step + 1,
                "micro_batch": self.pos.rows_per_micro_batch,
                "grad_accum": len(split_window(window, self.pos.rows_per_micro_batch)),
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
            return [*model_tensors(self.model), *optimizer_tensors(self.optimizer), *grads, *inputs]

        return self.peaks.step([tuple(b["input_ids"].shape[:2]) for b in batches], persistent)

    def _after_step(self, signals: Signals) -> None:
        t, pos = self.cfg.train, self.pos
        if t.eval_every and self.eval_ds is not None and pos.step % t.eval_every == 0:
            value = eval_loss(
                self.model,
                self.eval_ds,
                self.opts,
                t.micro_batch,
                self.tok.pad_token_id,
                self.device,
            )
            self.metrics.write({"step": pos.step, "eval_loss": value})
        every = self.cfg.output.save_every
        stop = dist.any_rank(signals.requested is not None, self.device)  # all ranks agree
        if (every and pos.step % every == 0) or stop:
            self.save()
        if stop:
            raise TrainingStopped(
                f"{signals.requested or 'a signal to another rank'}: stopped after step "
                f"{pos.step}, checkpoint {self.last_checkpoint}; to resume, run: "
                f"{self.resume_command}"
            )


def _peak_memory(peaks: StepPeaks | None, device, rss_before: int) -> dict:
    if peaks is not None:
        return {
            "measured_bytes": peaks.peak,
            "tracked_steps": peaks.tracked,
            "predicted_bytes": None,
            "device": "cpu",
            "peak_rss_bytes": _peak_rss_bytes(),
            "rss_before_training_bytes": rss_before,
        }
    return {
        "measured_bytes": torch.cuda.max_memory_allocated(device),
        "reserved_bytes": torch.cuda.max_memory_reserved(device),
        "predicted_bytes": None,
        "device": torch.cuda.get_device_name(device),
    }


@dataclass
class EvalJob:
    """What a stage's held-out evaluation reads besides the model and data."""

    tok: object
    cfg: Config
    opts: StepOptions
    device: torch.device
    micro_batch: int
    pad_id: int


def _evaluate(
    model, tok, eval_ds, cfg: Config, opts: StepOptions, device, console, when: str
) -> dict:
    """Held-out metrics `when` ("before"/"after") training, as the stage scores them, with the
    progress shown."""
    job = EvalJob(tok, cfg, opts, device, cfg.train.micro_batch, tok.pad_token_id)
    label = f"eval {when} training"

    def phase(title: str, total: int, unit: str) -> Phase:
        return Phase(console, f"{label}: {title}", total, unit)

    return opts.stage.evaluate(model, eval_ds, job, phase)


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
