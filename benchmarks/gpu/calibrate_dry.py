"""`snug calibrate --device cpu` as the GPU kit's CPU dry run runs it (run.sh --cpu-dry-run):
the same command (snug.cli's main: the series planned and timed in rounds, the fit, the table,
the entry kept in $SNUG_CALIBRATION), on the CPU series' narrow configurations only.

The two steps at the catalog models' own width (CPU_WIDE_SERIES: two layers with the whole
vocabulary, 255 and 262 GFLOP a step) were 45 s of the dry run's 74 s calibrate here, seven
steps each (2026-12-08, 2-core Xeon); the narrow five are a second a round. The dry run checks
that the kit runs, not how well it calibrates a CPU: `snug calibrate --device cpu` is the
whole series, and tests/test_calibrate.py runs a wide step in its own series.

Run: python benchmarks/gpu/calibrate_dry.py
"""

from __future__ import annotations

from snug.cli import main
from snug.plan import calibrate
from snug.runtime.shutdown import exit_now

if __name__ == "__main__":
    calibrate.CPU_WIDE_SERIES = ()
    exit_now(main(["calibrate", "--device", "cpu"]))
