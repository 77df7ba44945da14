import functools
import json
import re

import pytest

from snug.config import DataConfig
from snug.data.collate import collate
from snug.data.dataset import build_datasets
from snug.data.formats import DataError, detect_format, to_canonical
from snug.data.templates import BUILTIN, TemplateError, resolve_template
from snug.data.tokenize import IGNORE, chat_segments, encode_chat, tokenize_records

from conftest import write_jsonl

CHAT = [
    {"role": "user", "content": "Give the first word.\n\nred cat"},
    {"role": "assistant", "content": "red"},
]


def test_formats_detected_and_converted():
    alpaca = {"instruction": "Say hi.", "input": "", "output": "hi", "system": "be brief"}
    share = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    msgs = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert [detect_format(r, "x") for r in (alpaca, share, msgs, {"text": "t"})] == [
        "alpaca",
        "sharegpt",
        "messages",
        "text",
    ]
    assert to_canonical(alpaca, "alpaca", "x")["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
    ]
    assert to_canonical(share, "sharegpt", "x") == to_canonical(msgs, "messages", "x")


def test_sharegpt_roles_out_of_order_named():
    bad = {"conversations": [{"from": "gpt", "value": "b"}, {"from": "human", "value": "a"}]}
    with pytest.raises(
        DataError, match=r"f.jsonl row 3: field 'conversations' turn 1 is from 'assistant'"
    ):
        to_canonical(bad, "sharegpt", "f.jsonl row 3")


def test_missing_field_and_wrong_type_named():
    with pytest.raises(DataError, match=r"row 2: field 'output' must be a string"):
        to_canonical({"instruction": "a", "output": 3}, "alpaca", "row 2")
    with pytest.raises(DataError, match=r"cannot tell the format"):
        detect_format({"question": "a"}, "row 1")


def test_labels_mask_prompt_and_padding_exactly(tokenizer):
    template = tokenizer.chat_template
    ids, labels, status, prompt_len = encode_chat(tokenizer, template, CHAT, 128, False, "x")
    prompt, answer = chat_segments(tokenizer, template, CHAT, "x")[0]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert status == "kept" and prompt_len == n_prompt
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:]) == answer == "red<|im_end|>\n"
    short = {"input_ids": [1, 2], "labels": [IGNORE, 2]}
    batch = collate([{"input_ids": ids, "labels": labels}, short], pad_id=tokenizer.pad_token_id)
    assert batch["labels"][1, 2:].eq(IGNORE).all() and batch["attention_mask"][1, 2:].eq(0).all()
    assert batch["input_ids"][1, 2:].eq(tokenizer.pad_token_id).all()


def test_train_on_prompt_keeps_all_labels(tokenizer):
    ids, labels, _, _ = encode_chat(tokenizer, tokenizer.chat_template, CHAT, 128, True, "x")
    assert labels == ids


def test_cutoff_keeps_part_of_the_answer(tokenizer):
    long = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "cat " * 100},
    ]
    ids, labels, status, _ = encode_chat(tokenizer, tokenizer.chat_template, long, 64, False, "x")
    assert status == "truncated" and len(ids) == 64
    targets = sum(x != IGNORE for x in labels)
    assert 0 < targets < 64
    # The kept prompt ends with the assistant header, so the answer follows it as at inference.
    assert tokenizer.decode(ids[: len(ids) - targets]).endswith("<|im_start|>assistant\n")


