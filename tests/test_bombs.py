"""Nothing hangs, nothing explodes (issue 33, points 5-8): files snug reads that are built to
make it run forever or fill memory are refused in one line, within a bound that a test can
wait for.

Each case that would hang on a snug without the bound runs under `deadline`, so that the test
fails (instead of hanging the suite) where the bound is missing."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from snug.cli import main

from conftest import ROOT, write_jsonl


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """TimeoutError in this (the main) thread once it has spent `seconds` of CPU time, or once
    twelve times that (at least a minute) has passed on the clock (a wait that spends none).
    The work is what is bounded, not the machine's load: on 2 cores shared with other jobs a
    render that takes 2 s alone took past 5 s of the clock (issue 33's busy runs)."""

    def stop(signum, frame):
        clock = "of CPU time" if signum == signal.SIGPROF else "on the clock"
        raise TimeoutError(f"still running after {seconds} s {clock}")

    old = {s: signal.signal(s, stop) for s in (signal.SIGPROF, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_PROF, seconds)
    signal.setitimer(signal.ITIMER_REAL, max(60.0, 12 * seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in old.items():
            signal.signal(s, handler)


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
    from snug.config.yamlfile import MAX_BYTES, MAX_DEPTH, MAX_NODES

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
    from snug.config.yamlfile import load_text

    text = "base: &b {x: 1, y: [1, 2]}\nmore: {<<: *b, z: *b}\n"
    lines: dict[str, int] = {}
    loaded = load_text(text, "c.yaml", ConfigError, lines)
    assert loaded == {
        "base": {"x": 1, "y": [1, 2]},
        "more": {"x": 1, "y": [1, 2], "z": {"x": 1, "y": [1, 2]}},
    }
    assert lines["more.z"] == 2 and lines["base.x"] == 1


# -- 6: chat templates that never end ----------------------------------------------------------
NEVER_ENDS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    + (ROOT / "models/tiny/chat_template.jinja").read_text()
)
READS_A_FILE = "{{ cycler.__init__.__globals__.os.popen('cat /etc/passwd').read() }}"
REFUSES = (
    "{% if messages[0]['content'] == 'no' %}{{ raise_exception('I will not say no') }}{% endif %}"
    + (ROOT / "models/tiny/chat_template.jinja").read_text()
)


def model_with_template(tmp_path: Path, template: str) -> Path:
    """The bundled tiny model with `template` as its chat_template.jinja."""
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models/tiny", model)
    (model / "chat_template.jinja").write_text(template)
    return model


def train_config(tmp_path: Path, model: Path, rows: list[dict], **data) -> Path:
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(tmp_path / "train.jsonl"), "cutoff_len": 64, **data},
        "train": {"max_steps": 1, "eval_generate": 0},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


ROWS = [{"instruction": "Say yes.", "output": "yes"}, {"instruction": "no", "output": "ok"}]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (NEVER_ENDS, r"did not finish within 1,000,000 steps"),
        (READS_A_FILE, r"tried what the sandbox forbids \(access to attribute '__init__'"),
    ],
    ids=["never_ends", "reads_a_file"],
)
def test_a_chat_template_that_never_ends_or_reads_a_file_stops_training_naming_it(
    template, message, tmp_path, capsys
):
    cfg = train_config(tmp_path, model_with_template(tmp_path, template), ROWS)
    with deadline(20):  # the model and data load first; the template fails at once
        code = main(["train", str(cfg)])
    line = one_error(capsys)
    assert code == 2
    assert re.search(rf"error: \S*model/chat_template\.jinja: the chat template {message}", line)
    assert "unexpected" not in line
    # the run could not start: its folder holds only its status, failed with the same reason
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["status.json"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].split(": ", 1)[1] == line[7:]


