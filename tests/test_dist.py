"""Two processes on this CPU (gloo): FSDP and DDP give the losses and weights of one process
with the same global batch, a sharded checkpoint resumes exactly, and the ranks launch
themselves (`snug train cfg.yaml dist.nproc=2` starts torchrun)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from forked import Forked, run_forked
from safetensors.torch import load_file

from snug.cli import main

from conftest import ROOT, method_keys

pytestmark = pytest.mark.slow  # every test here starts real processes (2 gloo ranks)

STEPS = 6  # 24 samples, global micro-batch 4, accumulation 2: 3 steps an epoch, 2 epochs
# Two ranks add up each gradient in another order than one process, and run matmuls of other
# shapes, so gradients differ by float32 rounding (u = 2**-24). AdamW moves a weight by at most
# about lr a step: where a gradient stands well above its rounding the update changes by ~u * lr,
# but where it is near zero rounding can change a good part of the update. So the weights
# differ by a small fraction of lr * STEPS: measured on an AVX2-only CPU, 2e-4 to 3e-4 of it for
# LoRA and full fine-tuning, 2.2e-3 for QLoRA (its 4-bit layers compute through bitsandbytes);
# on an AVX-512 one, 8e-4 to 6e-3 for the preference stages (precompute against a copy the
# most). Real bugs move weights by a large part of it: rank 1's rows lost, 1.0; a 10% larger
# lr, 0.4-0.6. A gradient off by a constant factor does not show here (Adam is scale-invariant).
ADAM_FRACTION = 0.02
# A step's loss is the mean cross-entropy of its target tokens through 4 fp32 layers (dot
# products of up to 768 terms: ~sqrt(768) * 4 * u = 7e-6 relative). Measured: 2.3e-7 at most;
# rank 1's rows lost: 0.54, a 10% larger lr: 0.03-0.05.
LOSS_RTOL = 1e-5


def raw_config(out: Path, strategy: str, method: str = "lora", **train) -> dict:
    nproc = 1 if strategy == "none" else 2
    return {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {"name": method, **method_keys(method, r=4, dropout=0.0)},
        "data": {"train": str(ROOT / "data/instruct/train.jsonl"), "max_samples": 24},
        "train": {
            "epochs": 2,
            "micro_batch": 4 // nproc,  # the same global micro-batch of 4 rows
            "grad_accum": 2,
            "lr": 1e-3,
            "eval_generate": 0,
            "log_every": 1,
            **train,
        },
        "dist": {"strategy": strategy, "nproc": nproc},
        "output": {"dir": str(out), "save_every": 2, "plot_loss": False},
    }


def snug_train(cfg: Path) -> subprocess.CompletedProcess:
    """`snug train CFG` in a process of its own (tests/forked.py), launcher and torchrun
    included; it must succeed."""
    done = run_forked(["train", cfg], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def train_here(cfg: Path) -> subprocess.CompletedProcess:
    """`snug train CFG` of one process, in this one (a process start costs ~10 s of imports
    here); it must succeed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(cfg)])
    assert code == 0, out.getvalue()[-2000:] + err.getvalue()[-3000:]
    return subprocess.CompletedProcess(
        ["snug", "train", str(cfg)], code, out.getvalue(), err.getvalue()
    )