def test_multi_turn_masks_every_prompt_and_drops_the_earliest_turn(tokenizer):
    convo = [*CHAT, {"role": "user", "content": "again"}, {"role": "assistant", "content": "cat"}]
    ids, labels, status, prompt_len = encode_chat(
        tokenizer, tokenizer.chat_template, convo, 128, False, "x"
    )
    targets = tokenizer.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE])
    assert targets == "red<|im_end|>\ncat<|im_end|>\n" and status == "kept"
    assert tokenizer.decode(ids[prompt_len:]) == "cat<|im_end|>\n"
    last = encode_chat(tokenizer, tokenizer.chat_template, convo[2:], 128, False, "x")
    ids2, labels2, status2, _ = encode_chat(
        tokenizer, tokenizer.chat_template, convo, len(last[0]) + 3, False, "x"
    )
    assert status2 == "truncated" and (ids2, labels2) == last[:2]  # the first exchange went


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_render_prefix_by_prefix(tokenizer, name):
    convo = [
        {"role": "system", "content": "sys"},
        *CHAT,
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "cat"},
    ]
    pairs = chat_segments(tokenizer, BUILTIN[name], convo, "x")
    # An answer may start with what its template puts before the content (a space, a thought).
    assert len(pairs) == 2 and "red" in pairs[0][1] and "cat" in pairs[1][1]
    assert "cat" not in pairs[0][1] and "red" not in pairs[1][1]


def test_missing_template_is_a_clear_error(tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template; set data.template"):
        resolve_template(bare, "auto", "my-model")


def test_build_datasets_mix_split_limit_and_stats(tmp_path, tokenizer):
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]
    )
    b = tmp_path / "b.json"
    b.write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": f"m{i}"},
                        {"role": "assistant", "content": "ok"},
                    ]
                }
                for i in range(10)
            ]
        )
    )
    cfg = DataConfig(train=[str(a), str(b)], val_size=0.2, max_samples=20, cutoff_len=64)
    train, evals, stats = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert stats.kept == 30 and stats.dropped == 0  # 20 of a (max_samples) + 10 of b
    assert len(train) == 24 and len(evals) == 6


