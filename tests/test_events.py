"""A run tells what happens as events (snug/core/events.py) to sinks: the console,
metrics.jsonl/TensorBoard, status.json, and any sink a caller passes to run_training."""

import datetime
import io
import json
import math
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console

from snug.config import config_from_dict
from snug.core.events import Step
from snug.train.sinks import ConsoleSink
from snug.train.status import STARTING, alive
from snug.train.training import run_training

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


class StatusReader:
    """A sink that reads output.dir's status files at each phase (the status sink, before it,
    has written the phase by then), as a watcher polling the folder would."""

    def __init__(self, out) -> None:
        self.out, self.seen = out, []

    def on_phase(self, event):
        files = {p.name: json.loads(p.read_text()) for p in self.out.glob("status*.json")}
        self.seen.append((event.name, files))


def test_status_json_tells_the_phases_from_the_start_with_pid_and_heartbeat(tmp_path):
    """While the run validates, tokenizes and loads (no earlier run in the folder), status.json
    says the phase, tokenizing with its counts, the pid, host and a heartbeat."""
    raw = classify_run(tmp_path, max_steps=2)
    reader = StatusReader(tmp_path / "run")
    run_training(config_from_dict(raw), Console(quiet=True), sinks=[reader])
    names = [name for name, _ in reader.seen]
    order = [n for i, n in enumerate(names) if n not in names[:i]]
    assert order == ["validating", "tokenizing", "loading", "training", "saving"]
    assert names[:2] == ["validating", "tokenizing"] and names.count("saving") == 1
    for name, files in reader.seen:
        assert list(files) == ["status.json"]
        status = files["status.json"]
        assert status["state"] == name and status["pid"] == os.getpid()
        assert status["host"] == socket.gethostname() and alive(status)
    counted = [f["status.json"] for n, f in reader.seen if f["status.json"]["total"]]
    assert counted and counted[-1]["done"] == counted[-1]["total"] == 64  # data.max_samples
    final = json.loads((tmp_path / "run/status.json").read_text())
    assert final["state"] == "completed" and final["step"] == 2 and not alive(final)


def test_an_earlier_runs_status_stays_until_the_new_run_takes_over(tmp_path, monkeypatch):
    """A second run into a finished run's folder writes its early status beside status.json
    (status.starting.json), which the take-over renames over it; one that fails after taking
    over says failed, with the reason."""
    from snug.train import run as loop_run

    raw = classify_run(tmp_path, max_steps=2)
    run_training(config_from_dict(raw))
    earlier = (tmp_path / "run/status.json").read_bytes()
    real_step, calls = loop_run.train_step, []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the step broke\nsecond line")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_run, "train_step", broken)
    reader = StatusReader(tmp_path / "run")
    with pytest.raises(RuntimeError):
        run_training(config_from_dict(raw), Console(quiet=True), fresh=True, sinks=[reader])
    assert [name for name, _ in reader.seen][:2] == ["validating", "tokenizing"]
    for name, files in reader.seen:  # every phase is before the take-over
        assert files["status.json"] == json.loads(earlier)
        assert files[STARTING]["state"] == name and files[STARTING]["pid"] == os.getpid()
    assert not (tmp_path / "run" / STARTING).exists()
    final = json.loads((tmp_path / "run/status.json").read_text())
    assert final["state"] == "failed" and final["error"] == "RuntimeError: the step broke"
    assert final["detail"] == final["error"]


def test_a_dead_run_is_told_by_its_pid_and_heartbeat():
    now = time.time()
    beat = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="seconds")
    status = {"state": "tokenizing", "pid": os.getpid(), "host": socket.gethostname()}
    assert alive({**status, "heartbeat_at": beat}, now)
    assert not alive({**status, "heartbeat_at": beat}, now + 120)  # stale
    dead = _dead_pid()
    assert not alive({**status, "pid": dead, "heartbeat_at": beat}, now)
    assert alive({**status, "host": "elsewhere", "pid": dead, "heartbeat_at": beat}, now)
    assert not alive({**status, "state": "completed", "heartbeat_at": beat}, now)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_snug_train_writes_its_status_before_the_heavy_imports(tmp_path, monkeypatch, capsys):
    """`snug train` writes status.json (validating, its pid) once it holds output.dir's lock,
    before run_training is reached; a config error writes nothing, and a run that never took
    the folder over leaves its status saying how it ended (the folder made for the lock stays
    for it)."""
    import yaml

    import snug.train.training as training
    from snug.cli import main

    out = tmp_path / "new/run"
    raw = classify_run(tmp_path)
    raw["output"]["dir"] = str(out)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    seen = []

    def run_training(cfg, status=None, **_):
        seen.append((json.loads((out / "status.json").read_text()), status is not None))
        raise KeyboardInterrupt  # ends before taking the folder over

    monkeypatch.setattr(training, "run_training", run_training)
    assert main(["train", str(config), "train.lr=oops"]) == 2  # a config error
    assert not (tmp_path / "new").exists()
    assert main(["train", str(config)]) == 130  # interrupted
    [(status, handed)] = seen
    assert handed and status["state"] == "validating" and status["pid"] == os.getpid()
    assert alive(status) and "importing" in status["detail"]
    assert sorted(p.name for p in out.iterdir()) == ["status.json"]
    ended = json.loads((out / "status.json").read_text())
    assert ended["state"] == "interrupted" and ended["pid"] == os.getpid() and not alive(ended)


