"""Stop signals to `snug train` with dist.nproc=2: passed through torchrun to every rank, which
save and stop; the same command resumes (split from test_dist.py so that pytest-xdist can run
it beside that file)."""

from __future__ import annotations

import json
import signal
import time

import pytest
import yaml
from forked import Forked

from test_dist import losses, raw_config, snug_train

pytestmark = pytest.mark.slow  # the launcher, torchrun and 2 ranks, as a user runs them


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stop_signal_to_the_launcher_saves_every_rank_and_resumes(sig, tmp_path):
    """SIGTERM to the `snug train` process alone (as a scheduler or `kill` sends it): it passes
    the signal through torchrun to the ranks, which save after their step; exit 75, and the
    same command resumes there and finishes. SIGKILL (nothing can be passed on): the kernel
    tells torchrun, which stops the ranks the same way; none is left running."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(out, "fsdp", epochs=3, lr=1e-4)))  # 9 steps
    launcher = Forked(["train", cfg])  # `snug train` in a process of its own
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr_so_far()
        time.sleep(0.2)
    launcher.send_signal(sig)
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == (75 if sig == signal.SIGTERM else -9), stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] < 9
    assert stderr.count(f"{sig.name if sig == signal.SIGTERM else 'SIGTERM'}: stopped after") == 1
    step = summary["steps"]
    assert (out / f"checkpoints/step-{step}/shards").is_dir()
    if sig == signal.SIGKILL:
        return  # resuming is the same as after SIGTERM
    resumed = snug_train(cfg)
    flat = "".join(resumed.stdout.split())  # the console wraps long lines
    assert f"resumingfrom{out}/checkpoints/step-{step}" in flat
    assert (
        len(losses(out)) == 9
        and json.loads((out / "summary.json").read_text())["status"] == "completed"
    )
