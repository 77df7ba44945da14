"""`snug plan --num-gpus 2` against the per-rank peaks of real 2-process runs on this CPU (gloo),
for the preference stages under FSDP and DDP and, beside them, SFT full fine-tuning under FSDP.
Each run: the tiny base (models/tiny), 8 samples, 2 steps of a global micro-batch of 4 (2 a
rank), fp32; `snug train` starts torchrun itself. The plan replays the longest sample of the
data, the run trains what its 2 steps draw, so the plan may stand above the run by that much.

Run: python benchmarks/plan_ranks.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # name, stage, method, strategy, pref.reference, data
    ("dpo full FSDP, copy", "dpo", "full", "fsdp", "copy", "preference/train.jsonl"),
    ("dpo LoRA DDP", "dpo", "lora", "ddp", "auto", "preference/train.jsonl"),
    ("kto LoRA FSDP", "kto", "lora", "fsdp", "auto", "preference/kto_train.jsonl"),
    ("sft full FSDP", "sft", "full", "fsdp", None, "instruct/train.jsonl"),
]


def config(out: Path, stage: str, method: str, strategy: str, reference, data: str) -> dict:
    raw = {
        "model": {"name_or_path": str(ROOT / "models/tiny")},
        "method": {"name": method, **({"r": 4, "dropout": 0.0} if method == "lora" else {})},
        "data": {"train": str(ROOT / "data" / data), "max_samples": 8},
        "train": {
            "stage": stage, "micro_batch": 2, "grad_accum": 1, "max_steps": 2,
            "lr": 1e-4, "eval_generate": 0,
        },
        "dist": {"strategy": strategy, "nproc": 2},
        "output": {"dir": str(out), "plot_loss": False},
    }  # fmt: skip
    if reference is not None:
        raw["pref"] = {"reference": reference}
    return raw


def snug(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "snug.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"snug {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done


def main() -> None:
    print("| run | measured per-rank peak bytes | planned | planned / measured |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, *case in CASES:
            out = Path(tmp) / name.replace(" ", "-").replace(",", "")
            cfg = out.with_suffix(".yaml")
            cfg.write_text(yaml.safe_dump(config(out, *case)))
            snug("train", str(cfg))
            measured = json.loads((out / "summary.json").read_text())["peak_memory"]
            ranks = measured["per_rank_bytes"]
            plan = snug("plan", str(cfg), "--device", "cpu", "--num-gpus", "2", "--json")
            found = json.loads(plan.stdout)
            planned = (found["candidates"][0] if "candidates" in found else found)["peak_bytes"]
            shown = ", ".join(f"{r:,}" for r in ranks)
            print(f"| {name} | {shown} | {planned:,} | {planned / max(ranks):.3f} |")


if __name__ == "__main__":
    main()
