"""data.dataset_dir: LLaMA-Factory's dataset_info.json registry, its names in data.train and
data.eval, each source's own format, columns and role tags, ranking entries, num_samples, and
data.mix. Every file here is written by the test, in LLaMA-Factory's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snug.config import ConfigError, DataConfig, config_from_dict
from snug.config.preflight import MissingData, check_data_paths
from snug.data.dataset import build_datasets
from snug.data.formats import DataError

ALPACA = [
    {"instruction": f"Say {w}.", "input": "", "output": f"{w}!", "sys": "Be brief."}
    for w in ("yes", "no", "maybe", "hello")
]
SHAREGPT = [  # custom tags: role/content, user/bot
    {
        "dialog": [
            {"who": "person", "text": f"Name {n}."},
            {"who": "bot", "text": f"{n}."},
        ],
        "prompt_sys": "You are terse.",
    }
    for n in ("one", "two", "three")
]
PAIRS = [
    {
        "conversations": [{"from": "human", "value": f"Pick {n}."}],
        "chosen": {"from": "gpt", "value": f"{n}, gladly."},
        "rejected": {"from": "gpt", "value": "No."},
    }
    for n in ("a", "b")
]


def write_registry(folder: Path) -> Path:
    """A LLaMA-Factory data folder: an alpaca JSON array, a sharegpt file with its own column
    and role names, a ranking pair file, a JSON Lines text file; and its dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpaca.json").write_text(json.dumps(ALPACA, indent=1))
    (folder / "chat.json").write_text(json.dumps(SHAREGPT, indent=1))
    (folder / "pairs.json").write_text(json.dumps(PAIRS, indent=1))
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"content": f"Plain text {i}."}) + "\n" for i in range(5))
    )
    info = {
        "my_alpaca": {"file_name": "alpaca.json", "columns": {"system": "sys"}},
        "my_chat": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "system": "prompt_sys"},
            "tags": {
                "role_tag": "who",
                "content_tag": "text",
                "user_tag": "person",
                "assistant_tag": "bot",
            },
        },
        "my_pairs": {
            "file_name": "pairs.json",
            "ranking": True,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
        "my_corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "content"}},
        "two_of_alpaca": {"file_name": "alpaca.json", "num_samples": 2},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return folder


def test_a_registry_folder_given_as_data_is_not_read_as_save_to_disk(tmp_path, tokenizer):
    """A LLaMA-Factory data folder holds dataset_info.json, as a `save_to_disk` folder does:
    it was loaded with load_from_disk, which failed with an unexpected FileNotFoundError."""
    folder = write_registry(tmp_path / "data")
    with pytest.raises(DataError, match=r"data\.dataset_dir.*my_alpaca"):
        build_datasets(DataConfig(train=str(folder)), tokenizer, "sft", 0, "tiny")


def data_config(folder: Path, train, **keys) -> DataConfig:
    """The data section as a config file gives it: names kept, paths made absolute."""
    section = {"dataset_dir": str(folder), "train": train, **keys}
    return config_from_dict({"data": section}).data


def decoded(ds, tokenizer) -> list[str]:
    return [tokenizer.decode(ids) for ids in ds["input_ids"]]


def test_names_read_each_source_with_its_own_columns_and_tags(tmp_path, tokenizer):
    cfg = data_config(write_registry(tmp_path / "data"), ["my_alpaca", "my_chat"])
    assert cfg.train == ["my_alpaca", "my_chat"]  # names, not paths under the folder
    check_data_paths(cfg)
    train, _, stats = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert stats.kept == len(train) == len(ALPACA) + len(SHAREGPT)
    texts = decoded(train, tokenizer)
    # alpaca: the mapped system column is the system prompt; sharegpt: turns by custom tags
    assert sum("Be brief." in t and "Say " in t for t in texts) == len(ALPACA)
    assert sum("You are terse." in t and "Name one." in t for t in texts) == 1
    held = data_config(cfg.dataset_dir, "my_alpaca", eval="my_chat")
    assert len(build_datasets(held, tokenizer, "sft", 0, "tiny")[1]) == len(SHAREGPT)


def test_a_jsonl_prompt_column_is_pretraining_text(tmp_path, tokenizer):
    cfg = data_config(write_registry(tmp_path / "data"), "my_corpus")
    train, _, _ = build_datasets(cfg, tokenizer, "pt", 0, "tiny")
    assert "Plain text 3." in " ".join(decoded(train, tokenizer))


def test_ranking_entries_go_to_preference_stages_only(tmp_path, tokenizer):
    cfg = data_config(write_registry(tmp_path / "data"), "my_pairs")
    with pytest.raises(DataError, match=r"my_pairs: is a ranking dataset.*train\.stage=sft"):
        build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    train, _, _ = build_datasets(cfg, tokenizer, "dpo", 0, "tiny")
    assert len(train) == len(PAIRS) and "rejected_ids" in train.column_names


def test_num_samples_draws_that_many_by_the_seed(tmp_path, tokenizer):
    cfg = data_config(write_registry(tmp_path / "data"), "two_of_alpaca")
    drawn = [decoded(build_datasets(cfg, tokenizer, "sft", s, "t")[0], tokenizer) for s in range(6)]
    assert all(len(d) == 2 for d in drawn)
    assert len({tuple(sorted(d)) for d in drawn}) > 1  # drawn at random, not the first two


def test_unknown_name_is_one_error_naming_the_file_and_near_names(tmp_path):
    folder = write_registry(tmp_path / "data")
    with pytest.raises(
        ConfigError,
        match=r"'my_alpacca' is not a dataset of .*dataset_info\.json"
        r" \(did you mean my_alpaca",
    ):
        data_config(folder, ["my_alpacca"])
    with pytest.raises(ConfigError, match="holds no dataset_info.json"):
        data_config(tmp_path, "my_alpaca")


def test_an_entry_snug_cannot_read_is_refused_when_named_only(tmp_path, tokenizer):
    folder = write_registry(tmp_path / "data")
    info = json.loads((folder / "dataset_info.json").read_text())
    info["ms_only"] = {"ms_hub_url": "org/set"}
    info["odd"] = {"file_name": "alpaca.json", "formatting": "openai"}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    train, _, _ = build_datasets(data_config(folder, "my_alpaca"), tokenizer, "sft", 0, "t")
    assert len(train) == len(ALPACA)
    with pytest.raises(ConfigError, match=r"entry 'ms_only': has neither file_name nor hf_hub"):
        data_config(folder, "ms_only")
    with pytest.raises(ConfigError, match=r"entry 'odd': formatting is 'openai'"):
        data_config(folder, "odd")


def test_a_registered_file_that_is_missing_is_named_before_loading(tmp_path):
    folder = write_registry(tmp_path / "data")
    (folder / "chat.json").unlink()
    with pytest.raises(MissingData, match=r"data\.train=my_chat: .*'my_chat' names file_name"):
        check_data_paths(data_config(folder, ["my_alpaca", "my_chat"]))


def test_paths_still_mix_with_names(tmp_path, tokenizer):
    folder = write_registry(tmp_path / "data")
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"instruction": "Hi.", "output": "Hello."}) + "\n")
    cfg = data_config(folder, ["my_alpaca", str(extra)])
    train, _, _ = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert len(train) == len(ALPACA) + 1


