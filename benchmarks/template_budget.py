"""What the chat template budget (snug/data/template_budget.py) costs on real data: the CPU
seconds of rendering every conversation of the bundled instruction data with the bundled
tokenizer's template and the built-in ones, and of tokenizing that data (in a fresh datasets
cache each time). Run it against two trees and compare:

  PYTHONPATH=OLD_TREE python benchmarks/template_budget.py render
  PYTHONPATH=.        python benchmarks/template_budget.py render
  (the same with `tokenize`)

Each prints the median of 5 runs (CPU seconds of this process; wall time on a shared machine
varies by 2x between runs) and the runs themselves.

  PYTHONPATH=. python benchmarks/template_budget.py steps

prints the steps and the characters and items built that rendering one conversation of 3,000
turns spends, with the bundled template, the built-in Llama 3 one and the styles of
tests/test_bombs.py: how much of the budget a long conversation uses.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data/instruct/train.jsonl"


def conversations() -> list[list[dict]]:
    from snug.data.formats import to_canonical

    lines = DATA.read_text().splitlines()
    return [to_canonical(json.loads(line), "alpaca", "x")["messages"] for line in lines]


def render(tok) -> float:
    from snug.data.render import render_chat
    from snug.data.templates import BUILTIN

    convs = conversations()
    started = time.process_time()
    for template in (tok.chat_template, *BUILTIN.values()):
        for messages in convs:
            render_chat(tok, template, messages[:1], True)
            render_chat(tok, template, messages, False)
    return time.process_time() - started


def tokenize(tok) -> float:
    import datasets

    from snug.config import DataConfig
    from snug.data.dataset import build_datasets

    datasets.config.HF_DATASETS_CACHE = Path(tempfile.mkdtemp(prefix="snug-bench-"))
    started = time.process_time()
    build_datasets(DataConfig(train=str(DATA)), tok, "sft", 0, "tiny")
    return time.process_time() - started


def steps(tok) -> None:
    from snug.data import render as render_module
    from snug.data import template_budget
    from snug.data.templates import BUILTIN

    sys.path.insert(0, str(ROOT / "tests"))
    from test_bombs import STYLES

    spent = []
    start = render_module.start
    render_module.start = lambda: (
        spent.append(template_budget._Spent())
        or (  # type: ignore
            template_budget._spent.set(spent[-1])
        )
    )
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} of a long talk"}
        for i in range(3000)
    ]
    try:
        for name, template in {
            "bundled": tok.chat_template,
            "llama3": BUILTIN["llama3"],
            **STYLES,
        }.items():
            render_module.render_chat(tok, template, turns, False)
            print(
                f"{name}: {spent[-1].steps:,} steps, {spent[-1].built:,} characters and items built"
            )
    finally:
        render_module.start = start


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models/tiny")
    if sys.argv[1] == "steps":
        sys.exit(steps(tok))
    measure = {"render": render, "tokenize": tokenize}[sys.argv[1]]
    measure(tok)  # warm: compiled templates, imports
    runs = [round(measure(tok), 3) for _ in range(5)]
    tree = os.environ.get("PYTHONPATH", ".")
    print(f"{sys.argv[1]} ({tree}): median {statistics.median(runs):.3f} CPU s {runs}")