def test_truncated_samples_are_counted_and_keep_targets(tmp_path, tokenizer):
    rows = [{"instruction": "word " * 100, "output": "x"}, {"instruction": "q", "output": "a"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, stats = build_datasets(
        DataConfig(train=str(path), cutoff_len=8), tokenizer, "sft", 0, "t"
    )
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 2, 0)
    assert all(any(x != IGNORE for x in row["labels"][1:]) for row in train)


def test_sample_without_answer_tokens_is_fully_masked(tokenizer):
    drops_answers = "{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% endif %}{% endfor %}"
    ids, labels, status, _ = encode_chat(tokenizer, drops_answers, CHAT, 64, False, "x")
    assert status == "fully_masked" and all(x == IGNORE for x in labels)


def test_csv_parquet_and_directory(tmp_path, tokenizer):
    import pandas as pd

    df = pd.DataFrame({"instruction": ["a", "b"], "output": ["x", "y"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "pq").mkdir()
    df.to_parquet(tmp_path / "pq" / "part.parquet")
    for spec in (tmp_path / "d.csv", tmp_path / "pq"):
        train, _, stats = build_datasets(DataConfig(train=str(spec)), tokenizer, "sft", 0, "tiny")
        assert len(train) == 2 and stats.kept == 2


def test_pt_stage_splits_long_text_without_losing_tokens(tmp_path, tokenizer):
    text = "the red cat saw the dog. " * 40
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    train, _, _ = build_datasets(
        DataConfig(train=str(path), cutoff_len=32), tokenizer, "pt", 0, "tiny"
    )
    n = len(tokenizer(text)["input_ids"]) + 1  # + eos
    assert sum(len(r["input_ids"]) for r in train) == n and all(
        len(r["input_ids"]) <= 32 for r in train
    )
    assert all(r["labels"] == r["input_ids"] for r in train)


def test_unreadable_source_names_file(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/missing.jsonl: no such file"):  # not a hub id
        build_datasets(DataConfig(train="data/missing.jsonl"), tokenizer, "sft", 0, "tiny")
    with pytest.raises(DataError, match=r"nope.jsonl: no such file"):
        build_datasets(DataConfig(train=str(tmp_path / "nope.jsonl")), tokenizer, "sft", 0, "tiny")
    wrong = write_jsonl(tmp_path / "w.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"w.jsonl: train.stage=pt needs plain text"):
        build_datasets(DataConfig(train=str(wrong)), tokenizer, "pt", 0, "tiny")


def test_tokenized_data_is_cached_and_save_to_disk_dirs_load(tmp_path, tokenizer):
    from datasets import Dataset

    path = write_jsonl(
        tmp_path / "c.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(8)]
    )
    cfg = DataConfig(train=str(path))
    first, _, _ = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    again, _, _ = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert first.cache_files and again.cache_files == first.cache_files  # reused, not redone
    longer, _, _ = build_datasets(
        DataConfig(train=str(path), cutoff_len=64), tokenizer, "sft", 0, "tiny"
    )
    assert longer.cache_files != first.cache_files  # a setting that changes tokens misses
    Dataset.from_list([{"text": "the red cat."}] * 3).save_to_disk(tmp_path / "saved")
    train, _, _ = build_datasets(
        DataConfig(train=str(tmp_path / "saved")), tokenizer, "pt", 0, "tiny"
    )
    assert len(train) == 3


def test_val_size_that_leaves_nothing_is_named(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "v.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(5)]
    )
    with pytest.raises(DataError, match=r"data.val_size=200 holds out 200 of 5 samples"):
        build_datasets(DataConfig(train=str(path), val_size=200), tokenizer, "sft", 0, "tiny")


# Bad input: each case as line 3 of a JSON Lines file (line 2 is blank, so the line is not the
# row), between good records of the same format. Strict names file, line and field; skip drops
# and counts it.
ALPACA = json.dumps({"instruction": "q", "output": "a"})
SHAREGPT = json.dumps(
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
)
BAD_RECORDS = {
    "malformed_line": (ALPACA, '{"instruction": "q", "output": "a"', r"not valid JSON \("),
    "missing_field": (ALPACA, json.dumps({"instruction": "q"}), r"field 'output' is missing"),
    "wrong_type": (
        ALPACA,
        json.dumps({"instruction": "q", "output": 3}),
        r"field 'output' must be a string, not int",
    ),
    "not_a_record": (ALPACA, "[1, 2]", r"holds a JSON list, not a record"),
    "empty_sample": (
        ALPACA,
        json.dumps({"instruction": " ", "output": "a"}),
        r"field 'instruction' is empty",
    ),
    "roles_out_of_order": (
        SHAREGPT,
        json.dumps(
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}
        ),
        r"field 'conversations' turn 1 is from 'assistant' where 'user' was expected",
    ),
}


def _file_with_bad_line(tmp_path, case: str, blank_line: bool = True):
    good, bad, message = BAD_RECORDS[case]
    lines = [good, "" if blank_line else good, bad, good, good]
    path = tmp_path / f"{case}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, message


@pytest.mark.parametrize("blank_line", [True, False], ids=["blank_line", "no_blank_line"])
@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_strict_names_file_line_and_field(tmp_path, tokenizer, case, blank_line):
    path, message = _file_with_bad_line(tmp_path, case, blank_line)
    with pytest.raises(DataError) as failure:
        build_datasets(DataConfig(train=str(path)), tokenizer, "sft", 0, "tiny")
    text = str(failure.value)
    assert re.match(rf"{re.escape(str(path))} line 3: {message}", text), text
    assert text.endswith("or set data.on_error: skip to drop such records.") or text.endswith(
        "or set data.on_error: skip to drop such lines."
    )
    assert "\n" not in text


@pytest.mark.parametrize("blank_line", [True, False], ids=["blank_line", "no_blank_line"])
@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_skip_drops_and_counts_it(tmp_path, tokenizer, case, blank_line):
    path, message = _file_with_bad_line(tmp_path, case, blank_line)
    cfg = DataConfig(train=str(path), on_error="skip")
    train, _, stats = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    n_good = 3 if blank_line else 4
    assert len(train) == stats.kept == n_good
    assert (stats.dropped, stats.invalid) == (1, 1)
    assert len(stats.problems) == 1
    assert re.match(rf"{re.escape(str(path))} line 3: {message}", stats.problems[0])
    summary = stats.as_dict()
    assert summary["invalid"] == 1 and summary["problems"] == stats.problems
    assert {"kept", "dropped", "truncated", "fully_masked", "empty"} <= set(summary)


def test_bad_record_in_csv_is_named_by_row(tmp_path, tokenizer):
    import pandas as pd

    path = tmp_path / "d.csv"
    pd.DataFrame({"instruction": ["a", "b", "c"], "output": ["x", None, "z"]}).to_csv(
        path, index=False
    )
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 2: field 'output'"):
        build_datasets(DataConfig(train=str(path)), tokenizer, "sft", 0, "tiny")
    cfg = DataConfig(train=str(path), on_error="skip")
    train, _, stats = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert len(train) == 2 and stats.invalid == 1 and "row 2" in stats.problems[0]


def test_json_array_names_the_line(tmp_path, tokenizer):
    items = [{"instruction": "a", "output": "x"}, {"instruction": "b", "output": 3}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(items, indent=2))  # the second item opens on line 6
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 6: field 'output'"):
        build_datasets(DataConfig(train=str(path)), tokenizer, "sft", 0, "tiny")
    # A syntax error spoils the whole array: named, and not skipped.
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(items, indent=2).replace('"output": 3', '"output" 3'))
    for on_error in ("strict", "skip"):
        cfg = DataConfig(train=str(broken), on_error=on_error)
        with pytest.raises(DataError, match=r"broken.json line 8: not valid JSON \(Expecting ':'"):
            build_datasets(cfg, tokenizer, "sft", 0, "tiny")


def test_directory_of_jsonl_names_the_file_of_a_bad_line(tmp_path, tokenizer):
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir/a.jsonl", [{"instruction": "q", "output": "a"}] * 3)
    b = tmp_path / "dir/b.jsonl"
    b.write_text(ALPACA + "\n" + json.dumps({"instruction": "q"}) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(b))} line 2: field 'output' is missing"):
        build_datasets(DataConfig(train=str(tmp_path / "dir")), tokenizer, "sft", 0, "tiny")


# A chat template that renders no answer for replies starting with "skip": such samples have
# every label masked.
DROPS_SOME_ANSWERS = (
    "{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n"
    "{% elif not m['content'].startswith('skip') %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
)


@pytest.fixture
def answer_dropping_tokenizer(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = DROPS_SOME_ANSWERS
    return tok


def test_fully_masked_sample_strict_names_row_and_hint(tmp_path, answer_dropping_tokenizer):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "skip me"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError) as failure:
        build_datasets(DataConfig(train=str(path)), answer_dropping_tokenizer, "sft", 0, "t")
    text = str(failure.value)
    assert text.startswith(f"{path} line 2: field 'output' leaves no answer token to train on")
    assert "raise data.cutoff_len, or set data.on_error: skip" in text
    cfg = DataConfig(train=str(path), on_error="skip")
    train, _, stats = build_datasets(cfg, answer_dropping_tokenizer, "sft", 0, "t")
    assert len(train) == 1 and (stats.fully_masked, stats.dropped, stats.invalid) == (1, 1, 0)
    assert stats.problems[0].startswith(f"{path} line 2: field 'output'")


def test_no_fully_masked_sample_reaches_training_with_tiny_cutoff(
    tmp_path, answer_dropping_tokenizer
):
    rows = [
        {"instruction": "word " * n, "output": ("skip " if n % 3 == 0 else "") + "cat " * m}
        for n in (1, 5, 40)
        for m in (1, 6, 40)
    ]
    rows += [
        {"instruction": "a", "output": "b", "history": [["word " * 30, "skip " * 30]]},
        {"instruction": "word " * 30, "output": "cat", "history": [["a", "b"]]},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=str(path), cutoff_len=8, on_error="skip")
    train, _, stats = build_datasets(cfg, answer_dropping_tokenizer, "sft", 0, "t")
    assert stats.fully_masked > 0 and stats.truncated > 0  # both kinds were in the data
    assert len(train) == stats.kept > 0
    for sample in train:
        assert len(sample["input_ids"]) <= 8
        assert any(x != IGNORE for x in sample["labels"][1:]), sample
    # So every sample of a batch has loss targets: no NaN and no silent 0.0 loss.
    batch = collate(list(train), pad_id=answer_dropping_tokenizer.pad_token_id)
    assert (batch["labels"][:, 1:] != IGNORE).sum(1).min() > 0


@pytest.mark.parametrize("on_error", ["strict", "skip"])
def test_missing_chat_template_always_fails_naming_file_and_key(tmp_path, tokenizer, on_error):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "q", "output": "a"}])
    cfg = DataConfig(train=str(path), on_error=on_error)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: alpaca records need a chat "):
        build_datasets(cfg, bare, "sft", 0, "my-model")
    with pytest.raises(TemplateError, match=r"my-model has no chat template; set data.template"):
        build_datasets(cfg, bare, "sft", 0, "my-model")


