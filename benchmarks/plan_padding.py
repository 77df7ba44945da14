"""The planner's replay against real steps of padded and unpadded batches.

A real batch whose rows differ in length is padded and carries an attention mask, and masked
attention keeps more for backward than the causal path without one. `snug plan` replays the
mask unless data.packing (simulate's `padded`). This prints, for LoRA on a 3-layer llama
(tests/test_plan.py's small model), micro-batch 2 x accumulation 2, 64 tokens, fp32 on CPU: two
real steps' tracked peak with whole rows and with one row a token shorter (padded), each beside
the replay of the same batches (whole rows: padded=False; padded: the default, with the one
target fewer the shorter row has).

Run: python benchmarks/plan_padding.py
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from snug.config import load_config
from snug.data.collate import collate
from snug.plan.simulate import simulate
from snug.train.memory import TensorMemoryTracker, model_tensors
from snug.train.optim import build_optimizer
from snug.train.prepare import prepare_for_training, step_options
from snug.train.step import train_step

TOKENS = 64


def real_peak(cfg, config, shorten_last_row: bool) -> int:
    """Two real optimizer steps under the tracker `snug train` uses on CPU."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    base.config.use_cache = False
    model = prepare_for_training(base, cfg, "fp32")
    opts = step_options(cfg, torch.device("cpu"), "fp32")
    optimizer = build_optimizer(model, cfg.memory, cfg.train)
    tracker = TensorMemoryTracker()
    with tracker:
        tracker.track(model_tensors(model))
        for _ in range(2):
            micro = []
            for _ in range(cfg.train.grad_accum):
                rows = torch.randint(0, config.vocab_size, (cfg.train.micro_batch, TOKENS)).tolist()
                if shorten_last_row:
                    rows[-1] = rows[-1][:-1]
                micro.append(collate([{"input_ids": r, "labels": r} for r in rows], pad_id=0))
            train_step(model, optimizer, micro, opts)
            del micro
    return tracker.peak


def main() -> None:
    torch.set_num_threads(2)
    cfg = load_config(
        None,
        ["method.name=lora", "memory.grad_checkpointing=false", "train.micro_batch=2",
         "train.grad_accum=2"],
    )  # fmt: skip
    config = AutoConfig.for_model(
        "llama", vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    b = cfg.train.micro_batch
    whole = simulate(cfg, config, TOKENS, "cpu", "fp32", extend=False, padded=False).peak_bytes
    # the shorter row predicts one token fewer
    padded = simulate(cfg, config, TOKENS, "cpu", "fp32", b * (TOKENS - 1) - 1, False).peak_bytes
    unmasked = simulate(
        cfg, config, TOKENS, "cpu", "fp32", b * (TOKENS - 1) - 1, False, padded=False
    ).peak_bytes
    rows = [
        ("whole rows", real_peak(cfg, config, False), whole),
        ("one row a token shorter (padded, masked)", real_peak(cfg, config, True), padded),
        ("the same, replayed without the mask (before the fix)", None, unmasked),
    ]
    print("| batches | real peak bytes | replay peak bytes | replay - real |\n|---|---|---|---|")
    real = None
    for name, measured, replay in rows:
        real = measured if measured is not None else real
        shown = f"{measured:,}" if measured is not None else "(above)"
        print(f"| {name} | {shown} | {replay:,} | {replay - real:+,} |")


if __name__ == "__main__":
    main()
