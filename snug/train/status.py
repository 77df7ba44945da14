"""`output.dir/status.json`: where a run stands, for whatever watches it (a web UI, a script,
`watch cat`), from its first second: rewritten whole (written aside, then renamed) at every
phase, after steps at most once a second, and every HEARTBEAT_S seconds whatever happens.

Keys: `state` (a phase of core/events.py PHASES: validating, tokenizing, planning, loading,
evaluating, training, saving; or how it ended: completed, stopped, interrupted, failed),
`detail` (what the phase does now, in words; once ended, the one-line reason: a failed
run's error, a stopped run's signal and checkpoint), `done` and `total` (the phase's counted progress,
null when not counted; tokenizing counts records), `step`, `total_steps`, `epoch`, `loss`,
`tokens_per_second`, `elapsed_seconds` (since the process began the run), `eta_seconds`
(while training), `peak_memory_bytes` (measured so far), `predicted_peak_bytes` (when
memory.auto_fit planned the run), `pid`, `host`, `last_checkpoint`, `error` (the one-line
reason of a failed run), `taken_over` (whether the run has taken output.dir over, after its
first optimizer step: false while it starts, and in the file of a start that failed),
`started_at`, `updated_at` and `heartbeat_at` (UTC, ISO 8601).

Alive or dead (`alive` below): an ended state is an ended run; otherwise the run is alive
while its heartbeat is younger than STALE_S seconds and, read on its own host, its pid runs.
A run killed with -9 leaves its last phase, a pid that runs no more and a heartbeat that ages.

Where, and the rule of train/outputs.py (nothing of an earlier run changes before the new run
has proven it can start): the status is written from the moment the run holds output.dir's
lock and has checked the folder (a config error writes nothing). If the folder holds no
status.json, or only one that a run which never took the folder over left (`taken_over`
false: a failed start's, replaced freely), the new run writes status.json itself; if an
earlier run's status.json is there, the new run writes STARTING beside it, which the take-over
(after the first optimizer step) renames over status.json. A run that ends before taking the
folder over leaves its file saying how it ended (failed with `error`, or interrupted) and
changes nothing else: in a fresh folder that is status.json (the folder made for the lock
stays for it), beside an earlier run's status.json it is STARTING, the earlier one untouched.
A watcher of a folder therefore reads STARTING when it is there (a run is starting, or its
start failed), else status.json; train/outputs.py takes a status file that says `taken_over`
false as snug's own.

Written here: no library keeps a run's state file (TensorBoard and metrics.jsonl keep
history, not the present). No torch: `snug train` starts it before the heavy imports."""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from pathlib import Path

from snug.errors import AlreadySaid, first_line
from snug.runtime.files import write_text_atomic

NAME = "status.json"
STARTING = "status.starting.json"  # a starting run's, while an earlier run's status.json stays
ENDED = ("completed", "stopped", "interrupted", "failed")
EVERY_SECONDS = 1.0  # at most one rewrite a second while steps run
HEARTBEAT_S = 2.0  # rewritten at least this often while the run lives
STALE_S = 30.0  # a heartbeat older than this: the run is dead (or hung)


def is_status_file(name: str) -> bool:
    """status.json, status.starting.json, or one of them being written aside."""
    return name in (NAME, STARTING) or name.startswith((f".{NAME}.tmp-", f".{STARTING}.tmp-"))


def left_by_start(path: Path) -> bool:
    """Whether `path` is the status a run left that never took its folder over (`taken_over`
    false): snug's own, which the next run into the folder replaces."""
    try:
        fields = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(fields, dict) and fields.get("taken_over") is False


