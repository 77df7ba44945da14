"""What makes a run survivable: the data hash and config checks for resuming, and signals.

Written here because the loop is snug's own (no Trainer): what a checkpoint must match to be
resumed, and how SIGTERM / Ctrl-C turn into "save and stop", are decisions about that loop.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from array import array

from rich.console import Console

from snug.core.registry import get_stage
from snug.errors import UserError

# Keys a resumed run must share with the checkpoint's run: they change which samples are seen,
# in what order, in what batches, or what is trained (and the stage's own section, Stage.section).
# Everything else (steps, lr, eval, logging, output) may change on resume.
GUARDED_SECTIONS = ("data", "method")
GUARDED_KEYS = (
    "model.name_or_path",
    "model.revision",
    "model.quant",
    "model.dtype",
    "train.stage",
    "train.seed",
    "train.micro_batch x processes",  # the global micro-batch: the rows of each micro-step
    "train.grad_accum",
)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again to resume


class ResumeError(UserError):
    """The checkpoint in output.dir belongs to a different run."""


class TrainingStopped(Exception):
    """SIGTERM or Ctrl-C: a checkpoint was saved and the run stopped; running again resumes."""


def data_hash(train_ds) -> str:
    """sha256 of the tokenized training set (input_ids and labels, in order; and a preference
    pair's rejected answer, or a labelled completion's label)."""
    h = hashlib.sha256()
    more = [c for c in ("rejected_ids", "desirable") if c in train_ds.column_names]
    for batch in train_ds.iter(batch_size=1024):
        for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
            h.update(array("q", ids).tobytes())
            h.update(array("q", labels if isinstance(labels, list) else [labels]).tobytes())
            for column in more:
                value = batch[column][i]
                h.update(array("q", value if isinstance(value, list) else [value]).tobytes())
            h.update(b"|")
    return h.hexdigest()


def _flat(cfg: dict) -> dict[str, object]:
    flat = {f"{s}.{k}": v for s, keys in cfg.items() for k, v in keys.items()}
    # What fixes the sample order is the global micro-batch, not how it is split: 2 processes
    # of micro_batch 2 may resume 1 process of micro_batch 4, and back.
    ranks = flat.get("dist.nproc", 1) if flat.get("dist.strategy", "none") != "none" else 1
    flat["train.micro_batch x processes"] = flat.get("train.micro_batch", 1) * ranks
    return flat


def config_drift(saved: dict, now: dict) -> list[str]:
    """The guarded keys whose values differ between the checkpoint's config and this one,
    as 'key: old -> new' lines."""
    old, new = _flat(saved), _flat(now)
    guarded = {*GUARDED_SECTIONS, get_stage(str(new.get("train.stage", "sft"))).section}
    keys = sorted(
        k for k in old.keys() | new.keys() if k in GUARDED_KEYS or k.split(".")[0] in guarded
    )
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class Signals:
    """SIGTERM and the first Ctrl-C ask the loop to save a checkpoint and stop after the
    current step (`requested` names the signal); a second Ctrl-C aborts at once. Handlers are
    installed only in the main thread (signal's rule) and restored on exit."""

    def __init__(self, console: Console) -> None:
        self.console, self.requested, self._old = console, None, {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = signal.Signals(signum).name
        self.console.print(
            f"{self.requested}: saving a checkpoint after this step, then stopping "
            "(Ctrl-C again aborts at once, without saving)"
        )

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
