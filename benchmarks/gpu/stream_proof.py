"""memory.offload_weights on one GPU (issue 36): QLoRA of a model whose 4-bit weights do not fit
the memory the process may use, trained with its frozen decoder-layer weights streamed from
pinned host memory, against snug's plan of it; then the same run resident, for its tokens/s.

The model is a random-weight copy of a catalog config (default Qwen2.5-14B at its real size;
`--layers N` cuts its depth for a shorter run), written in bf16 once and loaded through snug's
loader as `snug train` loads it (model.quant=4bit: bitsandbytes quantizes it), as reality.py's
QLoRA rows are. Two configurations, each in a process of its own (reality.py's `run_one`):

1. streamed: memory.offload_weights=true under `torch.cuda.set_per_process_memory_fraction(cap /
   total)`, `--cap-gib` below the 4-bit weights: the run can only train if the layers stream;
2. resident: the same configuration without the cap and without streaming (where the card
   holds it; an out-of-memory is recorded as that row's error).

Reported, per configuration: `max_memory_allocated` against the plan's peak (target: within
5%), `max_memory_reserved` against the plan's peak plus allocator term and against the cap, the
median step after the first against the plan's step time (target: within 25% of it after `snug
calibrate`), tokens/s, and the host memory the streamed weights hold (planned and real); then
streamed tokens/s over resident. Writes OUTDIR/stream.md and OUTDIR/stream.csv naming the card.

Run: python benchmarks/gpu/stream_proof.py OUTDIR [--cap-gib 8] [--model NAME] [--layers N]
     [--tokens 1024] [--micro-batch 1] [--budget SECONDS] [--cpu-dry-run]
`--cpu-dry-run` runs the same code on this CPU with the catalog config shrunk (reality.py's
CPU_SHRINK, 3 layers, fp32), no cap, the "device" copy a clone of the host tensor.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from child import preload, run_forked, run_fresh
from reality import GIB, build_model, build_text, run_one

HERE = Path(__file__).resolve().parent
FIELDS = [
    "config", "model", "layers", "tokens", "micro_batch", "precision", "cap_gib",
    "predicted_peak_gib", "measured_peak_gib", "peak_error",
    "predicted_reserved_gib", "measured_reserved_gib", "reserved_error", "under_cap",
    "predicted_weights_gib", "predicted_host_gib", "measured_host_gib", "streamed_gb_per_step",
    "h2d", "predicted_step_s", "measured_step_s", "step_ratio", "calibration", "tokens_per_s",
    "train_s", "wall_s", "error",
]  # fmt: skip
PEAK_TARGET, STEP_TARGET = 0.05, 0.25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--model", default="Qwen/Qwen2.5-14B", help="a catalog model")
    parser.add_argument("--layers", type=int, help="cut the model to this many decoder layers")
    parser.add_argument("--cap-gib", type=float, default=8.0, help="GPU memory the run may use")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for both runs")
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    dry = args.cpu_dry_run
    if dry:
        args.layers = args.layers or 3
        args.tokens, args.micro_batch = min(args.tokens, 64), 1
    args.outdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if dry:
        preload()
    base = {
        "model": args.model,
        "layers": args.layers or "all",
        "tokens": args.tokens,
        "micro_batch": args.micro_batch,
        "precision": "fp32" if dry else "bf16-mixed",
    }
    configs = [
        ("streamed", ["memory.offload_weights=true"], None if dry else args.cap_gib),
        ("resident", ["memory.offload_weights=false"], None),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, (args.outdir / "stream.csv").open("w") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        work = Path(tmp)
        try:
            model_dir = build_model(args.model, work, dry, args.layers)
            text = build_text(work)
        except Exception as e:  # noqa: BLE001 (recorded, and the report still written)
            model_dir, text, built = None, None, f"building the model: {type(e).__name__}: {e}"
        else:
            built = None
        for i, (name, overrides, cap) in enumerate(configs):
            row = {**base, "config": name, "cap_gib": cap, "error": built}
            left = args.budget - (time.perf_counter() - started)
            if built is None and left < 20:
                row["error"] = "skipped: out of time budget"
            elif built is None:
                spec = {
                    "model_dir": str(model_dir),
                    "method": "lora",
                    "quant": "4bit",
                    "checkpointing": True,  # streaming a 4-bit model needs it (config checks)
                    "tokens": args.tokens,
                    "micro_batch": args.micro_batch,
                    "precision": base["precision"],
                    "text": str(text),
                    "out": str(work / f"run{i}"),
                    "dry_run": dry,
                    "overrides": overrides,
                    "cap_bytes": int(cap * GIB) if cap else None,
                }
                try:
                    row.update(measure(spec, left, args.outdir, cap))
                except Exception as e:  # noqa: BLE001 (a failure is a result: recorded, then on)
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
            writer.writerow(row)
            fh.flush()
            print(json.dumps(row), flush=True)
    card = "CPU dry run" if dry else _card()
    write_report(args.outdir / "stream.md", rows, card, time.perf_counter() - started)
    return 0


def measure(spec: dict, left: float, outdir: Path, cap: float | None) -> dict:
    """One configuration in a process of its own (a fresh interpreter on a GPU, a fork in the
    dry run: child.py), as reality.py measures its rows."""
    child_started = time.perf_counter()
    if spec["dry_run"]:
        result = run_forked(lambda: run_one(spec), max(left, 20))
    else:
        argv = [str(HERE / "reality.py"), str(outdir), "--one", json.dumps(spec)]
        result = run_fresh(argv, max(left, 20))
    p, m, host = result["predicted"], result["measured"], result["host"]
    return {
        "predicted_peak_gib": _gib(p["peak"]),
        "measured_peak_gib": _gib(m["peak"]),
        "peak_error": _err(p["peak"], m["peak"]),
        "predicted_reserved_gib": _gib(p["reserved"]),
        "measured_reserved_gib": _gib(m["reserved"]),
        "reserved_error": _err(p["reserved"], m["reserved"]),
        "under_cap": None if cap is None or m["reserved"] is None else m["reserved"] <= cap * GIB,
        "predicted_weights_gib": _gib(result["weights_bytes"]),
        "predicted_host_gib": _gib(host["predicted"]),
        "measured_host_gib": _gib(host["measured"]),
        "streamed_gb_per_step": round(result["streamed_per_step"] / 1e9, 4),
        "h2d": result["h2d"],
        "predicted_step_s": p["step"],
        "measured_step_s": m["step"],
        "step_ratio": p["step"] / m["step"] if p["step"] and m["step"] else None,
        "calibration": p["calibration"],
        "tokens_per_s": result["tokens_per_s"],
        "train_s": round(result["train_s"], 1),
        "wall_s": round(time.perf_counter() - child_started, 1),
    }


def _card() -> str:
    """The GPU's name, memory and driver, as nvidia-smi names them."""
    import subprocess

    proc = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 else "GPU (no nvidia-smi)"


