"""Fitting a step-time model to measured steps: what `snug calibrate` learns (seconds per FLOP,
per op and per 4-bit matmul) from the steps it runs; snug/plan/calibration.py holds the model
and its file."""

from __future__ import annotations

import dataclasses
import statistics

from snug.plan.calibration import StepModel


def fit_step_time(rows: list[tuple[float, ...]]) -> tuple[float, float]:
    """(seconds per FLOP, seconds per op) that best fit measured (flops, ops, seconds[, known])
    rows, where `known` is the part of each step's seconds already accounted for (its memory
    traffic at the measured bandwidth), in relative error (each row weighs the same, short or
    long), both at least zero. Two unknowns, so solved directly (a library solver would add a
    dependency for a 2x2 system)."""
    if not rows:
        raise ValueError("no measured steps to fit")
    rows = [(r[0], r[1], r[2], r[3] if len(r) > 3 else 0.0) for r in rows]
    # minimise sum((a f + b o + k - t)^2 / t^2): normal equations in (a, b)
    sff = sum(f * f / t / t for f, o, t, k in rows)
    soo = sum(o * o / t / t for f, o, t, k in rows)
    sfo = sum(f * o / t / t for f, o, t, k in rows)
    sf = sum(f * (t - k) / t / t for f, o, t, k in rows)
    so = sum(o * (t - k) / t / t for f, o, t, k in rows)
    det = sff * soo - sfo * sfo
    if det > 0:
        a, b = (sf * soo - so * sfo) / det, (so * sff - sf * sfo) / det
        if a > 0 and b >= 0:
            return a, b
    # one term alone explains the rows better: keep the one with the smaller error
    only_flops = (max(sf, 0.0) / sff, 0.0) if sff else None
    only_ops = (0.0, max(so, 0.0) / soo) if soo else None

    def error(ab):
        return sum(((ab[0] * f + ab[1] * o + k) / t - 1) ** 2 for f, o, t, k in rows)

    return min((x for x in (only_flops, only_ops) if x), key=error)


def fit_overlapped(
    rows: list[tuple[float, float, float, float]], least: float
) -> tuple[float, float]:
    """(seconds per FLOP, seconds per op) that best fit measured (flops, ops, seconds, known)
    rows to `max(a x flops + known, b x ops)` (the device's work and the host's dispatch
    overlapping), in relative error, with `a` at least `least` (the device's best case) and at
    most 64 times it, `b` at least zero. The maximum has no closed-form least squares, so it is
    a scan of both, then a finer scan around the best (five or so rows: a fraction of a
    second; a library optimiser would add a dependency and still need a start this good)."""
    if not rows:
        raise ValueError("no measured steps to fit")

    def error(a: float, b: float) -> float:
        return sum((max(a * f + k, b * o) / t - 1) ** 2 for f, o, t, k in rows)

    top = max((t / o for f, o, t, k in rows if o), default=0.0)
    a_grid = [least * 2 ** (i / 8) for i in range(49)]
    b_grid = [top * i / 400 for i in range(401)]
    best = min((error(a, b), a, b) for a in a_grid for b in b_grid)
    _, a0, b0 = best
    finer = min(
        (error(a, b), a, b)
        for a in (max(least, a0 * 2 ** (i / 128)) for i in range(-16, 17))
        for b in (max(0.0, b0 + top * i / 16000) for i in range(-40, 41))
    )
    return finer[1], finer[2]


def fit_rates(rows: list[dict], matmul: float, bandwidth_gbs: float) -> tuple[float, float]:
    """(seconds per FLOP, seconds per op) fitted to the measured rows, each step's memory
    traffic charged at the measured copy bandwidth. A whole step cannot run its FLOPs faster
    than one large matmul: a fit that asks for more (the traffic then explains the steps
    alone, as on an H100 whose small elementwise ops stay in cache) keeps the matmul rate
    and fits the per-op cost alone."""
    known = [r["traffic"] / (bandwidth_gbs * 1e9) for r in rows]
    a, b = fit_step_time(
        [(r["flops"], r["ops"], r["seconds"], k) for r, k in zip(rows, known, strict=True)]
    )
    if a < 1 / matmul:
        a = 1 / matmul
        _, b = fit_step_time(
            [
                (0, r["ops"], r["seconds"], k + a * r["flops"])
                for r, k in zip(rows, known, strict=True)
            ]
        )
    return a, b


def quant_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("quant_calls")]


def fit_model(rows: list[dict], matmul: float, bandwidth_gbs: float, overlap: bool) -> StepModel:
    """The step-time model fitted to measured rows (dicts with flops, ops, traffic, seconds and
    quant_calls): the rate and the per-op cost from the rows without 4-bit matmuls, on a GPU
    with the host's dispatch overlapping the device's work (`max`, plan/calibration.py), on a
    CPU added to it (`fit_rates`); then what each 4-bit matmul costs beyond that, the median
    over the 4-bit rows of what is left of their measured seconds per matmul (zero when none).
    The maximum tells the two costs apart only when some rows are the device's and some the
    host's; when the fit puts every row on one side, the other cost is anything below it, so
    the sum is fitted instead (both costs then come from every row), and the model adds."""
    plain = [r for r in rows if not r.get("quant_calls")]
    if overlap:
        moved = [r["traffic"] / (bandwidth_gbs * 1e9) for r in plain]
        a, b = fit_overlapped(
            [(r["flops"], r["ops"], r["seconds"], k) for r, k in zip(plain, moved, strict=True)],
            1 / matmul,
        )
        device_bound = [
            a * r["flops"] + k > b * r["ops"] for r, k in zip(plain, moved, strict=True)
        ]
        overlap = any(device_bound) and not all(device_bound)
    if not overlap:
        a, b = fit_rates(plain, matmul, bandwidth_gbs)
    model = StepModel(
        rate_flops=1 / a if a > 0 else 0.0,
        op_seconds=b,
        bandwidth_gbs=None,  # the fit has no weight-reading term; the plan's model adds it
        source="fitted",
        traffic_gbs=bandwidth_gbs,
        overlap=overlap,
    )
    left = [
        max(0.0, r["seconds"] - model.seconds(r["flops"], r["ops"], 0, r["traffic"]))
        / r["quant_calls"]
        for r in quant_rows(rows)
    ]
    if left:
        model = dataclasses.replace(model, quant_call_seconds=statistics.median(left))
    return model