def test_a_conversation_the_template_refuses_is_one_records_problem(tmp_path, capsys):
    cfg = train_config(tmp_path, model_with_template(tmp_path, REFUSES), ROWS)
    assert main(["train", str(cfg)]) == 2
    line = one_error(capsys)
    assert re.search(
        r"train\.jsonl line 2: the chat template \(\S*chat_template\.jinja\) refuses this "
        r"conversation \(I will not say no\); fix the record, or set data.on_error: skip",
        line,
    ), line
    cfg = train_config(tmp_path, cfg.parent / "model", ROWS, on_error="skip")
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert (summary["data"]["kept"], summary["data"]["invalid"]) == (1, 1), summary["data"]


def test_a_conversation_too_long_for_the_budget_is_one_records_problem(tmp_path):
    """The budget of steps grows with the conversation (2,000 steps a message on top of
    1,000,000): a render past it on a conversation of 500 messages or more is that record's
    problem, which data.on_error=skip drops (before: a TemplateError that stopped the run
    whatever data.on_error said, blaming the template as "loops without end"); on a shorter
    one, the template's (test_a_chat_template_that_never_ends_...)."""
    from transformers import AutoTokenizer

    from snug.config import DataConfig
    from snug.data.dataset import build_datasets

    # A template whose work explodes on long conversations, as one whose steps grow with the
    # square of the messages does on some conversation long enough.
    template = (
        "{% if messages|length > 600 %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}"
        + (ROOT / "models/tiny/chat_template.jinja").read_text()
    )
    model = model_with_template(tmp_path, template)
    tok = AutoTokenizer.from_pretrained(model)
    long = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"part {i}"} for i in range(602)
    ]
    short = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]
    write_jsonl(tmp_path / "t.jsonl", [{"messages": long}, {"messages": short}])
    cfg = DataConfig(train=str(tmp_path / "t.jsonl"), cutoff_len=32768, on_error="skip")
    with deadline(20):
        train, _, stats = build_datasets(cfg, tok, "sft", 0, str(model))
    assert (stats.kept, stats.invalid, len(train)) == (1, 1, 1), stats
    assert re.fullmatch(
        r"\S*t\.jsonl line 1: the chat template \(\S*model/chat_template\.jinja\) did not finish "
        r"this conversation of 601 messages within 2,202,\d{3} steps \(1,000,000 steps, 2,000 "
        r"more a message and one more per 10 characters\): its work grows faster than the "
        r"conversation\.",
        stats.problems[0],
    ), stats.problems


def test_chat_and_generate_render_within_the_budget_too(tokenizer):
    from snug.data.render import ChatTemplate, TemplateError, TemplateRefused
    from snug.deploy.session import Session

    def session(template: str) -> Session:
        return Session(None, tokenizer, ChatTemplate(template, "m/chat_template.jinja"), None)

    hi = [{"role": "user", "content": "hi"}]
    with deadline(5), pytest.raises(TemplateError, match=r"m/chat_template\.jinja: .*1,000,000"):
        session(NEVER_ENDS).prompt_ids(hi)
    with pytest.raises(TemplateRefused, match=r"I will not say no"):
        session(REFUSES).prompt_ids([{"role": "user", "content": "no"}])
    text = tokenizer.apply_chat_template(
        hi, chat_template=REFUSES, add_generation_prompt=True, tokenize=False
    )
    assert session(REFUSES).prompt_ids(hi) == tokenizer(text, add_special_tokens=False)["input_ids"]


