"""Every command in README.md, run in the order the README gives them.

The commands are the lines of the README's ```bash blocks. They run in a scratch folder that
holds a copy of `examples/`, `models/` and `data/` (the files a fresh clone has), so that what
one command writes (runs/quickstart, merged/quickstart, answers.jsonl) is what the next reads,
as for a reader who follows the README from the top. A ```yaml block whose first line is
`# NAME.yaml` is written there as NAME.yaml first (the README's `my.yaml`).

`snug` commands run in this process through `snug.cli.main` (a fresh process costs 5-8 s of
imports here). The test checks each one's exit status and a key line of its output (KEY_LINES;
another test checks that the README shows each of them). Where the README shows a command's
output (a ```text block right after its ```bash block, for the block's last command), the
output must hold those lines in that order, with other numbers and other folders before the
last two parts of a path allowed; for a command the test shrinks (below), only its key line.

So that the whole README runs in seconds, not minutes, exactly these changes are made (the
README's Development section lists them too):
- every `snug train` gets SHRINK_TRAIN appended: 2 steps of one micro-batch each, 2 generated
  answers, 64 samples;
- a `snug plan ... --search` without `--method` gets `--method lora --max-micro-batch 1`: one
  method's settings at one micro-batch, not every method's at every micro-batch (a minute of
  replays for a 7B model on 2 cores, 45 s for the tiny one; 2-3 s so);
- `my_data.jsonl`, the reader's own data in the README, is a copy of data/instruct/train.jsonl.

Commands that cannot run here are only parsed (argparse, and the config loaded where the
command has one; `make -n` for make), each listed in NOT_RUN with the reason."""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from snug.cli import OVERRIDE, build_parser, main

from conftest import ROOT

# one micro-batch a step: the search's chosen.yaml accumulates 16 of one row (at
# --max-micro-batch 1), my.yaml 4 of 4 rows; 2 steps of those were 5 of the test's 31 s here
SHRINK_TRAIN = [
    "train.max_steps=2",
    "train.eval_generate=2",
    "data.max_samples=64",
    "train.grad_accum=1",
]
SHRINK_SEARCH = ["--method", "lora", "--max-micro-batch", "1"]
STAND_INS = {"my_data.jsonl": "data/instruct/train.jsonl"}

# README lines that are only parsed, and why.
NOT_RUN = {
    "make quickstart": "sets up .venv (network) and trains for minutes; `make -n` shows it runs "
    "`snug train examples/quickstart.yaml`, which runs here",
    "make test": "the test suite itself",
    "make preference-demo": "trains the quickstart, merges it and trains dpo.yaml for minutes; "
    "`make -n` shows the steps, tests/test_demo.py how make picks them, and the README's own "
    "merge and dpo commands run here",
    "make test-fast": "the test suite itself",
    "make lint": "ruff over the repo; `make lint` is run before every commit",
    "make data": "rewrites the bundled data in the repo",
    "make base": "retrains models/tiny (about 20 minutes)",
    "pip install -e .": "needs the package registry (network)",
    "pip install flash-attn": "needs the package registry (network) and CUDA",
    "pip install -e '.[serve]'": "needs the package registry (network); the dev extra has it",
    "snug serve --adapter qs=runs/quickstart": "serves until stopped; tests/test_serve.py starts "
    "`snug serve` and drives it with the openai client",
    "pip install -e '.[ui]'": "needs the package registry (network); the dev extra has it",
    "snug ui --root .": "serves until stopped; tests/test_ui.py starts `snug ui` and drives it "
    "in a headless Chromium",
    'curl -s http://127.0.0.1:8000/v1/chat/completions -d \'{"model": "qs", "temperature": 0, '
    '"messages": [{"role": "user", "content": "What is the last word in the list small king uma '
    "lamp rain?\"}]}'": "needs the server above; its "
    "body is checked as JSON here, and tests/test_serve.py sends such requests",
    "snug calibrate": "a minute of real steps, and it writes the user's calibration file; "
    "tests/test_calibrate.py runs it",
    "snug train examples/fsdp.yaml dist.nproc=2": "starts torchrun and 2 ranks (~35 s); "
    "tests/test_dist_signals.py runs `snug train` with torchrun, tests/test_train.py this example",
    "snug train my.yaml dist.strategy=ddp dist.nproc=8": "8 processes (GPUs)",
    "snug train my.yaml dist.strategy=fsdp dist.nproc=8 --nnodes 2 --node-rank 0 "
    "--master-addr 10.0.0.1 --master-port 29500": "two machines",
}

