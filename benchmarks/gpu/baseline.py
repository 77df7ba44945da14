"""snug against the usual baseline on the same card: transformers `Trainer` + peft LoRA.

The same random-weight model (a catalog config at its real size), the same token rows (text
cut at the cutoff, no padding), LoRA rank 16 / alpha 32 on every linear layer, bf16 autocast
over a bf16 base with fp32 adapters, sdpa attention, gradient checkpointing, AdamW, the same
micro-batch and length, one micro-batch a step. Each side runs in its own process (child.py);
measured:
the median step time after two warm-up steps (tokens/s) and `torch.cuda.max_memory_allocated`.

Run: python benchmarks/gpu/baseline.py OUTDIR [--model NAME] [--tokens N] [--micro-batch N]
     [--steps N] [--cpu-dry-run]   (the dry run: a shrunk model, fp32, on this CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import preload, run_forked, run_fresh  # noqa: E402
from reality import ROOT, build_model, build_text, step_times  # noqa: E402


def token_rows(model_dir: str, text: str, tokens: int, rows: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [json.loads(line)["text"] for line in Path(text).open()]
    out = [tok(d)["input_ids"][:tokens] for d in docs[:rows]]
    assert all(len(r) == tokens for r in out), "rows shorter than the cutoff"
    return out


def run_trainer(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available() and not spec["dry_run"]
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation="sdpa",
    )
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    rows = token_rows(spec["model_dir"], spec["text"], spec["tokens"], spec["steps"] * spec["mb"])
    data = [{"input_ids": r, "labels": r, "attention_mask": [1] * len(r)} for r in rows]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]

    args = TrainingArguments(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["mb"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=1e-5,
        bf16=cuda,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch",
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not cuda,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
    return _result(times[2:], spec, torch.cuda.max_memory_allocated() if cuda else None)


def run_snug(spec: dict) -> dict:
    import torch

    from snug.config import load_config
    from snug.train.training import run_training

    cuda = torch.cuda.is_available() and not spec["dry_run"]
    cfg = load_config(
        None,
        [
            f"model.name_or_path={spec['model_dir']}",
            "method.name=lora",
            "method.r=16",
            "method.alpha=32",
            "memory.grad_checkpointing=true",
            "train.stage=pt",
            "data.format=text",
            f"data.train={spec['text']}",
            f"data.cutoff_len={spec['tokens']}",
            f"data.max_samples={spec['steps'] * spec['mb']}",
            f"train.micro_batch={spec['mb']}",
            "train.grad_accum=1",
            f"train.max_steps={spec['steps']}",
            "train.scheduler=constant",
            "train.warmup=0",
            "train.lr=1e-5",
            "train.eval_generate=0",
            "train.log_every=1",
            f"train.device={'cuda' if cuda else 'cpu'}",
            f"output.dir={spec['out']}",
            "output.plot_loss=false",
        ],
    )
    summary = run_training(cfg)
    steps = step_times(Path(spec["out"]), spec["mb"] * spec["tokens"])
    return _result(steps[1:], spec, summary["peak_memory"]["measured_bytes"] if cuda else None)


def _result(step_times: list[float], spec: dict, peak: int | None) -> dict:
    step = statistics.median(step_times)
    return {
        "step_s": step,
        "tokens_per_s": spec["mb"] * spec["tokens"] / step,
        "peak_bytes": peak,
        "steps_timed": len(step_times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--model", default="meta-llama/Llama-3.2-1B")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        side, spec = args.one[0], json.loads(args.one[1])
        result = (run_snug if side == "snug" else run_trainer)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.cpu_dry_run:
        args.tokens, args.micro_batch, args.steps = 128, 2, 3  # timed: snug 2, Trainer 1
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.cpu_dry_run:
        preload()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(args.model, work, args.cpu_dry_run)
        text = build_text(work)
        for side in ("trainer", "snug"):
            spec = {
                "model_dir": str(model_dir),
                "text": str(text),
                "tokens": args.tokens,
                "mb": args.micro_batch,
                "steps": args.steps,
                "out": str(work / side),
                "dry_run": args.cpu_dry_run,
            }
            try:
                if args.cpu_dry_run:  # a fork of this process (child.py says why)
                    run = run_snug if side == "snug" else run_trainer
                    results[side] = run_forked(lambda run=run, spec=spec: run(spec), 300)
                else:
                    argv = [__file__, str(args.outdir), "--one", side, json.dumps(spec)]
                    results[side] = run_fresh(argv, 300, cwd=str(ROOT))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                results[side] = {"error": str(e)}
            print(side, json.dumps(results[side]), flush=True)
    t, s = results.get("trainer", {}), results.get("snug", {})
    lines = [
        "# snug against transformers Trainer + peft"
        + (" (CPU dry run)" if args.cpu_dry_run else ""),
        "",
        f"{args.model} (random weights), LoRA r16/alpha 32 all-linear, {args.tokens} tokens, "
        f"micro-batch {args.micro_batch}, {args.steps} steps, gradient checkpointing, sdpa.",
        "",
        "| | tokens/s | step s | peak GiB (max_memory_allocated) |",
        "|---|---|---|---|",
    ]
    for side, r in (("Trainer + peft", t), ("snug", s)):
        if "error" in r:
            lines.append(f"| {side} | error: {r['error'][-300:]} | | |")
        else:
            peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
            lines.append(f"| {side} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {peak} |")
    if "error" not in t and "error" not in s:
        lines.append(f"\nsnug / Trainer tokens/s: {s['tokens_per_s'] / t['tokens_per_s']:.2f}x")
        if t["peak_bytes"] and s["peak_bytes"]:
            lines.append(f"snug / Trainer peak memory: {s['peak_bytes'] / t['peak_bytes']:.2f}x")
    (args.outdir / "baseline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from snug.runtime.shutdown import exit_now  # without the interpreter's teardown (1.5 s here)

    exit_now(main())
