"""Progress of a long phase (tokenizing, evaluating, planning, merging) told as counts with an
estimate of the time left: a live bar on a terminal; otherwise (a log, a pipe) a line when the
phase starts, one every EVERY_S seconds while it runs (also while nothing advances: a thread
keeps time), and one when it ends.

    started  "eval after training: answers by generation: 200 samples"
    running  "eval after training: answers by generation: 64 of 200 samples, 10 s, about 21 s left"
    ended    "eval after training: answers by generation: 200 samples done in 31.2 s"

rich draws the bar and keeps its own time on a terminal; its Progress has no form for output
that is not a terminal (it prints nothing until the end), hence the lines here.

A watcher (`watched(tell)`, train/training.py's status.json and events) is told each Phase
entered within its block: on entering, as it advances (at most every TELL_S seconds) and on
leaving, whatever the console shows.

A Phase that prints lines runs a thread: fork worker processes before entering one (plan/search.py
does), as for rich's live bar, whose refresh is a thread too.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bar

EVERY_S = 5.0  # seconds between lines when the output is not a terminal (a log, a pipe)
TICK_S = 1.0  # how often the thread of a Phase that prints lines looks at the clock
TELL_S = 1.0  # how often a watcher hears of an advancing phase
now = time.monotonic  # the clock of every Phase (a test puts a fake one here)
_watchers: list[Callable[[Phase], None]] = []


@contextlib.contextmanager
def watched(tell: Callable[[Phase], None]) -> Iterator[None]:
    """`tell(phase)` about every Phase of the block (its label, done, total, unit)."""
    _watchers.append(tell)
    try:
        yield
    finally:
        _watchers.remove(tell)


def duration(seconds: float) -> str:
    """'8 s', '2 min 05 s', '1 h 04 min'."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Phase:
    """`with Phase(console, "eval before training: generating answers", 200, "samples") as p:
    p.advance(32)`; `p.note("folding")` says what it does now, `p.step("folding")` also
    counts the step noted before it done (merge's steps)."""

    def __init__(self, console: Console, label: str, total: int, unit: str) -> None:
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.done = 0
        self.doing = ""  # what note() last said
        self.started = self.last = now()  # again on entering
        self.bar: Bar | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._lock = threading.Lock()  # one line at a time from advance() and the thread
        self._told = 0.0  # when watchers last heard

    def _tell(self, force: bool) -> None:
        t = now()
        if _watchers and (force or t - self._told >= TELL_S):
            self._told = t
            for tell in list(_watchers):
                tell(self)

    def __enter__(self) -> Phase:
        self.started = self.last = now()
        self._tell(force=True)
        if self.console.quiet:
            return self
        if self.console.is_terminal:
            columns = [  # the texts as written (a label may hold "[" or "{")
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}", markup=False),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[doing]}", markup=False),
            ]
            self.bar = Bar(*columns, console=self.console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, unit=self.unit, doing="")
        else:
            self._print(f"{self.label}: {self.total:,} {self.unit}")
            self._beat = threading.Thread(target=self._keep_time, daemon=True)
            self._beat.start()
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._tell(force=self.done >= self.total)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        else:
            self.tick()

    def note(self, doing: str) -> None:
        """What the phase does now: in the bar, and on a line of its own in a log."""
        self.doing = doing
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, doing=doing)
        else:
            with self._lock:
                self.last = now()
                self._print(self.line(self.last))

    def step(self, doing: str) -> None:
        """For a phase counted in named steps: the step noted before (if any) is done, and
        `doing` is the next (one line in a log)."""
        self.done += 1 if self.doing else 0
        self.note(doing)

    def tick(self) -> None:
        """A line when EVERY_S seconds passed since the last one (output that is not a
        terminal); called on each advance and by the thread."""
        with self._lock:
            t = now()
            if t - self.last < EVERY_S:
                return
            self.last = t
            self._print(self.line(t))

    def line(self, t: float) -> str:
        """'LABEL: DONE of TOTAL UNIT, ELAPSED, about LEFT left' (and what it does now)."""
        elapsed = t - self.started
        text = f"{self.label}: {self.done:,} of {self.total:,} {self.unit}, {duration(elapsed)}"
        if 0 < self.done < self.total:
            text += f", about {duration(elapsed / self.done * (self.total - self.done))} left"
        return text + (f" ({self.doing})" if self.doing else "")

    def _keep_time(self) -> None:
        while not self._stop.wait(TICK_S):
            self.tick()

    def _print(self, text: str) -> None:
        # as written: no markup ("[1/7]"), no colours, no wrapping of a long line in a log
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._tell(force=True)
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.bar is not None:
            self.bar.__exit__(*exc)
        if exc[0] is None:
            seconds = now() - self.started
            self._print(f"{self.label}: {self.done:,} {self.unit} done in {seconds:.1f} s")


PhaseFactory = Callable[[str, int, str], Phase]  # phase(title, total, unit), as stages take it


def phases(console: Console, prefix: str = "") -> PhaseFactory:
    """`phase(title, total, unit)`: a Phase on `console` labelled `prefix: title`."""

    def phase(title: str, total: int, unit: str) -> Phase:
        return Phase(console, f"{prefix}: {title}" if prefix else title, total, unit)

    return phase


def quiet(title: str, total: int, unit: str) -> Phase:
    """A Phase that shows nothing (library calls that no command watches)."""
    return Phase(Console(quiet=True), title, total, unit)


def importing(console: Console, label: str, module: str) -> None:
    """Import `module`, behind which torch, transformers and peft load (seconds: 4 to 12 on
    this project's 2-core machines), counted as a step, unless it is imported already."""
    if module in sys.modules:
        return
    with Phase(console, f"{label}: importing torch, transformers and peft", 1, "step") as p:
        importlib.import_module(module)
        p.advance(1)