# What each command must print (a line, as a regex), by sub-command.
KEY_LINES = {
    "train": r"saved \S+/(adapter|model)",
    "plan": r"recommended: .+",
    "measure": r"step: (predicted .+, )?measured .+ \(median of \d+ steps after \d+ warm-up steps.*",
    "merge": r"verified on \d+ prompts: largest logit difference .+",
    "generate": r"wrote \d+ answers of \S+ to \S+",
    "eval": r"metric\s+base\s+\S+",
    "chat": r"\[\S+\] you> .*",
    "convert": r"wrote \S+; run it with: snug train \S+",
}
HELP_LINE = r"usage: snug \w+ .*"
LIST_MODELS_LINE = r"Qwen/Qwen2\.5-7B"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n?", re.S | re.M)
NUMBER = r"[+-]?\d+(?:[.,]\d+)*(?:e[+-]?\d+)?"


@dataclass
class Command:
    line: str  # as the README writes it, less its comment
    shown: list[str] | None  # the output the README shows for it


def readme_files(text: str) -> dict[str, str]:
    """The ```yaml blocks whose first line is `# NAME.yaml`: files a reader writes."""
    files = {}
    for lang, body in FENCE.findall(text):
        first = body.split("\n", 1)[0]
        if lang == "yaml" and (m := re.fullmatch(r"# (\S+\.ya?ml)\b.*", first)):
            files[m[1]] = body
    return files


def readme_commands(text: str) -> list[Command]:
    """Every command of the ```bash blocks, in order; a ```text block right after a bash block
    is the output of its last command."""
    blocks = list(FENCE.finditer(text))
    commands = []
    for i, block in enumerate(blocks):
        if block[1] != "bash":
            continue
        lines = [shlex.join(shlex.split(x, comments=True)) for x in block[2].splitlines()]
        lines = [x for x in lines if x]
        after = blocks[i + 1] if i + 1 < len(blocks) else None
        shown = None
        if after and after[1] == "text" and not text[block.end() : after.start()].strip():
            shown = [x for x in after[2].splitlines() if x.strip() and x.strip() != "..."]
        commands += [
            Command(x, shown if j == len(lines) - 1 else None) for j, x in enumerate(lines)
        ]
    return commands


def token_pattern(token: str) -> str:
    """One word of a shown output line as a regex: any number where it shows a number, and any
    folder before the last two parts of a path."""
    prefix = ""
    if "/" in token and re.search(r"[A-Za-z]", token):
        prefix, token = r"\S*", "/".join(token.split("/")[-2:])
    parts = re.split(f"({NUMBER})", token)
    return prefix + "".join(NUMBER if i % 2 else re.escape(p) for i, p in enumerate(parts))


def line_pattern(line: str) -> str:
    return r"\s+".join(map(token_pattern, line.split()))


def missing_lines(shown: list[str], output: str) -> list[str]:
    """The shown lines the output lacks, in order (each after the one before it)."""
    actual = [x.strip() for x in output.splitlines()]
    at, missing = 0, []
    for line in shown:
        pattern = re.compile(line_pattern(line))
        found = next((j for j in range(at, len(actual)) if pattern.fullmatch(actual[j])), None)
        if found is None:
            missing.append(line)
        else:
            at = found + 1
    return missing


def key_line(argv: list[str]) -> str:
    if "--help" in argv:
        return HELP_LINE
    if "--list-models" in argv:
        return LIST_MODELS_LINE
    return KEY_LINES[argv[0]]


def shrunk(argv: list[str]) -> list[str]:
    if argv[0] == "train" and "--help" not in argv:
        return [*argv, *SHRINK_TRAIN]
    if argv[0] == "plan" and "--search" in argv and "--method" not in argv:
        return [*argv, *SHRINK_SEARCH]
    return argv


def scratch_copy(where: Path, text: str) -> Path:
    for name in ("examples", "models", "data"):
        shutil.copytree(ROOT / name, where / name)
    for name in ("Makefile", "pyproject.toml"):  # for `make -n`
        shutil.copy(ROOT / name, where / name)
    for name, stand_in in STAND_INS.items():
        shutil.copy(ROOT / stand_in, where / name)
    for name, body in readme_files(text).items():
        (where / name).write_text(body)
    return where


