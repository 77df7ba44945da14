"""The plan against reality on this machine's GPU: for each configuration, `snug plan`'s
predicted peak, reserved memory and step time next to a few real steps of `snug train`.

Models are random-weight copies of bundled catalog configs at their real size (built on the
device, written once, no download), the tokenizer is the bundled tiny one (its ids fit every
vocabulary) and the data is text long enough that every row is cut at the cutoff (no padding).
Each configuration runs in a process of its own, so one's allocator state never reaches the next
(child.py: a fresh interpreter on a GPU, a fork in the CPU dry run).

Measured, per configuration:
- peak: `torch.cuda.max_memory_allocated` over the run (what `summary.json` reports), against
  the plan's `peak_bytes`;
- reserved: `torch.cuda.max_memory_reserved`, against the plan's peak plus its allocator
  term; and the device's whole use as nvidia-smi would show it (context included), read with
  `torch.cuda.mem_get_info`, against the plan's `reserved_bytes`;
- the CUDA context: device memory in use after CUDA initialisation minus before (read with
  `mem_get_info` from a process that has allocated nothing);
- step seconds: the median of the steps after the first (read from metrics.jsonl's tokens/s),
  against the plan's FLOPs over the card's bf16 rate times its efficiency.

Run: python benchmarks/gpu/reality.py OUTDIR [--cpu-dry-run] [--budget SECONDS]
`--cpu-dry-run` runs the same code on this CPU with the same catalog configs shrunk to a few
layers of small width, so the script cannot rot where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import preload, run_forked, run_fresh  # noqa: E402

CATALOG = ROOT / "snug/models/catalog/models"

# (catalog model, method, quant, checkpointing, tokens, micro-batch, precision)
GPU_CONFIGS = [
    ("Qwen/Qwen2.5-0.5B", "lora", "none", True, 1024, 4, "bf16-mixed"),
    ("Qwen/Qwen2.5-0.5B", "lora", "none", False, 1024, 2, "bf16-mixed"),
    ("Qwen/Qwen2.5-0.5B", "full", "none", True, 1024, 2, "bf16-mixed"),
    ("Qwen/Qwen2.5-0.5B", "full", "none", True, 1024, 4, "bf16-true"),
    ("meta-llama/Llama-3.2-1B", "lora", "none", True, 4096, 1, "bf16-mixed"),
    ("meta-llama/Llama-3.2-1B", "lora", "4bit", True, 1024, 4, "bf16-mixed"),
    ("meta-llama/Llama-3.2-1B", "lora", "none", False, 2048, 2, "bf16-true"),
    ("meta-llama/Llama-3.2-1B", "ia3", "none", False, 1024, 2, "bf16-mixed"),
    ("meta-llama/Llama-3.2-1B", "llama_adapter", "none", False, 1024, 2, "bf16-mixed"),
    ("Qwen/Qwen2.5-3B", "lora", "none", True, 2048, 2, "bf16-mixed"),
    ("Qwen/Qwen2.5-3B", "lora", "4bit", True, 4096, 1, "bf16-mixed"),
    ("Qwen/Qwen2.5-3B", "dora", "none", True, 1024, 2, "bf16-mixed"),
    ("Qwen/Qwen2.5-3B", "lora", "4bit", True, 2048, 2, "bf16-true"),
]
CPU_SHRINK = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
# The same code paths on the CPU, in fp32, short: two models, checkpointing on and off. Two
# configurations, not more: each is a process of its own (~10 s of imports here), and the
# replay of each method against a real step is tests/test_plan.py's (4-bit and full included).
CPU_CONFIGS = [
    ("Qwen/Qwen2.5-0.5B", "lora", "none", True, 128, 2, "fp32"),
    ("meta-llama/Llama-3.2-1B", "ia3", "none", False, 128, 2, "fp32"),
]
STEPS = 4
FIELDS = [
    "model", "method", "quant", "checkpointing", "tokens", "micro_batch", "precision",
    "predicted_peak_gib", "measured_peak_gib", "peak_error",
    "predicted_reserved_gib", "measured_reserved_gib", "reserved_error",
    "predicted_device_gib", "measured_device_gib", "device_error", "context_gib",
    "predicted_step_typical_s", "predicted_step_s", "measured_step_s", "step_typical_ratio",
    "step_ratio", "calibration", "tokens_per_s", "plan_s", "import_s", "train_s", "wall_s",
    "error",
]  # fmt: skip
GIB = 2**30


def build_model(name: str, work: Path, shrink: bool, layers: int | None = None) -> Path:
    """A random-weight model of the catalog config (shrunk for the CPU dry run; `layers` cuts
    its depth), with the bundled tokenizer; written once per name and depth."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = work / (name.replace("/", "__") + (f"-{layers}-layers" if layers else ""))
    if (path / "config.json").exists():
        return path
    raw = json.loads((CATALOG / f"{name.replace('/', '__')}.json").read_text())
    tok = AutoTokenizer.from_pretrained(ROOT / "models/tiny")
    raw.update(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    raw.update(eos_token_id=tok.eos_token_id)
    if shrink:
        heads = 4
        raw.update(CPU_SHRINK, num_attention_heads=heads, num_key_value_heads=2, head_dim=32)
        raw["vocab_size"] = min(raw["vocab_size"], 32000)
    if layers:
        raw["num_hidden_layers"] = layers
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    device = "cuda" if torch.cuda.is_available() and not shrink else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # measured processes count what this one still holds
    return path


def build_text(work: Path) -> Path:
    """Rows longer than 4,096 tokens of the bundled tokenizer: every sample is cut at the cutoff."""
    docs = [json.loads(line)["text"] for line in (ROOT / "data/corpus/corpus.jsonl").open()]
    per_row = 120  # about 7,800 tokens
    rows = [{"text": " ".join(docs[i * per_row : (i + 1) * per_row])} for i in range(64)]
    path = work / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_one(spec: dict) -> dict:
    """One configuration, in this (fresh) process: plan it, then train STEPS steps."""
    started_imports = time.perf_counter()
    import dataclasses

    import torch

    from snug.config import load_config
    from snug.plan.device_probe import cuda_context
    from snug.plan.hardware import cpu_device, find_gpu, model_config
    from snug.plan.search import plan_one
    from snug.plan.timing import device_model, precision_for
    from snug.train.training import run_training

    import_s = time.perf_counter() - started_imports
    cuda = torch.cuda.is_available() and not spec["dry_run"]
    context = cuda_context() if cuda else None  # before anything else touches CUDA
    if cuda and spec.get("cap_bytes"):  # stream_proof.py: the card made smaller than the model
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["cap_bytes"] / total)
    cfg = load_config(
        None,
        [
            f"model.name_or_path={spec['model_dir']}",
            f"model.quant={spec['quant']}",
            f"method.name={spec['method']}",
            f"memory.grad_checkpointing={str(spec['checkpointing']).lower()}",
            f"train.precision={spec['precision']}",
            "train.stage=pt",
            "data.format=text",
            f"data.train={spec['text']}",
            f"data.cutoff_len={spec['tokens']}",
            f"train.micro_batch={spec['micro_batch']}",
            "train.grad_accum=1",
            f"train.max_steps={STEPS}",
            "train.eval_generate=0",
            "train.log_every=1",
            "train.lr=1e-5",
            f"train.device={'cuda' if cuda else 'cpu'}",
            f"output.dir={spec['out']}",
            "output.plot_loss=false",
        ]
        + (["model.dtype=bfloat16"] if spec["precision"] == "bf16-true" else [])
        + spec.get("overrides", []),
    )
    device = find_gpu(torch.cuda.get_device_name()) if cuda else cpu_device()
    started = time.perf_counter()
    # every row is cut at the cutoff: whole rows, no padding mask
    cand = plan_one(cfg, model_config(spec["model_dir"]), device, spec["tokens"], padded=False)
    if cand.error:
        raise RuntimeError(f"the plan failed: {cand.error}")
    sim = cand.sim
    # the same plan with typical values, for the step time before `snug calibrate`
    streams = cfg.memory.offload_weights  # stream_proof.py's streamed run: its copies too
    typical = device_model(device, precision_for(device, cfg), calibrated=False, streams=streams)
    predicted = {
        "peak": cand.peak_bytes,
        "reserved": cand.peak_bytes + cand.reserved_terms["allocator"]["bytes"] if cuda else None,
        "device": cand.reserved_bytes if cuda else None,
        "step": cand.step_seconds,
        "step_typical": typical.of(sim, cfg.memory.grad_checkpointing),
        "calibration": cand.calibration,
    }
    plan_s = time.perf_counter() - started
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=None, val_size=0.0))
    started_training = time.perf_counter()
    summary = run_training(cfg)
    train_s = time.perf_counter() - started_training
    tokens = spec["micro_batch"] * spec["tokens"]  # every row is cut at the cutoff
    steps = step_times(Path(spec["out"]), tokens)
    step_s = statistics.median(steps) if steps else summary["train_seconds"]
    peak = summary["peak_memory"]
    measured = {
        "peak": peak["measured_bytes"],
        "reserved": peak.get("reserved_bytes"),
        "device": (peak["reserved_bytes"] + context) if cuda and context is not None else None,
        "step": step_s,
    }
    return {
        "predicted": predicted,
        "measured": measured,
        "context": context,
        "plan_s": plan_s,
        "import_s": import_s,
        "train_s": train_s,  # run_training whole: load, tokenize, STEPS steps, save
        "tokens_per_s": tokens / step_s if step_s else None,
        # memory.offload_weights: the host memory the streamed weights hold, planned and real
        "host": {
            "predicted": sim.host_bytes,
            "measured": summary.get("offload_weights", {}).get("host_bytes"),
        },
        "weights_bytes": sim.breakdown.get("weights"),  # frozen weights on the device at peak
        "streamed_per_step": sim.streamed_bytes_per_step,
        "h2d": cand.h2d if sim.streamed_bytes_per_step else None,
    }


