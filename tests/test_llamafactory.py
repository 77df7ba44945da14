"""LLaMA-Factory configs (YAML and `llamafactory-cli train` flags) read by snug train and
written by snug convert (snug/config/llamafactory.py). The LLaMA-Factory-style files are
written here, in that tool's flat layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from snug.cli import main
from snug.config import load_config
from snug.config.llamafactory import convert
from snug.config.llamafactory_io import flags_to_keys, load_converted, read_file
from snug.errors import ConfigError
from tests.conftest import ROOT, TINY_BASE, write_jsonl

# A LoRA SFT config as LLaMA-Factory's examples write one (its keys, its sections by comment).
LORA_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 16
lora_target: q_proj,v_proj
quantization_bit: 4
### dataset
dataset: alpaca_local,identity
template: llama3
cutoff_len: 512
max_samples: 100
preprocessing_num_workers: 4
### output
output_dir: saves/tiny/lora/sft
logging_steps: 5
save_steps: 50
save_total_limit: 3
plot_loss: true
overwrite_output_dir: true
### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
learning_rate: 2.0e-4
num_train_epochs: 2.0
lr_scheduler_type: cosine
warmup_steps: 20
bf16: true
"""

# The seed article's `llamafactory-cli train` command, model and data local.
SEED = (
    "--stage sft --do_train --model_name_or_path {model} "
    "--dataset alpaca_gpt4_zh,identity,adgen_local --dataset_dir ./data --template llama3 "
    "--finetuning_type lora --output_dir ./saves/LLaMA3-8B/lora/sft --overwrite_cache "
    "--overwrite_output_dir --cutoff_len 1024 --preprocessing_num_workers 16 "
    "--per_device_train_batch_size 2 --per_device_eval_batch_size 1 "
    "--gradient_accumulation_steps 8 --lr_scheduler_type cosine --logging_steps 50 "
    "--warmup_steps 20 --save_steps 100 --eval_steps 50 --evaluation_strategy steps "
    "--load_best_model_at_end --learning_rate 5e-5 --num_train_epochs 5.0 --max_samples 1000 "
    "--val_size 0.1 --plot_loss --fp16"
).split()


def _lf_yaml(folder: Path, text: str = LORA_SFT, **changes) -> Path:
    raw = yaml.safe_load(text.format(model=TINY_BASE))
    raw.update(changes)
    path = folder / "lf.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _config(converted):
    return load_config(converted.source, read=(converted.sections, converted.lines))


def test_a_llamafactory_yaml_becomes_the_snug_config_it_means(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    converted = read_file(str(_lf_yaml(tmp_path)), gpu=True)
    # dataset names stay names (the dataset_info.json registry resolves them)
    assert converted.sections["data"]["train"] == ["alpaca_local", "identity"]
    cfg = _config(converted)
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha) == ("lora", 16, 32)  # 2 x rank
    assert cfg.method.targets == ["q_proj", "v_proj"]
    assert cfg.model.quant == "4bit" and cfg.model.trust_remote_code
    assert cfg.data.template == "llama3"
    assert (cfg.data.cutoff_len, cfg.data.max_samples) == (512, 100)
    assert (cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.epochs) == (2, 4, 2.0)
    assert (cfg.train.lr, cfg.train.scheduler, cfg.train.warmup) == (2e-4, "cosine", 20)
    assert (cfg.train.precision, cfg.train.log_every) == ("bf16-mixed", 5)
    assert (cfg.output.save_every, cfg.output.keep_last, cfg.output.plot_loss) == (50, 3, True)
    assert cfg.output.dir == str(tmp_path / "saves/tiny/lora/sft")  # from the current folder


def test_keys_left_out_take_llamafactorys_defaults(tmp_path):
    raw = {"model_name_or_path": "org/model", "dataset": "d", "lora_rank": 4, "pure_bf16": True}
    cfg = _config(convert(raw, "lf.yaml", tmp_path, gpu=True))
    assert (cfg.method.alpha, cfg.method.targets, cfg.data.cutoff_len) == (8, "all-linear", 2048)
    assert (cfg.train.lr, cfg.train.micro_batch, cfg.train.grad_accum) == (5e-5, 8, 1)
    assert (cfg.train.scheduler, cfg.train.warmup, cfg.train.log_every) == ("linear", 0, 500)
    assert (cfg.train.precision, cfg.train.eval_generate) == ("bf16-true", 0)
    assert (cfg.output.save_every, cfg.output.keep_last, cfg.output.plot_loss) == (500, 0, False)


