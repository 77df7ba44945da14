"""Speed of snug's chunked loss by chunk size, on this CPU: why a chunk of logits is at most
256 MiB in multiples of 128 positions (snug/train/loss.py: chunk_positions), not smaller.

A one-layer Llama of width 256 with Llama 3's 128,256-token vocabulary (the head is nearly all of
its work, as in benchmarks/memory.py), frozen but for its final norm, so that the gradient runs
through every chunk's head as in LoRA; 2 x 2,048 target positions. `snug.train.loss.chunked_loss`
forward and backward, timed at chunks of 1,024 positions (the baseline: the size before
2026-11-28) and smaller, each the median of 5 runs after a warm-up, sizes interleaved.

Run: python benchmarks/chunk_speed.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = (1024, 512, 384, 256)


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from snug.train import loss

    config = AutoConfig.for_model(
        "llama",
        vocab_size=128_256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    ids = torch.randint(0, config.vocab_size, (2, 2049))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    loss.CHUNK_BYTES = 2**62  # the size below, whatever the vocabulary

    def once(size: int) -> float:
        loss.CHUNK_POSITIONS = size
        started = time.perf_counter()
        loss.chunked_loss(model, batch).backward()
        model.model.norm.weight.grad = None
        return time.perf_counter() - started

    for size in SIZES:
        once(size)  # warm-up
    times = {size: [] for size in SIZES}
    for _ in range(5):
        for size in SIZES:
            times[size].append(once(size))
    base = statistics.median(times[SIZES[0]])
    print(f"torch threads {torch.get_num_threads()}; chunked loss, forward and backward, seconds")
    for size in SIZES:
        median = statistics.median(times[size])
        spread = f"{min(times[size]):.2f}-{max(times[size]):.2f}"
        print(f"{size:5d} positions: {median:.2f} s ({spread}), {median / base:.2f}x of 1,024")


if __name__ == "__main__":
    main()