def test_strict_and_skip_share_the_cached_tokenization(tmp_path, tokenizer, monkeypatch):
    import snug.data.dataset as dataset

    path, _ = _file_with_bad_line(tmp_path, "missing_field", blank_line=False)
    build_datasets(DataConfig(train=str(path), on_error="skip"), tokenizer, "sft", 0, "tiny")
    calls = []
    monkeypatch.setattr(
        dataset, "tokenize_records", lambda *a, **k: calls.append(1) or tokenize_records(*a, **k)
    )
    with pytest.raises(DataError, match=r"line 3: field 'output' is missing"):
        build_datasets(DataConfig(train=str(path)), tokenizer, "sft", 0, "tiny")
    assert calls == []  # strict read skip's cached map; it decided after the map


def test_problems_listed_are_capped_but_all_counted(tmp_path, tokenizer):
    rows = [{"instruction": "q", "output": "a"}] + [{"instruction": "q"}] * 25
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    cfg = DataConfig(train=str(path), on_error="skip")
    _, _, stats = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert stats.invalid == stats.dropped == 25 and len(stats.problems) == 20
    assert stats.problems[0].startswith(f"{path} line 2:")


def test_every_record_bad_is_named_even_under_skip(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "all.jsonl", [{"instruction": "q", "output": 1}] * 3)
    cfg = DataConfig(train=str(path), on_error="skip")
    with pytest.raises(
        DataError, match=r"no usable samples remain \(3 dropped; the first: .*line 1"
    ):
        build_datasets(cfg, tokenizer, "sft", 0, "tiny")