def test_preference_stages_and_their_keys(tmp_path):
    base = {"model_name_or_path": "org/m", "dataset": "d"}
    dpo = _config(
        convert({**base, "stage": "dpo", "pref_beta": 0.2, "pref_ftx": 0.5}, "f", tmp_path, False)
    )
    assert dpo.train.stage == "dpo"
    own = dpo.stage_section.own
    assert (own.loss, own.beta, own.ftx) == ("sigmoid", 0.2, 0.5)
    simpo = _config(convert({**base, "stage": "dpo", "pref_loss": "simpo"}, "f", tmp_path, False))
    assert simpo.train.stage == "simpo"
    assert (simpo.stage_section.own.beta, simpo.stage_section.own.gamma) == (0.1, 0.5)
    kto = {**base, "stage": "kto", "kto_chosen_weight": 2.0, "per_device_train_batch_size": 2}
    kto = _config(convert(kto, "f", tmp_path, False))
    assert (kto.train.stage, kto.stage_section.own.desirable_weight) == ("kto", 2.0)


def test_what_snug_cannot_honour_is_listed_in_one_error(tmp_path):
    raw = {
        "model_name_or_path": "org/m",
        "dataset": "d",
        "deepspeed": "ds_z3_config.json",
        "use_galore": True,
        "use_badam": False,  # LLaMA-Factory's default: asks for nothing
        "quantization_bit": 4,
        "quantization_method": "hqq",
        "lr_scheduler_type": "polynomial",
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
        "a_key_nobody_knows": 1,
    }
    with pytest.raises(ConfigError) as e:
        convert(raw, "lf.yaml", tmp_path, gpu=True)
    text = str(e.value)
    for key in ("deepspeed", "use_galore", "quantization_method", "lr_scheduler_type"):
        assert f"{key} (" in text
    assert "metric_for_best_model (" in text and "not accuracy" in text
    assert "load_best_model_at_end" not in text and "a_key_nobody_knows (" in text
    assert "use_badam" not in text and "dist.strategy=fsdp" in text
    assert text.startswith("lf.yaml: ") and "\n" not in text


def seed_data(folder: Path) -> None:
    """The seed command's ./data: a dataset_info.json naming its three datasets (alpaca_gpt4_zh
    and identity as LLaMA-Factory's own file declares them; adgen_local a user's own, with its
    columns mapped as LLaMA-Factory's README shows), each a few records."""
    data = folder / "data"
    data.mkdir(parents=True)
    info = {
        "alpaca_gpt4_zh": {"file_name": "alpaca_gpt4_zh.json"},
        "identity": {"file_name": "identity.json"},
        "adgen_local": {
            "file_name": "adgen_local.json",
            "columns": {"prompt": "content", "response": "summary"},
        },
    }
    (data / "dataset_info.json").write_text(json.dumps(info))
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(12)]
    (data / "alpaca_gpt4_zh.json").write_text(json.dumps(rows))
    (data / "identity.json").write_text(json.dumps(rows[:6]))
    ads = [{"content": f"type#{i}", "summary": f"ad {i}"} for i in range(12)]
    (data / "adgen_local.json").write_text(json.dumps(ads))


def test_the_seed_command_parses_every_flag(tmp_path):
    seed_data(tmp_path)
    flags = [f.format(model=TINY_BASE) for f in SEED]
    converted = convert(flags_to_keys(flags), "the flags", tmp_path, gpu=False)
    assert converted.sections["data"]["train"] == ["alpaca_gpt4_zh", "identity", "adgen_local"]
    cfg = _config(converted)
    assert cfg.model.name_or_path == str(TINY_BASE)
    assert cfg.data.dataset_dir == str(tmp_path / "data")
    assert (cfg.data.cutoff_len, cfg.data.max_samples, cfg.data.val_size) == (1024, 1000, 0.1)
    assert (cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.lr) == (2, 8, 5e-5)
    assert (cfg.train.epochs, cfg.train.warmup, cfg.train.log_every) == (5.0, 20, 50)
    assert (cfg.train.eval_every, cfg.output.save_every, cfg.output.plot_loss) == (50, 100, True)
    assert cfg.output.keep_best  # --load_best_model_at_end: the best by eval loss is the output
    assert cfg.train.precision == "auto"  # --fp16 without a GPU: said on one line
    fp16 = [line for line in converted.said if line.startswith("fp16:")]
    assert len(fp16) == 1 and "train.precision=fp16-mixed" in fp16[0]
    on_gpu = _config(convert(flags_to_keys(flags), "the flags", tmp_path, gpu=True))
    assert on_gpu.train.precision == "fp16-mixed"
    aside = " ".join(converted.said)
    for key in ("overwrite_cache", "overwrite_output_dir"):
        assert key in aside
    assert cfg.data.num_proc == 16  # --preprocessing_num_workers 16


