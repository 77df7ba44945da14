"""snug/runtime/progress.py: what a long phase prints where the output is not a terminal (a log, a
pipe), timed by a fake clock."""

from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console

from snug.runtime import progress
from snug.runtime.progress import Phase


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress, "now", fake)
    monkeypatch.setattr(progress, "TICK_S", 3600.0)  # the thread stays out of the way
    return fake


def log() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=40), out


def test_a_phase_in_a_log_says_its_start_then_every_few_seconds_with_time_left_then_its_end(
    clock,
):
    console, out = log()
    every = progress.EVERY_S
    with Phase(console, "eval: answers by generation", 200, "samples") as p:
        assert out.getvalue() == "eval: answers by generation: 200 samples\n"
        clock.t += every / 2
        p.advance(10)
        assert out.getvalue().count("\n") == 1  # not yet: the last line is too recent
        clock.t += every / 2
        p.advance(40)  # 50 of 200 after EVERY_S seconds: 150 more take 3 x EVERY_S
        clock.t += every - 0.5
        p.advance(50)  # too soon after the last line
        clock.t += 0.5
        p.advance(0)
        clock.t += 100
    lines = out.getvalue().splitlines()
    left = round(3 * every)
    assert (
        lines[1]
        == f"eval: answers by generation: 50 of 200 samples, {round(every)} s, about {left} s left"
    )
    # 100 of 200 after 2 x EVERY_S: as long again
    assert lines[2] == (
        f"eval: answers by generation: 100 of 200 samples, {round(2 * every)} s, about "
        f"{round(2 * every)} s left"
    )
    assert lines[3] == f"eval: answers by generation: 100 samples done in {2 * every + 100:.1f} s"
    assert len(lines) == 4  # long lines are not wrapped at the console's width


def test_while_nothing_advances_the_time_still_goes_on_and_a_note_is_said_at_once(clock):
    console, out = log()
    with Phase(console, "merge", 5, "steps") as p:
        p.note("loading the base")
        clock.t += progress.EVERY_S
        p.tick()  # what the thread does
        p.advance(1)
        clock.t += 200
        p.tick()
    lines = out.getvalue().splitlines()
    assert lines[1] == "merge: 0 of 5 steps, 0 s (loading the base)"
    assert lines[2] == f"merge: 0 of 5 steps, {round(progress.EVERY_S)} s (loading the base)"
    assert lines[3].startswith(f"merge: 1 of 5 steps, 3 min {205 - 180:02d} s, about 13 min")
    assert lines[4].startswith("merge: 1 steps done in")


def test_the_thread_prints_while_the_caller_waits(monkeypatch):
    console, out = log()
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    monkeypatch.setattr(progress, "TICK_S", 0.001)
    seen = threading.Event()

    class Watched(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith("search: 0 of 3"):
                seen.set()
            return super().write(text)

    console = Console(file=Watched(), force_terminal=False)
    with Phase(console, "search", 3, "methods"):
        assert seen.wait(10)  # no advance: the line came from the thread
    assert console.file.getvalue().splitlines()[-1].startswith("search: 0 methods done in")


def test_labels_are_printed_as_written():
    console, out = log()
    with Phase(console, "[1/7] {x} calibrate", 1, "steps") as p:
        p.advance(1)
    assert out.getvalue().splitlines()[0] == "[1/7] {x} calibrate: 1 steps"


def test_an_import_of_seconds_is_counted_once(tmp_path, monkeypatch):
    (tmp_path / "heavy_for_the_test.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    console, out = log()
    progress.importing(console, "plan", "heavy_for_the_test")
    lines = out.getvalue().splitlines()
    assert lines[0] == "plan: importing torch, transformers and peft: 1 step"
    assert lines[-1].startswith("plan: importing torch, transformers and peft: 1 step done in")
    progress.importing(console, "plan", "heavy_for_the_test")  # imported: nothing to wait for
    assert out.getvalue().splitlines() == lines
    monkeypatch.delitem(__import__("sys").modules, "heavy_for_the_test")
