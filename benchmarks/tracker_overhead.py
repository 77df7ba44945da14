"""Cost of snug's tensor-memory tracker: step time with and without it, same process.

Run: python benchmarks/tracker_overhead.py  (bundled tiny base, LoRA, 16 x ~40-token batches)
"""

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from snug.config import MethodConfig
from snug.methods import apply_method
from snug.train.memory import TensorMemoryTracker, model_tensors
from snug.train.step import StepOptions, train_step

ROOT = Path(__file__).resolve().parent.parent


def timed_steps(model, opt, batch, opts, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        train_step(model, opt, [batch], opts).loss.item()
    return (time.perf_counter() - start) / n


def main() -> None:
    torch.manual_seed(0)
    model = apply_method(
        AutoModelForCausalLM.from_pretrained(ROOT / "models/tiny"), MethodConfig(r=16)
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(5, 700, (16, 40))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    for chunked in (False, True):
        opts = StepOptions("cpu", None, 1.0, chunked_loss=chunked, offload_activations=False)
        timed_steps(model, opt, batch, opts, 5)  # warm-up
        plain = timed_steps(model, opt, batch, opts, 30)
        tracker = TensorMemoryTracker()
        with tracker:
            tracker.track(model_tensors(model))
            tracked = timed_steps(model, opt, batch, opts, 30)
        print(
            f"chunked_loss={chunked}: step {plain * 1e3:.1f} ms untracked, {tracked * 1e3:.1f} ms "
            f"tracked -> {tracked / plain:.2f}x (peak {tracker.peak / 2**20:.1f} MiB)"
        )


if __name__ == "__main__":
    main()
