"""Nothing hangs, nothing explodes (issue 33, points 5-8): files snug reads that are built to
make it run forever or fill memory are refused in one line, within a bound that a test can
wait for.

Each case that would hang on a snug without the bound runs under `deadline`, so that the test
fails (instead of hanging the suite) where the bound is missing."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from snug.cli import main


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """TimeoutError in this (the main) thread once `seconds` have passed."""

    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_error(capsys) -> str:
    """The one line a command printed on stderr."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# -- 5: YAML alias bombs -------------------------------------------------------------------------
def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" shape: each anchor a list of `width` aliases of the one before
    (width ** levels strings once expanded, a few hundred bytes as written)."""
    lines = ["a: &a [" + ", ".join(['"lol"'] * width) + "]"]
    names = "abcdefghijklmnopqrstuvwxyz"
    for before, name in zip(names[: levels - 1], names[1:levels], strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{before}"] * width) + "]")
    return "\n".join(lines) + "\n"


def bomb_run(tmp_path: Path) -> Path:
    """A run folder whose config.yaml is an alias bomb (what generate and merge read first)."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(alias_bomb())
    return run


BOMB_COMMANDS = {
    "train": lambda tmp: ["train", str(tmp / "bomb.yaml")],
    "plan": lambda tmp: ["plan", str(tmp / "bomb.yaml")],
    "generate": lambda tmp: [
        "generate",
        "--adapter",
        str(bomb_run(tmp)),
        "--input",
        str(tmp / "in.jsonl"),
        "--output",
        str(tmp / "out.jsonl"),
    ],  # fmt: skip
    "merge": lambda tmp: ["merge", "--adapter", str(bomb_run(tmp)), "--out", str(tmp / "m")],
}


@pytest.mark.parametrize("command", sorted(BOMB_COMMANDS))
def test_a_yaml_alias_bomb_is_refused_in_one_line(command, tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(alias_bomb())
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    argv = BOMB_COMMANDS[command](tmp_path)
    import snug.deploy.generate  # noqa: F401  (imports torch: not part of the time bound)
    import snug.deploy.merge  # noqa: F401

    with deadline(2):
        code = main(argv)
    line = one_error(capsys)
    assert code == 2
    config = "bomb.yaml" if command in ("train", "plan") else "run/config.yaml"
    assert config in line and "line 5" in line and "alias" in line, line
    assert not (tmp_path / "m").exists() and not (tmp_path / "out.jsonl").exists()


def test_yaml_loops_huge_files_deep_nesting_and_bombs_on_the_command_line_are_refused(tmp_path):
    from snug.config import ConfigError, load_config
    from snug.yamlfile import MAX_BYTES, MAX_DEPTH, MAX_NODES

    cfg = tmp_path / "c.yaml"
    cases = {
        "train:\n  x: &loop [1, *loop]\n": r"c\.yaml line 2: this value holds an alias of itself",
        "a:\n  b: "
        + "[" * 400
        + "]" * 400
        + "\n": rf"c\.yaml line 2: values nested more than {MAX_DEPTH}",
        "# " + "x" * MAX_BYTES + "\n": rf"c\.yaml: more than {MAX_BYTES:,} bytes",
    }
    for text, message in cases.items():
        cfg.write_text(text)
        with deadline(2), pytest.raises(ConfigError, match=message):
            load_config(cfg)
    bomb = "[" + ", ".join(["&a [" + ", ".join(["1"] * 9) + "]"] + ["*a"] * (MAX_NODES // 10)) + "]"
    with deadline(2), pytest.raises(ConfigError, match=r"override 'train\.lr=.*line 1: its alias"):
        load_config(None, [f"train.lr={bomb}"])


def test_anchors_and_merge_keys_within_the_bound_still_load():
    from snug.config import ConfigError
    from snug.yamlfile import load_text

    text = "base: &b {x: 1, y: [1, 2]}\nmore: {<<: *b, z: *b}\n"
    lines: dict[str, int] = {}
    loaded = load_text(text, "c.yaml", ConfigError, lines)
    assert loaded == {
        "base": {"x": 1, "y": [1, 2]},
        "more": {"x": 1, "y": [1, 2], "z": {"x": 1, "y": [1, 2]}},
    }
    assert lines["more.z"] == 2 and lines["base.x"] == 1
