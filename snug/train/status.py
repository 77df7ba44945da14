"""`output.dir/status.json`: where a run stands, for whatever watches it (a web UI, a script,
`watch cat`), rewritten whole (written aside, then renamed) as the run goes.

Keys: `state` (training, completed, stopped, interrupted, failed), `step`, `total_steps`,
`epoch`, `loss`, `tokens_per_second`, `elapsed_seconds`, `eta_seconds`, `peak_memory_bytes`
(measured so far: snug's tensor tracker on a CPU, `max_memory_allocated` on a GPU),
`predicted_peak_bytes` (the plan's, when memory.auto_fit planned the run), `pid`, `host`,
`last_checkpoint` (the newest complete one), `error` (the one-line reason of a failed run),
`started_at` and `updated_at` (UTC, ISO 8601).

When: from the end of the first optimizer step, when the run owns output.dir (before that an
earlier run's files, its status.json included, stay as they were: the rule of
train/outputs.py), then after each step at most once a second, at each checkpoint, and at the
end. A watcher tells a live run from a dead one by `state` with `pid`: a run killed with -9
leaves `training` and a pid that no longer runs. Written here: no library keeps a run's state
file (TensorBoard and metrics.jsonl keep history, not the present)."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

from snug.files import write_text_atomic

STATES = ("training", "completed", "stopped", "interrupted", "failed")
EVERY_SECONDS = 1.0  # at most one rewrite a second while steps run


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class RunStatus:
    def __init__(self, out: Path, total_steps: int, predicted_bytes: int | None = None) -> None:
        self.path = out / "status.json"
        self.started = time.perf_counter()
        self._written = 0.0
        self.fields = {
            "state": "training",
            "step": 0,
            "total_steps": total_steps,
            "epoch": 0.0,
            "loss": None,
            "tokens_per_second": None,
            "elapsed_seconds": 0.0,
            "eta_seconds": None,
            "peak_memory_bytes": None,
            "predicted_peak_bytes": predicted_bytes,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "last_checkpoint": None,
            "error": None,
            "started_at": _now(),
            "updated_at": None,
        }

    def update(self, force: bool = False, **fields) -> None:
        self.fields.update(fields)
        now = time.perf_counter()
        if not force and now - self._written < EVERY_SECONDS:
            return
        f = self.fields
        f["elapsed_seconds"] = round(now - self.started, 2)
        f["updated_at"] = _now()
        done, total = f["step"], f["total_steps"]
        if f["state"] == "training" and done:
            f["eta_seconds"] = round(f["elapsed_seconds"] / done * (total - done), 1)
        elif f["state"] != "training":
            f["eta_seconds"] = 0.0 if f["state"] == "completed" else None
        write_text_atomic(self.path, json.dumps(f, indent=2, allow_nan=False) + "\n")
        self._written = now

    def end(self, state: str, error: str | None = None, **fields) -> None:
        self.update(force=True, state=state, error=error, **fields)