def test_interleave_mixes_by_chance_and_seed(tmp_path, tokenizer):
    folder = write_registry(tmp_path / "data")
    both = ["my_alpaca", "my_chat"]
    under = data_config(folder, both, mix="interleave", mix_probs=[0.5, 0.5])
    first = decoded(build_datasets(under, tokenizer, "sft", 1, "t")[0], tokenizer)
    assert first == decoded(build_datasets(under, tokenizer, "sft", 1, "t")[0], tokenizer)
    assert len(first) < len(ALPACA) + len(SHAREGPT)  # stopped when one source ran out
    assert any("Say " in t for t in first) and any("Name " in t for t in first)
    over = data_config(folder, both, mix="interleave_over")
    assert len(build_datasets(over, tokenizer, "sft", 1, "t")[0]) >= len(ALPACA) + len(SHAREGPT)


@pytest.mark.parametrize("mix", ["interleave", "interleave_over"])
def test_kept_counts_the_samples_trained_after_mixing(tmp_path, tokenizer, mix):
    """summary.json's data.kept counted the sources' samples before interleaving, more than
    interleave trains and fewer than interleave_over does; `usable` keeps that count."""
    folder = write_registry(tmp_path / "data")
    cfg = data_config(folder, ["my_alpaca", "my_chat"], mix=mix)
    train, _, stats = build_datasets(cfg, tokenizer, "sft", 1, "t")
    assert stats.kept == len(train) != len(ALPACA) + len(SHAREGPT)
    assert stats.usable == len(ALPACA) + len(SHAREGPT) and stats.dropped == 0
    assert stats.as_dict()["kept"] == len(train)


