"""A run tells what happens as events (snug/core/events.py) to sinks: the console,
metrics.jsonl/TensorBoard, status.json, and any sink a caller passes to run_training."""

import io
import math
import re

from rich.console import Console

from snug.config import config_from_dict
from snug.core.events import Step
from snug.train.loop import run_training
from snug.train.sinks import ConsoleSink

from conftest import ROOT


def classify_run(tmp_path, **train) -> dict:
    """A few steps of the cls stage, whose steps have a metric of their own (accuracy)."""
    return {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {"name": "lora", "r": 4},
        "data": {
            "train": str(ROOT / "data/classify/train.jsonl"),
            "cutoff_len": 32,
            "max_samples": 64,
        },
        "train": {"stage": "cls", "micro_batch": 8, "grad_accum": 1, "lr": 1e-3, **train},
        "memory": {"grad_checkpointing": False},
        "output": {"dir": str(tmp_path / "run")},
    }


class Recorder:
    """A sink that keeps what it is told, and has no on_eval (a sink picks its methods)."""

    def __init__(self) -> None:
        self.events = []

    def on_start(self, event):
        self.events.append(("start", event))

    def on_step(self, event):
        self.events.append(("step", event))

    def on_checkpoint(self, event):
        self.events.append(("checkpoint", event))

    def on_end(self, event):
        self.events.append(("end", event))


def test_a_sink_of_the_caller_hears_the_run_in_order(tmp_path):
    raw = classify_run(tmp_path, max_steps=4, log_every=1)
    raw["output"]["save_every"] = 2
    sink = Recorder()
    summary = run_training(config_from_dict(raw), Console(quiet=True), sinks=[sink])
    assert summary["status"] == "completed"
    kinds = [kind for kind, _ in sink.events]
    assert kinds == ["start", "step", "step", "checkpoint", "step", "step", "checkpoint", "end"]
    start = sink.events[0][1]
    assert (start.total_steps, start.steps_done, start.last_checkpoint) == (4, 0, None)
    steps = [event for kind, event in sink.events if kind == "step"]
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(s.loss) and s.tokens_per_second > 0 for s in steps)
    assert steps[0].lr > 0 and all(s.lr >= 0 for s in steps)  # the schedule decays to 0
    # the stage's own metric, by its name, as a number
    assert all(set(s.metrics) == {"accuracy"} and 0 <= s.metrics["accuracy"] <= 1 for s in steps)
    assert steps[-1].loss == summary["train_loss_last"]
    checkpoints = [event for kind, event in sink.events if kind == "checkpoint"]
    run = tmp_path / "run/checkpoints"
    assert [(c.step, c.path) for c in checkpoints] == [(2, run / "step-2"), (4, run / "step-4")]
    end = sink.events[-1][1]
    assert end.state == "completed" and end.error is None
    assert end.last_checkpoint == run / "step-4"
    assert end.peak_memory_bytes == summary["peak_memory"]["measured_bytes"]


def test_the_console_prints_the_logged_steps_as_lines_when_not_a_terminal(tmp_path):
    """Not a terminal (a log, a pipe): a `step N/M ...` line on the steps train.log_every logs
    and at the last step, as the loop printed them before it told events to sinks."""
    text = io.StringIO()
    console = Console(file=text, force_terminal=False, width=200)
    run_training(config_from_dict(classify_run(tmp_path, max_steps=3, log_every=2)), console)
    lines = re.findall(r"^step .*$", text.getvalue(), re.M)
    assert [line.split()[1] for line in lines] == ["2/3", "3/3"]
    number = r"[0-9.e+-]+"
    shape = rf"step 2/3 loss {number} lr {number} [0-9,]+ tok/s accuracy {number}"
    assert re.fullmatch(shape, lines[0]), lines[0]
    # the format, number by number
    ConsoleSink(console, log_every=1).on_step(
        Step(2, 3, 0.5, 1.234567, 2e-4, None, 12345.6, None, {"accuracy": 0.625})
    )
    assert text.getvalue().splitlines()[-1] == (
        "step 2/3 loss 1.2346 lr 2.00e-04 12,346 tok/s accuracy 0.625"
    )