def test_bad_eval_record_is_dropped_and_listed(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "q", "output": "a"}] * 4)
    held = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"instruction": "q", "output": 1}, {"instruction": "q", "output": "a"}],
    )
    cfg = DataConfig(train=str(train), eval=str(held), on_error="skip")
    _, evals, stats = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert len(evals) == 1 and stats.eval_dropped == 1 and stats.dropped == 0
    assert stats.problems == [f"{held} line 1: field 'output' must be a string, not int."]
    with pytest.raises(DataError, match=r"eval.jsonl line 1: field 'output'"):
        build_datasets(DataConfig(train=str(train), eval=str(held)), tokenizer, "sft", 0, "tiny")


def test_classification_record_without_label_is_named(tmp_path, tokenizer):
    rows = [{"text": "red cat", "label": "a"}, {"text": "blue", "label": "b"}, {"text": "x"}]
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    with pytest.raises(DataError, match=r"cls.jsonl line 3: field 'label' is missing"):
        build_datasets(DataConfig(train=str(path)), tokenizer, "cls", 0, "tiny")
    cfg = DataConfig(train=str(path), on_error="skip")
    train, _, stats = build_datasets(cfg, tokenizer, "cls", 0, "tiny")
    assert len(train) == 2 and stats.labels == ["a", "b"] and stats.invalid == 1


def test_format_is_told_by_the_fields_a_record_fills():
    # `datasets` gives each record every column of the file, None where it lacks one.
    record = {"instruction": "q", "output": "a", "conversations": None}
    assert detect_format(record, "x") == "alpaca"
    assert detect_format({"instruction": "q", "output": None}, "x") == "alpaca"


