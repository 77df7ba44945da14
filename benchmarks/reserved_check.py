"""The planner's reserved memory against `max_memory_reserved` measured on a GPU, replayed here on
the CPU.

Each row of a GPU kit result (benchmarks/gpu/reality.py wrote it: a random-weight copy of a
bundled catalog config, train.stage=pt, text cut at the cutoff, grad_accum 1) is planned again
from its columns with the same overrides, on the bundled config of the same name and the card
the CSV was measured on. Printed per row: the plan's peak against `max_memory_allocated`, and
the plan's reserved (the peak plus its allocator term, snug/plan/allocator.py) against
`max_memory_reserved`, next to the CSV's own prediction (the planner of that day: a flat 5% of
the peak); then the median and worst absolute error.

The replay is of the step the run measured: `--chunk-positions` (default 1,024, what snug's
loss chunks were whatever the vocabulary until 2026-11-28; 0 for the current code's, for a run
made since).

Run: python benchmarks/reserved_check.py [CSV] [--gpu NAME] [--out FILE.md] [--chunk-positions N]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = ROOT / "benchmarks/results/gpu-2026-11-27-H200.csv"
GIB = 2**30


def overrides(row: dict) -> list[str]:
    """The config reality.py trained, from the row's columns (data and output paths aside)."""
    out = [
        f"model.name_or_path={row['model']}",
        f"model.quant={row['quant']}",
        f"method.name={row['method']}",
        f"memory.grad_checkpointing={row['checkpointing'].lower()}",
        f"train.precision={row['precision']}",
        "train.stage=pt",
        "data.format=text",
        f"data.cutoff_len={row['tokens']}",
        f"train.micro_batch={row['micro_batch']}",
        "train.grad_accum=1",
    ]
    return out + (["model.dtype=bfloat16"] if row["precision"] == "bf16-true" else [])


def plan_row(row: dict, gpu: str) -> dict:
    from snug.config import load_config
    from snug.plan.hardware import find_gpu, model_config
    from snug.plan.search import plan_one

    started = time.perf_counter()
    cfg = load_config(None, overrides(row))
    # the kit's rows are cut at the cutoff: whole rows, no padding mask
    cand = plan_one(
        cfg, model_config(row["model"]), find_gpu(gpu), int(row["tokens"]), padded=False
    )
    if cand.error:
        raise RuntimeError(f"{row['model']} {row['method']}: the plan failed: {cand.error}")
    return {
        "peak": cand.peak_bytes / GIB,
        "reserved": (cand.peak_bytes + cand.reserved_terms["allocator"]["bytes"]) / GIB,
        "seconds": time.perf_counter() - started,
    }


def chunk_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-positions",
        type=int,
        default=1024,
        help="positions per chunk of logits in the measured run's snug (0: the current code's)",
    )


def as_measured(positions: int) -> None:
    """Replay the loss a GPU run measured: snug's chunks of logits were 1,024 positions whatever
    the vocabulary until 2026-11-28 (now at most 256 MiB of fp32 logits, snug/train/loss.py);
    0 keeps the current code's chunks."""
    if positions:
        from snug.train import loss

        loss.CHUNK_POSITIONS, loss.CHUNK_BYTES = positions, 2**62


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--gpu", default="NVIDIA H200", help="the card the CSV was measured on")
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    chunk_option(parser)
    args = parser.parse_args()
    as_measured(args.chunk_positions)
    rows = [r for r in csv.DictReader(args.csv.open()) if r["measured_reserved_gib"]]
    lines = [
        "| model | method | quant | gc | tokens | mb | precision | peak pred/meas GiB | err "
        "| reserved pred/meas GiB | err | before (5% term) | err | plan s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    errors, before, peaks = [], [], []
    for row in rows:
        p = plan_row(row, args.gpu)
        peak, reserved = float(row["measured_peak_gib"]), float(row["measured_reserved_gib"])
        old = float(row["predicted_reserved_gib"])
        err, old_err, peak_err = (
            (p["reserved"] - reserved) / reserved,
            (old - reserved) / reserved,
            (p["peak"] - peak) / peak,
        )
        errors.append(abs(err))
        before.append(abs(old_err))
        peaks.append(abs(peak_err))
        line = (
            f"| {row['model']} | {row['method']} | {row['quant']} | {row['checkpointing']} "
            f"| {row['tokens']} | {row['micro_batch']} | {row['precision']} "
            f"| {p['peak']:.3f}/{peak:.3f} | {100 * peak_err:+.1f}% "
            f"| {p['reserved']:.3f}/{reserved:.3f} | {100 * err:+.1f}% "
            f"| {old:.3f} | {100 * old_err:+.1f}% | {p['seconds']:.1f} |"
        )
        lines.append(line)
        print(line, flush=True)
    summary = [
        "",
        f"reserved: median {100 * statistics.median(errors):.1f}%, worst "
        f"{100 * max(errors):.1f}% over {len(errors)} configurations "
        f"(before: median {100 * statistics.median(before):.1f}%, worst {100 * max(before):.1f}%)",
        f"peak: median {100 * statistics.median(peaks):.1f}%, worst {100 * max(peaks):.1f}%",
    ]
    print("\n".join(summary))
    if args.out:
        head = [
            f"# Reserved memory: plan against {args.csv.name}",
            "",
            f"Command: `python benchmarks/reserved_check.py {args.csv.relative_to(ROOT)}` "
            f"(planned on this CPU as {args.gpu}).",
            "",
        ]
        args.out.write_text("\n".join(head + lines + summary) + "\n")


if __name__ == "__main__":
    main()
