"""The planner: the fake-tensor replay of the step against the same step on real tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from snug.config import load_config
from snug.data.collate import collate
from snug.methods import apply_method
from snug.plan.simulate import simulate
from snug.train.activations import enable_checkpointing
from snug.train.loop import step_options
from snug.train.memory import TensorMemoryTracker, model_tensors
from snug.train.optim import build_optimizer
from snug.train.step import train_step

FAMILIES = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": None},
}


def small_config(family: str = "llama", layers: int = 3):
    return AutoConfig.for_model(
        family,
        vocab_size=3000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **FAMILIES[family],
    )


def measured_peak(cfg, config, seq_len: int) -> int:
    """Two real optimizer steps of snug's step on CPU, under the same tracker `snug train` uses."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    model = apply_method(model, cfg.method)
    if cfg.memory.grad_checkpointing:
        enable_checkpointing(model, cfg.memory.offload_activations)
    model.train()
    opts = step_options(cfg, torch.device("cpu"), "fp32")
    optimizer = build_optimizer(model, cfg.memory, cfg.train)
    b = cfg.train.micro_batch
    tracker = TensorMemoryTracker()
    with tracker:
        tracker.track(model_tensors(model))
        for _ in range(2):
            micro = []
            for _ in range(cfg.train.grad_accum):
                rows = torch.randint(0, config.vocab_size, (b, seq_len)).tolist()
                micro.append(collate([{"input_ids": r, "labels": r} for r in rows], pad_id=0))
            train_step(model, optimizer, micro, opts)
            del micro
    return tracker.peak


def plan_config(
    method: str, gc: bool, chunked: bool = True, optimizer: str = "adamw", accum: int = 2
):
    return load_config(
        None,
        [
            f"method.name={method}",
            f"memory.grad_checkpointing={str(gc).lower()}",
            f"memory.chunked_loss={str(chunked).lower()}",
            f"memory.optimizer={optimizer}",
            "train.micro_batch=2",
            f"train.grad_accum={accum}",
        ],
    )


@pytest.mark.parametrize(
    "family,method,gc,chunked,accum",
    [
        ("llama", "lora", True, True, 4),  # two simulated micro-batches stand for four
        ("llama", "lora", False, False, 2),
        ("llama", "full", True, True, 2),
        ("llama", "full", False, True, 2),
        ("llama", "dora", True, True, 2),
        ("llama", "ia3", False, True, 2),
        ("llama", "prompt", True, True, 2),
        ("llama", "adapter", True, True, 2),
        ("qwen2", "lora", True, True, 2),
        ("mistral", "lora", False, True, 2),
    ],
)
def test_fake_replay_predicts_the_real_peak_exactly(family, method, gc, chunked, accum):
    cfg = plan_config(method, gc, chunked, accum=accum)
    config = small_config(family)
    predicted = simulate(cfg, config, 128, device_type="cpu", extend=False)
    assert predicted.peak_bytes == measured_peak(cfg, config, 128)
    assert predicted.flops_per_step > 0


@pytest.mark.parametrize(
    "method,gc", [("lora", True), ("full", False), ("adapter", True), ("freeze", True)]
)
def test_extending_two_short_depths_equals_the_whole_model(method, gc):
    cfg = plan_config(method, gc)
    deep = small_config(layers=7)
    whole = simulate(cfg, deep, 64, device_type="cpu", extend=False)
    extended = simulate(cfg, deep, 64, device_type="cpu", extend=True)
    # freeze: the top trainable_layers (2) train, and each layer added below them is frozen
    assert extended.layers_simulated == ((3, 4) if method == "freeze" else (2, 3))
    assert extended.peak_bytes == whole.peak_bytes
    assert extended.total_params == whole.total_params
    assert extended.trainable_params == whole.trainable_params
    assert extended.flops_per_step == whole.flops_per_step


def test_cuda_plan_rounds_like_the_caching_allocator():
    cfg = plan_config("lora", True)
    cpu = simulate(cfg, small_config(), 64, device_type="cpu", precision="fp32", extend=False)
    cuda = simulate(cfg, small_config(), 64, device_type="cuda", precision="fp32", extend=False)
    assert cpu.peak_bytes < cuda.peak_bytes < cpu.peak_bytes * 1.2
    assert cuda.peak_bytes % 512 == 0


@pytest.mark.parametrize("method", ["lora", "full"])  # small weights (fp32 states), large (8-bit)
@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit", "lion8bit"])
def test_8bit_stand_in_allocates_what_bitsandbytes_allocates(name, method):
    """On CPU, bitsandbytes' real optimizer state against the planner's stand-in."""
    from snug.plan.simulate import _optimizer

    def state_bytes(optimizer) -> int:
        return sum(
            v.untyped_storage().nbytes()
            for state in optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        )

    cfg = plan_config(method, False, optimizer=name)
    sizes = []
    for stand_in in (False, True):
        model = apply_method(AutoModelForCausalLM.from_config(small_config()), cfg.method)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        if stand_in:
            optimizer = _optimizer(model, cfg, "cpu")
        else:
            optimizer = build_optimizer(model, cfg.memory, cfg.train)
        optimizer.step()
        sizes.append(state_bytes(optimizer))
    assert sizes[0] == sizes[1] > 0
