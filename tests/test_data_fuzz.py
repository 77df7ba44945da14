"""Random JSON values in every field of every data format: `snug train` either trains or stops
with one clean error naming the file and the line, never a traceback (Hypothesis).

Each generated case writes a file of three records of one format (alpaca, sharegpt, messages,
or text for train.stage=pt). Records 1 and 3 are valid, their texts drawn from strings that
look like other JSON values ("4", "true", "null", "[1, 2]"), which a reader that coerces types
would misread; record 2 has one or two of its fields (at any depth: a turn, a role, a history
pair) replaced by a random JSON value or removed. The command line runs in this process on a
tiny model, under data.on_error strict or skip. Then: it trained, keeping both valid records
(and, under skip, dropping at most line 2, named), or it stopped with one line naming the file
and line 2. The cases are derandomized, so every run of the suite tries the same ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snug.cli import main

from conftest import make_tiny_model

EXAMPLES = 60
TEMPLATES = {
    "alpaca": {
        "instruction": "Give the first word.",
        "input": "red cat",
        "output": "red",
        "system": "Be brief.",
        "history": [["hi", "hello"]],
    },
    "sharegpt": {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        "system": "Be brief.",
    },
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    },
    "text": {"text": "red blue green cat dog sun moon tree"},
}
REMOVE = object()  # the field is left out
# Where each format holds text (not role names): valid records get drawn strings there.
TEXT_LEAVES = {
    "alpaca": [
        ("instruction",),
        ("input",),
        ("output",),
        ("system",),
        ("history", 0, 0),
        ("history", 0, 1),
    ],
    "sharegpt": [("conversations", 0, "value"), ("conversations", 1, "value"), ("system",)],
    "messages": [
        ("messages", 0, "content"),
        ("messages", 1, "content"),
        ("messages", 2, "content"),
    ],
    "text": [("text",)],
}
TRICKY = ["4", "true", "null", "[1, 2]", '{"a": 1}', "1e5", "-0", "red cat", "NaN"]


def paths(value, prefix=()) -> list[tuple]:
    """Every place in a record a value can be: each key and item, containers included."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths(v, (*prefix, i))
    return found


def replace(record, path: tuple, new):
    record = json.loads(json.dumps(record))
    parent = record
    for part in path[:-1]:
        parent = parent[part]
    if new is REMOVE:
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    else:
        parent[path[-1]] = new
    return record


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def valid(draw, fmt: str) -> dict:
    record = TEMPLATES[fmt]
    for where in TEXT_LEAVES[fmt]:
        record = replace(record, where, draw(st.sampled_from(TRICKY)))
    return record


@st.composite
def cases(draw):
    fmt = draw(st.sampled_from(sorted(TEMPLATES)))
    record = draw(valid(fmt))
    for _ in range(draw(st.integers(1, 2))):
        if not paths(record):  # every field removed already
            break
        where = draw(st.sampled_from(paths(record)))
        new = draw(st.one_of(json_values, st.just(REMOVE)))
        record = replace(record, where, new)
    good = (draw(valid(fmt)), draw(valid(fmt)))
    return fmt, good, record, draw(st.sampled_from(["strict", "skip"]))


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("fuzz") / "model", tokenizer)


@pytest.mark.slow
def test_random_json_in_every_field_trains_or_names_file_and_line(model, tmp_path, capsys):
    seen: list[tuple[str, int]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(cases())
    def one(case):
        fmt, good, bad, on_error = case
        n = len(seen)
        data = tmp_path / f"data-{n}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in (good[0], bad, good[1])))
        cfg = tmp_path / f"cfg-{n}.yaml"
        raw = {
            "model": {"name_or_path": str(model)},
            "method": {"name": "full"},  # what trains is no matter here: 0.12 s a run, LoRA 0.18
            "data": {"train": str(data), "cutoff_len": 64, "on_error": on_error},
            "train": {
                "stage": "pt" if fmt == "text" else "sft",
                "max_steps": 1,
                "micro_batch": 3,
                "grad_accum": 1,
                "eval_generate": 0,
            },
            "memory": {"grad_checkpointing": False},
            "output": {"dir": str(tmp_path / f"run-{n}"), "plot_loss": False},
        }
        cfg.write_text(yaml.safe_dump(raw))
        capsys.readouterr()
        code = main(["train", str(cfg)])
        err = capsys.readouterr().err
        seen.append((fmt, code))
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        if code == 0:
            summary = json.loads((tmp_path / f"run-{n}/summary.json").read_text())
            assert summary["status"] == "completed"
            kept, problems = summary["data"]["kept"], summary["data"]["problems"]
            assert kept in (2, 3), (good, bad, summary["data"])  # the valid records, as written
            if kept == 2:  # only the bad one dropped, and named
                assert on_error == "skip" and problems[0].startswith(f"{data} line 2:"), problems
            return
        assert code == 2 and on_error == "strict", (fmt, bad, err)  # skip keeps the valid two
        assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
        assert errors[0].startswith(f"error: {data} line 2:"), (bad, errors[0])

    one()
    trained = sum(code == 0 for _, code in seen)
    with capsys.disabled():
        print(
            f"\nhypothesis: {len(seen)} generated cases ({trained} trained, "
            f"{len(seen) - trained} stopped with one line naming file and line)"
        )
    assert len(seen) >= EXAMPLES // 2
