"""`snug plan` on the command line and the search over methods and settings (the replay
itself is checked against real steps in tests/test_plan.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_plan import plan_config, small_config

from snug.config import load_config


def test_plan_cli_json_for_a_bundled_model_on_a_named_gpu(capsys):
    import json

    from snug.cli import main

    args = ["plan", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--method", "lora"]
    assert main([*args, "--seq-len", "256", "--micro-batch", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"]["name"] == "NVIDIA GeForce RTX 4090" and plan["best"] == 0
    (cand,) = plan["candidates"]
    assert cand["fits"] and cand["config"]["train"]["micro_batch"] == 2
    assert cand["reserved_bytes"] > cand["peak_bytes"] > cand["breakdown"]["weights"] > 0
    assert cand["step_seconds"] > 0 and cand["tokens_per_second"] > 0
    # bf16 weights of a 0.5B model: about 1 GB
    assert 0.8e9 < cand["breakdown"]["weights"] < 1.2e9


def test_plan_search_writes_a_config_that_trains(tmp_path, capsys, monkeypatch, tiny_llama):
    from snug.cli import main
    from snug.config import load_config

    from conftest import ROOT

    out = tmp_path / "chosen.yaml"
    monkeypatch.chdir(tiny_llama.parent)
    code = main(
        [
            "plan",
            "--model",
            tiny_llama.name,  # relative to the current directory
            "--device",
            "cpu",
            "--method",
            "lora",
            "--search",
            "--seq-len",
            "64",
            "--max-micro-batch",  # that the written config trains is the point, not its size
            "1",
            "--write-config",
            str(out),
        ]
    )
    shown = capsys.readouterr().out
    assert code == 0 and "recommended:" in shown and out.exists()
    chosen = load_config(out)
    # --model given relative to the current directory: the written config holds its absolute
    # path, so it trains from anywhere
    assert chosen.model.name_or_path == str(tiny_llama) and chosen.method.name == "lora"

    from snug.train.training import run_training

    monkeypatch.chdir(tmp_path)
    run = load_config(
        out,
        [
            f"data.train={ROOT / 'data/instruct/train.jsonl'}",
            "data.eval=null",
            "data.max_samples=64",
            "train.max_steps=2",
            "train.eval_generate=0",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    assert run_training(run)["status"] == "completed"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu", "h100"], "matches several GPUs: NVIDIA H100 80GB SXM; NVIDIA H100 PCIe"),
        (["--gpu", "potato"], "not in the bundled table"),
        (["--model", "/no/such/model", "--device", "cpu"], "not a config.json, a model directory"),
        ([], "name the device"),
    ],
)
def test_plan_cli_errors_are_one_line(args, message, capsys):
    from snug.cli import main

    base = ["plan", "--method", "lora", "--seq-len", "32"]
    if "--model" not in args:
        base += ["--model", "models/tiny"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_gpu_names_match_loosely():
    from snug.plan.hardware import find_gpu

    assert find_gpu("RTX 4090").name == find_gpu("4090").name == "NVIDIA GeForce RTX 4090"
    assert find_gpu("a100 80gb").name == "NVIDIA A100 80GB (SXM4)"
    assert find_gpu("16GiB").memory_bytes == 16 * 2**30


@pytest.mark.parametrize(
    "reported,row",
    [  # what torch.cuda.get_device_name() returns on each card
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB SXM"),  # seen on this project's GPU machine
        ("NVIDIA H200", "NVIDIA H200 (SXM)"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB (SXM4)"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB (SXM4)"),
        ("Tesla T4", "NVIDIA T4"),
        ("Tesla V100-SXM2-16GB", "NVIDIA V100 16GB (SXM2)"),
        ("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090"),
    ],
)
def test_the_names_torch_reports_find_their_row(reported, row):
    from snug.plan.hardware import find_gpu

    assert find_gpu(reported).name == row


def test_every_registered_method_can_be_recommended():
    """The planner ranks what the method registry holds (ptuning and llama_adapter were
    registered but missing from the planner's own quality list: `snug plan --search --method
    ptuning` failed with "tuple.index(x): x not in tuple")."""
    from snug.core.registry import methods
    from snug.plan.hardware import cpu_device, model_config
    from snug.plan.recommend import quality_rank, recommend
    from snug.plan.search import plan_one, searched_methods

    from conftest import ROOT

    cfg = load_config(
        None,
        ["method.name=ptuning", "method.num_virtual_tokens=4", "train.micro_batch=1"],
    )
    cand = plan_one(cfg, model_config(str(ROOT / "models/tiny")), cpu_device(), 32)
    choice, why = recommend([cand])
    assert choice is cand and "ptuning ranks highest" in why
    ranks = [quality_rank(m) for m in {*methods(), *searched_methods()}]
    assert len(set(ranks)) == len(ranks)  # one order, no ties between methods


def test_search_tries_lora_on_each_base_and_prefers_the_full_precision_one():
    from snug.plan.hardware import cpu_device
    from snug.plan.recommend import recommend
    from snug.plan.search import method_label, search

    cfg, config = plan_config("lora", True), small_config(layers=1)
    # micro-batch 1 only: the bases and the ranking are the point, not how far the batch grows
    found = search(cfg, config, cpu_device(2**30), 64, ("qlora", "qlora-8bit", "lora"), 1)
    bases = {c.name.split()[0]: (c.cfg.method.name, c.cfg.model.quant) for c in found}
    assert bases == {
        "lora": ("lora", "none"),
        "qlora-8bit": ("lora", "8bit"),
        "qlora": ("lora", "4bit"),
    }
    assert all(c.fits for c in found)
    assert {method_label(c.cfg) for c in found} == set(bases)
    choice, why = recommend(found)
    assert method_label(choice.cfg) == "lora" and why.startswith("lora ranks highest")
    choice, _ = recommend([c for c in found if method_label(c.cfg) != "lora"])
    assert method_label(choice.cfg) == "qlora-8bit"


def test_a_search_in_worker_processes_finds_what_one_process_finds(monkeypatch):
    """`search` runs each method's search in a forked worker (one per core): the candidates,
    their plans and their order are the same as in one process."""
    import snug.plan.timing as timing
    from snug.plan.hardware import cpu_device
    from snug.plan.search import search

    # the CPU's matmul rate is measured at each search: the same one for both
    monkeypatch.setattr(timing, "_cpu_rate", lambda: 5e10)
    cfg, config = plan_config("lora", True), small_config(layers=1)
    methods = ("full", "prompt")
    device = cpu_device(9 * 2**20)  # full does not fit (10 MB with Adafactor); prompt does

    def run(workers):  # micro-batch 1 only: the split into workers is the point
        found = search(cfg, config, device, 64, methods, 1, workers=workers)
        return [(c.name, c.fits, c.peak_bytes, c.step_seconds, c.error) for c in found]

    one = run(1)
    assert {name.split()[0] for name, *_ in one} == set(methods)
    assert not all(fits for _, fits, *_ in one) and any(fits for _, fits, *_ in one)
    assert run(2) == one


@pytest.mark.parametrize("search", [False, True])
def test_a_failed_simulation_is_an_error_not_a_verdict(search, monkeypatch, capsys):
    """Exit 1 says every candidate was planned and none fits; a simulation that breaks is
    exit 2 with its cause, in the table and in the one-line error, never "nothing fits"."""
    import snug.plan.search as search_module
    from snug.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("Couldn't swap Embedding.weight")

    monkeypatch.setattr(search_module, "simulate", broken)
    args = ["plan", "--model", "models/tiny", "--method", "lora", "--device", "cpu"]
    assert main([*args, "--seq-len", "32", *(["--search"] if search else [])]) == 2
    out, err = capsys.readouterr()
    assert "nothing fits" not in out
    assert "the simulation failed: RuntimeError: Couldn't swap Embedding.weight" in out
    assert err.startswith("error: the plan of ") and err.count("\n") == 1
    assert "failed" in err and "Couldn't swap Embedding.weight" in err


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_virtual_token_methods_plan_a_bfloat16_base(method, capsys):
    """peft's prompt-learning models hold the base's embedding twice; with model.dtype
    bfloat16 the replay crashed on it ("Couldn't swap Embedding.weight")."""
    import json

    from snug.cli import main

    from conftest import ROOT

    example = str(ROOT / f"examples/{method}.yaml")
    args = ["plan", example, "--device", "cpu", "--seq-len", "32", "--json", "model.dtype=bfloat16"]
    assert main(args) == 0, capsys.readouterr().err
    (cand,) = json.loads(capsys.readouterr().out)["candidates"]
    assert cand["error"] is None and cand["fits"] and cand["peak_bytes"] > 0


def test_the_plan_of_a_config_keeps_its_precision(tmp_path, capsys):
    """A full fine-tune in bf16-true on a bf16 base (weights, gradients and both AdamW moments
    in bf16, as published full-tuning benchmarks run) is planned as such: AdamW keeps
    2 x 2 bytes per trainable weight (8 bytes under bf16-mixed, whose trainable weights are
    fp32); each storage rounds up to 512 bytes on CUDA, under 1% on this model."""
    import json

    from snug.cli import main

    from conftest import ROOT

    args = ["plan", "--model", str(ROOT / "models/tiny"), "--method", "full", "--gpu", "24GiB"]
    args += ["--seq-len", "64", "--json", "train.precision=bf16-true", "model.dtype=bfloat16"]
    cfg = tmp_path / "full.yaml"
    cfg.write_text("method:\n  name: full\n")
    assert main(["plan", str(cfg), *args[1:]]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    (cand,) = result["candidates"]
    assert result["precision"] == "bf16-true"
    n = cand["trainable_params"]
    assert cand["breakdown"]["optimizer"] == pytest.approx(4 * n, rel=0.01)
    assert cand["breakdown"]["trainable"] == pytest.approx(2 * n, rel=0.01)


def replay_stand_in(cfg, config, seq_len, device_type="cuda", precision=None, **kwargs):
    """What `simulate` returns, without the replay (~2 s each): for tests of the search's
    bookkeeping, whose assertions are about configurations, not bytes. Activations grow with
    the micro-batch, as a replay's do."""
    from snug.plan.simulate import Simulation

    b, accum = cfg.train.micro_batch, cfg.train.grad_accum
    parts = {"weights": 2**24, "trainable": 2**20, "gradients": 2**20, "optimizer": 2**21}
    parts["activations"] = b * seq_len * 2**12
    return Simulation(
        peak_bytes=sum(parts.values()),
        weights_bytes=parts["weights"] + parts["trainable"],
        flops_per_step=6 * 2**22 * b * accum * seq_len,
        ops_per_step=1000 * accum,
        optimizer_bytes=parts["optimizer"],
        trainable_params=2**18,
        total_params=2**22 + 2**18,
        layers_simulated=(config.num_hidden_layers,),
        breakdown=parts,
        reserved_bytes=sum(parts.values()) if device_type == "cuda" else None,
    )


def test_search_keeps_every_key_it_does_not_search_and_says_which(tmp_path, capsys, monkeypatch):
    """`--search` varies method, quantization, micro-batch (with accumulation, keeping the
    effective batch), checkpointing, offload, optimizer and chunked loss; every other key the
    config sets is the user's in every candidate, and the output lists them. The candidates'
    configurations are the point, not their bytes: the replay is stood in for."""
    import json

    import snug.plan.search as search_module
    from snug.cli import main
    from snug.plan.hardware import cpu_device, model_config
    from snug.plan.report import searched_keys
    from snug.plan.search import search

    planned = []

    def simulate(cfg, *args, **kwargs):
        planned.append(cfg)
        return replay_stand_in(cfg, *args, **kwargs)

    monkeypatch.setattr(search_module, "simulate", simulate)

    from conftest import ROOT

    cfg_path = tmp_path / "mine.yaml"
    cfg_path.write_text(
        f"model:\n  name_or_path: {ROOT / 'models/tiny'}\n  dtype: bfloat16\n"
        "method:\n  r: 32\n  alpha: 64\n"
        "train:\n  precision: bf16-true\n  lr: 5.0e-5\n  micro_batch: 2\n  grad_accum: 4\n"
        "memory:\n  optimizer: adamw8bit\n"
    )
    args = ["plan", str(cfg_path), "--search", "--method", "lora", "--device", "cpu"]
    args += ["--max-micro-batch", "2"]  # the keys are the point, not how far the batch grows
    assert main([*args, "--seq-len", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    held = result["held_fixed"]
    assert held["train.precision"] == "bf16-true" and held["model.dtype"] == "bfloat16"
    assert held["method.r"] == 32 and held["method.alpha"] == 64 and held["train.lr"] == 5e-5
    assert "memory.optimizer" not in held and "train.micro_batch" not in held
    assert "memory.optimizer" in result["searched"]
    assert "method.name" in searched_keys(False, 1)  # without --method the method is searched

    from snug.config import load_config

    cfg = load_config(cfg_path)
    # an adapter on a quantized base (whose rank is the user's), a full fine-tune (the CLI
    # above searched LoRA itself)
    methods = ("qlora", "full")
    config = model_config(cfg.model.name_or_path)
    for cand in search(cfg, config, cpu_device(), 32, methods, 2, workers=1):  # sees `planned`
        c = cand.cfg
        assert (c.train.precision, c.model.dtype, c.train.lr) == ("bf16-true", "bfloat16", 5e-5)
        if c.method.name in ("lora", "dora"):
            assert (c.method.r, c.method.alpha) == (32, 64)
        assert c.train.micro_batch * c.train.grad_accum == 8, cand.name
    # and so does every configuration the search planned on its way
    assert {(c.method.name, c.model.quant) for c in planned} == {
        ("lora", "none"),  # the command line's search
        ("lora", "4bit"),
        ("full", "none"),
    }
    assert all(c.train.micro_batch * c.train.grad_accum == 8 for c in planned)
    assert all((c.train.precision, c.train.lr) == ("bf16-true", 5e-5) for c in planned)
    assert main([*args, "--seq-len", "32", "--max-micro-batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "held fixed from your config:" in out and "train.precision=bf16-true" in out


def test_the_old_bitsandbytes_what_if_keeps_each_4bit_input():
    """benchmarks/published.py's what-if for rows measured with bitsandbytes < 0.43.2 (whose
    4-bit matmul kept its input for backward) plans more than today's stand-in."""
    import importlib.util

    from snug.plan.simulate import simulate

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("published", ROOT / "benchmarks/published.py")
    published = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(published)
    cfg = load_config(None, ["method.name=lora", "model.quant=4bit", "train.micro_batch=2"])
    config = small_config(layers=1)  # each 4-bit layer keeps its input: one shows it
    today = simulate(cfg, config, 64, "cpu", "fp32", extend=False).peak_bytes
    with published.bitsandbytes_keeps_4bit_input():
        old = simulate(cfg, config, 64, "cpu", "fp32", extend=False).peak_bytes
    assert old > today


def test_a_search_for_another_method_than_the_configs(capsys):
    """`snug plan examples/quickstart.yaml --method ptuning --search` (quickstart trains LoRA):
    the file's LoRA keys are set aside in one line and the search plans P-tuning."""
    import json

    from snug.cli import main

    from conftest import ROOT

    quickstart = ROOT / "examples/quickstart.yaml"
    args = ["plan", str(quickstart), "--method", "ptuning", "--search", "--device", "cpu"]
    assert main([*args, "--max-micro-batch", "1", "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert {c["config"]["method"]["name"] for c in plan["candidates"]} == {"ptuning"}
    # stderr also holds the search's progress (stdout is JSON): the set-aside line once
    said = [line for line in captured.err.splitlines() if "set aside" in line]
    assert said == [
        f"{quickstart}: method.r, method.alpha, method.targets set aside: not keys of "
        "method.name=ptuning, chosen on the command line (the file sets them for "
        "method.name=lora)."
    ]


def test_measure_leaves_the_warm_up_steps_out_of_the_step_time(monkeypatch, capsys):
    """`snug measure`'s step time is that of the steps after the warm-up, and it says how many
    it left out: the first step's one-time set-up (and, on a CPU, the memory tracker on the
    first two) made `--steps 3` report many times the step time. Here the first real step is
    made to take 3 s longer; a step of this tiny config takes about 0.05 s."""
    import re
    import time

    import snug.train.run
    from snug.cli import main

    from conftest import ROOT

    real_step, calls = snug.train.run.train_step, []

    def slow_first_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(3)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(snug.train.run, "train_step", slow_first_step)
    config = str(ROOT / "examples/quickstart.yaml")
    assert main(["measure", config, "data.max_samples=32", "--steps", "2"]) == 0
    shown = capsys.readouterr().out
    measured = float(re.search(r"step: predicted [\d.]+ s, measured ([\d.]+) s", shown)[1])
    assert measured < 1.0, shown
    assert "median of 2 steps after 2 warm-up steps" in shown
    assert len(calls) == 4  # the warm-up steps run, then the timed ones
    # and what it does is shown as it goes (issue 33: it was silent while it trained)
    for line in ("measure: 4 steps", "(planning the step on fake tensors)", "(loading the model"):
        assert line in shown, shown
    assert "measure: 4 steps done in" in shown


def test_measure_needs_a_warm_up_step_and_a_timed_one(capsys):
    from snug.cli import main

    from conftest import ROOT

    config = str(ROOT / "examples/quickstart.yaml")
    assert main(["measure", config, "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--steps 3 --warmup 0: use 1 or more of each" in err and "\n" not in err


def test_write_config_says_when_a_data_path_it_writes_names_no_file(tmp_path, capsys):
    """Without a config, `snug plan --model M --write-config F` writes data.train's default,
    data/train.jsonl, which names no file: the plan says so in one line naming the key, and the
    written file says it beside the key, so that `snug train F` is not the first to tell."""
    from snug.cli import main

    from conftest import ROOT

    out = tmp_path / "chosen.yaml"
    argv = ["plan", "--model", str(ROOT / "models/tiny"), "--device", "cpu", "--method", "lora"]
    assert main([*argv, "--seq-len", "32", "--write-config", str(out)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert f"wrote {out}; set data.train there to your training data" in shown
    (line,) = [x for x in out.read_text().splitlines() if x.startswith("  train:")]
    assert line.endswith("# names no file: set it to your training data")


def test_write_config_from_a_config_keeps_its_data_wherever_it_is_written(
    tmp_path, monkeypatch, capsys
):
    """The written config names the same data files as the config planned, read from the
    written file's own folder (relative paths in a config are), from any directory."""
    from snug.cli import main
    from snug.config import load_config

    from conftest import ROOT

    out = tmp_path / "elsewhere/chosen.yaml"
    out.parent.mkdir()
    config = str(ROOT / "examples/quickstart.yaml")
    assert main(["plan", config, "--device", "cpu", "--write-config", str(out)]) == 0
    assert "set data" not in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    chosen, given = load_config(out), load_config(config)
    assert (chosen.data.train, chosen.data.eval) == (given.data.train, given.data.eval)
    assert Path(chosen.data.train).is_file() and Path(chosen.data.eval).is_file()


def test_a_search_tells_its_progress_and_its_json_stays_pure(capsys, monkeypatch):
    """Each method searched is counted, with the time left: beside the table, or on stderr
    when stdout is JSON (which stays JSON alone)."""
    import json

    import snug.plan.search as search_module
    from snug.cli import main
    from snug.runtime import progress

    monkeypatch.setattr(search_module, "simulate", replay_stand_in)
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line at each method searched
    monkeypatch.setenv("SNUG_PLAN_WORKERS", "1")
    n = len(search_module.searched_methods())
    args = ["plan", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--search", "--seq-len", "32"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["candidates"]
    lines = err.splitlines()
    assert lines[0] == f"search: {n} methods"
    assert any(line.startswith(f"search: 1 of {n} methods, 0 s, about") for line in lines)
    assert lines[-1].startswith(f"search: {n} methods done in ")
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert f"search: {n - 1} of {n} methods" in out and f"search: {n} methods done in" in out
    assert "search" not in err


def test_a_search_in_worker_processes_counts_each_method_as_it_ends(monkeypatch):
    import snug.plan.search as search_module
    from snug.plan.hardware import cpu_device

    monkeypatch.setattr(search_module, "simulate", replay_stand_in)
    told = []

    class Told:
        def __init__(self, title, total, unit):
            told.append((title, total, unit))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            told.append("end")

        def advance(self, n):
            told.append(n)

    methods = ("lora", "full", "prompt")
    cfg, config = plan_config("lora", True), small_config(layers=2)
    found = search_module.search(cfg, config, cpu_device(), 32, methods, 1, workers=2, phase=Told)
    assert {c.cfg.method.name for c in found} == set(methods)
    assert told == [("search", 3, "methods"), 1, 1, 1, "end"]


@pytest.mark.parametrize(
    ("example", "longest"), [("quickstart.yaml", 33), ("cls.yaml", 9), ("dpo.yaml", None)]
)
def test_a_config_is_planned_for_its_longest_tokenized_sample(example, longest):
    """`snug plan CONFIG` plans for the longest sample of the config's data, whatever the stage
    (issue 34's review: the stage's keys had moved, the call that tokenized failed unseen and
    the plan fell back to data.cutoff_len: 128 tokens where the quickstart's longest is 33)."""
    import argparse

    from snug.plan.report import sequence_length

    root = Path(__file__).resolve().parent.parent
    # dpo.yaml trains the quickstart's merge (merged/quickstart): the bundled base has its tokenizer
    cfg = load_config(root / "examples" / example, [f"model.name_or_path={root / 'models/tiny'}"])
    seq_len, why = sequence_length(argparse.Namespace(seq_len=None), cfg, has_config=True)
    assert why == "longest tokenized sample of data.train", (seq_len, why)
    assert seq_len < cfg.data.cutoff_len
    if longest is not None:  # measured on 5c0403b, before the keys moved
        assert seq_len == longest