def step_times(run: Path, tokens: int) -> list[float]:
    """Each step's seconds after the first, from a run's metrics.jsonl (logged every step):
    its tokens/s is cumulative (tokens seen / seconds so far), so the time at step k is
    k * tokens / rate_k and a step's time the difference; the first step (warm-up: kernel
    choice, cuBLAS handles) has no difference."""
    rates = [
        json.loads(line)["tokens_per_second"]
        for line in (run / "metrics.jsonl").open()
        if '"tokens_per_second"' in line
    ]
    at = [(k + 1) * tokens / r for k, r in enumerate(rates)]
    return [b - a for a, b in zip(at, at[1:], strict=False)]


def _ratio(pred, meas):
    return pred / meas if pred and meas else None


def _err(pred, meas):
    return None if pred is None or not meas else (pred - meas) / meas


def _gib(v):
    return None if v is None else round(v / GIB, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for all configs")
    parser.add_argument("--skip", type=int, default=0, help="start at this configuration")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    args.outdir.mkdir(parents=True, exist_ok=True)
    configs = (CPU_CONFIGS if args.cpu_dry_run else GPU_CONFIGS)[args.skip :]
    started = time.perf_counter()
    if args.cpu_dry_run:
        preload()
    rows = []
    csv_path = args.outdir / "reality.csv"
    with tempfile.TemporaryDirectory() as tmp, csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        work = Path(tmp)
        text = build_text(work)
        for i, (model, method, quant, gc, tokens, mb, precision) in enumerate(configs):
            left = args.budget - (time.perf_counter() - started)
            row = dict(
                zip(FIELDS[:7], (model, method, quant, gc, tokens, mb, precision), strict=True)
            )
            if left < 20:
                row["error"] = "skipped: out of time budget"
                writer.writerow(row)
                fh.flush()
                continue
            try:
                spec = {
                    "model_dir": str(build_model(model, work, args.cpu_dry_run)),
                    "method": method,
                    "quant": quant,
                    "checkpointing": gc,
                    "tokens": tokens,
                    "micro_batch": mb,
                    "precision": precision,
                    "text": str(text),
                    "out": str(work / f"run{i}"),
                    "dry_run": args.cpu_dry_run,
                }
                child_started = time.perf_counter()
                if args.cpu_dry_run:  # a fork of this process (child.py says why)
                    result = run_forked(lambda spec=spec: run_one(spec), max(left, 20))
                else:
                    argv = [__file__, str(args.outdir), "--one", json.dumps(spec)]
                    result = run_fresh(argv, max(left, 20))
                p, m = result["predicted"], result["measured"]
                row.update(
                    predicted_peak_gib=_gib(p["peak"]),
                    measured_peak_gib=_gib(m["peak"]),
                    peak_error=_err(p["peak"], m["peak"]),
                    predicted_reserved_gib=_gib(p["reserved"]),
                    measured_reserved_gib=_gib(m["reserved"]),
                    reserved_error=_err(p["reserved"], m["reserved"]),
                    predicted_device_gib=_gib(p["device"]),
                    measured_device_gib=_gib(m["device"]),
                    device_error=_err(p["device"], m["device"]),
                    context_gib=_gib(result["context"]),
                    predicted_step_typical_s=p["step_typical"],
                    predicted_step_s=p["step"],
                    measured_step_s=m["step"],
                    step_typical_ratio=_ratio(p["step_typical"], m["step"]),
                    step_ratio=_ratio(p["step"], m["step"]),
                    calibration=p["calibration"],
                    tokens_per_s=result["tokens_per_s"],
                    plan_s=round(result["plan_s"], 1),
                    import_s=round(result["import_s"], 1),
                    train_s=round(result["train_s"], 1),
                    wall_s=round(time.perf_counter() - child_started, 1),  # the process whole
                )
            except Exception as e:  # noqa: BLE001 (a failure is a result: recorded, then on)
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
            writer.writerow(row)
            fh.flush()
            print(json.dumps(row), flush=True)
    write_report(args.outdir / "reality.md", rows, args.cpu_dry_run, time.perf_counter() - started)
    return 0


def write_report(path: Path, rows: list[dict], dry: bool, seconds: float) -> None:
    def pct(v):
        return "" if v is None else f"{100 * v:+.1f}%"

    lines = [
        "# snug plan against reality" + (" (CPU dry run)" if dry else ""),
        "",
        f"{len(rows)} configurations, {seconds:.0f} s. Peak: predicted `peak_bytes` vs "
        "`max_memory_allocated`; reserved: peak + allocator term vs `max_memory_reserved`; "
        "device: the plan's reserved_bytes (context included) vs max reserved + measured context. "
        "Step: the plan's step seconds with typical values (before `snug calibrate`), with what "
        f"the plan used ({rows[0].get('calibration') if rows else ''}), and measured (the median "
        "step after the first).",
        "",
        "| model | method | quant | gc | tokens | mb | precision | peak pred/meas GiB | err | "
        "reserved pred/meas GiB | err | device pred/meas GiB | err | context GiB | step typical/"
        "plan/measured s "
        "| tok/s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['quant']} | {r['checkpointing']} | {r['tokens']} "
            f"| {r['micro_batch']} | {r['precision']} "
            f"| {r.get('predicted_peak_gib')}/{r.get('measured_peak_gib')} | {pct(r.get('peak_error'))} "
            f"| {r.get('predicted_reserved_gib')}/{r.get('measured_reserved_gib')} "
            f"| {pct(r.get('reserved_error'))} "
            f"| {r.get('predicted_device_gib')}/{r.get('measured_device_gib')} "
            f"| {pct(r.get('device_error'))} | {r.get('context_gib')} "
            f"| {_num(r.get('predicted_step_typical_s'))}/{_num(r.get('predicted_step_s'))}/"
            f"{_num(r.get('measured_step_s'))} "
            f"| {_num(r.get('tokens_per_s'), 0)} | {r.get('error') or ''} |"
        )
    for key in ("peak_error", "reserved_error", "device_error"):
        errs = [abs(r[key]) for r in rows if r.get(key) is not None]
        if errs:
            lines.append(
                f"\n{key}: median {100 * statistics.median(errs):.1f}%, worst "
                f"{100 * max(errs):.1f}% over {len(errs)} configurations."
            )
    for key in ("step_typical_ratio", "step_ratio"):
        ratios = [r[key] for r in rows if r.get(key)]
        if ratios:
            lines.append(
                f"\n{key} (predicted / measured step seconds): median "
                f"{statistics.median(ratios):.2f}, from {min(ratios):.2f} to {max(ratios):.2f}."
            )
    path.write_text("\n".join(lines) + "\n")


def _num(v, digits=3):
    return "" if v is None else f"{v:,.{digits}f}"


if __name__ == "__main__":
    from snug.runtime.shutdown import exit_now  # without the interpreter's teardown (1.5 s here)

    exit_now(main())
