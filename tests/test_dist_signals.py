"""Stop signals to `snug train` with dist.nproc=2: passed through torchrun to every rank, which
save and stop; the same command resumes (split from test_dist.py so that pytest-xdist can run
it beside that file)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml
from forked import Forked

from test_dist import losses, raw_config

pytestmark = pytest.mark.slow  # the launcher, torchrun and 2 ranks, as a user runs them

STEPS = 9


def stop_after_two_more_steps(cfg: Path, out: Path, sig: int, done: int) -> tuple[str, str]:
    """`snug train cfg` in a process of its own (the launcher), sent `sig` once its ranks have
    logged two steps past `done`; its stdout and stderr once it and every process it started
    (torchrun, the ranks) have ended."""
    launcher = Forked(["train", cfg])
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(losses(out)) >= done + 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr_so_far()
        time.sleep(0.2)
    # the launcher holds output.dir's lock for its ranks, and torchrun has it too: it lasts
    # while torchrun runs, also once the launcher is killed
    lock = out / ".snug-lock"
    assert json.loads(lock.read_text())["pid"] == launcher.pid
    (torchrun,) = psutil.Process(launcher.pid).children()
    assert str(lock) in {f.path for f in torchrun.open_files()}
    launcher.send_signal(sig)
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == (75 if sig == signal.SIGTERM else -9), stderr[-3000:]
    # every rank got SIGTERM: from the launcher, or from the kernel when the launcher died
    assert stderr.count("SIGTERM: stopped after") == 1, stderr[-3000:]
    return stdout, stderr


def test_a_stop_signal_to_the_launcher_saves_every_rank_and_resumes(tmp_path):
    """SIGTERM to the `snug train` process alone (as a scheduler or `kill` sends it): it passes
    the signal through torchrun to the ranks, which save after their step; exit 75. The same
    command resumes there, and SIGKILL to it (nothing can be passed on) stops it the same
    way: the kernel tells torchrun, which stops the ranks; none is left running (their output
    pipes close). One run for both signals: each launch costs its processes' imports."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(out, "fsdp", epochs=3, lr=1e-4)))  # 9 steps
    saved = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        stdout, _ = stop_after_two_more_steps(cfg, out, sig, saved[-1] if saved else 0)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "stopped" and summary["steps"] < STEPS
        saved.append(summary["steps"])
        assert (out / f"checkpoints/step-{saved[-1]}/shards").is_dir()
        # each step logged once: a resume drops what came after its checkpoint
        assert len(losses(out)) == saved[-1]
    flat = "".join(stdout.split())  # the console wraps long lines
    assert f"resumingfrom{out}/checkpoints/step-{saved[0]}" in flat
    assert saved[0] < saved[1]