# Templates in the styles of widely used models (written here: the hub is not reachable in
# tests), using what real templates use: namespaces, loop variables, macros, reversed and
# sliced messages, tojson, strip and trim, dict(), range(), raise_exception on a branch not
# taken, and transformers' {% generation %} tag.
STYLES = {
    "llama3_like": """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content']|trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{{- system }}{{- "<|eot_id|>" }}
{%- for message in messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}""",
    "qwen_like": """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == "user" %}{%- set ns.multi_step_tool = false %}
{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}
{%- if message.role == "user" or message.role == "system" %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{ message.content }}{% endgeneration %}
{%- if loop.index0 > ns.last_query_index %}{{- '' }}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
""",
    "macros_and_json": """{% macro turn(m, n) -%}
[{{ n }}] {{ m.role|upper }}: {{ m.content|tojson }}{{ "\\n" }}
{%- endmacro %}{% set meta = dict(count=messages|length) %}
{%- for m in messages %}{{ turn(m, loop.index) }}{% if loop.last %}({{ meta.count }} turns,
{%- for i in range(2) %} {{ i }}{% endfor %}){% endif %}{% endfor %}
{%- if add_generation_prompt %}{{ eos_token ~ "ASSISTANT:" }}{% endif %}""",
    # Gemma 4's way (trl's gemma4.jinja): for each message, a scan back over every message
    # before it for the last one that is not a tool's, so its steps grow with the square of
    # the messages.
    "gemma_like": """{{- bos_token }}{%- set loop_messages = messages %}
{%- if messages[0]['role'] == 'system' %}
{{- '<|turn>system\\n' + messages[0]['content'] | trim + '<turn|>\\n' }}
{%- set loop_messages = messages[1:] %}{%- endif %}
{%- for message in loop_messages %}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
{%- set prev_nt = namespace(role=None, found=false) %}
{%- if loop.index0 > 0 %}{%- for j in range(loop.index0 - 1, -1, -1) %}
{%- if not prev_nt.found %}{%- if loop_messages[j]['role'] != 'tool' %}
{%- set prev_nt.role = loop_messages[j]['role'] %}{%- set prev_nt.found = true %}
{%- endif %}{%- endif %}{%- endfor %}{%- endif %}
{%- if not (role == 'model' and prev_nt.role == 'assistant') %}{{- '<|turn>' + role + '\\n' }}
{%- endif %}{{- message['content'] | trim + '<turn|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|turn>model\\n' }}{%- endif %}""",
}
CONVERSATIONS = [
    [
        {"role": "user", "content": "Give the first word.\n\nred cat"},
        {"role": "assistant", "content": "red"},
    ],
    [
        {"role": "system", "content": "Be brief.  "},
        {"role": "user", "content": "Is {{ this }} a template? {% raw %}"},
        {"role": "assistant", "content": 'No: "quotes", ünïcödé, \\ and\ttabs.'},
        {"role": "user", "content": "And <|im_end|>?"},
        {"role": "assistant", "content": "Text."},
    ],
]


def every_template(tokenizer) -> dict[str, str]:
    from snug.data.templates import BUILTIN

    distinct = {template: name for name, template in reversed(BUILTIN.items())}  # yi is chatml...
    return {"models/tiny": tokenizer.chat_template, **{n: t for t, n in distinct.items()}, **STYLES}


def test_templates_render_byte_identical_to_transformers(tokenizer):
    from snug.data.render import render_chat

    compared, templates = 0, every_template(tokenizer)
    for name, template in templates.items():
        for messages in CONVERSATIONS:
            for k in range(1, len(messages) + 1):
                for gen in (False, True):
                    ours = render_chat(tokenizer, template, messages[:k], gen)
                    theirs = tokenizer.apply_chat_template(
                        messages[:k], chat_template=template, tokenize=False,
                        add_generation_prompt=gen,
                    )  # fmt: skip
                    assert ours == theirs, (name, k, gen)
                    compared += 1
    assert compared == len(templates) * 2 * (2 + 5)


