"""Never lose a run: exact resume after kill -9, checkpoints that survive a kill or a full disk,
signals, config drift, NaN/inf steps and out-of-memory fallback (docs/reliability.md).

Killed runs are real processes (forked from a server that has imported snug: tests/forked.py): a small
wrapper patches one function of snug to SIGKILL (or signal) itself at a chosen call, then runs
the `snug` command line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from forked import Forked, LeftRunning, run_forked
from safetensors.torch import load_file

from snug.cli import main
from snug.config import config_from_dict
from snug.train.checkpoint import CheckpointError, CheckpointLoadError
from snug.train.outputs import complete_checkpoints, recover
from snug.train.resume import EXIT_STOPPED, ResumeError
from snug.train.run import NonFiniteError, OutOfMemory
from snug.train.statefile import load_state
from snug.train.training import run_training

from conftest import ROOT, method_keys

# 24 samples, micro-batch 2 x accumulation 2: 6 steps an epoch, 2 epochs, shuffled per epoch;
# LoRA dropout, so a resume that did not restore the RNG would differ.
STEPS, MICRO_PER_STEP = 12, 2


def raw_config(out: Path, base: Path = ROOT / "models/tiny", **sections) -> dict:
    """The run's config; `base`: the model (the tests here pass conftest's 2-layer tiny_llama,
    which trains 3x faster than models/tiny and makes the same calls: what they check)."""
    raw = {
        "model": {"name_or_path": str(base)},
        "method": {"name": "lora", "r": 4, "dropout": 0.1},
        "data": {"train": str(ROOT / "data/instruct/train.jsonl"), "max_samples": 24},
        "train": {
            "epochs": 2,
            "micro_batch": 2,
            "grad_accum": 2,
            "lr": 1e-3,
            "eval_generate": 0,
            "log_every": 1,
            "max_grad_norm": 1.0,
        },
        "output": {"dir": str(out), "save_every": 2, "keep_last": 2, "plot_loss": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    # a run that switches the method keeps the keys the new method has (r for lora)
    name = raw["method"]["name"]
    raw["method"] = {"name": name, **method_keys(name, **raw["method"])}
    return raw


WRAPPER = """
import os, signal, sys, types
import snug.train.loss as loss  # the stage's loss reads chunked_loss from here at each call
import snug.train.checkpoint as ckpt

at, where = int(os.environ["AT"]), os.environ["WHERE"]
actions = os.environ["ACTION"].split(",")  # the i-th goes out at call at + i
calls = 0

def wrap(module, name):
    real = getattr(module, name)
    def patched(*args, **kwargs):
        global calls
        calls += 1
        if at <= calls < at + len(actions):
            os.kill(os.getpid(), getattr(signal, actions[calls - at]))
        return real(*args, **kwargs)
    setattr(module, name, patched)

