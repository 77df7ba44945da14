"""Progress of a long phase (tokenizing, evaluating) told as counts: a live bar on a terminal,
otherwise a line when the phase starts, one every half minute, and one when it ends."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar

EVERY_S = 30.0  # seconds between lines when the output is not a terminal (a log, a pipe)


class Phase:
    """`with Phase(console, "eval before training: generating answers", 200, "samples") as p:
    p.advance(32)`."""

    def __init__(self, console: Console, label: str, total: int, unit: str) -> None:
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.done = 0
        self.bar: Bar | None = None

    def __enter__(self) -> Phase:
        self.started = self.last = time.monotonic()
        if self.console.is_terminal:
            columns = [
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            ]
            self.bar = Bar(*columns, console=self.console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total)
        else:
            self.console.print(f"{self.label}: {self.total:,} {self.unit}")
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif time.monotonic() - self.last >= EVERY_S:
            self.last = time.monotonic()
            self.console.print(f"{self.label}: {self.done:,} of {self.total:,} {self.unit}")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        if exc[0] is None:
            seconds = time.monotonic() - self.started
            self.console.print(f"{self.label}: {self.done:,} {self.unit} done in {seconds:.1f} s")