def test_the_heartbeat_rewrites_the_status_while_a_phase_runs(tmp_path, monkeypatch):
    """Nothing happens in the run, yet the file is rewritten (its elapsed time moves on)."""
    from snug.train import status as status_module

    monkeypatch.setattr(status_module, "HEARTBEAT_S", 0.01)
    status = status_module.RunStatus(tmp_path, "loading")
    path = tmp_path / "status.json"
    first = json.loads(path.read_text())["elapsed_seconds"]
    try:
        for _ in range(500):  # up to 5 s
            if json.loads(path.read_text())["elapsed_seconds"] > first:
                break
            time.sleep(0.01)
        else:
            pytest.fail("status.json was not rewritten by the heartbeat")
    finally:
        status.close()
    assert json.loads(path.read_text())["state"] == "loading"  # kept, as last written


def _failing_start(tmp_path, out) -> tuple[Path, dict]:
    """A config of a run into `out` that fails while tokenizing (a column the data lacks)."""
    import yaml

    raw = classify_run(tmp_path)
    raw["output"]["dir"] = str(out)
    raw["cls"] = {"label_column": "nope"}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config, raw


def _error_line(err: str) -> str:
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    return line.removeprefix("error: ")


def _interrupted_start(monkeypatch, out: Path, seen: list) -> None:
    """The next `snug train` reads the status files when run_training is reached, then ends
    before taking the folder over (Ctrl-C)."""
    import snug.train.training as training

    def run_training(cfg, status=None, **_):
        seen.append({p.name: json.loads(p.read_text()) for p in out.glob("status*.json")})
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run_training", run_training)


def test_a_run_that_fails_while_starting_leaves_its_status_failed_with_the_reason(
    tmp_path, monkeypatch, capsys
):
    """A run that fails before taking output.dir over (here while tokenizing) leaves status.json
    saying failed, with the one line stderr says; the next run into the folder takes that file
    as snug's and writes status.json over it (it is no earlier run's output)."""
    from snug.cli import main

    out = tmp_path / "new/run"
    config, _ = _failing_start(tmp_path, out)
    assert main(["train", str(config)]) == 2
    said = _error_line(capsys.readouterr().err)
    assert "has no column 'nope'" in said
    assert sorted(p.name for p in out.iterdir()) == ["status.json"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].split(": ", 1)[1] == said
    assert status["detail"] == status["error"] and status["taken_over"] is False
    assert status["pid"] == os.getpid() and not alive(status)
    seen: list = []
    _interrupted_start(monkeypatch, out, seen)
    assert main(["train", str(config), "cls.label_column=label"]) == 130
    [files] = seen
    assert list(files) == ["status.json"] and files["status.json"]["state"] == "validating"
    assert sorted(p.name for p in out.iterdir()) == ["status.json"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted" and status["error"] is None
    assert "interrupted" in status["detail"] and not alive(status)


def test_a_failed_start_beside_an_earlier_runs_status_leaves_that_status_as_it_was(
    tmp_path, monkeypatch, capsys
):
    """Beside an earlier run's status.json, a run that fails while starting leaves its failed
    status in status.starting.json; status.json and every other file stay byte-identical, and
    the next start replaces status.starting.json."""
    from snug.cli import main
    from snug.train.outputs import RUN_MARKER
    from snug.train.status import RunStatus

    out = tmp_path / "run"
    out.mkdir()
    earlier = RunStatus(out, "training")  # an earlier run's, as it ends
    earlier.take_over(total_steps=2)
    earlier.end("completed")
    earlier.close()
    (out / RUN_MARKER).touch()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    config, _ = _failing_start(tmp_path, out)
    assert main(["train", str(config)]) == 2
    said = _error_line(capsys.readouterr().err)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    starting = json.loads(after.pop(STARTING))
    assert after == before
    assert starting["state"] == "failed" and starting["error"].split(": ", 1)[1] == said
    assert starting["taken_over"] is False and not alive(starting)
    seen: list = []
    _interrupted_start(monkeypatch, out, seen)
    assert main(["train", str(config), "cls.label_column=label"]) == 130
    assert seen[0][STARTING]["state"] == "validating"
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert json.loads(after.pop(STARTING))["state"] == "interrupted"
    assert after == before
