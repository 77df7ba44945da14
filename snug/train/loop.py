"""The training loop: data -> model -> method -> steps -> eval -> outputs. snug's own, no Trainer."""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import set_seed

from snug.config import Config, save_config
from snug.data.collate import collate, collate_packed, real_tokens
from snug.data.dataset import build_datasets
from snug.data.packing import micro_batches, pack
from snug.data.templates import resolve_template
from snug.methods import apply_method, count_params, get_method
from snug.models.load import (
    compute_dtype,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_precision,
)
from snug.train.activations import enable_checkpointing
from snug.train.checkpoint import save_checkpoint
from snug.train.evaluate import accuracy, eval_loss, exact_match
from snug.train.memory import TensorMemoryTracker, model_tensors
from snug.train.metrics import MetricsLog
from snug.train.optim import build_optimizer, build_scheduler
from snug.train.step import StepOptions, train_step

RUN_MARKER = ".snug-run"  # marks a directory as a snug run, so a new run may replace its outputs
RUN_OUTPUTS = (
    "checkpoints",
    "adapter",
    "model",
    "tensorboard",
    "metrics.jsonl",
    "loss.png",
    "summary.json",
    "config.yaml",
)


class OutputDirError(ValueError):
    """output.dir is not ours to write."""


@dataclass
class Schedule:
    """How samples become rows, micro-batches and optimizer steps."""

    rows: list[list[int]]  # sample indices of each batch row: one sample, or several if packed
    micro_batch: int
    grad_accum: int
    seed: int
    row_tokens: list[int] | None = None  # given: length-grouped micro-batches

    @classmethod
    def build(cls, lengths: list[int], cfg: Config) -> Schedule:
        d, t = cfg.data, cfg.train
        rows = pack(lengths, d.cutoff_len) if d.packing else [[i] for i in range(len(lengths))]
        tokens = [sum(lengths[i] for i in r) for r in rows] if d.group_by_length else None
        return cls(rows, t.micro_batch, t.grad_accum, t.seed, tokens)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.rows) / self.micro_batch) / self.grad_accum)

    def windows(self, epoch: int) -> list[list[list[list[int]]]]:
        """Rows for each optimizer step of `epoch`: [step][micro-batch][row][sample]."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        micro = micro_batches(len(self.rows), self.micro_batch, g, self.row_tokens)
        micro = [[self.rows[r] for r in mb] for mb in micro]
        return [micro[i : i + self.grad_accum] for i in range(0, len(micro), self.grad_accum)]


def step_options(cfg: Config, device: torch.device, precision: str) -> StepOptions:
    mixed = precision.endswith("-mixed")
    return StepOptions(
        device_type=device.type,
        autocast_dtype=compute_dtype(precision) if mixed else None,
        max_grad_norm=cfg.train.max_grad_norm,
        chunked_loss=cfg.memory.chunked_loss,
        offload_activations=cfg.memory.offload_activations,
        classify=cfg.train.stage == "cls",
    )


def prepare_for_training(model: torch.nn.Module, cfg: Config, precision: str) -> torch.nn.Module:
    """The loaded base -> the model that trains: the method, then checkpointing (and offload).
    `snug plan` prepares its meta-device model with this same function."""
    model = apply_method(model, cfg.method, keep_fp32_trainable=precision != "bf16-true")
    if cfg.memory.grad_checkpointing:
        enable_checkpointing(model, offload=cfg.memory.offload_activations)
    model.train()
    return model


def prepare_output_dir(cfg: Config) -> Path:
    """Create output.dir; a directory of an earlier snug run has its run outputs replaced, any
    other non-empty directory is refused so that no user file is overwritten."""
    out = Path(cfg.output.dir)
    if out.exists() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
        raise OutputDirError(
            f"output.dir={out} already holds files that are not a snug run; choose another "
            "output.dir so nothing of yours is overwritten."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).touch()
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return out


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


def run_training(cfg: Config, console: Console | None = None) -> dict:
    """Train as `cfg` says, write everything into output.dir, return summary.json's content."""
    console = console or Console()
    started = time.perf_counter()
    out = prepare_output_dir(cfg)
    summary: dict = {"status": "failed", "steps": 0}
    metrics: MetricsLog | None = None
    try:
        save_config(cfg, out / "config.yaml")
        device = resolve_device(cfg)
        precision = resolve_precision(cfg, device)
        set_seed(cfg.train.seed)

        tok = load_tokenizer(cfg.model)
        train_ds, eval_ds, stats = build_datasets(
            cfg.data, tok, cfg.train.stage, cfg.train.seed, cfg.model.name_or_path
        )
        template = (
            resolve_template(tok, cfg.data.template, cfg.model.name_or_path)
            if cfg.train.stage == "sft"
            else None
        )
        summary["data"] = stats.as_dict()
        console.print(
            f"data: {stats.kept} samples kept, {stats.dropped} dropped, "
            f"{stats.truncated} truncated; eval: {len(eval_ds) if eval_ds else 0}"
        )

        if cfg.memory.auto_fit:
            cfg = _auto_fit(cfg, train_ds, device, console, summary)
            save_config(cfg, out / "config.yaml")  # what actually trains
        model = load_model(cfg, device, precision, stats.labels, tok.pad_token_id)
        model = prepare_for_training(model, cfg, precision)
        trainable, total = count_params(model)
        summary.update(
            trainable_params=trainable, total_params=total, device=str(device), precision=precision
        )
        console.print(
            f"model: {cfg.model.name_or_path} | method {cfg.method.name} | trainable "
            f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%) | {device} {precision}"
        )

        opts = step_options(cfg, device, precision)
        metrics = MetricsLog(out)
        evaluate = (
            (lambda: _evaluate(model, tok, template, eval_ds, cfg, opts, device))
            if eval_ds
            else None
        )
        before = evaluate() if evaluate else None
        _train(
            model,
            tok,
            train_ds,
            eval_ds,
            cfg,
            opts,
            device,
            precision,
            out,
            metrics,
            summary,
            console,
        )
        if evaluate:
            summary["eval"] = _eval_block(before, evaluate())
            console.print(_eval_line(summary["eval"]))
        _save_final(model, tok, cfg, out)
        summary["status"] = "completed"
        console.print(f"saved {get_method(cfg.method.name).output} to {out}")
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise
    finally:
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        (out / "summary.json").write_text(
            json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n"
        )
        if metrics is not None:
            metrics.close()
            if cfg.output.plot_loss and metrics.rows:
                metrics.plot(out / "loss.png")
    return summary


