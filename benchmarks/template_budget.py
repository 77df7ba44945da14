"""What the chat template budget (snug/data/template_budget.py) costs on real data: the CPU
seconds of rendering every conversation of the bundled instruction data with the bundled
tokenizer's template and the built-in ones, and of tokenizing that data (in a fresh datasets
cache each time). Run it against two trees and compare:

  PYTHONPATH=OLD_TREE python benchmarks/template_budget.py render
  PYTHONPATH=.        python benchmarks/template_budget.py render
  PYTHONPATH=.        python benchmarks/template_budget.py render-transformers
  (the same with `tokenize`)

`render-transformers` renders the same conversations with the same templates through
transformers' own compiled templates (what `apply_chat_template` renders with), without any
budget. Each prints the median of 5 runs (CPU seconds of this process; wall time on a shared
machine varies by 2x between runs) and the runs themselves.

  PYTHONPATH=. python benchmarks/template_budget.py long [TEMPLATE.jinja ...]

renders long conversations (1,000 turns of 1,000-character messages; 500 and 1,000 for the
Gemma-style template, which scans back over the messages before each one; 460 and 1,000 for
each TEMPLATE.jinja given) with snug and with transformers, and prints both times (best of 3),
whether the texts are the same, and the steps each took of the steps it may take (before
those of the conversation's characters, which a render that needs them adds).

  PYTHONPATH=. python benchmarks/template_budget.py folder DIR [TURNS]

renders a conversation of TURNS turns (10; a system prompt and messages of about 600
characters) with every *.jinja in DIR (trl's chat_templates, say) five times, with snug and
with transformers, and prints the templates snug is slowest on against transformers, the
median of those ratios, and the total of both.

  PYTHONPATH=. python benchmarks/template_budget.py steps

prints the steps that rendering one conversation of 3,000 short turns spends, with the
bundled template, the built-in Llama 3 one and the styles of tests/test_bombs.py: how much of
the budget a long conversation uses.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

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


def render_transformers(tok) -> float:
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    from snug.data.templates import BUILTIN

    convs = conversations()
    started = time.process_time()
    for template in (tok.chat_template, *BUILTIN.values()):
        compiled = _cached_compile_jinja_template(template)
        for messages in convs:
            for part, gen in ((messages[:1], True), (messages, False)):
                compiled.render(
                    messages=part, tools=None, documents=None, add_generation_prompt=gen,
                    **tok.special_tokens_map,
                )  # fmt: skip
    return time.process_time() - started


def _templates(tok) -> dict[str, str]:
    from snug.data.templates import BUILTIN

    sys.path.insert(0, str(ROOT / "tests"))
    from test_bombs import STYLES
    from test_template_bombs import ACCUMULATES

    return {"bundled": tok.chat_template, "llama3": BUILTIN["llama3"], **STYLES,
            "accumulates": ACCUMULATES}  # fmt: skip


def _spending(render_module, template_budget) -> list:
    """Patches render_module so that each render's budget is kept in the list returned."""
    spent, start = [], template_budget.start

    def keeping(steps: int):
        token = start(steps)
        spent.append(template_budget.current())
        return token

    render_module.start = keeping
    return spent


def steps(tok) -> None:
    from snug.data import render as render_module
    from snug.data import template_budget

    spent = _spending(render_module, template_budget)
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} of a long talk"}
        for i in range(3000)
    ]
    for name, template in _templates(tok).items():
        render_module.render_chat(tok, template, turns, False)
        print(f"{name}: {spent[-1].steps:,.0f} of {spent[-1].limit:,.0f} steps")


