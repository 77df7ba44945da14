"""Two processes on this CPU (gloo): FSDP and DDP give the losses and weights of one process
with the same global batch, a sharded checkpoint resumes exactly, and the ranks launch
themselves (`snug train cfg.yaml dist.nproc=2` starts torchrun)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT

STEPS = 6  # 24 samples, global micro-batch 4, accumulation 2: 3 steps an epoch, 2 epochs


def raw_config(out: Path, strategy: str, method: str = "lora", **train) -> dict:
    nproc = 1 if strategy == "none" else 2
    return {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {"name": method, "r": 4, "dropout": 0.0},
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
    """`snug train CFG` in a process of its own; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "snug.cli", "train", str(cfg)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def train(tmp: Path, name: str, raw: dict) -> Path:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    snug_train(cfg)
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
    assert worst < 1e-5, worst
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)
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
    if strategy == "fsdp":  # sharded: trainable state in torch.distributed.checkpoint shards
        step = runs[strategy] / "checkpoints/step-6"
        assert (step / "dcp").is_dir() and (step / "rng-rank1.pt").exists()


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
import snug.train.step as step
real, calls = step.chunked_loss, [0]
def loss(model, batch):
    calls[0] += 1
    if calls[0] == int(os.environ["AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, batch)
step.chunked_loss = loss
from snug.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_both_ranks(cfg: Path, at: int) -> None:
    """Start the 2 ranks of `snug train cfg` by hand (torchrun's environment), each SIGKILLing
    itself at its at-th micro-batch."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", KILL_AT, "train", str(cfg)],
            env={
                **os.environ,
                "AT": str(at),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [-9, -9], [p.stderr.read()[-2000:] for p in procs]


def test_sharded_checkpoint_resumes_exactly_after_kill_9(tmp_path, runs):
    """Both ranks die by SIGKILL in step 5 (after the step-4 checkpoint); `snug train` again
    resumes the sharded checkpoint and ends where the uninterrupted FSDP run ended."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(out, "fsdp")))
    kill_both_ranks(cfg, at=9)  # the first micro-batch of step 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    resumed = snug_train(cfg)
    assert "resuming from" in resumed.stdout
    ours, theirs = weights(out), weights(runs["fsdp"])
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert losses(out) == losses(runs["fsdp"])


@pytest.mark.parametrize(
    "strategy,quant,reshard",
    [
        ("fsdp", "none", True),
        ("ddp", "none", True),
        ("fsdp", "4bit", True),
        ("fsdp", "none", False),
    ],
)
def test_planner_predicts_the_per_rank_peak(strategy, quant, reshard, tmp_path):
    """`snug plan` simulates rank 0 with a fake process group; against the tracked peak of each
    rank of a real 2-process run (text cut at the cutoff: every row full, no padding)."""
    from snug.config import config_from_dict
    from snug.plan.hardware import model_config
    from snug.plan.simulate import simulate

    docs = [json.loads(x)["text"] for x in (ROOT / "data/corpus/corpus.jsonl").open()]
    text = tmp_path / "text.jsonl"
    text.write_text(
        "".join(
            json.dumps({"text": " ".join(docs[i * 12 : i * 12 + 12])}) + "\n" for i in range(16)
        )
    )
    raw = raw_config(tmp_path / "run", strategy, max_steps=3, stage="pt")
    raw["data"] = {"train": str(text), "format": "text", "cutoff_len": 64}
    raw["memory"] = {"grad_checkpointing": True}
    raw["model"]["quant"] = quant
    raw["dist"]["reshard_after_forward"] = reshard  # false: gathered layers kept until backward
    run = train(tmp_path, strategy, raw)
    measured = json.loads((run / "summary.json").read_text())["peak_memory"]["per_rank_bytes"]
    cfg = config_from_dict(raw)
    predicted = simulate(cfg, model_config(cfg.model.name_or_path), 64, "cpu", "fp32", extend=False)
    assert all(abs(predicted.peak_bytes - m) / m < 0.05 for m in measured), (
        predicted.peak_bytes,
        measured,
    )


def test_a_sharded_checkpoint_resumes_in_one_process(tmp_path, runs):
    """Two ranks die after the step-4 checkpoint; one process with the same global
    micro-batch resumes the shards (torch.distributed.checkpoint re-splits them) and ends
    where the one-process run ended."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(out, "fsdp")))
    kill_both_ranks(cfg, at=9)
    one = raw_config(out, "none")
    cfg.write_text(yaml.safe_dump(one))
    resumed = snug_train(cfg)
    assert "resuming from" in resumed.stdout and "step 4" in resumed.stdout
    assert_same(out, runs["none"])


def test_a_one_process_checkpoint_resumes_on_two_fsdp_ranks(tmp_path, runs):
    """One process dies after its step-4 checkpoint (whole tensors); two ranks with the same
    global micro-batch resume it (FSDP: each keeps its slice of weights and optimizer state)
    and end where the uninterrupted run ended."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(out, "none")))
    died = subprocess.run(
        [sys.executable, "-c", KILL_AT, "train", str(cfg)],
        env={**os.environ, "AT": "9"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert died.returncode == -9, died.stderr[-2000:]
    assert (out / "checkpoints/step-4/trainable.safetensors").exists()
    cfg.write_text(yaml.safe_dump(raw_config(out, "fsdp")))
    resumed = snug_train(cfg)
    assert "resuming from" in resumed.stdout and "step 4" in resumed.stdout
    assert_same(out, runs["none"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stop_signal_to_the_launcher_saves_every_rank_and_resumes(sig, tmp_path):
    """SIGTERM to the `snug train` process alone (as a scheduler or `kill` sends it): it passes
    the signal through torchrun to the ranks, which save after their step; exit 75, and the
    same command resumes there and finishes. SIGKILL (nothing can be passed on): the kernel
    tells torchrun, which stops the ranks the same way; none is left running."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(out, "fsdp", epochs=8, lr=1e-4)))
    cmd = [sys.executable, "-m", "snug.cli", "train", str(cfg)]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
        time.sleep(0.2)
    launcher.send_signal(sig)
    # the pipes close when every process holding them (torchrun, the ranks) has ended
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == (75 if sig == signal.SIGTERM else -9), stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] < 24
    assert stderr.count(f"{sig.name if sig == signal.SIGTERM else 'SIGTERM'}: stopped after") == 1
    step = summary["steps"]
    assert (out / f"checkpoints/step-{step}/dcp").is_dir()
    if sig == signal.SIGKILL:
        return  # resuming is the same as after SIGTERM
    resumed = snug_train(cfg)
    flat = "".join(resumed.stdout.split())  # the console wraps long lines
    assert f"resumingfrom{out}/checkpoints/step-{step}" in flat
    assert (
        len(losses(out)) == 24
        and json.loads((out / "summary.json").read_text())["status"] == "completed"
    )


def test_fsdp_reduces_gradients_in_the_dtype_asked():
    """dist.reduce_dtype reaches FSDP's mixed-precision policy: the planner, which wraps its
    fake rank with the same code, sees half-size reduce-scatter buffers with bfloat16."""
    from snug.config import config_from_dict
    from snug.plan.hardware import model_config
    from snug.plan.simulate import simulate

    temporary = {}
    for reduce in ("float32", "bfloat16"):
        cfg = config_from_dict(
            {
                "model": {"name_or_path": str(ROOT / "models/tiny")},
                "method": {"name": "full"},
                "train": {"micro_batch": 1},
                "dist": {"strategy": "fsdp", "nproc": 2, "reduce_dtype": reduce},
            }
        )
        plan = simulate(cfg, model_config(cfg.model.name_or_path), 64, "cuda", "bf16-mixed")
        temporary[reduce] = plan.breakdown["temporary"]
    assert temporary["bfloat16"] < temporary["float32"], temporary