def _micro_batches(
    train_ds, window: list[list[list[int]]], pad_id: int, packed: bool, device
) -> tuple[list[dict], int]:
    """The step's micro-batches on `device`, and how many of their tokens are not padding."""
    batches, tokens = [], 0
    for mb in window:
        rows = [[train_ds[i] for i in row] for row in mb]
        batch = collate_packed(rows, pad_id) if packed else collate([r[0] for r in rows], pad_id)
        batches.append({k: v.to(device) for k, v in batch.items()})
        tokens += real_tokens(rows)
    return batches, tokens


def _auto_fit(cfg: Config, train_ds, device, console: Console, summary: dict) -> Config:
    """Adopt the planner's fastest fitting memory settings (snug/plan/search.py:auto_fit)."""
    from snug.plan.search import auto_fit

    seq_len = cfg.data.cutoff_len if cfg.data.packing else max(_lengths(train_ds))
    cfg, report = auto_fit(cfg, device.type, seq_len)
    summary["auto_fit"] = report
    console.print(
        f"auto_fit: micro_batch {report['micro_batch']} x grad_accum {report['grad_accum']}, "
        f"grad_checkpointing {report['grad_checkpointing']}, offload "
        f"{report['offload_activations']}, optimizer {report['optimizer']}: {report['why']}"
    )
    return cfg


def _lengths(train_ds) -> list[int]:
    return [len(ids) for ids in train_ds["input_ids"]]


