"""benchmarks/plan_accuracy.py's real-run child: it wraps snug's own Run.train to read the
kernel's peak RSS, so a change of that method's signature broke every row silently until the
benchmark was next run (issue 36: `take_over`). One tiny real run through it, each way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def plan_accuracy(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import plan_accuracy

    yield plan_accuracy
    sys.modules.pop("plan_accuracy", None)


def test_the_child_measures_a_real_run_both_ways(tmp_path, plan_accuracy):
    text = plan_accuracy.make_text(tmp_path, 32, rows=4)
    model = ROOT / "models/tiny"
    runs = {}
    for way, env in (
        ("controlled", plan_accuracy.CHILD_ENV),
        ("user", {"SNUG_BENCH_WHOLE_RUN": "1"}),
    ):
        keys = plan_accuracy.overrides(model, text, "lora", False, 32, tmp_path / way, steps=2)
        runs[way] = plan_accuracy.real_run(keys, env)
    for got in runs.values():
        assert got["tracked_bytes"] > 0
        assert got["peak_rss_bytes"] > got["tracked_bytes"]  # the interpreter and libraries too
        assert len(got["steps_seconds"]) == 1  # two steps, the first left out
