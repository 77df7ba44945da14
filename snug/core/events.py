"""What a run tells whoever watches it, as small event records handed to sinks.

The loop (train/run.py) and run_training (train/training.py) build one event per thing that
happens and give it to a `Reporter`, which hands it to each of its sinks in order. The loop
knows no metric names and no file formats: the console, metrics.jsonl/TensorBoard and
status.json are sinks (train/sinks.py), and a caller adds its own with
`run_training(cfg, sinks=[...])`.

The sink protocol: a sink is any object with the methods it cares about, among

    on_phase(Phase)            from the start: each phase the run enters (validating, tokenizing,
                               planning, loading, evaluating, training, saving; PHASES), and
                               the progress of a counted one (tokenizing: records done/total)
    on_start(Start)            once, when the run takes output.dir over (after its first
                               optimizer step, train/outputs.py), before that step's event
    on_step(Step)              after every optimizer step
    on_eval(Eval)              after every held-out loss of train.eval_every
    on_checkpoint(Checkpoint)  after every complete checkpoint
    on_end(End)                once, last, however the run ended

A run that fails before its first optimizer step sends phases only: no start and no end (its
exit status and error say how it ended, and output.dir is as it was). Only the main rank reports: the other ranks of a distributed run have no sinks. A method runs
inside the loop, so it should be quick; an exception it raises ends the run like any other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What a run does, in the order it does it (auto_fit's planning only with memory.auto_fit,
# evaluating only with eval data; a resumed run loads its checkpoint in `loading`).
PHASES = (
    "validating",  # config read; output.dir's lock held and checked; importing, the device
    "tokenizing",  # the tokenizer, then the data (done/total: records)
    "planning",  # memory.auto_fit searching the fastest settings that fit
    "loading",  # the model, the method applied, a resumed run's checkpoint
    "evaluating",  # the held-out evaluation before training and after it
    "training",  # the optimizer steps (their progress comes as Step events)
    "saving",  # the final adapter or model
)


@dataclass(frozen=True)
class Phase:
    name: str  # one of PHASES
    done: int | None = None  # counted progress within the phase, when it is counted
    total: int | None = None
    detail: str = ""  # what it does now, in words ("tokenizing data/train.jsonl")


@dataclass(frozen=True)
class Start:
    total_steps: int
    steps_done: int  # before this run: a resumed run's checkpoint step, else 0
    predicted_peak_bytes: int | None  # the plan's, when memory.auto_fit planned the run
    last_checkpoint: Path | None  # the checkpoint a resumed run started from


@dataclass(frozen=True)
class Step:
    step: int  # optimizer steps done, this one included
    total_steps: int
    epoch: float  # steps done / steps per epoch, to 3 decimals
    loss: float  # NaN/inf when the step was skipped as non-finite
    lr: float
    grad_norm: float | None  # None where the step does not clip
    tokens_per_second: float  # over the run so far
    peak_memory_bytes: int | None  # measured so far (None on a CPU before a tracked step)
    metrics: dict[str, float]  # the stage's own (cls: accuracy), by whatever names it gives


@dataclass(frozen=True)
class Eval:
    step: int
    eval_loss: float


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


@dataclass(frozen=True)
class End:
    state: str  # completed, stopped, interrupted or failed
    error: str | None  # the first line of a failed run's reason
    peak_memory_bytes: int | None  # the run's measured peak; None if the loop did not finish
    last_checkpoint: Path | None
    reason: str | None = None  # the first line of why it ended: a failed run's error, a
    # stopped run's signal and checkpoint, an interrupted run's Ctrl-C


class Reporter:
    """Hands each event to every sink that has a method for it, in the order sinks came."""

    def __init__(self, sinks=()) -> None:
        self.sinks = list(sinks)

    def attach(self, *sinks) -> None:
        self.sinks.extend(sinks)

    def phase(self, event: Phase) -> None:
        self._send("on_phase", event)

    def start(self, event: Start) -> None:
        self._send("on_start", event)

    def step(self, event: Step) -> None:
        self._send("on_step", event)

    def eval(self, event: Eval) -> None:
        self._send("on_eval", event)

    def checkpoint(self, event: Checkpoint) -> None:
        self._send("on_checkpoint", event)

    def end(self, event: End) -> None:
        self._send("on_end", event)

    def _send(self, method: str, event) -> None:
        for sink in self.sinks:
            # The protocol: a sink has only the methods it cares about, so a missing one is
            # the sink saying "not interested", not a mistake to report.
            handle = getattr(sink, method, None)
            if handle is not None:
                handle(event)