def reason(e: BaseException) -> str:
    """The one-line reason a run failed with `e`, as status.json's `error` says it."""
    if isinstance(e, AlreadySaid):  # another rank failed and printed why
        return f"another process of this run failed (exit {e.code}); its error is on stderr"
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def alive(fields: dict, now: float | None = None) -> bool:
    """Whether the run of a status.json's `fields` lives (the rule of the module docstring)."""
    if fields.get("state") in ENDED:
        return False
    beat = datetime.datetime.fromisoformat(fields["heartbeat_at"]).timestamp()
    if (time.time() if now is None else now) - beat > STALE_S:
        return False
    if fields.get("host") != socket.gethostname():
        return True  # another host's pid cannot be asked
    try:
        os.kill(fields["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # runs, as another user
    return True


class RunStatus:
    """The status of the run in `out`, written from now on (see the module docstring); a
    thread refreshes its heartbeat until `close`."""

    def __init__(self, out: Path, state: str = "validating", detail: str = "") -> None:
        self.out = Path(out)
        self.taken_over = False
        earlier = (self.out / NAME).exists() and not left_by_start(self.out / NAME)
        self.path = self.out / (STARTING if earlier else NAME)
        if not earlier:  # a failed start's, left beside a status.json since removed
            (self.out / STARTING).unlink(missing_ok=True)
        self.started = time.perf_counter()
        self._written = 0.0
        self._training: tuple[float, int] | None = None  # (when, step) training began
        self._lock = threading.Lock()  # one writer at a time: the run and the heartbeat
        self._stop = threading.Event()
        self.fields = {
            "state": state,
            "detail": detail,
            "done": None,
            "total": None,
            "step": 0,
            "total_steps": None,
            "epoch": 0.0,
            "loss": None,
            "tokens_per_second": None,
            "elapsed_seconds": 0.0,
            "eta_seconds": None,
            "peak_memory_bytes": None,
            "predicted_peak_bytes": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "last_checkpoint": None,
            "error": None,
            "taken_over": False,
            "started_at": _now(),
            "updated_at": None,
            "heartbeat_at": None,
        }
        self.update(force=True)
        self._beat = threading.Thread(target=self._keep_beating, daemon=True, name="status")
        self._beat.start()

    def phase(self, name: str, done: int | None, total: int | None, detail: str) -> None:
        """A new phase, or progress within one: written at once when the phase changes or its
        count completes, else at most once a second."""
        if name == "training" and self._training is None:
            self._training = (time.perf_counter(), self.fields["step"])
        changed = name != self.fields["state"] or detail != self.fields["detail"]
        finished = done is not None and done == total  # a counted phase's last count
        self.update(force=changed or finished, state=name, done=done, total=total, detail=detail)

    def update(self, force: bool = False, **fields) -> None:
        with self._lock:
            self.fields.update(fields)
            if force or time.perf_counter() - self._written >= EVERY_SECONDS:
                self._write()

    def take_over(self, **fields) -> None:
        """The run owns output.dir now: its status becomes status.json."""
        with self._lock:
            self.fields.update(fields, taken_over=True)
            self._write()
            if self.path.name != NAME:
                os.replace(self.path, self.out / NAME)
                self.path = self.out / NAME
            self.taken_over = True

    def end(self, state: str, error: str | None = None, detail: str = "", **fields) -> None:
        """How the run ended; `detail`: why, in one line (a stopped run's signal)."""
        self.update(
            force=True, state=state, error=error, detail=detail, done=None, total=None, **fields
        )

    def ended_by(self, e: BaseException) -> None:
        """A run that `e` ends before it took output.dir over says so: interrupted (Ctrl-C),
        else failed with its one-line reason. Nothing once it took over (the run tells its end
        then) or said how it ended."""
        if self.taken_over or self.fields["state"] in ENDED:
            return
        if isinstance(e, KeyboardInterrupt):
            why = "interrupted (Ctrl-C) while starting: output.dir left as it was"
            self.end("interrupted", detail=why)
        else:
            self.end("failed", reason(e), detail=reason(e))

    def close(self) -> None:
        """Stop the heartbeat; the file stays as last written (a run that never took output.dir
        over leaves it beside the earlier run's outputs, saying how it ended). Idempotent."""
        self._stop.set()
        if self._beat.is_alive() and self._beat is not threading.current_thread():
            self._beat.join()

    def _keep_beating(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.update(force=True)
            except OSError:  # a full disk: the run says so itself where it matters
                pass

    def _write(self) -> None:
        now = time.perf_counter()
        f = self.fields
        f["elapsed_seconds"] = round(now - self.started, 2)
        f["updated_at"] = f["heartbeat_at"] = _now()
        step, total = f["step"], f["total_steps"]
        if f["state"] == "training" and self._training is not None and total:
            began, first = self._training
            if step > first:  # the time per step of this run's steps so far
                f["eta_seconds"] = round((now - began) / (step - first) * (total - step), 1)
        elif f["state"] in ENDED:
            f["eta_seconds"] = 0.0 if f["state"] == "completed" else None
        write_text_atomic(self.path, json.dumps(f, indent=2, allow_nan=False) + "\n")
        self._written = now