# checkpoint.py's own view of os, so that other libraries' os.replace calls do not count
ckpt.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
module, name = where.split(".")
wrap({"loss": loss, "ckpt": ckpt, "os": ckpt.os}[module], name)
from snug.cli import main
sys.exit(main(sys.argv[1:]))
"""


def snug_train(
    cfg_path: Path,
    at: int = 0,
    action: str = "SIGKILL",
    where: str = "loss.chunked_loss",
    extra: tuple[str, ...] = (),
):
    """`snug train CFG [EXTRA]` in a process of its own (tests/forked.py); with `at`, the
    wrapper sends `action` to itself at the at-th call of `where`."""
    return run_forked(["train", cfg_path, *extra], WRAPPER, AT=str(at), ACTION=action, WHERE=where)


def snug_train_here(cfg_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`snug train CFG` in this process, as `snug_train` gives it (running again after a kill
    needs no process of its own, and a process start costs ~10 s of imports here)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(cfg_path), *extra])
    return subprocess.CompletedProcess(["snug"], code, out.getvalue(), err.getvalue())


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter/adapter_model.safetensors")


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama) -> Path:
    """The uninterrupted run, in a process of its own like the killed ones."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = snug_train_here(write_config(out.parent / "cfg.yaml", raw_config(out, tiny_llama)))
    assert done.returncode == 0, done.stderr
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    ours, theirs = adapter(run), adapter(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "final weights differ"
    assert losses(run) == losses(reference)  # every step's loss, before and after the resume
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize(
    "at",
    [
        2 * MICRO_PER_STEP * 2 + 2,  # second micro-batch of step 5: mid-accumulation
        6 * MICRO_PER_STEP + 1,  # first micro-batch of step 7: the start of epoch 2
        # anywhere: a new point each run, the same in every xdist worker of a run
        random.Random(os.environ.get("PYTEST_XDIST_TESTRUNUID")).randint(2, STEPS * MICRO_PER_STEP),
    ],
)
def test_kill_9_then_resume_is_bit_identical(at, tmp_path, reference, tiny_llama):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", raw_config(out, tiny_llama))
    killed = snug_train(cfg, at=at)
    assert killed.returncode == -9, f"kill at micro-batch call {at}: {killed.stderr[-500:]}"
    assert not (out / "adapter").exists()
    resumed = snug_train_here(cfg)
    assert resumed.returncode == 0, resumed.stderr
    newest = complete_checkpoints(out / "checkpoints")
    if (at - 1) // MICRO_PER_STEP >= 2:  # a checkpoint existed before the kill
        assert "resuming from" in resumed.stdout, f"kill at micro-batch call {at}"
    assert newest  # the resumed run kept saving
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "where,at",
    [
        ("ckpt.save_file", 2),  # the second checkpoint, before its weights are written
        ("ckpt.fsync", 7),  # the second checkpoint, files written, before its marker
        ("os.replace", 2),  # the second checkpoint complete in its temporary directory
        ("ckpt.prune", 2),  # the second checkpoint renamed into place, before pruning
    ],
)
def test_kill_during_a_save_leaves_a_loadable_checkpoint(
    where, at, tmp_path, reference, tiny_llama
):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", raw_config(out, tiny_llama))
    killed = snug_train(cfg, at=at, where=where)
    assert killed.returncode == -9, killed.stderr[-500:]
    newest = recover(out / "checkpoints")
    assert newest is not None and newest.name in ("step-2", "step-4")
    assert newest.name == ("step-4" if where == "ckpt.prune" else "step-2")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    resumed = snug_train_here(cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, tiny_llama
):
    import snug.train.checkpoint as ckpt

    real, calls = ckpt.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as e:
        run_training(config_from_dict(raw_config(out, tiny_llama)))
    message = str(e.value)
    assert "step-4" in message and "No space left" in message
    assert "step-2 is intact" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert load_file(out / "checkpoints/step-2/trainable.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_sigterm_or_one_ctrl_c_saves_and_stops_then_resumes(
    signal_name, tmp_path, reference, tiny_llama
):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", raw_config(out, tiny_llama))
    at = 3 * MICRO_PER_STEP  # during step 3: no periodic checkpoint falls there
    # started with --fresh (and an override): the command that resumes is given without it
    stopped = snug_train(cfg, at=at, action=signal_name, extra=("--fresh", "train.log_every=1"))
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr
    said = " ".join(stopped.stderr.split())
    assert f"to resume, run: snug train {cfg} train.log_every=1" in said, said
    assert "--fresh" not in said
    assert "step-3" in [p.name for p in complete_checkpoints(out / "checkpoints")]
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 3
    assert "stopped after step 3" in status["detail"]  # the one-line reason
    assert status["last_checkpoint"] == str(out / "checkpoints/step-3")
    resumed = snug_train_here(cfg)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["total_steps"]
    assert_same_run(out, reference)


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path, tiny_llama):
    out = tmp_path / "run"
    raw = raw_config(out, tiny_llama, output={"save_every": None})
    # the first Ctrl-C in step 2's first micro-batch, the second in its second
    aborted = snug_train(write_config(tmp_path / "cfg.yaml", raw), at=3, action="SIGINT,SIGINT")
    assert aborted.returncode == 130, aborted.stderr
    assert complete_checkpoints(out / "checkpoints") == []
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "seed", 7),
        ("data", "max_samples", 20),
        ("method", "r", 8),
        ("train", "micro_batch", 1),
        ("train", "grad_accum", 4),
    ],
)
def test_resuming_a_changed_run_is_refused_with_the_differences(
    section, key, value, tmp_path, tiny_llama
):
    out = tmp_path / "run"
    first = raw_config(out, tiny_llama, train={"max_steps": 2, "epochs": 1})
    assert run_training(config_from_dict(first))["status"] == "completed"
    changed = raw_config(out, tiny_llama, train={"max_steps": 3, "epochs": 1})
    changed[section][key] = value
    with pytest.raises(ResumeError) as e:
        run_training(config_from_dict(changed))
    assert f"{section}.{key}" in str(e.value) and "--allow-config-change" in str(e.value)
    # refusing lost nothing: the finished run's outputs are all still there
    assert (out / "adapter").is_dir() and (out / "summary.json").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())[section][key] != value
    if section == "method":  # other trainable shapes: allowed, but it cannot load them
        with pytest.raises(CheckpointLoadError, match="shapes differ"):
            run_training(config_from_dict(changed), allow_config_change=True)
    else:
        summary = run_training(config_from_dict(changed), allow_config_change=True)
        assert summary["status"] == "completed" and summary["steps"] == 3
    if key == "r":  # --fresh starts over whatever changed: once, where resuming cannot load
        assert run_training(config_from_dict(changed), fresh=True)["steps"] == 3


