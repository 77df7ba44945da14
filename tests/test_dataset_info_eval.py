"""`snug eval --data NAME`: a dataset named in a dataset_info.json (--dataset-dir, else the
run's data.dataset_dir, else ./data as in LLaMA-Factory) is read as training reads it. Every
file here is written by the test (test_dataset_info.py: write_registry)."""

from __future__ import annotations

import json

from test_dataset_info import ALPACA, SHAREGPT, write_registry

from snug.cli import main

from conftest import TINY_BASE


def scored(tmp_path, *argv: str) -> dict:
    """`snug eval --model tiny --metrics loss ARGV`'s results file."""
    out = tmp_path / f"scores{len(list(tmp_path.glob('scores*')))}.json"
    args = ["eval", "--model", str(TINY_BASE), "--metrics", "loss", "--output", str(out), *argv]
    assert main(args) == 0
    return json.loads(out.read_text())


def test_names_of_dataset_dir_are_scored_as_training_reads_them(tmp_path):
    folder = write_registry(tmp_path / "lf")
    report = scored(tmp_path, "--dataset-dir", str(folder), "--data", "my_chat")
    assert report["counts"]["records"] == report["counts"]["samples"] == len(SHAREGPT)
    both = scored(tmp_path, "--dataset-dir", str(folder), "--data", "my_alpaca,my_chat")
    assert both["counts"]["samples"] == len(ALPACA) + len(SHAREGPT)
    assert both["data"] == "my_alpaca,my_chat"


def test_the_default_dataset_dir_is_data_in_the_current_folder(tmp_path, monkeypatch):
    write_registry(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert scored(tmp_path, "--data", "my_alpaca")["counts"]["samples"] == len(ALPACA)


def test_an_unknown_name_is_one_line_naming_the_file_and_near_names(tmp_path, capsys):
    folder = write_registry(tmp_path / "lf")
    argv = ["eval", "--model", str(TINY_BASE), "--dataset-dir", str(folder)]
    assert main([*argv, "--data", "my_alpacca"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'my_alpacca'" in err, err
    assert str(folder / "dataset_info.json") in err and "did you mean my_alpaca" in err, err
    assert main([*argv, "--data", "my_alpaca", "--dataset-dir", str(tmp_path)]) == 2
    assert "holds no dataset_info.json" in capsys.readouterr().err