# -- 7, 8: long records and long conversations ---------------------------------------------------
def _budget(src: int, tgt: int, budget: int) -> tuple[int, int]:
    """How snug split a turn's budget before issue 35 (it now splits as LLaMA-Factory does)."""
    if src + tgt <= budget:
        return src, tgt
    if tgt <= budget // 2:
        keep_tgt = tgt
    elif src <= budget // 2:
        keep_tgt = budget - src
    else:
        keep_tgt = max(1, budget * tgt // (src + tgt))
    return min(src, budget - keep_tgt), keep_tgt


def encode_chat_before(tok, template, messages, cutoff_len, train_on_prompt):
    """snug's encode_chat as it was before issue 33 (ebda891), rendering through
    transformers and every turn first: the reference the tokenized results of the samples
    that fit must equal (and of a long prompt before a short answer, cut alike since)."""
    from snug.data.tokenize import EMPTY, FULLY_MASKED, IGNORE, KEPT, TRUNCATED

    def render(msgs, gen):
        return tok.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=gen
        )

    pairs, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt, full = render(messages[:k], True), render(messages[: k + 1], False)
            pairs.append((prompt[len(done) :], full[len(prompt) :]))
            done = full
    ids, labels, status, prompt_len = [], [], KEPT, 0
    for k, (prompt, answer) in enumerate(pairs):
        src = tok(prompt, add_special_tokens=False)["input_ids"]
        tgt = tok(answer, add_special_tokens=False)["input_ids"]
        n_src, n_tgt = _budget(len(src), len(tgt), cutoff_len - len(ids))
        if (n_src, n_tgt) != (len(src), len(tgt)):
            status = TRUNCATED
            if k > 0 and n_src < len(src):
                break
        head = 1 if n_src < len(src) and n_src > 1 and src[0] in tok.all_special_ids else 0
        src, tgt = src[:head] + src[len(src) - n_src + head :], tgt[:n_tgt]
        prompt_len = len(ids) + len(src)
        ids += src + tgt
        labels += (src if train_on_prompt else [IGNORE] * len(src)) + tgt
        if len(ids) >= cutoff_len:
            status = TRUNCATED if k < len(pairs) - 1 else status
            break
    if not ids:
        return ids, labels, EMPTY, 0
    if all(x == IGNORE for x in labels[1:]):
        return ids, labels, FULLY_MASKED, prompt_len
    return ids, labels, status, prompt_len


def conversations() -> list[list[dict]]:
    """The bundled held-out instructions, and multi-turn cases for every truncation rule: a
    system prompt, a long first prompt, a long answer, both long, a later turn whose prompt
    does not fit."""
    from snug.data.formats import to_canonical

    lines = (ROOT / "data/instruct/heldout.jsonl").read_text().splitlines()
    bundled = [to_canonical(json.loads(line), "alpaca", "x")["messages"] for line in lines[:60]]
    long = " ".join(f"word{i}" for i in range(40))
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"question {i}: " + (long if i == 2 else "short")},
            {"role": "assistant", "content": f"answer {i}: " + (long if i == 4 else "ok")},
        ]
    return bundled + [
        [{"role": "system", "content": "Be brief."}, *turns],
        turns,
        [{"role": "user", "content": long}, {"role": "assistant", "content": long}],
        [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}, *turns],
    ]


def test_tokenized_conversations_are_byte_identical_to_before(tokenizer):
    from snug.data.templates import BUILTIN
    from snug.data.tokenize import encode_chat

    templates = [tokenizer.chat_template, BUILTIN["llama3"], STYLES["qwen_like"]]
    compared = cut = 0
    for template in templates:
        for messages in conversations():
            for cutoff in (8, 24, 64, 512):
                for train_on_prompt in (False, True):
                    args = (tokenizer, template, messages, cutoff, train_on_prompt)
                    ours, before = encode_chat(*args, "x"), encode_chat_before(*args)
                    if before[2] == "truncated":  # cut otherwise since issue 35
                        assert ours[2] == "truncated" and len(ours[0]) <= cutoff
                        cut += 1
                        continue
                    assert ours == before, (cutoff, messages)
                    compared += 1
    assert compared + cut == 3 * 64 * 4 * 2 and compared > 500 and cut > 0