def test_a_named_pipe_as_data_is_refused_before_it_is_opened(tmp_path):
    """A FIFO (or one inside a data directory) is named and refused, never opened: opening it
    would wait for a writer forever, and its records could not be read twice."""
    import os

    from snug.data.sources import load_raw

    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(DataError, match=rf"^{tmp_path}/pipe.jsonl is a named pipe \(FIFO\), not"):
        load_raw(str(tmp_path / "pipe.jsonl"), "train")
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "there"}])
    with pytest.raises(DataError, match=rf"^{tmp_path} holds {tmp_path}/pipe.jsonl, a named pipe"):
        load_raw(str(tmp_path), "train")


# -- LLaMA-Factory's formats (issue 35): .txt, typed content, v1 pairs, media, placeholders


def _v1(role: str, *parts: dict, loss_weight: float | None = None) -> dict:
    """A message as LLaMA-Factory v1 writes it: typed parts, a loss_weight per message."""
    message = {"role": role, "content": list(parts)}
    return message if loss_weight is None else {**message, "loss_weight": loss_weight}


def _text(value: str, key: str = "value") -> dict:
    return {"type": "text", key: value}


def test_txt_file_trains_pt_one_sample_per_line(tmp_path, tokenizer):
    path = tmp_path / "wiki.txt"
    path.write_text("the red cat\n\nsaw the dog\nand ran\n", encoding="utf-8")
    train, _, stats = build_datasets(DataConfig(train=str(path)), tokenizer, "pt", 0, "tiny")
    eos = [tokenizer.eos_token_id]
    lines = ["the red cat", "saw the dog", "and ran"]  # the blank line holds no document
    assert [r["input_ids"] for r in train] == [tokenizer(t)["input_ids"] + eos for t in lines]
    assert stats.kept == 3 and stats.dropped == 0


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "cls"])
def test_txt_file_for_another_stage_is_refused_naming_file_and_stage(tmp_path, tokenizer, stage):
    path = tmp_path / "wiki.txt"
    path.write_text("the red cat\nsaw the dog\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: .*only train.stage=pt.*train.stage={stage}"
    ):
        build_datasets(DataConfig(train=str(path)), tokenizer, stage, 0, "tiny")


def test_typed_text_parts_are_joined_as_written():
    openai = {
        "messages": [
            {"role": "user", "content": [_text("Name a ", "text"), _text("colour.", "text")]},
            {"role": "assistant", "content": [_text("red")]},
        ]
    }
    v1 = {
        "messages": [
            _v1("user", _text("Name a "), _text("colour.")),
            _v1("assistant", _text("red")),
        ]
    }
    plain = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]
    assert to_canonical(openai, "messages", "x")["messages"] == plain
    assert to_canonical(v1, "messages", "x")["messages"] == plain


def test_loss_weight_zero_masks_that_answer_and_others_are_refused(tokenizer):
    turns = [
        _v1("user", _text("a"), loss_weight=0.0),
        _v1("assistant", _text("first answer"), loss_weight=0.0),
        _v1("user", _text("b"), loss_weight=0.0),
        _v1("assistant", _text("second"), loss_weight=1.0),
    ]
    messages = to_canonical({"messages": turns}, "messages", "x")["messages"]
    template = tokenizer.chat_template
    ids, labels, status, _ = encode_chat(tokenizer, template, messages, 256, False, "x")
    trained = tokenizer.decode([t for t in labels if t != IGNORE])
    assert status == "kept" and "second" in trained and "first" not in trained
    halves = [{**turns[0]}, {**turns[1], "loss_weight": 0.5}]
    with pytest.raises(DataError, match=r"f.jsonl line 4: .*turn 2 has loss_weight 0.5; .*0 or 1"):
        to_canonical({"messages": halves}, "messages", "f.jsonl line 4")
    trains_user = [{**turns[0], "loss_weight": 1.0}, turns[3]]
    with pytest.raises(DataError, match=r"turn 1 .*user.* loss_weight 1.0"):
        to_canonical({"messages": trains_user}, "messages", "x")


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "http://x/1.jpg"}},
        {"type": "image", "value": "1.jpg"},
        {"type": "input_audio", "input_audio": {"data": "..."}},
        {"type": "video", "value": "1.mp4"},
        {"type": "file", "file": {"file_id": "f"}},
    ],
)
def test_media_parts_are_refused_naming_the_record(part):
    record = {"messages": [_v1("user", _text("look"), part), _v1("assistant", _text("ok"))]}
    kind = part["type"].removeprefix("input_").removesuffix("_url")
    with pytest.raises(DataError, match=rf"^m.json line 7: .*turn 1 .*{kind}.*text only"):
        to_canonical(record, "messages", "m.json line 7")