def test_resuming_with_more_steps_is_allowed(tmp_path, tiny_llama):
    out = tmp_path / "run"
    run_training(config_from_dict(raw_config(out, tiny_llama, train={"max_steps": 2, "epochs": 1})))
    more = raw_config(out, tiny_llama, train={"max_steps": 4, "epochs": 1, "lr": 5e-4})
    summary = run_training(config_from_dict(more))
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert sorted(losses(out)) == [1, 2, 3, 4]


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss with a non-finite gradient norm."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_step(monkeypatch, step: int, kind: str) -> None:
    import snug.train.loss as step_module  # the stage's loss reads chunked_loss here

    real, calls = step_module.chunked_loss, []

    def loss(model, batch):
        calls.append(1)
        value = real(model, batch)
        if (len(calls) - 1) // MICRO_PER_STEP + 1 == step:
            return value * float("nan") if kind == "loss" else NanGradient.apply(value)
        return value

    monkeypatch.setattr(step_module, "chunked_loss", loss)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nonfinite_step_stops_before_the_update(kind, tmp_path, monkeypatch, tiny_llama):
    poison_step(monkeypatch, 5, kind)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        run_training(config_from_dict(raw_config(out, tiny_llama)))
    message = str(e.value)
    assert message.startswith("step 5:") and "step-4" in message
    saved = load_file(out / "checkpoints/step-4/trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch, tiny_llama):
    poison_step(monkeypatch, 5, "loss")
    out = tmp_path / "run"
    raw = raw_config(out, tiny_llama, train={"skip_nonfinite": 1})
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["nonfinite_skipped"] == [5]
    assert all(torch.isfinite(v).all() for v in adapter(out).values())


def inject_oom(monkeypatch, above_rows: int) -> list[int]:
    """Every micro-batch of more than `above_rows` rows runs out of memory; returns the row
    counts that trained."""
    import snug.train.loss as step_module  # the stage's loss reads chunked_loss here

    real, trained = step_module.chunked_loss, []

    def loss(model, batch):
        rows = batch["input_ids"].shape[0]
        if rows > above_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        trained.append(rows)
        return real(model, batch)

    monkeypatch.setattr(step_module, "chunked_loss", loss)
    return trained


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_result(
    tmp_path, monkeypatch, tiny_llama
):
    # no dropout: its masks are drawn per micro-batch, so other splits draw other masks
    sections = {"train": {"micro_batch": 4, "grad_accum": 1}, "method": {"dropout": 0.0}}
    plain = run_training(config_from_dict(raw_config(tmp_path / "plain", tiny_llama, **sections)))
    trained = inject_oom(monkeypatch, above_rows=1)
    out = tmp_path / "run"
    raw = raw_config(out, tiny_llama, **sections)
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["steps"] == plain["steps"]
    assert summary["oom_changes"] == [
        {"step": 1, "micro_batch": 2, "grad_accum": 2},
        {"step": 1, "micro_batch": 1, "grad_accum": 4},
    ]
    assert set(trained) == {1}
    ours, theirs = adapter(out), adapter(tmp_path / "plain")
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    # One-row micro-batches add up each gradient in another order (float32 rounding), and AdamW
    # moves a weight by at most about lr a step, of which rounding can change a good part only
    # where a gradient is near zero (see test_dist.ADAM_FRACTION). Measured with models/tiny on
    # an AVX2-only CPU: 8e-4 of lr * steps; a fallback losing one row a step gives 0.76, a 10%
    # larger lr 0.32. With this 2-layer model on an AVX-512 CPU: 2.5e-6; a 10% larger lr 0.15.
    assert worst < 0.02 * raw["train"]["lr"] * summary["steps"], worst
    # the change is in the checkpoint, and a resume keeps it
    state = load_state(complete_checkpoints(out / "checkpoints")[-1] / "state")
    assert state["train_state"]["rows_per_micro_batch"] == 1
    more = dict(raw, train={**raw["train"], "epochs": 3})
    trained.clear()
    resumed = run_training(config_from_dict(more))
    assert resumed["status"] == "completed" and resumed["steps"] > summary["steps"]
    assert set(trained) == {1} and resumed["oom_changes"] == summary["oom_changes"]


def test_out_of_memory_at_one_row_stops_with_a_clear_message(tmp_path, monkeypatch, tiny_llama):
    inject_oom(monkeypatch, above_rows=0)
    with pytest.raises(OutOfMemory) as e:
        run_training(config_from_dict(raw_config(tmp_path / "run", tiny_llama)))
    assert "micro-batches of one row" in str(e.value) and "step 1" in str(e.value)


def test_outputs_stay_inside_the_resolved_output_dir(tmp_path, tiny_llama):
    out = tmp_path / "a" / ".." / "run"
    (tmp_path / "a").mkdir()
    before = set(tmp_path.rglob("*"))
    raw = raw_config(out, tiny_llama, train={"max_steps": 2, "epochs": 1})
    run_training(config_from_dict(raw))
    written = set(tmp_path.rglob("*")) - before
    resolved = (tmp_path / "run").resolve()
    assert written and all(p.resolve().is_relative_to(resolved) or p == resolved for p in written)
    assert (resolved / "checkpoints/step-2").is_dir() and (resolved / "adapter").is_dir()


def test_progressive_unfreezing_resumes(tmp_path, tiny_llama):
    """freeze with unfreeze_every: the trainable set grows during training; a checkpoint holds
    the set of its step and a resume restores that set before loading. Two layers: the top one
    trains in steps 1 to 3, both from step 4 (after the crash)."""
    out = tmp_path / "run"
    method = {"name": "freeze", "trainable_layers": 2, "unfreeze_every": 3}
    train = {"max_steps": 5, "epochs": 1}
    whole = raw_config(tmp_path / "whole", tiny_llama, method=method, train=train)
    reference = run_training(config_from_dict(whole))
    first = raw_config(out, tiny_llama, method=method, train=train)
    first["output"]["save_every"] = 1
    import snug.train.run as loop

    real = loop.Run._after_step

    def stop_after_3(self, signals):
        real(self, signals)
        if self.pos.step == 3:
            raise KeyboardInterrupt  # a crash right after the step-3 checkpoint

    loop.Run._after_step = stop_after_3
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(config_from_dict(first))
    finally:
        loop.Run._after_step = real
    resumed = run_training(config_from_dict(first))
    assert resumed["status"] == "completed" and losses(out) == losses(tmp_path / "whole")
    assert resumed["train_loss_last"] == reference["train_loss_last"]


def test_ending_without_the_interpreters_teardown_loses_nothing(tmp_path):
    """`snug` ends through snug/runtime/shutdown.py's exit_now (os._exit after the work): what a normal
    exit does before its teardown still happens. A thread that is not a daemon finishes its
    write, a thread pool left running finishes its job and lets its idle worker go, atexit
    handlers run (after them, as in Python's exit), output still in Python's buffers and in the
    C library's (as NCCL writes) reaches the pipe, and the status is the command's. Run without
    PYTHONUNBUFFERED, which would flush each write on its own."""
    import sys

    done, pooled = tmp_path / "thread-wrote", tmp_path / "pool-wrote"
    code = (
        "import atexit, ctypes, sys, threading, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from pathlib import Path\n"
        "from snug.runtime.shutdown import exit_now\n"
        "def late(path):\n"
        "    time.sleep(0.3)\n"
        "    Path(path).write_text('yes')\n"
        f"threading.Thread(target=late, args=({str(done)!r},)).start()\n"
        f"ThreadPoolExecutor(1).submit(late, {str(pooled)!r})  # never shut down\n"
        f"atexit.register(lambda: print('atexit saw', Path({str(done)!r}).exists()))\n"
        "sys.stdout.write('unflushed ')\n"
        "sys.stderr.write('to stderr')\n"
        "ctypes.CDLL(None).printf(b'from C ')\n"
        "exit_now(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )
    assert proc.returncode == 3, proc.stderr
    # Python's buffer is flushed first, then the C library's
    assert proc.stdout == "unflushed atexit saw True\nfrom C "
    assert proc.stderr == "to stderr"
    assert done.read_text() == "yes" and pooled.read_text() == "yes"


def test_a_command_left_running_says_where_it_waits_and_is_stopped():
    """A test's deadline passed while what a command started still runs (a rank after its
    launcher died): tests/forked.py names the process still holding the output, with each of
    its threads' Python stacks (snug's processes print them on SIGUSR1:
    snug/runtime/shutdown.py's stacks_on_request), and kills it; nothing is left running."""
    script = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'from snug.runtime.shutdown import stacks_on_request\\n"
        "stacks_on_request()\\nimport time\\ndef held_here():\\n    time.sleep(120)\\n"
        "held_here()'])\n"
        "import time; time.sleep(0.5)\n"  # the child's imports (0.03 s on this machine)
    )
    child = Forked(["--version"], script=script)
    with pytest.raises(LeftRunning) as caught:
        child.communicate(timeout=2.5)
    report = str(caught.value)
    assert "still running:" in report and "time.sleep(120)" in report, report
    assert "in held_here" in report, report  # the child's own stack, printed on request
    pid = int(report.split("pid ")[1].split(":")[0])
    time.sleep(0.5)
    status = Path(f"/proc/{pid}/status")  # gone, or a zombie its new parent has yet to reap
    assert not status.exists() or "State:\tZ" in status.read_text()
