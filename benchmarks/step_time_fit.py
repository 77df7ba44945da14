"""The planner's step time against steps measured on a GPU, and the typical values it uses where
no `snug calibrate` entry exists.

Each row of a GPU kit result (benchmarks/gpu/reality.py: a random-weight catalog model, a few
real steps of `snug train`, the median step after the first) is planned again here on the CPU
with the same overrides (benchmarks/reserved_check.py: overrides), which gives the step's FLOPs
and dispatched ops. Printed: the step time under the planner's old rule (FLOPs / (table bf16
rate x 0.4)); the two-term model of plan/calibration.py fitted to all rows (the achieved share
of the table's rate and the seconds per op: the typical values in plan/calibration.py come from
this); and, to show it predicts rows it has not seen, each row predicted from a fit to the
others (leave-one-out).

The replay is of the step the run measured (`--chunk-positions`, benchmarks/reserved_check.py).

Run: python benchmarks/step_time_fit.py [CSV] [--gpu NAME] [--chunk-positions N]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_CSV = ROOT / "benchmarks/results/gpu-2026-11-27-H200-run2.csv"

from reserved_check import as_measured, chunk_option  # noqa: E402


def replan(row: dict, gpu: str) -> tuple[int, int]:
    from reserved_check import overrides

    from snug.config import load_config
    from snug.plan.hardware import find_gpu, model_config
    from snug.plan.search import plan_one

    cand = plan_one(
        load_config(None, overrides(row)),
        model_config(row["model"]),
        find_gpu(gpu),
        int(row["tokens"]),
        padded=False,  # the kit's rows are cut at the cutoff
    )
    if cand.error:
        raise RuntimeError(f"{row['model']} {row['method']}: the plan failed: {cand.error}")
    return cand.sim.flops_per_step, cand.sim.ops_per_step


def op_seconds_at(rows: list[tuple], rate: float) -> float:
    """Seconds per op that best fit (flops, ops, seconds) rows, in relative error, with the
    compute at `rate` FLOP/s."""
    num = sum(o / t * (1 - f / rate / t) for f, o, t in rows)
    return max(num / sum(o * o / t / t for f, o, t in rows), 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--gpu", default="H200", help="the card the CSV was measured on")
    chunk_option(parser)
    args = parser.parse_args()
    as_measured(args.chunk_positions)
    from snug.plan.calibration import GPU_EFFICIENCY
    from snug.plan.fitting import fit_step_time
    from snug.plan.hardware import find_gpu

    table_rate = find_gpu(args.gpu).bf16_tflops * 1e12
    rows = [r for r in csv.DictReader(args.csv.open()) if r.get("measured_step_s")]
    data = []
    for r in rows:
        flops, ops = replan(r, args.gpu)
        data.append((flops, ops, float(r["measured_step_s"])))
        print(f"planned {r['model']} {r['method']} {r['micro_batch']}x{r['tokens']}", flush=True)
    a, b = fit_step_time(data)
    print(
        f"\n{args.csv.name}: {len(data)} rows, {args.gpu} table bf16 {table_rate / 1e12:g} TFLOP/s"
    )
    print(f"fit to all rows: {1 / a / table_rate:.3f} of the table rate, {b * 1e6:.1f} us per op")
    rate = table_rate * GPU_EFFICIENCY
    fixed = op_seconds_at(data, rate)
    print(
        f"with the rate fixed at {GPU_EFFICIENCY} of the table's: {fixed * 1e6:.2f} us per op "
        "(plan/calibration.py's typical GPU_OP_SECONDS)\n"
    )
    print(
        "| model | method | quant | gc | mb x tokens | GFLOP | ops | measured s | old rule | fit "
        "| leave-one-out | typical, leave-one-out |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    old_err, fit_err, loo_err, typ_err = [], [], [], []
    for i, (r, (f, o, t)) in enumerate(zip(rows, data, strict=True)):
        old = f / (table_rate * GPU_EFFICIENCY)
        fit = a * f + b * o
        la, lb = fit_step_time(data[:i] + data[i + 1 :])
        loo = la * f + lb * o
        old_err.append(abs(old / t - 1))
        fit_err.append(abs(fit / t - 1))
        loo_err.append(abs(loo / t - 1))
        typ = f / rate + op_seconds_at(data[:i] + data[i + 1 :], rate) * o
        typ_err.append(abs(typ / t - 1))
        print(
            f"| {r['model']} | {r['method']} | {r['quant']} | {r['checkpointing']} | "
            f"{r['micro_batch']} x {r['tokens']} | {f / 1e9:,.0f} | {o:,} | {t:.3f} | "
            f"{old:.3f} ({100 * (old / t - 1):+.0f}%) | {fit:.3f} ({100 * (fit / t - 1):+.0f}%) | "
            f"{loo:.3f} ({100 * (loo / t - 1):+.0f}%) | {typ:.3f} ({100 * (typ / t - 1):+.0f}%) |"
        )
    for name, errs in (
        ("old rule", old_err),
        ("fit", fit_err),
        ("leave-one-out", loo_err),
        ("typical (fixed rate, fitted op cost), leave-one-out", typ_err),
    ):
        print(
            f"{name}: median abs error {100 * statistics.median(errs):.1f}%, worst {100 * max(errs):.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