def write_report(path: Path, rows: list[dict], card: str, seconds: float) -> None:
    streamed, resident = rows[0], rows[1]
    lines = [
        f"# memory.offload_weights on {card}",
        "",
        f"QLoRA (LoRA on a 4-bit base, checkpointing) of {streamed['model']} ({streamed['layers']}"
        f" layers) with random weights, {streamed['micro_batch']} x {streamed['tokens']} tokens "
        f"a step, {seconds:.0f} s. Streamed: frozen decoder-layer weights in pinned host memory, "
        "the process capped at "
        + (f"{streamed['cap_gib']} GiB" if streamed["cap_gib"] else "nothing (CPU dry run)")
        + "; resident: no cap, no streaming. Peak: the plan's `peak_bytes` vs "
        "`max_memory_allocated`; reserved: plus its allocator term vs `max_memory_reserved`; "
        "step: the plan's step seconds vs the median step after the first.",
        "",
        "| config | peak pred/meas GiB | err | reserved pred/meas GiB | err | under cap "
        "| 4-bit weights GiB (plan) | host pred/meas GiB | streamed GB/step | step plan/meas s "
        "| ratio | tok/s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r.get('predicted_peak_gib')}/{r.get('measured_peak_gib')} "
            f"| {_pct(r.get('peak_error'))} "
            f"| {r.get('predicted_reserved_gib')}/{r.get('measured_reserved_gib')} "
            f"| {_pct(r.get('reserved_error'))} | {_blank(r.get('under_cap'))} "
            f"| {_blank(r.get('predicted_weights_gib'))} "
            f"| {r.get('predicted_host_gib')}/{r.get('measured_host_gib')} "
            f"| {_blank(r.get('streamed_gb_per_step'))} "
            f"| {_num(r.get('predicted_step_s'))}/{_num(r.get('measured_step_s'))} "
            f"| {_num(r.get('step_ratio'), 2)} | {_num(r.get('tokens_per_s'), 0)} "
            f"| {r.get('error') or ''} |"
        )
    lines += ["", *verdicts(streamed, resident)]
    path.write_text("\n".join(lines) + "\n")


def verdicts(streamed: dict, resident: dict) -> list[str]:
    """The proof's claims, each met or not, with its numbers."""
    out = []
    if streamed.get("error"):
        return [f"- The streamed run failed: {streamed['error']}"]
    weights, cap = resident.get("predicted_weights_gib"), streamed["cap_gib"]
    if cap and weights:
        below = "below" if cap < weights else "NOT below (no proof: raise --layers or lower it)"
        out.append(f"- The cap, {cap} GiB, is {below} the 4-bit model's {weights} GiB (plan).")
    if streamed.get("under_cap") is not None:
        held = "held" if streamed["under_cap"] else "NOT held"
        out.append(f"- Reserved {streamed['measured_reserved_gib']} GiB: the cap {held}.")
    err = streamed.get("peak_error")
    if err is not None:
        met = "met" if abs(err) <= PEAK_TARGET else "NOT met"
        out.append(f"- Streamed peak vs plan {_pct(err)} (target 5%: {met}).")
    ratio = streamed.get("step_ratio")
    if ratio:
        met = "met" if abs(ratio - 1) <= STEP_TARGET else "NOT met"
        out.append(
            f"- Streamed step: plan / measured {ratio:.2f} (target within 25% after calibration, "
            f"{streamed.get('calibration')}: {met}); H2D rate planned at {streamed.get('h2d')}."
        )
    if streamed.get("tokens_per_s") and resident.get("tokens_per_s"):
        share = streamed["tokens_per_s"] / resident["tokens_per_s"]
        out.append(
            f"- Tokens/s streamed {streamed['tokens_per_s']:,.0f} vs resident "
            f"{resident['tokens_per_s']:,.0f}: {share:.2f}x."
        )
    return out


def _gib(v):
    return None if v is None else round(v / GIB, 4)


def _err(pred, meas):
    return None if pred is None or not meas else (pred - meas) / meas


def _pct(v):
    return "" if v is None else f"{100 * v:+.1f}%"


def _blank(v):
    return "" if v is None else v


def _num(v, digits=3):
    return "" if v is None else f"{v:,.{digits}f}"


if __name__ == "__main__":
    from snug.runtime.shutdown import exit_now  # without the interpreter's teardown

    exit_now(main())
