"""What a replay costs at the depths `snug plan` chooses between for a shallow model.

A deep model is replayed at 2 and 3 decoder layers and extended; a model no deeper than those
two together (5 layers) is replayed whole (plan/simulate.py). This prints, for models/tiny
(4 layers) with LoRA and checkpointing, micro-batch 2 x 128 tokens, fp32 on CPU, one thread:
the seconds of one whole replay and of the two short ones (each the mean of 3 after a warm-up),
and whether the whole replay's peak equals the extended one.

Run: python benchmarks/plan_depth.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoConfig

from snug.config import load_config
from snug.plan.simulate import simulate, with_depth

ROOT = Path(__file__).resolve().parent.parent


def seconds(run, n: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(n):
        run()
    return (time.perf_counter() - start) / n


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config(
        None,
        ["method.name=lora", "memory.grad_checkpointing=true", "train.micro_batch=2"],
    )
    config = AutoConfig.from_pretrained(ROOT / "models/tiny")

    def replay(layers: int):
        return simulate(cfg, with_depth(config, layers), 128, "cpu", "fp32", extend=False)

    replay(config.num_hidden_layers)  # warm the fake-tensor cache
    whole = seconds(lambda: replay(config.num_hidden_layers))
    short = seconds(lambda: (replay(2), replay(3)))
    a, b, w = replay(2).peak_bytes, replay(3).peak_bytes, replay(config.num_hidden_layers)
    extended = b + (b - a) * (config.num_hidden_layers - 3)
    print(f"models/tiny ({config.num_hidden_layers} layers), lora, gc, 2 x 128 tokens, fp32 CPU")
    print(f"whole replay       {whole:6.2f} s  peak {w.peak_bytes:,}")
    print(f"2 and 3 layers     {short:6.2f} s  extended peak {extended:,}")
    print(f"short / whole      {short / whole:6.2f}")


if __name__ == "__main__":
    main()
