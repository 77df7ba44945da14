"""Every fine-tuning method on the bundled instruction task: same data, same steps, same seed.

For each: trainable parameters, tracked peak tensor memory, tokens/s, final train loss, and the
held-out exact match by greedy generation (before is the base model: 0.0% for all). Learning
rates are each method's customary scale, not tuned per method; say so when quoting the table.

Run: python benchmarks/methods.py [--steps 1000] [--out benchmarks/results/methods-DATE.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
from pathlib import Path

from rich.console import Console

from snug.config import load_config
from snug.train.training import run_training

ROOT = Path(__file__).resolve().parent.parent

# (row name, overrides on top of examples/quickstart.yaml)
ROWS = [
    ("full", ["method.name=full", "train.lr=5e-4"]),
    ("freeze (top 2 layers)", ["method.name=freeze", "method.trainable_layers=2", "train.lr=1e-3"]),
    ("lora r16", ["method.name=lora", "train.lr=2e-3"]),
    ("lora+ r16 (ratio 16)", ["method.name=lora", "method.lora_plus_ratio=16", "train.lr=5e-4"]),
    ("rslora r16", ["method.name=lora", "method.rslora=true", "train.lr=5e-4"]),
    ("dora r16", ["method.name=dora", "train.lr=2e-3"]),
    ("qlora 4bit r16", ["method.name=lora", "model.quant=4bit", "train.lr=2e-3"]),
    ("qlora 8bit r16", ["method.name=lora", "model.quant=8bit", "train.lr=2e-3"]),
    ("ia3", ["method.name=ia3", "train.lr=1e-2"]),
    ("adapter (bottleneck 64)", ["method.name=adapter", "method.bottleneck=64", "train.lr=2e-3"]),
    ("prefix (20 tokens)", ["method.name=prefix", "train.lr=1e-2"]),
    ("prompt (20 tokens)", ["method.name=prompt", "train.lr=3e-2"]),
    ("ptuning (20 tokens)", ["method.name=ptuning", "train.lr=1e-2"]),
    (
        "llama_adapter (10 tokens, top 2)",
        [
            "method.name=llama_adapter",
            "method.num_virtual_tokens=10",
            "method.trainable_layers=2",
            "train.lr=1e-2",
        ],
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--out", type=Path, default=ROOT / f"benchmarks/results/methods-{datetime.date.today()}.md"
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    quiet = Console(quiet=True)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in ROWS:
            cfg = load_config(
                ROOT / "examples/quickstart.yaml",
                [
                    *overrides,
                    f"train.max_steps={args.steps}",
                    "train.log_every=1000",
                    f"output.dir={tmp}/{len(lines)}",
                ],
            )
            s = run_training(cfg, quiet)
            row = (
                f"| {name} | {s['trainable_params']:,} | {s['peak_memory']['measured_bytes'] / 2**20:.1f} | "
                f"{s['tokens_per_second']:,.0f} | {s['train_loss_last']:.3f} | {s['eval']['loss_after']:.3f} | "
                f"{100 * s['eval']['after']:.1f}% | {cfg.train.lr:g} |"
            )
            print(row, flush=True)
            lines.append(row)
    header = [
        f"# Fine-tuning methods side by side — {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/methods.py --steps {args.steps}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, fp32, no GPU.",
        "",
        f"Bundled tiny base (`models/tiny`, Llama architecture, 3.3M parameters) and instruction task "
        f"(`data/instruct`: 2,000 train, 200 held-out); {args.steps} optimizer steps of 16 samples, seed 42, "
        "cosine schedule, no gradient checkpointing (`examples/quickstart.yaml` with the method's overrides). "
        "Learning rates are each method's customary scale, not tuned per method. Exact match is greedy "
        "generation on the 200 held-out prompts; the base model scores 0.0%. Peak memory is snug's "
        "tracked peak of live tensor storage (weights, adapters, gradients, optimizer state, activations).",
        "",
        "| method | trainable params | peak MiB | tokens/s | final train loss | held-out loss | held-out exact match | lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
