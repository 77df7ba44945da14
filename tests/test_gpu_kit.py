"""The GPU kit (benchmarks/gpu/run.sh) end to end on this CPU, so it cannot rot where no GPU is
at hand (issue 16): `--cpu-dry-run` runs snug calibrate, the stream proof (issue 36), the plan
against real steps and the Trainer baseline with tiny shapes, and writes the same report and CSV
a GPU run writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_kit_runs_end_to_end_on_this_cpu(tmp_path):
    out = tmp_path / "kit"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "--cpu-dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        # the dry run's own budgets (900 s a part) guard against a hang; how fast this CPU is,
        # shared with the rest of the suite, is not what this test checks
        timeout=3 * 900 + 60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("calibrate: rc 0", "stream: rc 0", "reality: rc 0", "baseline: rc 0"):
        assert step in proc.stdout, proc.stdout
    # snug calibrate kept a CPU entry in OUTDIR, and the plans below used it: the CPU series'
    # narrow configurations, each a row (benchmarks/gpu/calibrate_dry.py leaves out the wide)
    from snug.plan.calibrate import CPU_SERIES, CPU_SHRINK

    cal = json.loads((out / "calibration.json").read_text())
    (key,) = cal["devices"]
    steps = cal["devices"][key]["steps"]
    assert key.startswith("cpu: ") and len(steps) == len(CPU_SERIES)
    assert {s["hidden"] for s in steps} == {CPU_SHRINK["hidden_size"]}
    rows = list(csv.DictReader((out / "reality.csv").open()))
    assert len(rows) >= 2  # every configuration of reality.py's CPU_CONFIGS
    for row in rows:
        assert not row["error"], row["error"]
        # the fp32 CPU replay equals the real step's tracked peak (tests/test_plan.py), so a
        # kit that compares the wrong things shows here
        assert abs(float(row["peak_error"])) < 0.02, row
        assert row["calibration"] == f"calibrated on {cal['devices'][key]['date']} ({key})"
        assert float(row["predicted_step_s"]) > 0 and float(row["measured_step_s"]) > 0
    # the stream proof (memory.offload_weights): streamed and resident QLoRA, each planned
    streamed, resident = csv.DictReader((out / "stream.csv").open())
    assert (streamed["config"], resident["config"]) == ("streamed", "resident")
    for row in (streamed, resident):
        assert not row["error"], row["error"]
        assert abs(float(row["peak_error"])) < 0.05, row  # the CPU replay is exact (tests/)
        assert float(row["tokens_per_s"]) > 0 and float(row["predicted_step_s"]) > 0
    # the streamed run's layers lived in host memory, as many bytes as the plan says
    assert float(streamed["measured_host_gib"]) > 0 and not float(resident["predicted_host_gib"])
    assert float(streamed["predicted_host_gib"]) == float(streamed["measured_host_gib"])
    assert float(streamed["streamed_gb_per_step"]) > 0
    report = (out / "report.md").read_text()
    assert "# memory.offload_weights on CPU dry run" in report and "Tokens/s streamed" in report
    assert "## snug calibrate" in report and "saved to" in report
    assert "snug / Trainer tokens/s" in report


PARTS = ("calibrate", "stream_proof.py", "reality.py", "baseline.py")


def test_the_dry_runs_budgets_guard_against_a_hang_not_a_busy_cpu(tmp_path):
    """On the AMD kind, with the suite's other worker beside it, the dry run's calibrate took
    121 s and its 120 s budget failed the kit (issue 33): on a CPU each part may take up to
    900 s. A `timeout` and a python of our own record the budgets the kit passes, and run
    nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "budgets.txt"
    (bin_dir / "timeout").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake_python = bin_dir / "python"
    fake_python.write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(fake_python)}
    for key in ("CALIBRATE_S", "STREAM_S", "REALITY_S", "BASELINE_S", "STREAM_ARGS"):
        env.pop(key, None)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "--cpu-dry-run", str(tmp_path / "kit")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    budgets = {}
    for line in log.read_text().splitlines():  # "SECONDS PYTHON ARGS..."
        part = next(p for p in PARTS if p in line)
        budgets[part] = int(line.split()[0])
        if part == "stream_proof.py":  # the GPU's options (a 14B model's layers) stay out
            assert "--layers" not in line and "--cap-gib" not in line, line
    assert set(budgets) == set(PARTS)
    assert min(budgets.values()) >= 900, budgets


def test_the_kit_gives_snug_its_entry_point_where_it_is_not_installed(tmp_path):
    """On a device the kit runs snug from the source folder, not installed (no .venv carried):
    the registry's door finds snug's own methods and stages through its entry point, so
    benchmarks/gpu/metadata.py writes the metadata run.sh then puts on the path (issue 34's
    review: every command of the kit would have stopped with 'install snug')."""
    import importlib.metadata
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu/metadata.py"), str(tmp_path)], check=True
    )
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path)])
    assert dist.name == "snug" and dist.version == __import__("snug").__version__
    (door,) = dist.entry_points.select(group="snug.plugins")
    assert (door.name, door.value) == ("snug", "snug.builtin")
    assert "metadata.py /tmp/snug-metadata" in (ROOT / "benchmarks/gpu/run.sh").read_text()
