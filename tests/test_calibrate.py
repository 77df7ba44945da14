"""`snug calibrate` and what the plan does with a calibration (issue 16)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from snug.plan import calibration
from snug.plan.calibration import Calibration, CalibrationError, StepModel
from snug.plan.fitting import fit_step_time


def _entry(device: str, **extra) -> Calibration:
    keys = dict(
        device=device,
        date="2026-11-27",
        precision="fp32",
        rate_flops=2e10,
        op_seconds=50e-6,
        step_error=(-0.05, 0.04),
    )
    keys.update(extra)
    return Calibration(**keys)


def test_the_fit_recovers_the_rate_and_the_cost_per_op():
    a, b = 1 / 3e10, 20e-6  # seconds per FLOP, seconds per op
    rows = [(f, o, a * f + b * o) for f, o in ((1e9, 3000), (4e10, 3000), (2e10, 9000), (1e8, 500))]
    fa, fb = fit_step_time(rows)
    assert fa == pytest.approx(a, rel=1e-9) and fb == pytest.approx(b, rel=1e-9)


def test_the_fit_leaves_out_what_the_memory_traffic_already_explains():
    a, b = 1 / 3e10, 20e-6
    rows = [(1e9, 3000, 0.2), (4e10, 3000, 0.05), (2e10, 9000, 0.5), (1e8, 500, 0.01)]
    rows = [(f, o, a * f + b * o + k, k) for f, o, k in rows]
    fa, fb = fit_step_time(rows)
    assert fa == pytest.approx(a, rel=1e-9) and fb == pytest.approx(b, rel=1e-9)


def test_a_fitted_rate_beyond_one_large_matmul_is_held_at_it():
    from snug.plan.fitting import fit_rates

    # steps whose traffic at 1 GB/s takes nearly all their time: a free fit would ask for a
    # FLOP rate far beyond the 1e10 FLOP/s of the device's best matmul
    rows = [
        {"flops": f, "ops": o, "traffic": t, "seconds": t / 1e9 + f / 1e13 + o * 1e-5}
        for f, o, t in ((1e9, 100, 5e8), (4e9, 300, 1e9), (2e9, 900, 2e9))
    ]
    a, b = fit_rates(rows, matmul=1e10, bandwidth_gbs=1.0)
    assert a == pytest.approx(1 / 1e10)
    assert b >= 0
    # one a free fit can reach stays as fitted
    rows = [{**r, "seconds": r["traffic"] / 1e9 + r["flops"] / 1e9 + r["ops"] * 1e-5} for r in rows]
    a, b = fit_rates(rows, matmul=1e10, bandwidth_gbs=1.0)
    assert a == pytest.approx(1 / 1e9) and b == pytest.approx(1e-5)


def test_the_replay_counts_the_bytes_that_ops_without_flops_move():
    import torch

    from snug.plan.tracker import ModuleNames, PlanTracker

    model = torch.nn.Linear(4, 4)
    x = torch.randn(256, 512)  # 512 KiB
    with ModuleNames(model) as names, PlanTracker(1, names, 32000) as tracker:
        tracker.counting = True
        y = x.relu()  # reads x, writes y: 1 MiB
        v = y.view(512, 256).t()  # views move nothing
        z = v + v  # reads both, writes one: 1.5 MiB
        before = tracker.traffic
        w = x @ x.t()  # a matmul: FLOPs, not counted as traffic
    assert before == (2 + 3) * x.numel() * 4
    assert tracker.traffic == before
    assert tracker.flops == 2 * 256 * 512 * 256
    assert z.shape == (256, 512) and w.shape == (256, 256)


def test_the_fit_keeps_both_costs_at_least_zero():
    # steps that get cheaper with more ops would need a negative cost per op: one term is kept
    rows = [(1e9, 1000, 0.5), (2e9, 100, 1.0), (4e9, 10, 2.0)]
    a, b = fit_step_time(rows)
    assert a > 0 and b >= 0
    assert a * 2e9 + b * 100 == pytest.approx(1.0, rel=0.05)


def test_the_step_time_is_the_longer_of_compute_and_reading_weights_plus_the_ops():
    model = StepModel(rate_flops=1e12, op_seconds=1e-5, bandwidth_gbs=1000.0, source="x")
    assert model.seconds(2e12, 1000, 10**9) == pytest.approx(2.0 + 0.01)
    assert model.seconds(1e9, 1000, 10**12) == pytest.approx(3.0 + 0.01)  # 3 reads of 1 TB
    assert StepModel(None, 1e-5, None, "x").seconds(1e9, 10, 0) is None


def test_on_a_gpu_the_hosts_dispatch_overlaps_the_devices_work_and_4bit_matmuls_add():
    gpu = StepModel(1e12, 1e-5, None, "x", traffic_gbs=1.0, overlap=True, quant_call_seconds=1e-3)
    # device: 2 s of FLOPs + 1 s of traffic; host: 1,000 ops at 10 us: the device's 3 s
    assert gpu.seconds(2e12, 1000, 0, 10**9) == pytest.approx(3.0)
    # a launch-bound step: 10**6 ops are 10 s of host work, longer than the device's 3 s
    assert gpu.seconds(2e12, 10**6, 0, 10**9) == pytest.approx(10.0)
    assert gpu.seconds(2e12, 1000, 0, 10**9, quant_calls=500) == pytest.approx(3.5)
    cpu = StepModel(1e12, 1e-5, None, "x", traffic_gbs=1.0)  # the host does the work: a sum
    assert cpu.seconds(2e12, 1000, 0, 10**9) == pytest.approx(3.01)


def test_the_overlapped_fit_recovers_the_rate_and_the_cost_per_op():
    from snug.plan.fitting import fit_overlapped

    a, b = 1 / 4e14, 15e-6  # a card at half its best matmul rate of 8e14
    shapes = ((6e11, 11000, 0.003), (7e12, 7000, 0.025), (3e13, 11600, 0.07), (1.2e14, 12000, 0.28))
    rows = [(f, o, max(a * f + k, b * o), k) for f, o, k in (*shapes, (1.5e14, 26000, 0.33))]
    fa, fb = fit_overlapped(rows, least=1 / 8e14)
    assert fa == pytest.approx(a, rel=0.01) and fb == pytest.approx(b, rel=0.01)
    for f, o, t, k in rows:
        assert max(fa * f + k, fb * o) == pytest.approx(t, rel=0.01)
    # rows a rate beyond the best matmul would fit are held at it
    fast = [(f, o, max(f / 2e15 + k, b * o), k) for f, o, t, k in rows]
    assert fit_overlapped(fast, least=1 / 8e14)[0] == pytest.approx(1 / 8e14)


def test_when_every_step_is_on_one_side_of_the_maximum_the_sum_is_fitted():
    from snug.plan.fitting import fit_model

    # every step launch-bound: the maximum would leave the FLOP rate anything (the fit's edge,
    # the best matmul's); the sum takes both costs from every row
    rows = [
        {"flops": f, "ops": o, "traffic": 0, "quant_calls": 0, "seconds": o * 20e-6 + f / 2e14}
        for f, o in ((1e11, 10000), (4e11, 12000), (2e11, 30000), (8e11, 20000))
    ]
    model = fit_model(rows, matmul=8e14, bandwidth_gbs=3000.0, overlap=True)
    assert not model.overlap
    assert model.rate_flops == pytest.approx(2e14, rel=1e-6)
    assert model.op_seconds == pytest.approx(20e-6, rel=1e-6)


def test_a_4bit_step_that_fails_leaves_the_rest_of_the_calibration(monkeypatch):
    """On a CPU the series is timed in rounds, each row its fastest step, the matmul and copy
    their best of the rounds; a 4-bit configuration that fails as it starts or in a round is
    skipped with the reason and the rest still calibrates."""
    import time

    import torch

    from snug.plan import calibrate as calibrate_module

    order = []  # which configuration each timed step was

    def step(i, seconds):
        order.append(i)
        if i == 3 and order.count(3) == 2:
            raise RuntimeError("bitsandbytes: kernel failed in round 2\nand more")
        time.sleep(seconds)

    def trial(i, seconds, quant="none"):
        keys = {"flops": 1e9 * (i + 1), "ops": 1000 * (3 - i), "traffic": 0, "quant_calls": 0}
        return calibrate_module.Trial(
            {**keys, "quant": quant},
            list,
            lambda batch: step(i, seconds),
            torch.device("cpu"),
            None,
        )

    made = iter([trial(0, 0.003), trial(1, 0.05), trial(2, 0.04), trial(3, 0.01, "4bit")])

    def start_one(spec, device, precision, narrow=True):
        if spec[3] == 16:
            raise RuntimeError("bitsandbytes: no kernel for this device\nand more")
        return next(made)

    rates = iter(range(100, 200))  # each call its own value: the best is the last
    monkeypatch.setattr(calibrate_module, "matmul_rate", lambda where: 1e12 * next(rates))
    monkeypatch.setattr(calibrate_module, "copy_bandwidth", lambda where: 1.0 * next(rates))
    qlora = ("Qwen/Qwen2.5-0.5B", "lora", 1, 32, 1, "4bit")
    series = (*calibrate_module.CPU_SERIES[:3], qlora[:3] + (16,) + qlora[4:], qlora)
    monkeypatch.setattr(calibrate_module, "CPU_SERIES", series)
    monkeypatch.setattr(calibrate_module, "CPU_WIDE_SERIES", ())
    monkeypatch.setattr(calibrate_module, "start_one", start_one)
    lines = []
    cal = calibrate_module.calibrate("cpu", progress=lines.append)
    assert len(cal.steps) == 3 and cal.quant_call_seconds is None
    assert "  skipped: the 4-bit step failed (bitsandbytes: no kernel for this device)" in lines
    assert "  skipped: the 4-bit step failed (bitsandbytes: kernel failed in round 2)" in lines
    # rounds over the series (the 4-bit one dropped in round 2), each row its fastest step
    rounds = calibrate_module.CPU_ROUNDS
    assert order == [0, 1, 2, 3, 0, 1, 2, 3] + [0, 1, 2] * (rounds - 2)
    for row, slept in zip(cal.steps, (0.003, 0.05, 0.04), strict=True):
        assert row["seconds"] == row["seconds_spread"][0] >= slept
    # measured before the rounds and after each, alternating: the best of each kept
    assert cal.matmul_flops == 1e12 * (100 + 2 * rounds) and cal.bandwidth_gbs == 101 + 2 * rounds
    assert cal.h2d_gbs > 0  # a real clone's rate: what streaming copies at on a CPU


def test_calibrate_counts_what_it_builds_and_times_with_the_time_left(monkeypatch, capsys):
    """`snug calibrate --json`: the configurations built and the steps timed are counted on
    stderr, a line at a time (here at every step), and stdout is the JSON alone. The steps
    are stood in for: the counting is the point."""
    import torch

    from snug.cli import main
    from snug.plan import calibrate as calibrate_module
    from snug.runtime import progress

    def start_one(spec, device, precision, narrow=True):
        i = calibrate_module.CPU_SERIES.index(spec)
        keys = {"flops": 1e9 * (i + 1), "ops": 1000 * (3 - i), "traffic": 0, "quant_calls": 0}
        # a step takes as long as the formula says (rate 1e12, 1 us per op): the fit is exact
        seconds = keys["flops"] / 1e12 + keys["ops"] * 1e-6
        trial = calibrate_module.Trial(
            {**keys, "quant": "none"}, list, lambda batch: None, torch.device("cpu"), None
        )
        trial.times = [seconds] * calibrate_module.CPU_ROUNDS
        monkeypatch.setattr(trial, "timed_step", lambda: None)
        return trial

    monkeypatch.setattr(calibrate_module, "CPU_SERIES", calibrate_module.CPU_SERIES[:3])
    monkeypatch.setattr(calibrate_module, "CPU_WIDE_SERIES", ())
    monkeypatch.setattr(calibrate_module, "start_one", start_one)
    monkeypatch.setattr(calibrate_module, "matmul_rate", lambda where: 2e12)
    monkeypatch.setattr(calibrate_module, "copy_bandwidth", lambda where: 10.0)
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    assert main(["calibrate", "--device", "cpu", "--json", "--no-save"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["steps"]) == 3
    rounds = calibrate_module.CPU_ROUNDS
    built, timed = "calibrate: building and warming up", f"calibrate: {rounds} rounds of one step"
    lines = err.splitlines()
    assert f"{built}: 3 configurations" in lines
    assert any(line.startswith(f"{built}: 1 of 3 configurations, 0 s, about") for line in lines)
    assert f"{timed} of each: {3 * rounds} steps" in lines
    assert any(line.startswith(f"{timed} of each: 4 of {3 * rounds} steps") for line in lines)
    assert any(line.startswith(f"{timed} of each: {3 * rounds} steps done in") for line in lines)


def test_the_gpu_series_runs_one_configuration_at_a_time(monkeypatch):
    """calibrate("cuda") measures each configuration with measure_one (its steps in a row, the
    card holding one at a time), not in the CPU's rounds, and the matmul, the copy and the
    host-to-device copy after them."""
    from snug.plan import calibrate as calibrate_module
    from snug.plan.hardware import Device

    calls = []

    def measure_one(spec, device, precision, narrow=True):
        calls.append(("measure", spec[3]))
        i = len(calls)
        return {
            "flops": 1e12 * i, "ops": 1000 * (7 - i), "traffic": 0, "quant_calls": 0,
            "seconds": 0.01 * i, "measured_reserved": 1.0, "planned_reserved": 1.0,
        }  # fmt: skip

    monkeypatch.setattr(calibrate_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(calibrate_module, "cuda_context", lambda: 2**29)
    card = Device(name="Some GPU", type="cuda", memory_bytes=None)
    monkeypatch.setattr(calibrate_module, "device_for", lambda kind, gpu: card)
    monkeypatch.setattr(calibrate_module, "measure_one", measure_one)
    monkeypatch.setattr(
        calibrate_module, "start_one", lambda *a, **k: pytest.fail("the CPU's rounds on a GPU")
    )
    monkeypatch.setattr(
        calibrate_module, "matmul_rate", lambda where: calls.append("matmul") or 1e15
    )
    monkeypatch.setattr(
        calibrate_module, "copy_bandwidth", lambda where: calls.append("copy") or 3000.0
    )
    monkeypatch.setattr(
        calibrate_module, "h2d_bandwidth", lambda where: calls.append(where.type) or 52.0
    )
    series = calibrate_module.GPU_SERIES
    cal = calibrate_module.calibrate("cuda")
    assert calls == [("measure", s[3]) for s in series] + ["matmul", "copy", "cuda"]
    assert len(cal.steps) == len(series) and cal.context_bytes == 2**29
    assert cal.h2d_gbs == 52.0  # the pinned host-to-device copy, kept in the entry


def test_calibration_learns_what_each_4bit_matmul_costs_from_the_qlora_step():
    from snug.plan.fitting import fit_model

    a, b, q = 1 / 4e14, 15e-6, 300e-6
    rows = [
        {"flops": f, "ops": o, "traffic": t, "quant_calls": n}
        for f, o, t, n in (
            (6e11, 11000, 9e9, 0),
            (7e12, 7000, 7e10, 0),
            (3e13, 11600, 2e11, 0),
            (1.2e14, 12000, 8e11, 0),
            (3e13, 11000, 2.6e11, 336),
        )
    ]
    for r in rows:
        device = a * r["flops"] + r["traffic"] / 3e12
        r["seconds"] = max(device, b * r["ops"]) + q * r["quant_calls"]
    model = fit_model(rows, matmul=8e14, bandwidth_gbs=3000.0, overlap=True)
    assert model.overlap and model.rate_flops == pytest.approx(4e14, rel=0.01)
    assert model.quant_call_seconds == pytest.approx(q, rel=0.02)
    # on a CPU the same rows are fitted as a sum and the 4-bit cost is what the sum leaves
    assert not fit_model(rows, matmul=8e14, bandwidth_gbs=3000.0, overlap=False).overlap
    # a series with no 4-bit step (a CPU's) learns no 4-bit cost
    assert fit_model(rows[:4], 8e14, 3000.0, overlap=True).quant_call_seconds == 0.0


def test_saving_keeps_every_other_device_and_reads_back(tmp_path):
    path = tmp_path / "sub" / "calibration.json"
    calibration.save(_entry("H200", precision="bf16-mixed", context_bytes=536870912), path)
    calibration.save(_entry("cpu: Some CPU x2 threads"), path)
    calibration.save(_entry("H200", precision="bf16-mixed", rate_flops=3e14), path)
    raw = json.loads(path.read_text())
    assert sorted(raw["devices"]) == ["H200", "cpu: Some CPU x2 threads"]
    back = calibration.load("H200", path)
    assert back.rate_flops == 3e14 and back.step_error == (-0.05, 0.04)
    assert calibration.load("A100 80GB", path) is None
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary left


def test_a_card_snugs_kit_calibrated_plans_with_the_shipped_entry_until_the_user_calibrates(
    tmp_path, tiny_llama
):
    """The H100 entry snug ships (its GPU kit's run on that card): used, and named with its
    source, for a card the user never calibrated; the user's own entry replaces it; a card the
    kit never ran keeps the typical values."""
    from snug.plan.hardware import find_gpu

    h100 = find_gpu("H100 SXM").name
    shipped = calibration.load(h100, calibration.SHIPPED)
    assert shipped.source.startswith("shipped with snug")
    report = Path(__file__).parents[1] / shipped.source.split("(")[1].split(",")[0]
    assert report.is_file(), report  # the run it names is in the repository
    # what `snug calibrate --device cuda` keeps: the overlapped fit, a rate no faster than the
    # card's one large matmul, a 4-bit cost, the measured context and reserve ratio
    assert shipped.overlap and 0 < shipped.rate_flops <= shipped.matmul_flops
    assert shipped.quant_call_seconds > 0 and shipped.traffic_gbs == shipped.bandwidth_gbs
    assert shipped.context_bytes > 0 and 0.9 < shipped.reserved_ratio < 1.1
    gpu = ["--model", str(tiny_llama), "--method", "lora", "--seq-len", "64", "--gpu", h100]
    plan = _plan_json(tmp_path, *gpu)  # the user's file: none
    assert plan["calibration"] == shipped.label() and "shipped with snug" in plan["calibration"]
    terms = plan["candidates"][0]["reserved_terms"]
    assert terms["cuda_context"]["bytes"] == shipped.context_bytes
    own = tmp_path / "own.json"
    calibration.save(_entry(h100, precision="bf16-mixed", rate_flops=1e14), own)
    assert _plan_json(tmp_path, *gpu, cal_file=own)["calibration"] == (
        f"calibrated on 2026-11-27 ({h100})"
    )
    other = _plan_json(tmp_path, *gpu[:-1], "H100 PCIe")
    assert other["calibration"] == "typical values, not calibrated"


@pytest.mark.parametrize("text", ["{not json", '{"version": 7, "devices": {}}', "[1, 2]"])
def test_a_file_that_is_not_a_calibration_is_named_and_never_overwritten(tmp_path, text):
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=str(path)):
        calibration.load("H200", path)
    with pytest.raises(CalibrationError, match=str(path)):
        calibration.save(_entry("H200"), path)
    assert path.read_text() == text


@pytest.mark.parametrize(
    "key, value, must",
    [
        ("rate_flops", float("nan"), "a finite number above 0"),
        ("rate_flops", 0, "a finite number above 0"),
        ("op_seconds", -1e-6, "a finite number of 0 or more"),
        ("bandwidth_gbs", float("inf"), "a finite number above 0"),
        ("reserved_ratio", "1.1", "a finite number above 0"),
        ("step_error", [float("nan"), 0.1], "two finite numbers"),
    ],
)
def test_a_calibration_number_that_is_not_finite_or_not_positive_is_named(
    tmp_path, key, value, must
):
    """A number the plan would compute with (NaN, inf, zero or negative, a string) is refused
    when the file is read, naming the file, the device and the key, never planned with."""
    path = tmp_path / "calibration.json"
    calibration.save(_entry("H200"), path)
    raw = json.loads(path.read_text())
    raw["devices"]["H200"][key] = value
    path.write_text(json.dumps(raw))  # Python's json writes NaN and Infinity; it reads them too
    with pytest.raises(CalibrationError) as e:
        calibration.load("H200", path)
    assert str(e.value).startswith(f"{path}: the entry for 'H200': {key} is ")
    assert f"but must be {must}; run snug calibrate again" in str(e.value)


def test_a_nan_in_the_calibration_stops_the_plan_in_one_line(tmp_path, tiny_llama, capsys):
    from snug.cli import main
    from snug.plan.hardware import find_gpu

    path = tmp_path / "calibration.json"
    h200 = find_gpu("H200").name
    calibration.save(_entry(h200, rate_flops=float("nan")), path)
    old = os.environ["SNUG_CALIBRATION"]
    os.environ["SNUG_CALIBRATION"] = str(path)
    try:
        args = ["--model", str(tiny_llama), "--method", "lora", "--seq-len", "64"]
        code = main(["plan", *args, "--gpu", "H200"])
    finally:
        os.environ["SNUG_CALIBRATION"] = old
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith(f"error: {path}: the entry for '{h200}': rate_flops is")
    assert "nan" in line


def _plan_json(tmp_path, *args, cal_file=None) -> dict:
    """`snug plan --json ARGS` in this process, with `cal_file` as the calibration file."""
    import contextlib
    import io

    from snug.cli import main

    out = io.StringIO()
    old = os.environ.get("SNUG_CALIBRATION")
    os.environ["SNUG_CALIBRATION"] = str(cal_file or tmp_path / "none.json")
    try:
        with contextlib.redirect_stdout(out):
            assert main(["plan", "--json", *args]) == 0
    finally:
        os.environ["SNUG_CALIBRATION"] = old
    return json.loads(out.getvalue())


def test_the_plan_uses_a_matching_calibration_and_says_so(tmp_path, tiny_llama, monkeypatch):
    from snug.plan.hardware import Device, device_key, find_gpu

    gpu = ["--model", str(tiny_llama), "--method", "lora", "--seq-len", "64"]
    typical = _plan_json(tmp_path, *gpu, "--gpu", "H200")
    assert typical["calibration"] == "typical values, not calibrated"
    cand = typical["candidates"][0]
    assert cand["reserved_terms"]["cuda_context"]["bytes"] == 2**29
    # torch names the card "NVIDIA H200"; the entry is kept under the table's name
    key = device_key(Device(name="NVIDIA H200", type="cuda", memory_bytes=None))
    assert key == find_gpu("h200").name
    cal_file = tmp_path / "calibration.json"
    calibration.save(
        _entry(
            key,
            precision="bf16-mixed",
            rate_flops=1e14,
            op_seconds=30e-6,
            context_bytes=600 * 2**20,
            reserved_ratio=1.10,
        ),
        cal_file,
    )
    calibrated = _plan_json(tmp_path, *gpu, "--gpu", "H200", cal_file=cal_file)
    assert calibrated["calibration"] == f"calibrated on 2026-11-27 ({key})"
    c = calibrated["candidates"][0]
    assert c["peak_bytes"] == cand["peak_bytes"]  # the replay itself is not calibrated
    bandwidth = find_gpu("H200").bandwidth_gbs * 1e9
    compute = max(c["flops_per_step"] / 1e14, 3 * c["weights_bytes"] / bandwidth)
    # an entry from before the overlapped fit: the host's and the device's parts add up
    assert c["step_seconds"] == pytest.approx(compute + c["ops_per_step"] * 30e-6)
    assert c["step_seconds"] != pytest.approx(cand["step_seconds"])
    # one the GPU series fitted: the longer of the two, and its 4-bit cost reaches the model
    overlapped = _entry(
        key, precision="bf16-mixed", rate_flops=1e14, op_seconds=30e-6, overlap=True
    )
    calibration.save(dataclasses.replace(overlapped, quant_call_seconds=2e-4), cal_file)
    o = _plan_json(tmp_path, *gpu, "--gpu", "H200", cal_file=cal_file)["candidates"][0]
    assert o["quant_calls_per_step"] == 0  # no 4-bit weights in this plan
    assert o["step_seconds"] == pytest.approx(max(compute, c["ops_per_step"] * 30e-6))
    from snug.plan.timing import device_model

    monkeypatch.setenv("SNUG_CALIBRATION", str(cal_file))
    model = device_model(find_gpu("H200"), "bf16-mixed")
    assert model.overlap and model.quant_call_seconds == 2e-4
    assert c["reserved_terms"]["cuda_context"]["bytes"] == 600 * 2**20
    replayed = cand["peak_bytes"] + cand["reserved_terms"]["allocator"]["bytes"]
    assert c["peak_bytes"] + c["reserved_terms"]["allocator"]["bytes"] == pytest.approx(
        replayed * 1.10, abs=1
    )
    # another card's plan is not touched by the H200 entry
    other = _plan_json(tmp_path, *gpu, "--gpu", "A100 80GB", cal_file=cal_file)
    assert other["calibration"] == "typical values, not calibrated"


def test_the_cpu_plan_reads_its_own_entry(tmp_path, tiny_llama):
    from snug.plan.hardware import cpu_device, device_key

    cal_file = tmp_path / "calibration.json"
    calibration.save(_entry(device_key(cpu_device()), rate_flops=1e9, op_seconds=1e-3), cal_file)
    args = ["--model", str(tiny_llama), "--method", "lora", "--seq-len", "64", "--device", "cpu"]
    plan = _plan_json(tmp_path, *args, cal_file=cal_file)
    c = plan["candidates"][0]
    assert plan["calibration"].startswith("calibrated on 2026-11-27 (cpu: ")
    assert c["step_seconds"] == pytest.approx(c["flops_per_step"] / 1e9 + c["ops_per_step"] * 1e-3)
    # an entry fitted with the traffic term charges the replay's traffic at its bandwidth
    calibration.save(
        _entry(device_key(cpu_device()), rate_flops=1e9, op_seconds=1e-3, traffic_gbs=2.0),
        cal_file,
    )
    c = _plan_json(tmp_path, *args, cal_file=cal_file)["candidates"][0]
    assert c["traffic_per_step"] > 0
    assert c["step_seconds"] == pytest.approx(
        c["flops_per_step"] / 1e9 + c["ops_per_step"] * 1e-3 + c["traffic_per_step"] / 2e9
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_calibrating_a_gpu_that_is_not_there_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from snug.cli import main

    cal_file = tmp_path / "calibration.json"
    monkeypatch.setenv("SNUG_CALIBRATION", str(cal_file))
    assert main(["calibrate", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: snug calibrate --device cuda: torch sees no CUDA device here."
    )
    assert main(["calibrate", "--device", "cpu", "--gpu", "H200"]) == 2
    assert "--gpu names the GPU calibrated" in capsys.readouterr().err
    assert not cal_file.exists()


def test_calibrate_on_this_cpu_measures_and_keeps_an_entry(tmp_path, capsys, monkeypatch):
    """The whole command, in this process, on this machine's CPU, with three of the series'
    configurations (the GPU kit's dry run, tests/test_gpu_kit.py, runs its five narrow ones), a
    step at a catalog model's own width as CPU_WIDE_SERIES has, and a QLoRA one as the GPU
    series has (its bitsandbytes model built and loaded as on a GPU): real steps timed, the
    fitted step times near the measured ones, the entry kept, progress on stderr under --json."""
    from snug.cli import main
    from snug.plan import calibrate as calibrate_module

    series = calibrate_module.CPU_SERIES
    qlora = ("Qwen/Qwen2.5-0.5B", "lora", True, 32, 1, "4bit")
    monkeypatch.setattr(calibrate_module, "CPU_SERIES", (series[0], series[2], series[4], qlora))
    wide = ("Qwen/Qwen2.5-0.5B", "lora", False, 16, 1, "none")  # at its own width, briefly
    monkeypatch.setattr(calibrate_module, "CPU_WIDE_SERIES", (wide,))
    cal_file = tmp_path / "calibration.json"
    monkeypatch.setenv("SNUG_CALIBRATION", str(cal_file))
    assert main(["calibrate", "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    cal = json.loads(out)
    assert cal["device"].startswith("cpu: ") and cal["rate_flops"] > 0
    assert len(cal["steps"]) == 5 and all(s["seconds"] > 0 for s in cal["steps"])
    assert [s["quant_calls"] > 0 for s in cal["steps"]] == [False, False, False, True, False]
    # the narrow rows at CPU_SHRINK's width, the last at Qwen2.5-0.5B's own (896), two layers
    assert [s["hidden"] for s in cal["steps"]] == [256] * 4 + [896]
    assert {s["layers"] for s in cal["steps"]} == {2}
    assert not cal["overlap"] and cal["quant_call_seconds"] >= 0
    # each fitted time is the formula with the fitted and measured values (FLOPs over the
    # rate, traffic over the copy bandwidth, ops times the cost), and it explains every narrow
    # step within a factor of 2: the steps are timed while the other test worker runs, and one
    # may take twice its time; on a quiet machine the fit is far closer (printed as step_error).
    # The wide step of 16 tokens is far from what one rate fits (a CPU's matmul rate grows with
    # the matrices' size; seen at 0.31x its measured time under load), so only its formula is
    # checked here
    for s in cal["steps"]:
        formula = s["flops"] / cal["rate_flops"] + s["ops"] * cal["op_seconds"]
        formula += s["traffic"] / (cal["traffic_gbs"] * 1e9)
        formula += s["quant_calls"] * cal["quant_call_seconds"]
        assert s["fitted_seconds"] == pytest.approx(formula, rel=1e-9)
    assert cal["traffic_gbs"] == cal["bandwidth_gbs"] > 0
    narrow = [s["fitted_seconds"] / s["seconds"] - 1 for s in cal["steps"][:4]]
    assert all(-1 / 2 < e < 1 for e in narrow), narrow
    lo, hi = cal["step_error"]
    assert lo <= min(narrow) and max(narrow) <= hi
    saved = json.loads(cal_file.read_text())
    assert list(saved["devices"]) == [cal["device"]]
    assert "1 x 32" in err and "lora, 4bit" in err  # progress went to stderr under --json


def test_the_gpu_series_path_times_one_configuration_at_a_time_and_takes_the_median(monkeypatch):
    """measure_one, as the GPU series runs each configuration (here on the CPU, narrow): a
    warm-up step, then TIMED_STEPS timed steps in a row, the row's seconds their median."""
    import statistics

    from snug.plan import calibrate as calibrate_module
    from snug.plan.hardware import cpu_device

    trials, start_one = [], calibrate_module.start_one

    def kept(*args, **kwargs):
        trials.append(start_one(*args, **kwargs))
        return trials[-1]

    monkeypatch.setattr(calibrate_module, "start_one", kept)
    spec = ("Qwen/Qwen2.5-0.5B", "lora", False, 16, 1, "none")
    row = calibrate_module.measure_one(spec, cpu_device(), "fp32")
    times = trials[0].times
    assert len(times) == calibrate_module.TIMED_STEPS
    assert row["seconds"] == statistics.median(times) > 0
    assert row["seconds_spread"] == [min(times), max(times)]
    assert row["hidden"] == calibrate_module.CPU_SHRINK["hidden_size"] and row["flops"] > 0