def test_snug_train_takes_the_seed_flags_and_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seed_data(tmp_path)
    flags = [f.format(model=TINY_BASE) for f in SEED]
    more = ["--metric_for_best_model", "accuracy", "--greater_is_better", "true"]
    assert main(["train", *flags, *more, "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metric_for_best_model (" in err
    assert "greater_is_better (" in err
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # nothing written


def test_the_seed_command_trains_on_its_registered_datasets(tmp_path, monkeypatch, capsys):
    """Issue 35's seed command, `llamafactory-cli train` replaced by `snug train`, on a local
    base and a ./data folder of its three datasets: it trains (2 steps here, evaluated after
    each), every flag honoured: --load_best_model_at_end ends with the step of the lower eval
    loss."""
    monkeypatch.chdir(tmp_path)
    seed_data(tmp_path)
    flags = [f.format(model=TINY_BASE) for f in SEED]
    assert main(["train", *flags, "train.max_steps=2", "train.eval_every=1"]) == 0
    out = tmp_path / "saves/LLaMA3-8B/lora/sft"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert summary["best"] == {"step": best, "eval_loss": evals[best]}
    assert (out / "checkpoints" / f"step-{best}" / "COMPLETE").is_file()
    # the three datasets, each read with its own columns (12 + 6 + 12 records)
    assert summary["data"]["kept"] == 30, summary["data"]
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["train"] == [
        "alpaca_gpt4_zh",
        "identity",
        "adgen_local",
    ]


def test_snug_convert_writes_a_config_snug_train_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lf = _lf_yaml(tmp_path)
    out = tmp_path / "snug.yaml"
    assert main(["convert", str(lf), "--out", str(out)]) == 0
    assert load_config(out) == _config(read_file(str(lf)))
    assert "# from lora_rank" in out.read_text()
    before = out.read_text()
    assert main(["convert", str(lf), "--out", str(out)]) == 2  # never overwrites
    assert out.read_text() == before
    snug = tmp_path / "plain.yaml"
    snug.write_text("train:\n  lr: 1.0e-4\n")
    assert main(["convert", str(snug)]) == 2
    assert "not a LLaMA-Factory config" in capsys.readouterr().err


def test_snug_train_runs_a_llamafactory_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [{"instruction": f"say {w}", "input": "", "output": w} for w in "red blue green".split()]
    write_jsonl(tmp_path / "train.jsonl", rows)
    lf = _lf_yaml(
        tmp_path,
        dataset="train.jsonl",
        template="chatml",
        quantization_bit=None,
        lora_target="all",
        output_dir="out",
        max_steps=2,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
    )
    assert main(["train", str(lf)]) == 0
    printed = capsys.readouterr().out
    assert "as a snug config" in printed and "max_steps: 2" in printed
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("completed", 2)
    saved = load_config(tmp_path / "out/config.yaml")
    assert (saved.method.alpha, saved.train.max_steps) == (32, 2)


def test_snugs_own_arguments_are_told_from_the_flags():
    from snug.cli import OVERRIDE
    from snug.config.llamafactory_io import split_arguments

    tokens = "--stage sft --fresh --plot_loss --nnodes 2 --dataset a,b train.max_steps=2".split()
    flags, own = split_arguments(tokens, ("--fresh",), ("--nnodes",), OVERRIDE.match)
    assert flags == ["--stage", "sft", "--plot_loss", "--dataset", "a,b"]
    assert own == ["--fresh", "--nnodes", "2", "train.max_steps=2"]
    assert flags_to_keys(flags) == {"stage": "sft", "plot_loss": True, "dataset": "a,b"}


def test_the_shipped_llamafactory_example_converts(monkeypatch):
    monkeypatch.chdir(ROOT)  # as LLaMA-Factory, its paths are read from the current folder
    converted = read_file("examples/llamafactory/lora_sft.yaml", gpu=False)
    cfg = _config(converted)
    assert cfg.data.dataset_dir == str(ROOT / "examples/llamafactory/data")
    info = json.loads((ROOT / "examples/llamafactory/data/dataset_info.json").read_text())
    assert converted.sections["data"]["train"] in info


def test_an_error_about_a_converted_key_names_the_llamafactory_key(tmp_path):
    raw = {"model_name_or_path": "org/m", "dataset": "d", "stage": "kto"}
    raw["per_device_train_batch_size"] = 1  # snug's kto needs 2: its KL pairs rows
    with pytest.raises(ConfigError, match=r"train\.micro_batch \(per_device_train_batch_size\)"):
        load_converted(convert(raw, "lf.yaml", tmp_path, gpu=False))
