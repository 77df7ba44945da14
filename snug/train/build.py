"""Everything a run does before it may touch output.dir (train/outputs.py): data, model,
method, optimizer, the checkpoint of a resumed run (read back into memory) and the evaluation
before training. The result is a `Run` ready to train."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from transformers import set_seed

from snug.config import Config
from snug.core import events
from snug.core.events import Reporter
from snug.core.registry import get_stage
from snug.data.dataset import build_datasets
from snug.methods import check_against_model, count_params
from snug.models.fingerprint import base_record
from snug.models.load import load_model, load_tokenizer, resolve_precision
from snug.runtime.progress import Phase, watched
from snug.train import dist
from snug.train.checkpoint import read_train_state
from snug.train.prepare import prepare_for_training, step_options
from snug.train.resume import ResumeError, config_drift, data_hash
from snug.train.run import Run
from snug.train.schedule import sample_lengths
from snug.train.step import StepOptions
from snug.train.streaming import stream_weights


def build_run(
    cfg: Config,
    ctx: dist.Dist,
    device,
    resume_path: Path | None,
    *,
    allow_config_change: bool,
    console: Console,
    summary: dict,
    reporter: Reporter,
    planner: Callable | None = None,
    resume_command: str = "the same command",
) -> Run:
    """The run `cfg` describes, ready to train; nothing written (see the module's docstring).
    Each phase is told to `reporter` as it begins (tokenizing with its progress)."""

    def phase(name: str, detail: str, done: int | None = None, total: int | None = None):
        reporter.phase(events.Phase(name, done, total, detail))

    def counted(p: Phase) -> None:  # the progress of tokenizing (snug/runtime/progress.py)
        phase("tokenizing", p.label, p.done, p.total)

    given = cfg.to_dict()  # the user's config, before auto_fit or an OOM fallback change it
    precision = resolve_precision(cfg, device)
    set_seed(cfg.train.seed)
    phase("tokenizing", f"loading the tokenizer of {cfg.model.name_or_path}")
    tok = load_tokenizer(cfg.model)
    check_against_model(cfg)  # lora's targets: the model's module names, before tokenizing
    if not ctx.main:  # rank 0 tokenizes into the datasets cache first, the others read it
        dist.barrier()
    with watched(counted):
        train_ds, eval_ds, stats = build_datasets(
            cfg.data,
            tok,
            cfg.train.stage,
            cfg.train.seed,
            cfg.model.name_or_path,
            console,
            own=get_stage(cfg.train.stage).own(cfg),
        )
    if ctx.main:
        dist.barrier()
    summary["data"] = stats.as_dict()
    clipped = (
        f" ({stats.clipped} cut to data.cutoff_len before tokenizing)" if stats.clipped else ""
    )
    mixed = (
        f" (data.mix={cfg.data.mix} of {stats.usable} usable)" if stats.kept != stats.usable else ""
    )
    console.print(
        f"data: {stats.kept} samples kept{mixed}, {stats.dropped} dropped, "
        f"{stats.truncated} truncated{clipped}; eval: {len(eval_ds) if eval_ds else 0}"
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
        phase("planning", "memory.auto_fit: the fastest settings that fit")
        cfg = _auto_fit(cfg, train_ds, device, console, summary, planner)
    phase("loading", f"the model {cfg.model.name_or_path}, method {cfg.method.name}")
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
    # the frozen model a preference stage compares with, made before any step (a copy of the
    # weights as loaded, or the adapter switched off)
    reference = get_stage(cfg.train.stage).reference(model, cfg)
    if cfg.memory.offload_weights:  # loaded into host memory: the layers stream from there
        stream = stream_weights(model, device)
        summary["offload_weights"] = {"host_bytes": stream.host_bytes, "layers": len(stream.layers)}
        console.print(
            f"offload_weights: {len(stream.layers)} decoder layers' frozen weights stream from "
            f"host memory ({stream.host_bytes / 2**30:.2f} GiB"
            + (", pinned)" if device.type == "cuda" else ")")
        )
    trainable, total = count_params(model)
    opts = dataclasses.replace(step_options(cfg, device, precision), world=ctx.world)
    computes = repr((base["fingerprint"], cfg.method.name, cfg.model.quant, precision))
    train_ds, eval_ds = _with_reference(
        (train_ds, eval_ds), model, reference, opts, ctx, device, cfg.train.micro_batch, computes
    )
    model = dist.wrap(model, cfg, ctx, precision, device)
    dist.wrap_reference(opts.stage, reference, cfg, ctx, precision)
    summary.update(
        trainable_params=trainable, total_params=total, device=str(device), precision=precision
    )
    console.print(
        f"model: {cfg.model.name_or_path} | method {cfg.method.name} | trainable "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%) | {device} {precision}"
        + (f" | {ctx.strategy} x {ctx.world} processes" if ctx.active else "")
    )
    identity = {"config": given, "adopted": cfg.to_dict(), "data_hash": hashed, "base": base}
    evaluate = None
    if eval_ds:

        def evaluate(when: str) -> dict:
            phase("evaluating", f"held-out data, {when} training")
            return _evaluate(
                dist.unwrap(model), tok, eval_ds, cfg, opts, device, console, when, reference
            )

    run = Run(
        ctx=ctx,
        model=model,
        tok=tok,
        train_ds=train_ds,
        eval_ds=eval_ds,
        cfg=cfg,
        opts=opts,
        device=device,
        precision=precision,
        summary=summary,
        console=console,
        identity=identity,
        reporter=reporter,
        resume_command=resume_command,
        reference=reference,
        evaluate=evaluate,
    )
    if resume_path is not None:
        phase("loading", f"the checkpoint {resume_path}")
        run.restore(resume_path)
    # before training; a resumed run kept it in its checkpoint (the model has moved on)
    before = resumed["eval_before"] if resumed else (evaluate("before") if evaluate else None)
    run.identity["eval_before"] = before
    return run


def _with_reference(
    datasets: tuple,
    model: torch.nn.Module,
    reference: object,
    opts: StepOptions,
    ctx: dist.Dist,
    device: torch.device,
    rows: int,
    computes: str,
) -> tuple | list:
    """pref.reference=precompute: the reference's log-probs written into the data once, by the
    model as loaded (before a resume restores the checkpoint's weights, and before FSDP shards
    it); rank 0 computes them into the datasets cache first, the other ranks read them back.
    Each turn is agreed (dist.agree), so that a failure on one rank stops every rank with its
    error instead of leaving the others waiting. `computes` names the base and how it computes
    (the cache's key). Other references leave the data as it is (Stage.with_reference)."""

    def compute() -> list:
        return [
            opts.stage.with_reference(ds, model, reference, opts, device, rows, computes)
            for ds in datasets
        ]

    if not ctx.active:
        return compute()
    first = dist.agree(lambda: compute() if ctx.main else None, device)
    return dist.agree(lambda: first if ctx.main else compute(), device)


def _adopted(cfg: Config, adopted: dict) -> Config:
    """The current config with the memory settings auto_fit chose for the checkpoint's run
    (everything else as the user has it now)."""
    m, t = adopted["memory"], adopted["train"]
    keys = ("grad_checkpointing", "offload_activations", "offload_weights", "optimizer")
    memory = {k: m[k] for k in keys if k in m}  # a checkpoint from before offload_weights
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


def _auto_fit(
    cfg: Config, train_ds, device, console: Console, summary: dict, planner: Callable | None
) -> Config:
    """Adopt the planner's fastest fitting memory settings (snug/plan/autofit.py, handed in)."""
    if planner is None:
        raise ValueError(
            "memory.auto_fit: run_training was given no planner (pass "
            "planner=snug.plan.autofit.auto_fit)."
        )
    seq_len = cfg.data.cutoff_len if cfg.data.packing else max(sample_lengths(train_ds))
    cfg, report = planner(cfg, device.type, seq_len)
    summary["auto_fit"] = report
    console.print(
        f"auto_fit: micro_batch {report['micro_batch']} x grad_accum {report['grad_accum']}, "
        f"grad_checkpointing {report['grad_checkpointing']}, offload "
        f"{report['offload_activations']}, offload_weights {report['offload_weights']}, "
        f"optimizer {report['optimizer']}: {report['why']} "
        f"(step time and reserved memory: {report['calibration']})"
    )
    return cfg


@dataclass
class EvalJob:
    """What a stage's held-out evaluation reads besides the model and data."""

    tok: object
    cfg: Config
    opts: StepOptions
    device: torch.device
    micro_batch: int
    pad_id: int
    reference: object = None  # the stage's reference model, if it compares with one


def _evaluate(
    model, tok, eval_ds, cfg: Config, opts: StepOptions, device, console, when: str, reference=None
) -> dict:
    """Held-out metrics `when` ("before"/"after") training, as the stage scores them, with the
    progress shown."""
    job = EvalJob(tok, cfg, opts, device, cfg.train.micro_batch, tok.pad_token_id, reference)
    label = f"eval {when} training"

    def phase(title: str, total: int, unit: str) -> Phase:
        return Phase(console, f"{label}: {title}", total, unit)

    return opts.stage.evaluate(model, eval_ds, job, phase)
