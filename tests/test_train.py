"""`snug train` end to end on tiny models: outputs, families, precisions, CLI errors."""

import json
import math
import os
import random

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from snug.cli import main
from snug.config import config_from_dict
from snug.plan.autofit import auto_fit
from snug.train import run as loop_run
from snug.train.checkpoint import COMPLETE
from snug.train.memory import StepPeaks
from snug.train.outputs import OutputDirError
from snug.train.status import STARTING
from snug.train.training import run_training

from conftest import ROOT, make_tiny_model, method_keys

INSTRUCT = ROOT / "data/instruct"


def tiny_run(tmp_path, model_path, **sections) -> dict:
    raw = {
        "model": {"name_or_path": str(model_path)},
        "method": {"name": "lora", "r": 4},
        "data": {
            "train": str(INSTRUCT / "train.jsonl"),
            "eval": str(INSTRUCT / "heldout.jsonl"),
            "max_samples": 32,
            "cutoff_len": 64,
        },
        "train": {
            "max_steps": 4,
            "micro_batch": 4,
            "grad_accum": 2,
            "lr": 1e-3,
            "eval_generate": 4,
            "max_new_tokens": 8,
            "log_every": 1,
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    # a run that switches the method keeps the keys the new method has (r for lora)
    name = raw["method"]["name"]
    raw["method"] = {"name": name, **method_keys(name, **raw["method"])}
    return raw


def test_train_writes_every_output(tmp_path):
    raw = tiny_run(
        tmp_path,
        ROOT / "models/tiny",
        output={"dir": str(tmp_path / "run"), "save_every": 1, "keep_last": 2},
    )
    summary = run_training(config_from_dict(raw))
    out = tmp_path / "run"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["status"] == "completed" and summary["steps"] == 4
    for key in (
        "train_loss_first",
        "train_loss_last",
        "trainable_params",
        "total_params",
        "tokens_per_second",
        "wall_seconds",
    ):
        assert summary[key] > 0, key
    assert summary["data"] == {
        "kept": 32,
        "usable": 32,  # one source: mixing changes nothing
        "dropped": 0,
        "truncated": 0,
        "clipped": 0,
        "fully_masked": 0,
        "empty": 0,
        "invalid": 0,
        "eval_dropped": 0,
        "problems": [],
        "placeholders": {},  # {{name}}-style placeholders left in the data: none here
    }
    assert summary["eval"]["metric"] == "exact_match" and 0 <= summary["eval"]["before"] <= 1
    assert summary["eval"]["loss_after"] < summary["eval"]["loss_before"]
    peak = summary["peak_memory"]
    assert peak["device"] == "cpu" and peak["measured_bytes"] > 14_000_000  # > the fp32 weights
    assert peak["peak_rss_bytes"] > peak["measured_bytes"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert (out / "loss.png").stat().st_size > 0 and (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4"]
    assert (out / "checkpoints/step-4" / COMPLETE).exists()
    assert (out / "adapter/adapter_model.safetensors").exists()
    assert (out / "adapter/tokenizer_config.json").exists()
    # status.json: where the run stands, for a watcher (snug/train/status.py)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["total_steps"] == 4
    assert status["pid"] == os.getpid() and status["error"] is None
    assert status["eta_seconds"] == 0 and status["loss"] == summary["train_loss_last"]
    assert status["peak_memory_bytes"] == peak["measured_bytes"]
    assert status["last_checkpoint"] == str(out / "checkpoints/step-4")
    assert status["tokens_per_second"] == summary["tokens_per_second"]
    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(ROOT / "models/tiny"), out / "adapter"
    )


def test_the_peak_of_the_steps_that_can_set_it_is_the_peak_of_every_step(
    tmp_path, monkeypatch, tiny_llama
):
    """The CPU tracker runs on the first two steps and on steps with a larger micro-batch
    (rows x length or rows x length²) than any tracked before; the peak it reports is the
    peak of tracking every step, on rows of 1 to 20 words (5 to 80 tokens) in random order."""
    rng = random.Random(0)
    words = "alpha beta gamma delta echo fox golf hotel india juliet".split()
    rows = [
        {"instruction": "repeat", "output": " ".join(rng.choices(words, k=rng.randint(1, 20)))}
        for _ in range(48)
    ]
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(name: str) -> dict:
        raw = tiny_run(tmp_path, tiny_llama, output={"dir": str(tmp_path / name)})
        raw["data"] = {"train": str(data), "cutoff_len": 256}
        raw["train"].update(max_steps=12, micro_batch=2, grad_accum=1, eval_generate=0)
        return run_training(config_from_dict(raw))["peak_memory"]

    some = run("some")
    monkeypatch.setattr(loop_run, "StepPeaks", lambda: StepPeaks(warmup=10**9))  # every step
    every = run("every")
    assert every["tracked_steps"] == 12
    assert 2 < some["tracked_steps"] < 12  # later steps were chosen, not all of them
    assert some["measured_bytes"] == every["measured_bytes"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_families_train_with_lora_and_dora(family, tmp_path, tokenizer):
    path = make_tiny_model(family, tmp_path / family, tokenizer)
    for method in ("lora", "dora"):
        raw = tiny_run(
            tmp_path,
            path,
            method={"name": method, "r": 4},
            train={"max_steps": 2, "eval_generate": 0},
            output={"dir": str(tmp_path / method)},
        )
        summary = run_training(config_from_dict(raw))
        assert summary["status"] == "completed"
        assert summary["train_loss_last"] == summary["train_loss_last"]  # finite, not NaN


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_keeps_trainable_weights_fp32(precision, tmp_path, tiny_llama):
    raw = tiny_run(
        tmp_path, tiny_llama, train={"precision": precision, "max_steps": 2, "eval_generate": 0}
    )
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["precision"] == precision
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_bf16_true_full_tuning_trains_in_bf16(tmp_path, tiny_llama):
    raw = tiny_run(
        tmp_path,
        tiny_llama,
        method={"name": "full"},
        train={"precision": "bf16-true", "max_steps": 2, "eval_generate": 0},
    )
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run/model")
    assert saved.config.dtype == torch.bfloat16 or next(saved.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_bf16_true_adapters_train_and_save_in_bf16(quant, tmp_path, tiny_llama):
    """LoRA and QLoRA in bf16-true (torchtune's and the FSDP+QLoRA recipes' setup): the run
    completes with finite losses and the saved adapter is bf16, as it trained."""
    raw = tiny_run(
        tmp_path,
        tiny_llama,
        model={"name_or_path": str(tiny_llama), "quant": quant},
        train={"precision": "bf16-true", "max_steps": 2, "eval_generate": 0},
    )
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["precision"] == "bf16-true"
    assert math.isfinite(summary["train_loss_last"]) and not summary["nonfinite_skipped"]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert weights and all(w.dtype == torch.bfloat16 for w in weights.values())


def test_pt_stage_trains_on_text(tmp_path, tiny_llama):
    raw = tiny_run(
        tmp_path,
        tiny_llama,
        data={"train": str(ROOT / "data/corpus/corpus.jsonl"), "eval": None, "format": "text"},
        train={"stage": "pt", "max_steps": 2},
    )
    assert run_training(config_from_dict(raw))["status"] == "completed"


def test_refuses_to_write_into_a_foreign_directory(tmp_path, tiny_llama):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not a snug run"):
        run_training(config_from_dict(tiny_run(tmp_path, tiny_llama)))
    assert (tmp_path / "run/notes.txt").read_text() == "mine"


def test_cli_errors_are_one_sentence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  micro_bach: 2\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "micro_batch" in err and "Traceback" not in err
    cfg.write_text(
        f"model:\n  name_or_path: {tmp_path}/missing-model\ndata:\n  train: {INSTRUCT}/train.jsonl\n"
        f"output:\n  dir: {tmp_path}/out\n"
    )
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path" in err and "missing-model" in err and err.count("\n") == 1


def test_a_run_that_cannot_start_writes_nothing_and_a_failed_one_says_why(
    tmp_path, tiny_llama, monkeypatch
):
    """Bad data: the output directory holds only the failed start's status.json (nothing to
    replace, nothing else written). A run that fails in its first step leaves the earlier run's
    files byte-identical (its failed status beside them); one that failed after it records the
    reason in summary.json; a later good run replaces it."""
    bad = tiny_run(
        tmp_path, tiny_llama, data={"train": str(tmp_path / "missing.jsonl"), "eval": None}
    )
    from snug.data.formats import DataError

    with pytest.raises(DataError) as raised:
        run_training(config_from_dict(bad))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["status.json"]
    status = json.loads((tmp_path / "run/status.json").read_text())
    assert status["state"] == "failed" and status["error"] == f"DataError: {raised.value}"
    run_training(config_from_dict(tiny_run(tmp_path, tiny_llama, train={"max_steps": 1})))
    finished = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    real_step, calls = loop_run.train_step, []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == broken.at:
            raise RuntimeError("the step broke")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_run, "train_step", broken)
    for broken.at in (1, 2):
        calls.clear()
        with pytest.raises(RuntimeError, match="the step broke"):
            run_training(config_from_dict(tiny_run(tmp_path, tiny_llama)), fresh=True)
        if broken.at == 1:  # the first step never finished: the earlier run is untouched
            now = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
            starting = json.loads(now.pop(tmp_path / "run" / STARTING))
            assert now == finished and starting["state"] == "failed"
            assert starting["error"] == "RuntimeError: the step broke"
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: the step broke"
    assert summary["steps"] == 1
    status = json.loads((tmp_path / "run/status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "RuntimeError: the step broke"
    assert status["step"] == 1 and status["eta_seconds"] is None
    monkeypatch.undo()
    good = tiny_run(
        tmp_path, tiny_llama, train={"max_steps": 2, "eval_generate": 0, "eval_every": 1}
    )
    summary = run_training(config_from_dict(good))
    assert summary["status"] == "completed" and summary["eval"]["metric"] == "loss"
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2]


def test_packed_length_grouped_offloaded_run_trains(tmp_path, tiny_llama):
    """Packing fits 32 short samples into a few 256-token rows: fewer, fuller micro-batches."""
    raw = tiny_run(
        tmp_path,
        tiny_llama,
        data={"packing": True, "group_by_length": True, "cutoff_len": 256},
        memory={"offload_activations": True},
        train={"max_steps": None, "epochs": 3, "micro_batch": 2, "grad_accum": 1, "lr": 3e-3},
    )
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # 32 samples of about 30 tokens fill 4-5 rows of <= 256 tokens: 2-3 steps an epoch, not 16
    assert 3 * 2 <= summary["steps"] <= 3 * 3
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert summary["eval"]["loss_after"] < summary["eval"]["loss_before"]


def test_adafactor_trains(tmp_path, tiny_llama):
    raw = tiny_run(
        tmp_path,
        tiny_llama,
        memory={"optimizer": "adafactor"},
        train={"max_steps": 2, "eval_generate": 0},
    )
    assert run_training(config_from_dict(raw))["status"] == "completed"


TINY_EXAMPLES = sorted(
    p.name
    for p in (ROOT / "examples").glob("*.yaml")
    if "name_or_path: ../models/tiny\n" in p.read_text()
    or "name_or_path: ../merged/quickstart\n" in p.read_text()
)


def test_the_tiny_examples_are_found():
    assert len(TINY_EXAMPLES) >= 12, TINY_EXAMPLES


@pytest.mark.parametrize(
    "example",
    [pytest.param(e, marks=pytest.mark.slow) if e == "fsdp.yaml" else e for e in TINY_EXAMPLES],
)
def test_every_tiny_example_trains(example, tmp_path, monkeypatch):
    """`snug train examples/<method>.yaml` works: two steps of each, through the CLI, run from
    another directory (the examples' paths are read from their own folder). fsdp.yaml's 2 ranks
    start as torchrun starts them, forked from a process that imported snug (tests/test_dist.py;
    torchrun's own start and the ranks' imports cost ~35 s here): `snug train` starting
    torchrun is tests/test_dist_signals.py's."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    overrides = [
        "train.max_steps=2",
        "train.eval_generate=1",
        "data.max_samples=32",
        f"output.dir={out}",
    ]
    if "../merged/quickstart" in (ROOT / "examples" / example).read_text():
        # the preference examples start from the quickstart's merged result (`make
        # preference-demo` makes it); the tiny base stands in for it here
        overrides.append(f"model.name_or_path={ROOT / 'models/tiny'}")
    if example == "fsdp.yaml":
        from test_dist import train_ranks

        train_ranks(ROOT / "examples" / example, *overrides)
    else:
        assert main(["train", str(ROOT / "examples" / example), *overrides]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    if example == "fsdp.yaml":
        assert len(summary["peak_memory"]["per_rank_bytes"]) == 2  # it ran on 2 ranks


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_qlora_trains_on_cpu(quant, tmp_path, tiny_llama):
    raw = tiny_run(
        tmp_path,
        tiny_llama,
        model={"name_or_path": str(tiny_llama), "quant": quant},
        train={"max_steps": 2, "eval_generate": 2},
    )
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["train_loss_last"] > 0
    full = run_training(
        config_from_dict(
            tiny_run(tmp_path / "fp", tiny_llama, train={"max_steps": 1, "eval_generate": 0})
        )
    )
    assert summary["total_params"] == full["total_params"]  # 4-bit packing is counted by shape
    assert summary["trainable_params"] == full["trainable_params"]


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "freeze", "trainable_layers": 0},  # head only
        {"name": "freeze", "trainable_layers": 0, "cls.head": "mlp"},  # head + a new FC layer
        {"name": "freeze", "trainable_layers": 2},  # last N layers + head
        {"name": "lora", "r": 4},
        {"name": "adapter", "bottleneck": 16},
        {"name": "prompt", "num_virtual_tokens": 4},
    ],
    ids=["head", "head-mlp", "last-2", "lora", "adapter", "prompt"],
)
def test_classification_strategies_learn(strategy, tmp_path):
    own = {k.removeprefix("cls."): v for k, v in strategy.items() if k.startswith("cls.")}
    raw = {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {k: v for k, v in strategy.items() if not k.startswith("cls.")},
        "data": {
            "train": str(ROOT / "data/classify/train.jsonl"),
            "eval": str(ROOT / "data/classify/heldout.jsonl"),
            "cutoff_len": 32,
            "max_samples": 400,
        },
        "train": {
            "stage": "cls",
            "max_steps": 25,
            "micro_batch": 16,
            "grad_accum": 1,
            "lr": 3e-3,
            "log_every": 5,
        },
        "cls": own,
        "memory": {"grad_checkpointing": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["eval"]["metric"] == "accuracy"
    # the stage's own step metric reaches metrics.jsonl without the loop knowing its name
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    accuracy = [r["accuracy"] for r in rows if "accuracy" in r]
    assert len(accuracy) == 5 and all(0 <= a <= 1 for a in accuracy)
    assert summary["eval"]["loss_after"] < summary["eval"]["loss_before"]
    assert summary["eval"]["after"] > 0.4  # three balanced classes: chance is 1/3


def test_auto_fit_keeps_the_effective_batch_and_stays_under_the_budget(tmp_path, tiny_llama):
    """A budget below what micro-batch 16 without checkpointing needs (7.2 MiB planned): auto_fit
    picks a setting the plan says fits, and the real run's measured peak stays under it."""
    budget = 4 * 2**20
    raw = tiny_run(
        tmp_path,
        tiny_llama,
        memory={"auto_fit": True, "gpu": "4MiB", "grad_checkpointing": False},
        data={"max_samples": 64, "cutoff_len": 128},
        train={"micro_batch": 16, "grad_accum": 1, "max_steps": 3, "eval_generate": 0},
    )
    summary = run_training(config_from_dict(raw), planner=auto_fit)
    fit = summary["auto_fit"]
    assert summary["status"] == "completed"
    assert fit["micro_batch"] * fit["grad_accum"] == 16
    assert (fit["micro_batch"], fit["grad_checkpointing"]) != (16, False)  # something changed
    assert fit["calibration"] == "typical values, not calibrated"  # conftest: no calibration
    assert summary["peak_memory"]["measured_bytes"] <= summary["peak_memory"]["predicted_bytes"]
    assert summary["peak_memory"]["predicted_bytes"] <= budget
    saved = (tmp_path / "run/config.yaml").read_text()
    assert f"micro_batch: {fit['micro_batch']}" in saved


def test_auto_fit_refuses_with_the_smallest_change_that_fits(tmp_path, capsys):
    from transformers import AutoConfig, AutoTokenizer

    # models/tiny at 2 layers of its 4: each of the search's replays costs half
    base = tmp_path / "two-layers"
    config = AutoConfig.from_pretrained(ROOT / "models/tiny", num_hidden_layers=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    AutoTokenizer.from_pretrained(ROOT / "models/tiny").save_pretrained(base)
    raw = tiny_run(
        tmp_path,
        base,
        memory={"auto_fit": True, "gpu": "6MiB"},  # less than the weights (7.1 MB)
        data={"max_samples": 64, "cutoff_len": 128},
        train={"eval_generate": 0},
    )
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()  # saving the model's progress bar
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "memory.auto_fit: method lora does not fit cpu (0.01 GiB)" in err
    # 4-bit weights take a quarter of fp32's: QLoRA fits where LoRA does not
    # the smallest change: an 8-bit base before a 4-bit one
    assert "method.name=lora with model.quant=8bit fits" in err and err.count("\n") == 1
    assert not (tmp_path / "run/adapter").exists()


def test_a_logged_line_is_never_broken_at_the_terminal_width(tmp_path, capsys, monkeypatch):
    """In a pipe rich wraps lines at 80 columns, which broke long paths in logs (and the tests
    that read them, as pytest's temporary folders grew longer): snug's output keeps each line
    whole."""
    monkeypatch.setenv("COLUMNS", "80")
    deep = tmp_path / ("a-folder-with-a-long-name-" * 3) / "run"
    raw = tiny_run(
        tmp_path,
        ROOT / "models/tiny",
        train={"max_steps": 1, "eval_generate": 0},
        data={"eval": None},
        output={"dir": str(deep), "plot_loss": False},
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"saved {deep / 'adapter'}\n" in out, out
