"""The step-time formula in its three forms, refitted to a GPU run's own calibration series and
checked against that run's measured configurations (no GPU needed: the plans are replayed here,
the seconds are the run's).

Reads a kit run's `-calibration.json` (the series: each step's measured seconds) and `.csv`
(the plan-against-reality configurations: each one's measured step), replans every step to
count its FLOPs, ops, memory traffic and 4-bit matmuls, then fits (a) `flops / rate + ops x
cost`, (b) the same plus `traffic / copy bandwidth` (the bandwidth the run measured; the rate
held at most the run's one-large-matmul rate), as `snug calibrate` did before the overlapped
fit, and (c) `max(flops / rate + traffic / bandwidth, ops x cost) + 4-bit matmuls x their
cost`, as it does since on a GPU (plan/calibration.py), and prints |predicted/measured - 1|
over the configurations.

A series from before (c) has no QLoRA step, so (c)'s 4-bit cost is taken from the first
4-bit configuration of the run's CSV, as the series' QLoRA step would give it, and that
configuration is left out of (c)'s summary (marked `fit` in its column).

The replay is of the step the run measured: snug's chunks of logits were 1,024 positions
whatever the vocabulary until 2026-11-28 (now at most 256 MiB of fp32 logits: 384 positions
for Qwen2.5's vocabulary, more ops and less traffic), so the replay keeps 1,024 unless
`--chunk-positions 0` asks for the current code's chunks (for a run made since).

`--entry FILE` also writes (c) as that card's calibration entry into FILE (its other cards
kept), in the calibration file's format (plan/calibration.py): the run's own measurements (context, reserved ratio, one matmul,
copy bandwidth, the series' steps) with (c)'s rate, per-op and 4-bit costs, its error over the
configurations as `step_error`, and its source. snug ships such an entry
(snug/models/catalog/calibrations.json) for a card its kit calibrated.

Run: python benchmarks/step_time_refit.py [RESULTS_PREFIX] [--chunk-positions N] [--entry FILE]
     (default benchmarks/results/gpu-2026-11-28-H100, 1,024)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from reserved_check import as_measured, chunk_option, overrides

    from snug.config import load_config
    from snug.plan.calibrate import _config
    from snug.plan.fitting import fit_model, fit_rates, fit_step_time
    from snug.plan.hardware import model_config
    from snug.plan.simulate import simulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "prefix", nargs="?", type=Path, default=ROOT / "benchmarks/results/gpu-2026-11-28-H100"
    )
    chunk_option(parser)
    parser.add_argument("--entry", type=Path, help="write (c) as a calibration entry here")
    args = parser.parse_args()
    prefix = args.prefix
    as_measured(args.chunk_positions)  # the chunks the measured run's snug used
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
            r.get("quant", "none"),
        )
        sim = simulate(  # calibrate's whole rows
            cfg, model_config(r["model"]), r["tokens"], "cuda", cal["precision"], padded=False
        )
        series.append(
            {
                "flops": sim.flops_per_step,
                "ops": sim.ops_per_step,
                "traffic": sim.traffic_per_step,
                "quant_calls": sim.quant_calls_per_step,
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
                "quant_calls": sim.quant_calls_per_step,
                "seconds": float(row["measured_step_s"]),
                "measured": float(row["measured_step_s"]),
            }
        )

    bandwidth = cal["bandwidth_gbs"] * 1e9
    plain = [s for s in series if not s["quant_calls"]]  # (a) and (b) knew no 4-bit cost
    a2, b2 = fit_step_time([(s["flops"], s["ops"], s["seconds"]) for s in plain])
    a3, b3 = fit_rates(plain, cal["matmul_flops"], cal["bandwidth_gbs"])
    free, _ = fit_step_time(
        [(s["flops"], s["ops"], s["seconds"], s["traffic"] / bandwidth) for s in plain]
    )
    print(f"a free fit with traffic asks for {1 / free / 1e12:,.0f} TFLOP/s" if free > 0 else "")
    held = next((c for c in configs if c["quant_calls"]), None)
    if any(s["quant_calls"] for s in series) or held is None:
        held = None  # the series has its own QLoRA step (or no configuration is 4-bit)
    overlapped = fit_model(
        series + ([held] if held else []), cal["matmul_flops"], cal["bandwidth_gbs"], True
    )
    models = {
        "flops + ops": lambda c: a2 * c["flops"] + b2 * c["ops"],
        "flops + ops + traffic": lambda c: (
            a3 * c["flops"] + b3 * c["ops"] + c["traffic"] / bandwidth
        ),
        "max(device, host) + 4-bit": lambda c: overlapped.seconds(
            c["flops"], c["ops"], 0, c["traffic"], c["quant_calls"]
        ),
    }
    print(
        f"copy bandwidth {cal['bandwidth_gbs']:,.0f} GB/s, one matmul {cal['matmul_flops'] / 1e12:,.0f} TFLOP/s"
    )
    print(
        f"two terms: {1 / a2 / 1e12:,.0f} TFLOP/s, {b2 * 1e6:.1f} us/op; with traffic: {1 / a3 / 1e12:,.0f} TFLOP/s, {b3 * 1e6:.1f} us/op"
    )
    print(
        f"max(device, host) + 4-bit: {overlapped.rate_flops / 1e12:,.0f} TFLOP/s, "
        f"{overlapped.op_seconds * 1e6:.1f} us/op, {overlapped.quant_call_seconds * 1e6:.0f} us "
        "per 4-bit matmul" + (f" (from {held['name']})" if held else "")
    )
    print(f"| configuration | measured s | {' | '.join(models)} |")
    print("|---|---|" + "---|" * len(models))
    errors = {k: [] for k in models}  # every form over the same configurations: held left out
    for c in configs:
        cells = []
        for k, f in models.items():
            e = f(c) / c["measured"] - 1
            cells.append(f"{100 * e:+.1f}%" + (" (fit)" if c is held else ""))
            if c is not held:
                errors[k].append(e)
        print(f"| {c['name']} | {c['measured']:.3f} | {' | '.join(cells)} |")
    for k, e in errors.items():
        size = [abs(x) for x in e]
        over = sum(x > 0.25 for x in size)
        print(
            f"{k}: median {100 * statistics.median(size):.1f}%, worst {100 * max(size):.1f}%, {over} of {len(size)} beyond 25%"
            + (" (the row marked fit left out)" if held else "")
        )
    if args.entry:
        write_entry(args.entry, cal, overlapped, series, prefix)


def write_entry(path: Path, cal: dict, fitted, series: list, prefix: Path) -> None:
    """(c) as the card's calibration entry: the run's measurements, the refitted step time and
    its error over the run's series (as `snug calibrate` reports it)."""
    import dataclasses

    from snug.plan import calibration

    # each step's counts as replayed here, and its time as (c) fits it
    steps = [
        {
            **r,
            **{k: s[k] for k in ("flops", "ops", "traffic", "quant_calls")},
            "fitted_seconds": fitted.seconds(
                s["flops"], s["ops"], 0, s["traffic"], s["quant_calls"]
            ),
        }
        for r, s in zip(cal["steps"], series, strict=True)
    ]
    errors = [r["fitted_seconds"] / r["seconds"] - 1 for r in steps]
    source = (
        f"shipped with snug, from its GPU kit's run on that card (benchmarks/results/"
        f"{prefix.name}.md, refitted: benchmarks/step_time_refit.py); `snug calibrate` "
        "measures yours"
    )
    entry = dataclasses.replace(
        calibration.Calibration.from_dict(cal),
        rate_flops=fitted.rate_flops,
        op_seconds=fitted.op_seconds,
        traffic_gbs=cal["bandwidth_gbs"],
        overlap=fitted.overlap,
        quant_call_seconds=fitted.quant_call_seconds,
        step_error=(min(errors), max(errors)),
        steps=tuple(steps),
        source=source,
    )
    calibration.save(entry, path)  # the file's other cards kept
    print(f"entry for {entry.device} written to {path}")


if __name__ == "__main__":
    main()
