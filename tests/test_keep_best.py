"""output.keep_best: the run ends with the weights of the lowest held-out loss seen at
train.eval_every (Hugging Face's load_best_model_at_end by eval_loss)."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from snug.cli import main
from snug.config import config_from_dict, save_config
from snug.errors import ConfigError
from snug.train import run as loop_run
from snug.train.resume import Signals, TrainingStopped
from snug.train.status import STARTING
from snug.train.training import run_training

from conftest import ROOT
from test_train import tiny_run


def _losses(monkeypatch, chosen: dict[int, float]) -> dict[int, float]:
    """The loop's held-out loss at step N is `chosen[N]`; returns the real losses measured
    there (on the weights of that step), by step."""
    real: dict[int, float] = {}
    measure = loop_run.eval_metrics

    def fake(model, *args, **kwargs):
        step = len(real) + min(chosen)
        real[step] = measure(model, *args, **kwargs)["loss"]
        return {"loss": chosen[step]}

    monkeypatch.setattr(loop_run, "eval_metrics", fake)
    return real


def _cfg(tmp_path, steps: int, **output):
    raw = tiny_run(
        tmp_path,
        ROOT / "models/tiny",
        train={"max_steps": steps, "eval_every": 1, "eval_generate": 0},
        output={"save_every": 1, "keep_last": 1, "keep_best": True, "plot_loss": False, **output},
    )
    return config_from_dict(raw)


def _adapter_equals(out, step: int) -> bool:
    """adapter/'s weights are checkpoints/step-N's trainable weights (peft drops `.default`)."""
    saved = load_file(out / "checkpoints" / f"step-{step}" / "trainable.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    saved = {k.replace(".default", ""): v for k, v in saved.items()}
    return saved.keys() == adapter.keys() and all(saved[k].equal(adapter[k]) for k in saved)


def test_the_lowest_held_out_loss_is_the_output_and_survives_keep_last(tmp_path, monkeypatch):
    real = _losses(monkeypatch, {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5})
    summary = run_training(_cfg(tmp_path, 4))
    out = tmp_path / "run"
    # keep_last 1 keeps step-4; the best (step 2) is never rotated away
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert summary["best"] == {"step": 2, "eval_loss": 1.0}
    assert json.loads((out / "summary.json").read_text())["best"] == summary["best"]
    assert _adapter_equals(out, 2) and not _adapter_equals(out, 4)
    # the evaluation after training is of step 2's weights
    assert summary["eval"]["loss_after"] == pytest.approx(real[2], rel=1e-5)
    assert real[2] != pytest.approx(real[4], rel=1e-5)


def test_a_resumed_run_keeps_knowing_the_best(tmp_path, monkeypatch):
    """Stopped (as by SIGTERM) after step 3, resumed to step 5: step 2 stays the best, though the
    resumed run's own evals (2.5, 2.2) are all above it."""
    real = _losses(monkeypatch, {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.2})

    class StopAfterStep3(Signals):  # as a SIGTERM during step 3 asks
        requested = property(lambda self: "SIGTERM" if max(real, default=0) == 3 else None)
        _handle = None

        def __init__(self, console):
            self.console, self._old = console, {}

        def __enter__(self):
            return self

    monkeypatch.setattr(loop_run, "Signals", StopAfterStep3)
    with pytest.raises(TrainingStopped):
        run_training(_cfg(tmp_path, 5))
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    monkeypatch.setattr(loop_run, "Signals", Signals)
    summary = run_training(_cfg(tmp_path, 5))
    assert min(real) == 1 and sorted(real) == [1, 2, 3, 4, 5]
    assert summary["status"] == "completed" and summary["steps"] == 5
    assert summary["best"] == {"step": 2, "eval_loss": 1.0}
    assert _adapter_equals(out, 2)


def test_a_resumed_run_whose_best_checkpoint_is_gone_is_refused(tmp_path, monkeypatch, capsys):
    _losses(monkeypatch, {1: 3.0, 2: 1.0, 3: 2.0})
    cfg = _cfg(tmp_path, 3)
    run_training(cfg)
    out = tmp_path / "run"
    shutil.rmtree(out / "checkpoints" / "step-2")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    path = tmp_path / "more.yaml"
    save_config(_cfg(tmp_path, 4), path)
    assert main(["train", str(path)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bar
    assert line.startswith("error: ") and "output.keep_best" in line and "step-2" in line
    # nothing changed but the status of the run that could not start (train/status.py)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != STARTING}
    assert after == before


@pytest.mark.parametrize(
    "change, named",
    [
        ({"train": {"eval_every": None}}, "train.eval_every"),
        ({"data": {"eval": None}}, "data.val_size"),
        ({"method": {"name": "freeze", "unfreeze_every": 2}}, "method.unfreeze_every"),
    ],
)
def test_keep_best_without_what_it_needs_is_one_config_error(tmp_path, change, named):
    sections = {"train": {"eval_every": 1}, "output": {"keep_best": True}}
    for section, values in change.items():
        sections[section] = {**sections.get(section, {}), **values}
    raw = tiny_run(tmp_path, ROOT / "models/tiny", **sections)
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert named in str(e.value) and "output.keep_best" in str(e.value)
    assert "\n" not in str(e.value)
