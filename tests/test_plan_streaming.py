"""What memory.offload_weights costs in a plan (issue 36): the step time of the streamed copies
(snug/plan/calibration.py), the rate they run at (the GPU table's PCIe figure, `snug calibrate`,
a CPU's clone), and the host memory a local run must have (snug/plan/hardware.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from rich.console import Console

from snug.config import load_config
from snug.plan import calibration, search, timing
from snug.plan.calibration import FORWARD_SHARE, Calibration, StepModel
from snug.plan.hardware import GIB, Device, Host, find_gpu, gpu_table, host_shortfall
from snug.plan.simulate import Simulation

GPU = StepModel(1e12, 1e-5, None, "x", h2d_gbs=10.0, h2d_overlaps=True)
CPU = StepModel(1e12, 1e-5, None, "x", h2d_gbs=10.0)


def _sim(host: int = 0, streamed: int = 0, flops: int = 10**12) -> Simulation:
    return Simulation(
        peak_bytes=2 * GIB,
        weights_bytes=GIB,
        flops_per_step=flops,
        ops_per_step=1000,
        optimizer_bytes=0,
        trainable_params=1,
        total_params=2,
        layers_simulated=(2, 3),
        breakdown={"weights": 2 * GIB},
        reserved_bytes=2 * GIB,
        host_bytes=host,
        streamed_bytes_per_step=streamed,
    )


def test_streaming_adds_time_that_grows_with_the_bytes_and_shrinks_with_the_rate():
    for model in (GPU, CPU):
        plain = model.seconds(10**12, 1000, 0)
        times = [model.seconds(10**12, 1000, 0, streamed=n * 10**10) for n in (1, 4, 16)]
        assert plain < times[0] < times[1] < times[2]
        faster = dataclasses.replace(model, h2d_gbs=40.0).seconds(10**12, 1000, 0, streamed=16e10)
        assert faster < times[2]
    # a step without streamed bytes is what it was
    assert GPU.seconds(10**12, 1000, 0) == pytest.approx(1.0 + 1000 * 1e-5)


def test_a_gpu_overlaps_the_copies_with_the_pass_they_belong_to():
    device = 1.0  # 1e12 FLOPs at 1e12 FLOP/s; no host part to keep the numbers plain
    model = dataclasses.replace(GPU, op_seconds=0.0)
    # copies that keep up with each pass cost nothing: forward's half (1 GB at 10 GB/s = 0.1 s)
    # runs beside forward's quarter of the second
    assert model.seconds(10**12, 0, 0, streamed=2 * 10**9) == pytest.approx(device)
    # copies far slower than the compute: the step is the copies
    assert model.seconds(10**12, 0, 0, streamed=10**12) == pytest.approx(100.0)
    # near the crossover forward waits on its copies while backward does not: more than both
    copies = 1.0  # 10 GB at 10 GB/s
    both = model.seconds(10**12, 0, 0, streamed=10**10)
    assert both > max(device, copies)
    assert both == pytest.approx(max(0.25, 0.5) + max(0.75, 0.5))
    # without checkpointing forward is a third of the device's time
    third = model.seconds(10**12, 0, 0, streamed=10**10, forward_share=FORWARD_SHARE[False])
    assert third == pytest.approx(max(1 / 3, 0.5) + max(2 / 3, 0.5))
    # a CPU makes its copies itself: they add up
    cpu = dataclasses.replace(CPU, op_seconds=0.0)
    assert cpu.seconds(10**12, 0, 0, streamed=10**10) == pytest.approx(device + copies)


def test_a_step_that_streams_with_no_rate_known_is_an_error_not_a_silent_zero():
    with pytest.raises(ValueError, match="host-to-device"):
        StepModel(1e12, 1e-5, None, "x").seconds(10**12, 0, 0, streamed=10**9)


def test_every_gpu_has_a_pcie_link_and_its_practical_rate():
    rows = gpu_table()
    per_x16 = {}
    for row in rows:
        gen, lanes = row["pcie_link"].split(" x")
        rate = float(row["pcie_h2d_gbs"])
        per_x16.setdefault(gen, set()).add(round(rate * 16 / int(lanes), 6))
    # one measured figure per generation, scaled by the lanes, each below the link's rate
    link = {"3.0": 15.75, "4.0": 31.5, "5.0": 63.0}
    assert set(per_x16) == set(link)
    for gen, rates in per_x16.items():
        assert len(rates) == 1 and 0.6 * link[gen] < rates.pop() < link[gen]
    assert find_gpu("4060 Ti").pcie_gbs == pytest.approx(find_gpu("4090").pcie_gbs / 2)
    assert find_gpu("H100 SXM").pcie_gbs > find_gpu("A100 80GB").pcie_gbs > find_gpu("T4").pcie_gbs


def test_an_old_calibration_entry_reads_with_no_h2d_rate(tmp_path):
    entry = Calibration("H200", "2026-11-27", "bf16-mixed", 4e14, 1.6e-5, (-0.1, 0.1))
    raw = entry.as_dict()
    del raw["h2d_gbs"]  # written before calibrate measured it
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"version": 1, "devices": {"H200": raw}}))
    assert calibration.load("H200", path).h2d_gbs is None
    raw["h2d_gbs"] = float("nan")
    path.write_text(json.dumps({"version": 1, "devices": {"H200": raw}}))
    with pytest.raises(calibration.CalibrationError, match="h2d_gbs"):
        calibration.load("H200", path)


def test_the_shipped_h100_entry_has_no_invented_h2d_rate():
    assert calibration.load("NVIDIA H100 80GB SXM", calibration.SHIPPED).h2d_gbs is None


def test_the_h2d_rate_is_calibrated_else_the_tables_else_typical(tmp_path, monkeypatch):
    monkeypatch.setenv("SNUG_CALIBRATION", str(tmp_path / "none.json"))
    h200 = find_gpu("H200")
    assert timing.device_model(h200, "bf16-mixed").h2d_gbs is None  # not streaming: no rate
    table = timing.device_model(h200, "bf16-mixed", streams=True)
    assert table.h2d_gbs == h200.pcie_gbs and table.h2d_overlaps
    assert "PCIe" in table.h2d_source
    sized = timing.device_model(find_gpu("24GiB"), "bf16-mixed", streams=True)
    assert sized.h2d_gbs == calibration.TYPICAL_H2D_GBS and "typical" in sized.h2d_source
    entry = Calibration("NVIDIA H200 (SXM)", "2026-12-01", "bf16-mixed", 4e14, 1.6e-5, (0, 0))
    calibration.save(dataclasses.replace(entry, h2d_gbs=48.5))
    measured = timing.device_model(h200, "bf16-mixed", streams=True)
    assert measured.h2d_gbs == 48.5 and "snug calibrate" in measured.h2d_source
    # a CPU copies host to host: a clone's rate measured when the plan is made
    monkeypatch.setattr(timing, "h2d_bandwidth", lambda where: 3.25)
    cpu = Device(name="cpu", type="cpu", memory_bytes=None)
    monkeypatch.setattr(timing, "_cpu_rate", lambda: 1e11)
    model = timing.device_model(cpu, "fp32", calibrated=False, streams=True)
    assert model.h2d_gbs == 3.25 and not model.h2d_overlaps


def test_host_memory_is_checked_only_for_the_machine_that_trains():
    small = Host(memory_bytes=16 * GIB, process_bytes=2 * GIB)
    gpu = dataclasses.replace(find_gpu("4090"), host=small)
    why = host_shortfall(gpu, 15 * GIB)
    assert why.startswith("needs 17.0 GiB of pinned host memory")
    assert why.endswith("this machine has 16.0 GiB")
    assert host_shortfall(gpu, 13 * GIB) is None  # 15 GiB of 16
    assert host_shortfall(find_gpu("4090"), 500 * GIB) is None  # another machine: unknown
    assert host_shortfall(gpu, 0) is None  # nothing streams
    cpu = Device(name="cpu", type="cpu", memory_bytes=16 * GIB, host=small)
    why = host_shortfall(cpu, 10 * GIB, tensors=5 * GIB)  # a CPU's tensors are in RAM too
    assert why.startswith("needs 17.0 GiB of host memory") and "tensors 5.0 GiB" in why


def _evaluated(monkeypatch, sim: Simulation, device: Device, streams: bool = True):
    monkeypatch.setattr(search, "simulate", lambda *a, **k: sim)
    cfg = load_config(None, [f"memory.offload_weights={str(streams).lower()}"])
    model = StepModel(1e12, 1e-5, None, "x", h2d_gbs=25.0, h2d_overlaps=True, h2d_source="t")
    cand = search.Candidate(cfg, "lora")
    return search.evaluate(cand, None, device, 512, model)


def test_a_plan_row_reports_host_bytes_and_fails_a_machine_without_the_ram(monkeypatch):
    sim = _sim(host=20 * GIB, streamed=80 * 10**9)
    roomy = dataclasses.replace(find_gpu("4090"), host=Host(64 * GIB, GIB))
    cand = _evaluated(monkeypatch, sim, roomy)
    assert cand.fits and cand.host_short is None
    row = cand.as_dict()
    assert row["host_bytes"] == 20 * GIB and row["streamed_bytes_per_step"] == 80 * 10**9
    assert row["h2d"] == "25.0 GB/s (t)"
    # the copies (80 GB at 25 GB/s) are most of the step
    assert cand.step_seconds == pytest.approx(max(0.25, 1.6) + max(0.75, 1.6) + 0.01)
    tight = dataclasses.replace(roomy, host=Host(16 * GIB, GIB))
    cand = _evaluated(monkeypatch, sim, tight)
    assert cand.fits is False and "this machine has 16.0 GiB" in cand.host_short
    assert cand.as_dict()["host_short"] == cand.host_short


def test_a_plan_without_streaming_shows_no_host_column(monkeypatch):
    device = find_gpu("4090")
    plain = _evaluated(monkeypatch, _sim(), device, streams=False)
    streamed = _evaluated(monkeypatch, _sim(host=20 * GIB, streamed=8 * 10**10), device)

    def shown(cands) -> str:
        console = Console(record=True, width=200)
        from snug.plan.report import print_table

        print_table(console, cands, device, "t")
        return console.export_text()

    assert "host GiB" not in shown([plain]) and "offload_weights" not in shown([plain])
    text = shown([streamed, plain])
    assert "host GiB" in text and "20.00" in text
    assert "80.0 GB copied per step at 25.0 GB/s (t)" in text


def test_planning_for_this_machines_gpu_knows_its_ram(monkeypatch):
    import torch

    from snug.plan import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA GeForce RTX 4090")
    assert hardware.local_gpu(find_gpu("4090")).host.memory_bytes == hardware.host_memory_bytes()
    assert hardware.local_gpu(find_gpu("H100 SXM")).host is None  # planning for another card


def test_auto_fit_says_when_host_memory_is_what_does_not_fit(monkeypatch):
    from snug.plan import autofit
    from snug.plan.simulate import PlanError

    cfg = load_config(None, ["memory.offload_weights=true", "memory.gpu=8GiB"])
    miss = search.Candidate(cfg, "lora", sim=_sim(host=90 * GIB), fits=False)
    miss.host_short = "needs 91.0 GiB of host memory (...), this machine has 16.0 GiB"
    monkeypatch.setattr(autofit, "search", lambda *a, **k: [miss])
    monkeypatch.setattr(autofit, "model_config", lambda *a, **k: None, raising=False)
    monkeypatch.setattr("snug.plan.hardware.model_config", lambda *a, **k: None)
    with pytest.raises(PlanError, match="offload_weights=true needs 91.0 GiB"):
        autofit.auto_fit(cfg, "cpu", 512)