def test_a_classifier_reads_registered_names(tmp_path, tokenizer):
    """train.stage=cls read each data.train entry as a path: a registered name failed while
    listing the classes. Its records keep their own columns (cls.text_column, label_column)."""
    folder = write_registry(tmp_path / "data")
    rows = [{"text": f"item {i}", "label": ["odd", "even"][i % 2], "x": i} for i in range(6)]
    (folder / "classes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = json.loads((folder / "dataset_info.json").read_text())
    info["my_classes"] = {"file_name": "classes.jsonl"}
    info["three_classes"] = {"file_name": "classes.jsonl", "num_samples": 3}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    train, _, stats = build_datasets(data_config(folder, "my_classes"), tokenizer, "cls", 0, "t")
    assert stats.labels == ["even", "odd"] and len(train) == stats.kept == len(rows)
    assert sorted(train["labels"]) == [0, 0, 0, 1, 1, 1]
    drawn = data_config(folder, "three_classes")
    train, _, stats = build_datasets(drawn, tokenizer, "cls", 2, "t")
    assert len(train) == 3 and stats.invalid == 0


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"mix_probs": [0.5, 0.5]}, "data.mix is concat"),
        ({"mix": "interleave", "mix_probs": [1.0]}, "1 chance.*for 2 train"),
        ({"mix": "interleave", "mix_probs": [0.5, 0.6]}, "sums to 1.1"),
    ],
)
def test_mix_probs_are_checked_with_the_config(tmp_path, keys, match):
    with pytest.raises(ConfigError, match=match):
        data_config(write_registry(tmp_path / "data"), ["my_alpaca", "my_chat"], **keys)


def test_hub_entries_load_through_datasets(tmp_path, tokenizer, monkeypatch):
    """hf_hub_url, subset, folder and split reach `datasets.load_dataset` (the suite is
    offline: a local dataset stands in for the hub's)."""
    import datasets

    import snug.data.registry as registry

    folder = tmp_path / "data"
    folder.mkdir()
    info = {
        "hub": {
            "hf_hub_url": "org/set",
            "subset": "en",
            "folder": "d",
            "split": "dev",
            "columns": {"prompt": "q", "response": "a"},
        }
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    asked = []

    def load_dataset(path, **kwargs):
        asked.append((path, kwargs))
        return datasets.Dataset.from_dict({"q": ["Ask?"], "a": ["Answer."]})

    monkeypatch.setattr(registry.datasets, "load_dataset", load_dataset)
    cfg = data_config(folder, "hub")
    check_data_paths(cfg)
    train, _, _ = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
    assert asked == [("org/set", {"name": "en", "data_dir": "d", "split": "dev"})]
    assert "Answer." in decoded(train, tokenizer)[0]


def test_snug_train_on_registered_names(tmp_path, capsys, monkeypatch):
    """The command, end to end: a relative data.dataset_dir read from the config's folder, two
    names mixed, two steps; a misspelt name stops it before anything is written. `snug eval`
    reads the run's names from its data.dataset_dir, wherever it is run."""
    from snug.cli import main

    from conftest import TINY_BASE

    write_registry(tmp_path / "data")
    config = tmp_path / "lf.yaml"
    config.write_text(
        f"model:\n  name_or_path: {TINY_BASE}\n"
        "data:\n  dataset_dir: data\n  train: [my_alpaca, my_chat]\n  cutoff_len: 64\n"
        "train:\n  max_steps: 2\n  grad_accum: 1\n"
        f"output:\n  dir: {tmp_path / 'run'}\n"
    )
    assert main(["train", str(config), "data.train=[my_chat, my_alpacca]"]) == 2
    assert "did you mean my_alpaca" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["data"]["kept"] == len(ALPACA) + len(SHAREGPT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = elsewhere / "scores.json"
    argv = ["eval", "--adapter", str(tmp_path / "run"), "--data", "my_chat", "--metrics", "loss"]
    assert main([*argv, "--output", str(out)]) == 0
    assert json.loads(out.read_text())["counts"]["samples"] == len(SHAREGPT)