def test_a_long_conversation_renders_only_the_turns_that_fit(tokenizer, monkeypatch):
    from snug.data import tokenize, truncate

    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} of a long talk"}
        for i in range(3000)
    ]
    rendered = []
    render = tokenize.render_chat
    for module in (tokenize, truncate):  # encode_chat's turns, and the end that fits
        monkeypatch.setattr(
            module,
            "render_chat",
            lambda tok, t, msgs, *a: rendered.append(len(msgs)) or render(tok, t, msgs, *a),
        )
    ids, labels, status, _ = tokenize.encode_chat(
        tokenizer, tokenizer.chat_template, turns, 128, False, "x"
    )
    assert status == "truncated" and len(ids) <= 128
    # the turns that fit in 128 tokens and one more, then the end: up to twice what fits
    assert max(rendered) < 60, rendered
    kept = tokenizer.decode(ids).count("<|im_start|>assistant")
    assert (ids, labels) == encode_chat_before(
        tokenizer, tokenizer.chat_template, turns[-2 * kept :], 128, False
    )[:2]
    one_more = turns[-2 * kept - 2 :]
    assert (
        len(encode_chat_before(tokenizer, tokenizer.chat_template, one_more, 10**4, False)[0]) > 128
    )


def test_a_huge_message_is_cut_to_what_cutoff_len_can_keep_and_counted(tokenizer, tmp_path):
    """A 60,000-character instruction (a 30 MB one, scaled down) under cutoff_len 16 keeps the
    tokens it kept before, is counted as clipped, and is never rendered whole."""
    from snug.config import DataConfig
    from snug.data.dataset import build_datasets
    from snug.data.tokenize import text_limit

    huge = " ".join(f"w{i}" for i in range(10_000)) + " end of the instruction"
    rows = [{"instruction": huge, "output": "ok"}, {"instruction": "Say yes.", "output": "yes"}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "t.jsonl"), cutoff_len=16)
    train, _, stats = build_datasets(cfg, tokenizer, "sft", 0, str(ROOT / "models/tiny"))
    assert (stats.kept, stats.truncated, stats.clipped) == (2, 2, 1), stats
    assert text_limit(tokenizer, 16) < len(huge) // 100
    messages = [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]
    before = encode_chat_before(tokenizer, tokenizer.chat_template, messages, 16, False)
    assert train[0]["input_ids"] == before[0] and train[0]["labels"] == before[1]
    assert stats.as_dict()["clipped"] == 1


def test_a_text_record_is_tokenized_in_pieces_and_one_too_long_is_named(
    tokenizer, tmp_path, monkeypatch
):
    from snug.config import DataConfig
    from snug.data import tokenize
    from snug.data.dataset import build_datasets
    from snug.data.formats import DataError

    lines = (ROOT / "data/corpus/corpus.jsonl").read_text().splitlines()[:20]
    text = "\n".join(json.loads(line)["text"] for line in lines) + "\n  two  spaces\n\n"
    whole = tokenizer(text, add_special_tokens=True)["input_ids"]
    monkeypatch.setattr(tokenize, "TEXT_CHUNK", 300)
    assert len(text) > 15 * 300
    assert tokenize._text_ids(tokenizer, text) == whole

    monkeypatch.setattr(tokenize, "MAX_TEXT_CHARS", 1000)
    write_jsonl(tmp_path / "c.jsonl", [{"text": "short text"}, {"text": text}])
    cfg = DataConfig(train=str(tmp_path / "c.jsonl"), cutoff_len=64)
    message = rf"c\.jsonl line 2: field 'text' holds {len(text):,} characters, more than the 1,000"
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, tokenizer, "pt", 0, "tiny")


def test_a_json_line_over_the_limit_is_refused_naming_it(tokenizer, tmp_path, monkeypatch):
    from snug.config import DataConfig
    from snug.data import locate
    from snug.data.dataset import build_datasets
    from snug.data.formats import DataError

    monkeypatch.setattr(locate, "MAX_LINE_BYTES", 1000)
    rows = [{"instruction": "a", "output": "b"}] * 3 + [{"instruction": "x" * 2000, "output": "b"}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "t.jsonl"))
    with pytest.raises(DataError, match=r"t\.jsonl line 4: longer than 1,000 bytes"):
        build_datasets(cfg, tokenizer, "sft", 0, "tiny")


