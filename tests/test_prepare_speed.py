"""Speed of preparation (issue 35, point 7): tokenizing in data.num_proc processes, and a cache
of the tokenized records of a JSON array, which sources.py reads into memory."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

import snug.data.dataset as dataset
from snug.config import DataConfig
from snug.data import parallel
from snug.data.dataset import build_datasets
from snug.data.formats import DataError

from conftest import write_jsonl


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """datasets' cache in a folder of the test's own."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    return folder


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The records each call of the tokenizing function got (in this process)."""
    got: list[int] = []
    real = dataset.tokenize_records

    def counted(records, indices, **kwargs):
        got.append(len(indices))
        return real(records, indices, **kwargs)

    monkeypatch.setattr(dataset, "tokenize_records", counted)
    return got


def _array(path: Path, n: int, answer: str = "a") -> Path:
    path.write_text(
        json.dumps([{"instruction": f"q{i}", "output": f"{answer}{i}"} for i in range(n)])
    )
    return path


def test_a_json_array_is_tokenized_once_while_nothing_that_changes_its_tokens_changes(
    tmp_path, tokenizer, cache, calls
):
    data = _array(tmp_path / "a.json", 20)

    def run(**keys) -> list[list[int]]:
        calls.clear()
        cfg = DataConfig(train=str(data), template="chatml", cutoff_len=64, num_proc=1)
        for key, value in keys.items():
            setattr(cfg, key, value)
        train, _, stats = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
        assert stats.kept == 20
        return train["input_ids"]

    first = run()
    assert sum(calls) == 20
    assert run() == first and calls == []  # read from the cache
    for changed in ({"cutoff_len": 16}, {"template": "llama3"}):
        run(**changed)
        assert sum(calls) == 20, changed
    _array(data, 20, answer="b")  # the file's bytes change
    assert run() != first and sum(calls) == 20


def test_num_proc_tokenizes_in_processes_as_one_process_does(tmp_path, tokenizer, monkeypatch):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(200)]
    rows[150] = {"instruction": "q", "output": 7}  # invalid: named by file and line
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    done = {}
    for n in (1, 2):  # each in a cache of its own: the other's result is not read back
        cache = tmp_path / f"cache{n}"
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        cfg = DataConfig(train=str(data), template="chatml", on_error="skip", num_proc=n)
        done[n] = build_datasets(cfg, tokenizer, "sft", 0, "tiny")
        shards = list(cache.rglob("*_of_00002.arrow"))
        assert len(shards) == (2 if n == 2 else 0)  # one per process
        strict = DataConfig(train=str(data), template="chatml", num_proc=n)
        with pytest.raises(DataError, match=f"{data} line 151: .*data.on_error: skip"):
            build_datasets(strict, tokenizer, "sft", 0, "tiny")
    (one, _, stats1), (two, _, stats2) = done[1], done[2]
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]
    assert stats1.as_dict() == stats2.as_dict() and stats2.invalid == 1
    assert f"{data} line 151" in stats2.problems[0]


def test_processes_tell_the_progress_of_each_batch_here(tmp_path, tokenizer, cache):
    raw = datasets.Dataset.from_dict({"x": list(range(300))})
    told: list[int] = []
    ds = parallel.run_map(
        raw,
        _double,
        2,
        told.append,
        batched=True,
        batch_size=50,
        with_indices=True,
        cache_file_name=str(tmp_path / "m.arrow"),
    )
    assert ds["x"] == [2 * i for i in range(300)]
    assert sorted(told) == [50] * 6  # heard here, from both processes
    assert len(list(tmp_path.glob("m_0000*_of_00002.arrow"))) == 2  # one shard per process


def _double(records: dict, indices: list[int]) -> dict:
    return {"x": [2 * x for x in records["x"]]}


def test_processes_default_from_records_and_cores(monkeypatch):
    monkeypatch.setattr(parallel, "usable_cores", lambda: 4)
    assert parallel.processes(None, 500) == 1  # too few records to gain from a process
    assert parallel.processes(None, 2_500) == 2
    assert parallel.processes(None, 100_000) == 4  # no more than the cores
    assert parallel.processes(16, 100_000) == 4
    assert parallel.processes(3, 2) == 2  # no more than the records
    assert parallel.processes(1, 100_000) == 1