def parse_only(line: str, where: Path) -> str | None:
    """The problem with a command that is only parsed, or None."""
    words = shlex.split(line)
    if words[0] == "make":
        done = subprocess.run(
            ["make", "-n", *words[1:]],
            cwd=where,
            capture_output=True,
            text=True,
        )
        return None if done.returncode == 0 else f"make -n: {done.stderr.strip()}"
    if words[0] == "pip":
        return None if words[1] == "install" else "not a pip install"
    if words[0] == "curl":  # a request to `snug serve`: its body must be JSON
        import json

        try:
            json.loads(words[words.index("-d") + 1])
        except (ValueError, IndexError) as e:
            return f"curl: no JSON body after -d ({e})"
        return None
    # as snug.cli.main parses: overrides after a flag join the others; SystemExit(2) on a bad
    # option
    args, extra = build_parser().parse_known_args(words[1:])
    if extra and not all(map(OVERRIDE.match, extra)):
        return f"unrecognized arguments: {extra}"
    if getattr(args, "config", None):
        from snug.config import load_config

        load_config(args.config, [*args.overrides, *extra])
    return None


def run_snug(argv: list[str], shown: list[str] | None, capfd, monkeypatch) -> tuple[int, str]:
    if argv[0] == "chat":  # the reader's typed lines, from the shown session
        typed = [x.split("you> ", 1)[1] for x in shown or [] if "you> " in x]
        monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{x}\n" for x in typed)))
    try:
        code = main(argv)
    except SystemExit as e:  # --help
        code = e.code
    out, err = capfd.readouterr()
    return code, out + err


def test_every_readme_command_runs(tmp_path, capfd, monkeypatch):
    """Each command of the README, in order: exit status 0 and its key line, and the lines the
    README shows under it; the ones in NOT_RUN parsed."""
    text = (ROOT / "README.md").read_text()
    where = scratch_copy(tmp_path, text)
    monkeypatch.chdir(where)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps lines at 80 columns in a pipe
    problems, ran = [], []
    for command in readme_commands(text):
        if command.line in NOT_RUN:
            if why := parse_only(command.line, where):
                problems.append(f"{command.line}: {why}")
            continue
        argv = shlex.split(command.line)
        if argv[0] != "snug":
            problems.append(f"{command.line}: neither a snug command nor in NOT_RUN")
            continue
        argv = argv[1:]
        code, output = run_snug(shrunk(argv), command.shown, capfd, monkeypatch)
        ran.append(command.line)
        if code != 0:
            problems.append(f"{command.line}: exit status {code}: {output[-2000:]}")
            continue
        if not re.search(rf"^\s*{key_line(argv)}\s*$", output, re.M):
            problems.append(f"{command.line}: no line like {key_line(argv)!r} in: {output[-2000:]}")
        if command.shown and shrunk(argv) == argv and argv[0] != "chat":
            if missing := missing_lines(command.shown, output):
                problems.append(f"{command.line}: printed no line like {missing} in: {output}")
    assert problems == [], "\n\n".join(problems)
    assert ran, "no command of the README ran"


def test_not_run_lists_only_readme_commands():
    """NOT_RUN names README lines: a command the README dropped is dropped here too."""
    lines = {c.line for c in readme_commands((ROOT / "README.md").read_text())}
    assert sorted(set(NOT_RUN) - lines) == []


def test_each_key_line_is_one_the_readme_shows():
    """The key line checked for each sub-command is one the README shows in an output block."""
    text = (ROOT / "README.md").read_text()
    shown = [
        x.strip() for lang, body in FENCE.findall(text) if lang == "text" for x in body.splitlines()
    ]
    for name, pattern in KEY_LINES.items():
        assert any(re.fullmatch(pattern, x) for x in shown), f"{name}: README shows no {pattern!r}"


@pytest.mark.parametrize(
    "line,output,missing",
    [
        ("saved runs/q/adapter", "saved /tmp/x/runs/q/adapter\n", []),
        ("loss 6.2457 -> 0.1172 (+3.00%)", "loss 7.1 -> 12 (-1.5%)\n", []),
        ("verified on 4 prompts: 1.74e-05", "verified on 4 prompts: 4.29e-06\n", []),
        ("metric  base  qs", "metric base other\n", ["metric  base  qs"]),
        ("wrote a to b", "wrote a to c\n", ["wrote a to b"]),
    ],
)
def test_shown_output_matches_with_other_numbers_and_folders(line, output, missing):
    assert missing_lines([line], output) == missing