# -- 11: tokenizing tells its progress -------------------------------------------------------------
def test_tokenizing_tells_its_progress_batch_by_batch(tokenizer, tmp_path, monkeypatch):
    from rich.console import Console

    from snug.config import DataConfig
    from snug.data import dataset

    told: list[tuple] = []

    class Phase:  # snug.runtime.progress.Phase's API, recording what it is told
        def __init__(self, console, label, total, unit):
            told.append((label, total, unit))

        def __enter__(self):
            return self

        def advance(self, n: int) -> None:
            told.append(n)

        def __exit__(self, *exc) -> None:
            told.append("end")

    monkeypatch.setattr(dataset, "Phase", Phase)
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(250)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "t.jsonl"))
    console = Console(file=io.StringIO(), width=400)
    dataset.build_datasets(cfg, tokenizer, "sft", 0, "tiny", console)
    assert told == [(f"tokenizing {tmp_path}/t.jsonl", 250, "records"), 100, 100, 50, 0, "end"]
    told.clear()
    dataset.build_datasets(cfg, tokenizer, "sft", 0, "tiny", console)  # from the cache
    assert told == [(f"tokenizing {tmp_path}/t.jsonl", 250, "records"), 250, "end"]
    assert f"tokenized {tmp_path}/t.jsonl: 250 samples, 0 dropped" in console.file.getvalue()


# -- 7: an adapter's numbers are checked against its weights and its base ------------------------
# The number each method's config says, set to what it is not (the weights hold 4, 20 or 64).
TAMPERED = {
    "lora": ("adapter_config.json", "r", 2000),
    "dora": ("adapter_config.json", "r", 2000),
    "prefix": ("adapter_config.json", "num_virtual_tokens", 2000),
    "prompt": ("adapter_config.json", "num_virtual_tokens", 2000),
    "ptuning": ("adapter_config.json", "num_virtual_tokens", 2000),
    "llama_adapter": ("adapter_config.json", "adapter_len", 2000),
    "adapter": ("snug_adapter.json", "bottleneck", 2000),
}


SMALL = {"lora": "r", "dora": "r", "adapter": "bottleneck"}  # else num_virtual_tokens


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory) -> dict[str, Path]:
    """An untrained adapter of every method that has numbers in its config, on models/tiny."""
    from transformers import AutoModelForCausalLM

    from snug.config import load_config
    from snug.core.registry import get_method
    from snug.methods import apply_method

    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(ROOT / "models/tiny")
    for method in TAMPERED:
        size = f"method.{SMALL.get(method, 'num_virtual_tokens')}=4"
        cfg = load_config(None, [f"method.name={method}", size, "memory.grad_checkpointing=false"])
        model = apply_method(copy.deepcopy(base), cfg.method)
        get_method(method).save(model, root / method)
    return {method: root / method for method in TAMPERED}


@pytest.mark.parametrize("method", sorted(TAMPERED))
def test_an_adapter_config_that_disagrees_with_its_weights_is_refused_naming_the_key(
    method, saved_adapters, tmp_path
):
    from snug.deploy.merge import find_source
    from snug.methods.saved import SavedAdapterError

    base = str(ROOT / "models/tiny")
    assert find_source(saved_adapters[method], base).method == method  # as saved: loads
    adapter = shutil.copytree(saved_adapters[method], tmp_path / method)
    name, key, value = TAMPERED[method]
    config = json.loads((adapter / name).read_text())
    config[key] = value
    (adapter / name).write_text(json.dumps(config))
    with pytest.raises(SavedAdapterError, match=rf"{method}/{name}: {key} is {value}, but .*"):
        find_source(adapter, base)