@pytest.mark.parametrize("column", ["images", "videos", "audios"])
def test_records_carrying_media_are_refused_never_trained_as_text(tmp_path, tokenizer, column):
    chat = [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Kane."}]
    path = tmp_path / "mllm.json"
    path.write_text(
        json.dumps([{"messages": chat, column: []}, {"messages": chat, column: ["1.jpg"]}])
    )
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line \d+: .*'{column}'.*text"):
        build_datasets(DataConfig(train=str(path)), tokenizer, "sft", 0, "tiny")
    _, _, stats = build_datasets(
        DataConfig(train=str(path), on_error="skip"), tokenizer, "sft", 0, "t"
    )
    assert stats.kept == 1 and stats.invalid == 1  # the empty list carries nothing


THINKING = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m.get('reasoning_content') %}<think>"
    "{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_reasoning_parts_render_as_the_thinking_block_else_are_refused(tmp_path, tokenizer):
    reasoning = {"type": "reasoning", "value": "the cat is red"}
    record = {
        "messages": [_v1("user", _text("colour?")), _v1("assistant", reasoning, _text("red"))]
    }
    fn = functools.partial(
        tokenize_records,
        tok=tokenizer,
        fmt="messages",
        cutoff_len=256,
        train_on_prompt=False,
        max_chars=10_000,
        where=lambda i: f"r.jsonl line {i + 1}",
    )
    out = fn({"messages": [record["messages"]]}, [0], template=THINKING)
    answer = tokenizer.decode([t for t in out["labels"][0] if t != IGNORE])
    assert out["status"] == ["kept"]
    assert "<think>thecatisred</think>red" in answer.replace(" ", "")
    out = fn({"messages": [record["messages"]]}, [0], template=BUILTIN["chatml"])
    assert out["status"] == ["invalid"]
    assert re.match(r"r.jsonl line 1: .*reasoning.*thinking", out["problem"][0])


def test_v1_chosen_and_rejected_messages_are_read_as_pairs(tmp_path, tokenizer):
    from snug.data.preference import canonical_pair

    prompt = [
        _v1("system", _text("be brief"), loss_weight=0.0),
        _v1("user", _text("2+2?"), loss_weight=0.0),
    ]
    record = {
        "chosen_messages": [*prompt, _v1("assistant", _text("4"), loss_weight=1.0)],
        "rejected_messages": [*prompt, _v1("assistant", _text("5"), loss_weight=1.0)],
    }
    pair = canonical_pair(record, "x")
    assert (pair["chosen"], pair["rejected"]) == ("4", "5")
    assert pair["prompt"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
    ]
    path = write_jsonl(tmp_path / "v1_dpo.jsonl", [record] * 3)
    train, _, stats = build_datasets(DataConfig(train=str(path)), tokenizer, "dpo", 0, "tiny")
    assert len(train) == 3 and stats.kept == 3
    with pytest.raises(DataError, match=r"v1_dpo.jsonl: holds preference pairs.*train.stage=dpo"):
        build_datasets(DataConfig(train=str(path)), tokenizer, "sft", 0, "tiny")


def test_placeholders_left_in_data_are_counted(tmp_path, tokenizer):
    rows = [
        {"instruction": "hi", "output": "I am {{name}}, made by {{author}}."},
        {"instruction": "who?", "output": "{{name}}."},
        {"instruction": "q", "output": "a {{ not a name"},
    ]
    path = write_jsonl(tmp_path / "identity.jsonl", rows)
    _, _, stats = build_datasets(DataConfig(train=str(path)), tokenizer, "sft", 0, "tiny")
    assert stats.as_dict()["placeholders"] == {"{{name}}": 2, "{{author}}": 1}
    assert stats.kept == 3  # a warning, not an error