def _train(
    model,
    tok,
    train_ds,
    eval_ds,
    cfg: Config,
    opts: StepOptions,
    device,
    precision,
    out: Path,
    metrics: MetricsLog,
    summary: dict,
    console: Console,
) -> None:
    t = cfg.train
    schedule = Schedule.build(_lengths(train_ds), cfg)
    total_steps = t.max_steps or math.ceil(t.epochs * schedule.steps_per_epoch)
    optimizer = build_optimizer(model, cfg.memory, t, cfg.method.lora_plus_ratio)
    method = get_method(cfg.method.name)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None

    # Peak memory: CUDA counts it itself; on CPU our tracker counts every tensor storage.
    tracker = TensorMemoryTracker() if device.type == "cpu" else None
    if tracker is None:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_rss_bytes()
    loop_started = time.perf_counter()
    step, epoch, tokens_seen, seconds = 0, 0, 0, 0.0
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("train", total=total_steps, info="")
        if tracker is not None:
            tracker.__enter__()
            tracker.track(model_tensors(model))
        try:
            while step < total_steps:
                for window in schedule.windows(epoch)[: total_steps - step]:
                    batches, n_tokens = _micro_batches(
                        train_ds, window, tok.pad_token_id, cfg.data.packing, device
                    )
                    if method.before_step is not None:
                        method.before_step(model, cfg.method, step)
                    tick = time.perf_counter()
                    result = train_step(model, optimizer, batches, opts, scaler)
                    scheduler.step()
                    loss = result.loss.item()  # the one host sync per step
                    seconds += time.perf_counter() - tick
                    step += 1
                    tokens_seen += n_tokens
                    summary.setdefault("train_loss_first", loss)
                    summary.update(
                        steps=step,
                        train_loss_last=loss,
                        tokens_per_second=round(tokens_seen / seconds, 1),
                    )
                    info = (
                        f"loss {loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                        f"{tokens_seen / seconds:,.0f} tok/s"
                    )
                    bar.update(task, advance=1, info=info)
                    if step % t.log_every == 0 or step == total_steps:
                        grad_norm = None if result.grad_norm is None else result.grad_norm.item()
                        metrics.write(
                            {
                                "step": step,
                                "epoch": round(step / schedule.steps_per_epoch, 3),
                                "loss": loss,
                                "lr": scheduler.get_last_lr()[0],
                                "grad_norm": grad_norm,
                                "tokens_per_second": tokens_seen / seconds,
                            }
                        )
                        if not console.is_terminal:
                            console.print(f"step {step}/{total_steps} {info}")
                    if t.eval_every and eval_ds is not None and step % t.eval_every == 0:
                        value = eval_loss(
                            model, eval_ds, opts, t.micro_batch, tok.pad_token_id, device
                        )
                        metrics.write({"step": step, "eval_loss": value})
                    if cfg.output.save_every and step % cfg.output.save_every == 0:
                        save_checkpoint(
                            out / "checkpoints",
                            step,
                            model,
                            optimizer,
                            scheduler,
                            {"step": step, "epoch": epoch, "tokens_seen": tokens_seen},
                            cfg.output.keep_last,
                        )
                epoch += 1
        finally:
            if tracker is not None:
                tracker.__exit__(None, None, None)
    summary["train_seconds"] = round(time.perf_counter() - loop_started, 2)  # the loop, no evals
    summary["peak_memory"] = _peak_memory(tracker, device, rss_before)
    if "auto_fit" in summary:
        summary["peak_memory"]["predicted_bytes"] = summary["auto_fit"]["predicted_peak_bytes"]


def _peak_memory(tracker: TensorMemoryTracker | None, device, rss_before: int) -> dict:
    if tracker is not None:
        return {
            "measured_bytes": tracker.peak,
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


def _evaluate(model, tok, template, eval_ds, cfg: Config, opts: StepOptions, device) -> dict:
    result = {
        "loss": eval_loss(model, eval_ds, opts, cfg.train.micro_batch, tok.pad_token_id, device)
    }
    if template is not None and cfg.train.eval_generate > 0:
        score, samples = exact_match(
            model, tok, template, eval_ds, cfg.train.eval_generate, cfg.train.max_new_tokens, device
        )
        result.update(exact_match=score, samples=samples[:5])
    if cfg.train.stage == "cls":
        result["accuracy"] = accuracy(
            model, eval_ds, cfg.train.micro_batch, tok.pad_token_id, device
        )
    return result


def _eval_block(before: dict, after: dict) -> dict:
    """summary.json's eval: accuracy for classification, exact match by generation where
    scored, else the loss."""
    metric = next((m for m in ("accuracy", "exact_match") if m in before), "loss")
    block = {
        "metric": metric,
        "before": before[metric],
        "after": after[metric],
        "loss_before": before["loss"],
        "loss_after": after["loss"],
    }
    if metric == "exact_match":
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


def _save_final(model, tok, cfg: Config, out: Path) -> None:
    method = get_method(cfg.method.name)
    target = out / method.output  # adapter/ or model/
    model.config.use_cache = True  # the saved model is for inference
    method.save(model, target)
    tok.save_pretrained(str(target))
