"""What a plan's step time and reserved memory are computed from for a device: its
`snug calibrate` entry, else typical values (this CPU's measured matmul rate, the GPU table's
peak rates); the rate streamed weights are copied at (memory.offload_weights); and the precision
a plan assumes on it."""

from __future__ import annotations

import dataclasses
import time

import torch

from snug.config import Config
from snug.plan import calibration
from snug.plan.calibration import Calibration, StepModel
from snug.plan.device_probe import h2d_bandwidth
from snug.plan.hardware import Device, device_key
from snug.plan.simulate import PlanError

TYPICAL = "typical values, not calibrated"


def _cpu_rate() -> float:
    """This CPU's fp32 matmul rate (FLOP/s), measured now: a few 1024 x 1024 products."""
    a = torch.randn(1024, 1024)
    a @ a
    started, n = time.perf_counter(), 8
    for _ in range(n):
        a @ a
    return n * 2 * 1024**3 / (time.perf_counter() - started)


def device_model(
    device: Device, precision: str, calibrated: bool = True, streams: bool = False
) -> StepModel:
    """The step-time and reserved-memory inputs for `device`: its `snug calibrate` entry when
    there is one (and `calibrated`), else typical values (plan/calibration.py says which);
    with `streams` (memory.offload_weights) the rate the weights are copied at too."""
    cal = calibration.load(device_key(device)) if calibrated else None
    model = _step_model(device, precision, cal)
    if not streams:
        return model
    h2d, source = _h2d(device, cal)
    return dataclasses.replace(
        model, h2d_gbs=h2d, h2d_overlaps=device.type == "cuda", h2d_source=source
    )


def _h2d(device: Device, cal: Calibration | None) -> tuple[float, str]:
    """(GB/s, where it is from) at which streamed weights reach `device`: what `snug calibrate`
    measured, else on a GPU the table's PCIe figure or a typical one, on a CPU a large clone's
    rate measured now (the copy is host to host)."""
    if cal is not None and cal.h2d_gbs:
        return cal.h2d_gbs, f"measured by snug calibrate ({cal.label()})"
    if device.type == "cpu":
        return h2d_bandwidth(torch.device("cpu")), "a large clone on this CPU, measured now"
    if device.pcie_gbs:
        return device.pcie_gbs, f"the GPU table's PCIe figure for {device.name}"
    typical = calibration.TYPICAL_H2D_GBS
    return typical, f"typical pinned PCIe 4.0 x16 ({typical} GB/s), not calibrated"


def _step_model(device: Device, precision: str, cal: Calibration | None) -> StepModel:
    family = precision.split("-")[0]
    if cal is not None:
        rate = cal.rate_flops
        if device.type == "cuda" and family != cal.precision.split("-")[0]:
            # calibrated in another dtype: scale by the table's ratio of the two rates
            ours, theirs = _table_tflops(device, family), _table_tflops(device, cal.precision)
            rate = rate * ours / theirs if ours and theirs else None
        return StepModel(
            rate_flops=rate,
            op_seconds=cal.op_seconds,
            bandwidth_gbs=cal.bandwidth_gbs if device.type == "cuda" else None,
            source=cal.label(),
            context_bytes=cal.context_bytes,
            reserved_ratio=cal.reserved_ratio,
            traffic_gbs=cal.traffic_gbs,
            overlap=cal.overlap,
            quant_call_seconds=cal.quant_call_seconds or 0.0,
        )
    if device.type == "cpu":
        return StepModel(_cpu_rate(), calibration.CPU_OP_SECONDS, None, TYPICAL)
    tflops = _table_tflops(device, family)
    return StepModel(
        rate_flops=tflops * 1e12 * calibration.GPU_EFFICIENCY if tflops else None,
        op_seconds=calibration.GPU_OP_SECONDS,
        bandwidth_gbs=device.bandwidth_gbs,
        source=TYPICAL,
    )


def _table_tflops(device: Device, precision: str) -> float | None:
    return {
        "bf16": device.bf16_tflops,
        "fp16": device.fp16_tflops,
        "fp32": device.fp32_tflops,
    }[precision.split("-")[0]]


def precision_for(device: Device, cfg: Config | None = None) -> str:
    """The config's train.precision when it names one (the plan of a config is the plan of
    that config), else what training picks on that device for `auto`."""
    if cfg is not None and cfg.train.precision != "auto":
        chosen = cfg.train.precision
        if chosen.startswith("bf16") and device.type == "cuda" and not device.supports_bf16:
            raise PlanError(
                f"train.precision={chosen}: {device.name} has no bf16; use fp16-mixed or auto."
            )
        return chosen
    if device.type == "cpu":
        return "fp32"
    return "bf16-mixed" if device.supports_bf16 else "fp16-mixed"