def _best_of_3(render: Callable[[], str]) -> tuple[float, str]:
    """The least CPU seconds of 3 calls of `render`, and what it rendered."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        text = render()
        best = min(best, time.process_time() - started)
    return best, text


def long(tok, files: list[str]) -> None:
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    from snug.data import render as render_module
    from snug.data import template_budget

    templates = _templates(tok)
    from test_template_bombs import conversation  # (tests/ is on the path now)

    spent = _spending(render_module, template_budget)
    turns = {
        "bundled": [1000],
        "qwen_like": [1000],
        "accumulates": [1000],
        "gemma_like": [500, 1000],
    }
    for file in files:  # more templates, at 460 and 1,000 turns
        templates[Path(file).name] = Path(file).read_text()
        turns[Path(file).name] = [460, 1000]
    for name, template in templates.items():
        for count in turns.get(name, []):
            messages = conversation(count)
            compiled = _cached_compile_jinja_template(template)
            theirs, their_text = _best_of_3(
                lambda: compiled.render(  # noqa: B023 (called at once)
                    messages=messages, tools=None, documents=None, add_generation_prompt=True,  # noqa: B023
                    **tok.special_tokens_map,
                )
            )  # fmt: skip
            ours, our_text = _best_of_3(
                lambda: render_module.render_chat(tok, template, messages, True)  # noqa: B023
            )
            same = "the same text" if our_text == their_text else "DIFFERENT TEXT"
            print(
                f"{name}, {count} turns: transformers {theirs:.3f} CPU s, snug {ours:.3f} CPU s "
                f"({ours / theirs:.2f}x), {same}, {spent[-1].steps:,.0f} of "
                f"{spent[-1].limit:,.0f} steps"
            )


def folder(tok, path: str, turns: int) -> None:
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    from snug.data.render import ChatTemplate, render_chat

    messages = [{"role": "system", "content": "be nice " * 50}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"q{i} " + "lorem ipsum " * 50})
        messages.append({"role": "assistant", "content": f"a{i} " + "consectetur " * 50})
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    tok = SimpleNamespace(special_tokens_map=specials)
    rows, theirs_all, ours_all = [], 0.0, 0.0
    for file in sorted(Path(path).glob("*.jinja")):
        source = file.read_text()
        compiled = _cached_compile_jinja_template(source)

        def theirs():
            return compiled.render(  # noqa: B023 (called at once)
                messages=messages, tools=None, documents=None, add_generation_prompt=True,
                **specials,
            )  # fmt: skip

        def ours():
            return render_chat(tok, ChatTemplate(source, file.name), messages, True)  # noqa: B023

        try:
            same = theirs() == ours()
        except Exception:  # noqa: BLE001 (a template these messages do not suit: left out)
            continue
        times = []
        for render in (theirs, ours):
            started = time.process_time()
            for _ in range(5):
                render()
            times.append(time.process_time() - started)
        theirs_all, ours_all = theirs_all + times[0], ours_all + times[1]
        rows.append((times[1] / times[0], file.name, same))
    rows.sort()
    for ratio, name, same in rows[-5:]:
        print(f"{name}: {ratio:.1f}x transformers{'' if same else ', DIFFERENT TEXT'}")
    print(
        f"{len(rows)} templates, {sum(not same for *_, same in rows)} rendering differently; "
        f"median {statistics.median(r for r, *_ in rows):.2f}x; in all, transformers "
        f"{theirs_all:.2f} CPU s, snug {ours_all:.2f} CPU s ({ours_all / theirs_all:.2f}x)"
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models/tiny")
    if sys.argv[1] == "folder":
        sys.exit(folder(tok, sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 10))
    if sys.argv[1] == "long":
        sys.exit(long(tok, sys.argv[2:]))
    if sys.argv[1] == "steps":
        sys.exit(steps(tok))
    measure = {
        "render": render, "render-transformers": render_transformers, "tokenize": tokenize
    }[sys.argv[1]]  # fmt: skip
    measure(tok)  # warm: compiled templates, imports
    runs = [round(measure(tok), 3) for _ in range(5)]
    tree = os.environ.get("PYTHONPATH", ".")
    print(f"{sys.argv[1]} ({tree}): median {statistics.median(runs):.3f} CPU s {runs}")