def refused_before_loading(command, adapter, tmp_path, capsys, monkeypatch) -> str:
    """`snug generate` or `snug merge` of `adapter`: exit 2 and the one line it says, the base
    model never loaded."""
    from snug.deploy import merge, session

    def never(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(session, "load_model", never)
    monkeypatch.setattr(merge, "load_model", never)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    argv = {
        "generate": ["generate", "--adapter", str(adapter), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "out.jsonl")],
        "merge": ["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")],
    }[command]  # fmt: skip
    assert main(argv) == 2
    return one_error(capsys)


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_generate_and_merge_refuse_a_tampered_adapter_before_loading_the_base(
    command, saved_adapters, tmp_path, capsys, monkeypatch
):
    """r: 2000000 in adapter_config.json made generate allocate 9.5 GB and merge ask for
    ~156 GB before peft said "size mismatch"; now nothing is loaded."""
    adapter = shutil.copytree(saved_adapters["lora"], tmp_path / "lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 2_000_000}))

    line = refused_before_loading(command, adapter, tmp_path, capsys, monkeypatch)
    assert re.search(
        r"lora/adapter_config\.json: r is 2000000, but adapter_model\.safetensors holds ranks up "
        r"to 4 \(base_model\.\S+\.lora_A\.weight\)",
        line,
    ), line
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_a_huge_adapter_config_is_refused_in_one_line_before_it_is_read(
    command, saved_adapters, tmp_path, capsys, monkeypatch
):
    """adapter_config.json goes through one reader with a size limit (saved.read_config):
    merge's own reader, which ran first for both commands, read and parsed any size (before:
    a 2 MB file was read whole and reported as "not valid JSON")."""
    from snug.methods.saved import MAX_CONFIG_BYTES

    adapter = shutil.copytree(saved_adapters["lora"], tmp_path / "lora")
    text = '{"peft_type": "LORA", "pad": "' + "x" * 2 * MAX_CONFIG_BYTES  # never closed
    (adapter / "adapter_config.json").write_text(text)

    line = refused_before_loading(command, adapter, tmp_path, capsys, monkeypatch)
    assert re.search(
        rf"lora/adapter_config\.json: more than {MAX_CONFIG_BYTES:,} bytes, too large for the "
        "adapter config",
        line,
    ), line
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out.jsonl").exists()


def test_an_adapter_for_another_base_is_refused_naming_the_base_key(
    saved_adapters, tmp_path, tokenizer
):
    from snug.deploy.merge import find_source
    from snug.methods.saved import SavedAdapterError

    from conftest import make_tiny_model

    other = make_tiny_model("llama", tmp_path / "narrow", tokenizer)  # hidden_size 32
    with pytest.raises(
        SavedAdapterError,
        match=r"prompt/adapter_config\.json: token_dim is 256, but the base model's config\.json "
        r"has hidden_size 32: the adapter belongs to another base",
    ):
        find_source(saved_adapters["prompt"], str(other))
    with pytest.raises(
        SavedAdapterError, match=r"snug_adapter\.safetensors: .* has hidden_size 32"
    ):
        find_source(saved_adapters["adapter"], str(other))


def test_a_huge_preference_prompt_or_answer_is_cut_too(tokenizer, monkeypatch):
    from snug.data import preference

    huge = " ".join(f"w{i}" for i in range(10_000))
    columns = {"prompt": [huge, "Say it."], "chosen": ["yes", huge], "rejected": ["no", "no"]}

    def tokenized() -> dict[str, list]:
        return preference.tokenize_pairs(
            columns, [0, 1], tok=tokenizer, template=tokenizer.chat_template, cutoff_len=16,
            paired=True, where=lambda i: f"row {i}",
        )  # fmt: skip

    cut = tokenized()
    monkeypatch.setattr(preference, "text_limit", lambda tok, cutoff_len: 10**9)
    whole = tokenized()
    assert cut["status"] == ["clipped", "clipped"] and whole["status"] == ["truncated"] * 2
    for column in ("input_ids", "labels", "rejected_ids", "rejected_labels", "prompt_len"):
        assert cut[column] == whole[column], column
