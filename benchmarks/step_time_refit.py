"""The step-time formula with and without the memory-traffic term, refitted to a GPU run's own
calibration series and checked against that run's measured configurations (no GPU needed: the
plans are replayed here, the seconds are the run's).

Reads a kit run's `-calibration.json` (the series: each step's measured seconds) and `.csv`
(the plan-against-reality configurations: each one's measured step), replans every step to
count its FLOPs, ops and memory traffic, then fits (a) `flops / rate + ops x cost` and (b) the
same plus `traffic / copy bandwidth` (the bandwidth the run measured; the rate held at most the
run's one-large-matmul rate) exactly as `snug calibrate` does, and prints |predicted/measured -
1| over the configurations for both.

Run: python benchmarks/step_time_refit.py [RESULTS_PREFIX]
     (default benchmarks/results/gpu-2026-11-28-H100)
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from reserved_check import overrides

    from snug.config import load_config
    from snug.plan.calibrate import _config, fit_rates
    from snug.plan.calibration import fit_step_time
    from snug.plan.hardware import model_config
    from snug.plan.simulate import simulate

    prefix = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/gpu-2026-11-28-H100"
    )
    cal = next(iter(json.loads(Path(f"{prefix}-calibration.json").read_text())["devices"].values()))
    series = []
    for r in cal["steps"]:
        cfg = _config(
            r["model"],
            r["method"],
            r["checkpointing"],
            r["tokens"],
            r["micro_batch"],
            cal["precision"],
        )
        sim = simulate(  # calibrate's whole rows
            cfg, model_config(r["model"]), r["tokens"], "cuda", cal["precision"], padded=False
        )
        series.append(
            {
                "flops": sim.flops_per_step,
                "ops": sim.ops_per_step,
                "traffic": sim.traffic_per_step,
                "seconds": r["seconds"],
            }
        )
    configs = []
    for row in csv.DictReader(Path(f"{prefix}.csv").open()):
        if not row["measured_step_s"]:
            continue
        keys = overrides(row)  # the config reality.py trained
        sim = simulate(
            load_config(None, keys),
            model_config(row["model"]),
            int(row["tokens"]),
            "cuda",
            row["precision"],
            padded=False,  # reality.py's rows are cut at the cutoff
        )
        name = f"{row['model']} {row['method']} {row['quant']} gc={row['checkpointing']} {row['micro_batch']}x{row['tokens']} {row['precision']}"
        configs.append(
            {
                "name": name,
                "flops": sim.flops_per_step,
                "ops": sim.ops_per_step,
                "traffic": sim.traffic_per_step,
                "measured": float(row["measured_step_s"]),
            }
        )

    bandwidth = cal["bandwidth_gbs"] * 1e9
    a2, b2 = fit_step_time([(s["flops"], s["ops"], s["seconds"]) for s in series])
    a3, b3 = fit_rates(series, cal["matmul_flops"], cal["bandwidth_gbs"])
    free, _ = fit_step_time(
        [(s["flops"], s["ops"], s["seconds"], s["traffic"] / bandwidth) for s in series]
    )
    print(f"a free fit with traffic asks for {1 / free / 1e12:,.0f} TFLOP/s" if free > 0 else "")
    models = {
        "flops + ops": lambda c: a2 * c["flops"] + b2 * c["ops"],
        "flops + ops + traffic": lambda c: (
            a3 * c["flops"] + b3 * c["ops"] + c["traffic"] / bandwidth
        ),
    }
    print(
        f"copy bandwidth {cal['bandwidth_gbs']:,.0f} GB/s, one matmul {cal['matmul_flops'] / 1e12:,.0f} TFLOP/s"
    )
    print(
        f"two terms: {1 / a2 / 1e12:,.0f} TFLOP/s, {b2 * 1e6:.1f} us/op; with traffic: {1 / a3 / 1e12:,.0f} TFLOP/s, {b3 * 1e6:.1f} us/op"
    )
    print(f"| configuration | measured s | {' | '.join(models)} |")
    print("|---|---|" + "---|" * len(models))
    errors = {k: [] for k in models}
    for c in configs:
        cells = []
        for k, f in models.items():
            errors[k].append(f(c) / c["measured"] - 1)
            cells.append(f"{100 * errors[k][-1]:+.1f}%")
        print(f"| {c['name']} | {c['measured']:.3f} | {' | '.join(cells)} |")
    for k, e in errors.items():
        size = [abs(x) for x in e]
        over = sum(x > 0.25 for x in size)
        print(
            f"{k}: median {100 * statistics.median(size):.1f}%, worst {100 * max(size):.1f}%, {over} of {len(size)} beyond 25%"
        )


if __name__ == "__main__":
    main()