def ranks(
    cfg: Path, script: str | None = None, overrides: tuple[str, ...] = (), **env: str
) -> list[Forked]:
    """The 2 ranks of `snug train cfg [overrides]` started by hand with torchrun's environment
    (no launcher, no torchrun agent: what they add is tested in tests/test_dist_signals.py),
    each a process of its own (tests/forked.py); `script` runs instead of the command line (it
    ends by calling it)."""
    port = _free_port()
    return [
        Forked(
            ["train", cfg, *overrides],
            script,
            **env,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        for r in range(2)
    ]


def train_ranks(cfg: Path, *overrides: str) -> str:
    """Both ranks to the end; rank 0's output."""
    procs = ranks(cfg, overrides=overrides)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    return outs[0][0]


def train(tmp: Path, name: str, raw: dict) -> Path:
    """One process in this one, two as ranks of their own."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    if raw["dist"]["strategy"] == "none":
        train_here(cfg)
    else:
        train_ranks(cfg)
    return Path(raw["output"]["dir"])


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(run: Path, method: str = "lora") -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(run / "adapter/adapter_model.safetensors")
    return load_file(run / "model/model.safetensors")


def assert_same(run: Path, single: Path, method: str = "lora") -> None:
    ours, theirs = weights(run, method), weights(single, method)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    lr = yaml.safe_load((single / "config.yaml").read_text())["train"]["lr"]
    assert worst < ADAM_FRACTION * lr * STEPS, (worst, lr)
    assert losses(run) == pytest.approx(losses(single), rel=LOSS_RTOL)
    assert len(losses(run)) == STEPS


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    return {s: train(tmp, s, raw_config(tmp / s, s)) for s in ("none", "fsdp", "ddp")}


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_train_like_one_process_with_the_same_global_batch(strategy, runs):
    assert_same(runs[strategy], runs["none"])
    summary = json.loads((runs[strategy] / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["peak_memory"]["per_rank_bytes"]) == 2
    step = runs[strategy] / "checkpoints/step-6"
    # sharded: torch.distributed.checkpoint's safetensors, one per rank; nothing pickled
    assert len(list((step / "shards").glob("*.safetensors"))) == 2
    assert (step / "rng-rank1.json").exists()
    kinds = {p.suffix or p.name for p in step.rglob("*") if p.is_file()}
    assert kinds == {".json", ".safetensors", "COMPLETE"}, kinds


def test_fsdp_full_fine_tune_matches_one_process(tmp_path):
    single = train(tmp_path, "one", raw_config(tmp_path / "one", "none", "full", lr=1e-4))
    fsdp = train(tmp_path, "fsdp", raw_config(tmp_path / "fsdp", "fsdp", "full", lr=1e-4))
    assert_same(fsdp, single, "full")


def test_qlora_trains_sharded_like_one_process(tmp_path):
    """QLoRA (NF4 base) under FSDP, whose 4-bit weights are packed in the compute dtype and
    sharded like the rest: the adapter and losses of one process. (DDP holds the 4-bit base as
    one process does; `check` lets it through, untested here to keep the suite short.)"""
    made = {}
    for strategy in ("none", "fsdp"):
        raw = raw_config(tmp_path / strategy, strategy)
        raw["model"]["quant"] = "4bit"
        made[strategy] = train(tmp_path, strategy, raw)
    assert_same(made["fsdp"], made["none"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KILL_AT = """
import os, signal, sys
import snug.train.loss as lossmod  # the stage's loss reads chunked_loss from here at each call
real, calls = lossmod.chunked_loss, [0]
def loss(model, batch):
    calls[0] += 1
    if calls[0] == int(os.environ["AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, batch)
lossmod.chunked_loss = loss
from snug.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_both_ranks(cfg: Path, at: int) -> None:
    """Start the 2 ranks of `snug train cfg` by hand (torchrun's environment), each SIGKILLing
    itself at its at-th micro-batch."""
    procs = ranks(cfg, KILL_AT, AT=str(at))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [-9, -9], [o[1][-2000:] for o in outs]


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """An FSDP run whose two ranks died by SIGKILL in step 5, after the step-4 checkpoint (the
    tests below copy it and resume it each their own way)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    cfg = out.parent / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(out, "fsdp")))
    kill_both_ranks(cfg, at=9)  # the first micro-batch of step 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of the run to put it back from once a test has resumed it in place (its
    checkpoints record their config's absolute paths, so it resumes where it was made)."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_sharded_checkpoint_resumes_exactly_after_kill_9(tmp_path, runs, killed):
    """Both ranks die by SIGKILL in step 5 (after the step-4 checkpoint); `snug train` again
    resumes the sharded checkpoint and ends where the uninterrupted FSDP run ended."""
    cfg = killed.parent / "cfg.yaml"
    saved = copy_of(killed, tmp_path)
    try:
        assert "resuming from" in train_ranks(cfg)
        ours, theirs = weights(killed), weights(runs["fsdp"])
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert losses(killed) == losses(runs["fsdp"])
    finally:  # the killed run as it was, for the next test
        shutil.rmtree(killed)
        shutil.copytree(saved, killed)


def test_a_sharded_checkpoint_resumes_in_one_process(tmp_path, runs, killed):
    """Two ranks die after the step-4 checkpoint; one process with the same global
    micro-batch resumes the shards (torch.distributed.checkpoint re-splits them) and ends
    where the one-process run ended."""
    saved = copy_of(killed, tmp_path)
    cfg = killed.parent / "one.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(killed, "none")))
    try:
        resumed = train_here(cfg)
        assert "resuming from" in resumed.stdout and "step 4" in resumed.stdout
        assert_same(killed, runs["none"])
    finally:
        shutil.rmtree(killed)
        shutil.copytree(saved, killed)


def test_a_one_process_checkpoint_resumes_on_two_fsdp_ranks(tmp_path, runs):
    """One process dies after its step-4 checkpoint (whole tensors); two ranks with the same
    global micro-batch resume it (FSDP: each keeps its slice of weights and optimizer state)
    and end where the uninterrupted run ended."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(out, "none")))
    died = run_forked(["train", cfg], KILL_AT, timeout=600, AT="9")
    assert died.returncode == -9, died.stderr[-2000:]
    assert (out / "checkpoints/step-4/trainable.safetensors").exists()
    cfg.write_text(yaml.safe_dump(raw_config(out, "fsdp")))
    resumed = " ".join(train_ranks(cfg).split())
    assert "resuming from" in resumed and "step 4" in resumed
    assert_same(out, runs["none"])


# Preference stages under FSDP and DDP: the step divides the summed pair losses by the pairs of
# every rank, and kto averages its KL estimate over every rank's mismatched rows, so two ranks
# with the same global micro-batch train as one process (each case against one process with
# pref.reference auto: adapter_off for lora, a copy for full, which precompute equals to float
# rounding: tests/test_preference.py). They write no checkpoints: a sharded one holds the
# model's trainable state and optimizer state whatever the stage (the reference is no part of
# it), as the runs above save and resume; each save costs a launch about 0.3 s.
PREFERENCE = {
    "dpo-lora-ddp": ("dpo", "lora", "ddp", "auto"),
    "dpo-full-fsdp-copy": ("dpo", "full", "fsdp", "copy"),  # the copy sharded as the model
    "dpo-full-fsdp-precompute": ("dpo", "full", "fsdp", "precompute"),
    "kto-lora-fsdp": ("kto", "lora", "fsdp", "auto"),
}


def preference_config(out: Path, stage: str, method: str, strategy: str, reference: str) -> dict:
    raw = raw_config(out, strategy, method, stage=stage, lr=1e-3 if method == "lora" else 1e-4)
    data = "kto_train.jsonl" if stage == "kto" else "train.jsonl"
    raw["data"] = {"train": str(ROOT / "data/preference" / data), "max_samples": 24}
    raw["pref"] = {"beta": 0.5, "reference": reference}
    raw["output"]["save_every"] = None
    return raw


@pytest.fixture(scope="module")
def preference_single(tmp_path_factory) -> dict[tuple[str, str], Path]:
    tmp = tmp_path_factory.mktemp("pref-one")
    made = {}
    for stage, method, _, _ in PREFERENCE.values():
        if (stage, method) not in made:
            raw = preference_config(tmp / f"{stage}-{method}", stage, method, "none", "auto")
            made[stage, method] = train(tmp, f"{stage}-{method}", raw)
    return made


@pytest.mark.parametrize("case", PREFERENCE)
def test_preference_stages_train_on_two_ranks_like_one_process(case, preference_single, tmp_path):
    stage, method, strategy, reference = PREFERENCE[case]
    run = train(tmp_path, case, preference_config(tmp_path / case, *PREFERENCE[case]))
    assert_same(run, preference_single[stage, method], method)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("pref_accuracy" in r for r in logged if "loss" in r)


def test_an_uneven_last_micro_batch_keeps_the_ranks_in_step(tmp_path):
    """25 completions, 2 ranks of 2, accumulation 2: the last global micro-batch (1 row) is
    filled with the epoch's first rows, so neither rank trains a share without rows (DDP's
    gradient all-reduce and kto's KL sum would meet other collectives and hang) nor kto a
    single completion."""
    raw = preference_config(tmp_path / "run", "kto", "lora", "ddp", "auto")
    raw["data"]["max_samples"] = 25
    raw["train"]["epochs"] = 1
    run = train(tmp_path, "uneven", raw)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4  # ceil(ceil(25 / 4) / 2)


CHOSEN_LOSSES = """
import json, os, sys
import snug.train.run as loop
real, measured = loop.eval_metrics, {}
# rank 0 sees its lowest at step 2; rank 1 its at step 3 (rank 0's must decide for both)
chosen = {0: [3.0, 1.0, 2.0], 1: [0.5, 4.0, 0.1]}[int(os.environ["RANK"])]
def fake(model, *args, **kwargs):
    step = len(measured) + 1
    measured[step] = real(model, *args, **kwargs)["loss"]
    with open(os.environ["REAL"] + os.environ["RANK"], "w") as f:
        json.dump(measured, f)
    return {"loss": chosen[step - 1]}
loop.eval_metrics = fake
from snug.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_keep_best_on_two_fsdp_ranks_ends_with_rank_0s_best(tmp_path):
    """output.keep_best under FSDP: rank 0's held-out loss decides for both ranks (else they
    would save at different steps and hang), keep_last 1 keeps only the best's shards, and the
    final adapter is the best step's: the evaluation after training gives the loss measured
    at step 2."""
    raw = raw_config(tmp_path / "run", "fsdp", max_steps=3, eval_every=1)
    raw["data"]["eval"] = str(ROOT / "data/instruct/heldout.jsonl")
    raw["output"].update(save_every=None, keep_last=1, keep_best=True)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    procs = ranks(cfg, CHOSEN_LOSSES, REAL=str(tmp_path / "real"))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"] == {"step": 2, "eval_loss": 1.0}
    # step-1 (the best until step 2) was pruned by keep_last 1 once step-2 was complete
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    real = json.loads((tmp_path / "real0").read_text())
    assert summary["eval"]["loss_after"] == pytest.approx(real["2"], rel=1e-5)
    assert real["2"] != pytest.approx(real["3"], rel=1e-5)
