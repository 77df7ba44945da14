"""How a run ends: the held-out evaluation after training and the final adapter or model
(`finish`), then summary.json and the sinks told, and previous/ deleted once a completed run's
outputs are all in place (`end`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from rich.console import Console

from snug.config import Config
from snug.core.events import End, Phase, Reporter
from snug.core.registry import get_method
from snug.errors import RunError
from snug.models.fingerprint import base_record, write_base_record
from snug.runtime.files import (
    OutOfSpace,
    aside,
    check_space,
    disk_full,
    failed_write,
    out_of_space,
    replace_dir,
    write_text_atomic,
)
from snug.train import dist
from snug.train.checkpoint import load_checkpoint
from snug.train.outputs import COMPLETE, PREVIOUS, discard_previous
from snug.train.run import Run
from snug.train.statefile import tensor_bytes


def finish(run: Run, out: Path, ctx: dist.Dist, console: Console, summary: dict) -> None:
    """After the last step: the held-out evaluation after training (in the summary and said),
    then the final adapter or model; with output.keep_best, both of the best checkpoint's
    weights."""
    if run.cfg.output.keep_best:
        summary["best"] = use_best(run)
    if run.evaluate:
        summary["eval"] = eval_block(run.identity["eval_before"], run.evaluate("after"))
        console.print(eval_line(summary["eval"]))
    run.reporter.phase(Phase("saving", detail=f"{out / get_method(run.cfg.method.name).output}"))
    target = save_final(run.model, run.tok, run.cfg, out, ctx)
    console.print(f"saved {target}")


def use_best(run: Run) -> dict | None:
    """output.keep_best, after the last step: the model takes the weights of the best
    checkpoint (its train_state names it; resumed runs too), so the evaluation after
    training and the final output are of them. Returns summary.json's `best`."""
    best = run.pos.best
    if best is None:
        warning = (
            "output.keep_best: no held-out loss was measured (train.eval_every="
            f"{run.cfg.train.eval_every} > {run.pos.step} steps); the last step's "
            "weights are the output"
        )
        run.summary.setdefault("warnings", []).append(warning)
        run.console.print(f"[yellow]{warning}[/yellow]")
        return None
    if best["step"] != run.pos.step:
        path = run.out / "checkpoints" / f"step-{best['step']}"
        if not (path / COMPLETE).is_file():
            raise RunError(
                f"output.keep_best: the best checkpoint {path} (held-out loss "
                f"{best['eval_loss']:.4f}) is missing or incomplete, so its weights cannot "
                "be the output; run again with output.keep_best=false to end with the last "
                "checkpoint's, or with --fresh to train again."
            )
        load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.scaler, run.ctx)
    run.console.print(
        f"output.keep_best: the output is step {best['step']}'s weights (held-out loss "
        f"{best['eval_loss']:.4f})"
    )
    return dict(best)


def end(
    out: Path,
    summary: dict,
    reporter: Reporter,
    last_checkpoint: Path | None,
    console: Console,
    main: bool,
    reason: str | None = None,
) -> None:
    """summary.json, then the sinks told the run ended (`reason`: why a stopped or
    interrupted run ended, for End.reason) (a watcher told finds summary.json in
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
                json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n",
            )
        except OSError as e:
            problems.append(e)
    error = summary.get("error")
    peak = (summary.get("peak_memory") or {}).get("measured_bytes")
    first = error.splitlines()[0] if error else None
    why = first or (reason.splitlines()[0] if reason else None)
    try:
        reporter.end(End(summary["status"], first, peak, last_checkpoint, why))
    except OSError as e:
        problems.append(e)
    if main and completed and not problems:
        discard_previous(out)
    if problems and completed:
        if disk_full(problems[0]):
            raise OutOfSpace(
                f"out of space: could not write {failed_write(problems[0], out)}; the run's "
                "outputs are in place, its summary may be missing: free some space there."
            ) from None
        raise problems[0]
    for e in problems:
        console.print(f"[yellow]could not write {failed_write(e, out)}[/yellow]")


def json_safe(value):
    """NaN/inf -> null, so summary.json stays valid JSON whatever the loss did."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def eval_block(before: dict, after: dict) -> dict:
    """summary.json's eval: the metric the stage names (cls: accuracy, sft: exact match by
    generation where scored), else the loss."""
    metric = before.get("metric", "loss")
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


def eval_line(block: dict) -> str:
    line = f"held-out loss: {block['loss_before']:.4f} -> {block['loss_after']:.4f}"
    if block["metric"] != "loss":
        name = block["metric"].replace("_", " ")
        line = (
            f"held-out {name}: {100 * block['before']:.1f}% before -> "
            f"{100 * block['after']:.1f}% after training | " + line
        )
    return line


def save_final(model, tok, cfg: Config, out: Path, ctx: dist.Dist | None = None) -> Path:
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
        needed = weight_bytes(model, state, trainable_only=method.output == "adapter")
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


def weight_bytes(model, state: dict | None, trainable_only: bool) -> int:
    """The bytes of the weights an adapter or model directory holds: the gathered `state`,
    else the trainable parameters (an adapter) or every tensor once (a model; tied weights
    share one)."""
    if state is not None:
        return tensor_bytes(state)
    if trainable_only:
        return tensor_bytes([p for p in model.parameters() if p.requires_grad])
    return tensor_bytes(model.state_dict())
