"""memory.offload_weights (snug/train/streaming.py): the frozen weights of each decoder layer
live in host memory and a copy reaches the "device" for the layer's forward and its
recomputation. On a CPU the copy is a clone of the host tensor through the same code path, so
the arithmetic must be the resident model's exactly (same ops on equal values: bit for bit),
and every layer's matmuls must read the copy, never the host tensor (on a GPU the host tensor
would be on the wrong device)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from snug.config import config_from_dict, load_config
from snug.errors import ConfigError
from snug.train.prepare import prepare_for_training, step_options
from snug.train.step import train_step
from snug.train.streaming import WeightStream, stream_weights

from conftest import ROOT, method_keys

QUICKSTART = ROOT / "examples/quickstart.yaml"


def _model(overrides: list[str], stream: bool, quant: str = "none"):
    cfg = load_config(QUICKSTART, [*overrides, f"memory.offload_weights={str(stream).lower()}"])
    torch.manual_seed(0)
    if quant == "4bit":
        from snug.models.load import load_model

        cfg = config_from_dict(
            {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "quant": quant}}
        )
        model = load_model(cfg, torch.device("cpu"), "fp32")
    else:
        model = AutoModelForCausalLM.from_pretrained(ROOT / "models/tiny")
        model.config.use_cache = False
    torch.manual_seed(1)  # the adapters' initial weights, the same in both
    model = prepare_for_training(model, cfg, "fp32")
    return cfg, model, stream_weights(model, torch.device("cpu")) if stream else None


def _steps(cfg, model, n: int = 3) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(2)
    ids = torch.randint(0, 500, (2, 24))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    opts = step_options(cfg, torch.device("cpu"), "fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = [
        train_step(model, opt, [dict(batch), dict(batch)], opts).loss.item() for _ in range(n)
    ]
    return losses, [p.detach().clone() for p in params]


METHODS = [
    ("lora", "true"),
    ("lora", "false"),  # without checkpointing: the weights saved for backward come back
    ("dora", "true"),
    ("ia3", "true"),
    ("adapter", "true"),
    ("prefix", "false"),
    ("llama_adapter", "true"),
    ("freeze", "true"),  # the top layers train (resident), the others stream
]


@pytest.mark.parametrize("method,checkpointing", METHODS)
def test_a_streamed_step_is_the_resident_step_bit_for_bit(method, checkpointing):
    keys = [f"{k}={v}" for k, v in method_keys(method).items() if k != "name"]
    overrides = [
        f"method.name={method}",
        *[f"method.{k}" for k in keys],
        f"memory.grad_checkpointing={checkpointing}",
    ]
    if method == "freeze":
        overrides.append("method.trainable_layers=1")
    resident = _steps(*_model(overrides, stream=False)[:2])
    cfg, model, stream = _model(overrides, stream=True)
    streamed = _steps(cfg, model)
    assert streamed[0] == resident[0]
    assert all(torch.equal(a, b) for a, b in zip(streamed[1], resident[1], strict=True))
    assert stream.loads > 0 and stream.host_bytes > 0


def test_a_streamed_qlora_step_is_the_resident_step():
    overrides = ["memory.grad_checkpointing=true"]
    resident = _steps(*_model(overrides, stream=False, quant="4bit")[:2], n=2)
    cfg, model, stream = _model(overrides, stream=True, quant="4bit")
    streamed = _steps(cfg, model, n=2)
    assert streamed[0] == resident[0]
    assert all(torch.equal(a, b) for a, b in zip(streamed[1], resident[1], strict=True))
    # the packed 4-bit weights and their absmax are what streams
    dtypes = {s.host.dtype for layer in stream.layers for s in layer.slots}
    assert torch.uint8 in dtypes


def _watch(stream: WeightStream, layers: list[nn.Module]) -> dict:
    """Count, for every linear of a streamed layer, calls that read the host tensor itself
    (what a GPU could not compute with), and the most layers resident at once."""
    seen = {"host_reads": 0, "linear_calls": 0, "most_resident": 0}
    hosts = {id(s.owner): s.host for layer in stream.layers for s in layer.slots}

    def check(module, args):
        seen["linear_calls"] += 1
        weight = module.weight
        host = hosts.get(id(weight))
        if host is not None and weight.data_ptr() == host.data_ptr():
            seen["host_reads"] += 1
        resident = sum(layer.resident for layer in stream.layers)
        seen["most_resident"] = max(seen["most_resident"], resident)

    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                module.register_forward_pre_hook(check)
    return seen


@pytest.mark.parametrize("checkpointing", ["true", "false"])
def test_every_layer_computes_with_its_streamed_copy_and_two_at_most_are_resident(checkpointing):
    cfg, model, stream = _model([f"memory.grad_checkpointing={checkpointing}"], stream=True)
    seen = _watch(stream, stream.modules)
    bottom = []  # whether the bottom layer's input needs a gradient (then it says when to go)
    stream.modules[0].register_forward_pre_hook(lambda m, a: bottom.append(a[0].requires_grad))
    _steps(cfg, model, n=2)
    layers = len(stream.layers)
    assert seen["linear_calls"] > 0 and seen["host_reads"] == 0
    assert seen["most_resident"] <= 2
    # each micro-batch brings every layer in for its forward and, but for the top one (kept
    # for backward's start), again for backward; each leaves once the gradient of its input
    # is made, so the bottom one stays for the next forward where its input needs none
    micro = 2 * 2
    if bottom[0]:
        assert stream.loads == micro * (2 * layers - 1)
    else:
        assert stream.loads == (2 * layers - 1) + (micro - 1) * (2 * layers - 2)
    assert [layer.resident for layer in stream.layers] == [not bottom[0]] + [False] * (layers - 1)


def test_evaluation_without_gradients_streams_too():
    cfg, model, stream = _model([], stream=True)
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        streamed = model(input_ids=ids).logits
    resident = _model([], stream=False)[1]
    with torch.no_grad():
        assert torch.equal(streamed, resident(input_ids=ids).logits)
    assert sum(layer.resident for layer in stream.layers) <= 1


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["method.name=full"], "trains every weight"),
        (["model.quant=8bit", "method.name=lora"], "model.quant=8bit"),
        (["model.quant=4bit", "memory.grad_checkpointing=false"], "grad_checkpointing=true"),
        (["dist.strategy=fsdp", "dist.nproc=2"], "dist.cpu_offload"),
        (["train.stage=dpo", "method.name=full"], "trains every weight"),
        (["train.stage=dpo", "pref.reference=copy"], "pref.reference=precompute"),
    ],
)
def test_what_cannot_stream_is_refused_in_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, [*overrides, "memory.offload_weights=true"])
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_streamed_run_killed_mid_step_resumes_to_the_resident_runs_weights(tmp_path):
    """A streamed run (kill -9 in its fifth step, then resumed) ends with the weights and the
    losses of the same run without streaming, step for step."""
    from test_reliability import (
        MICRO_PER_STEP,
        assert_same_run,
        raw_config,
        snug_train,
        snug_train_here,
        write_config,
    )

    reference = tmp_path / "resident" / "run"
    done = snug_train_here(write_config(tmp_path / "resident.yaml", raw_config(reference)))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "streamed" / "run"
    cfg = write_config(
        tmp_path / "streamed.yaml", raw_config(out, memory={"offload_weights": True})
    )
    killed = snug_train(cfg, at=4 * MICRO_PER_STEP + 2)
    assert killed.returncode == -9, killed.stderr[-500:]
    resumed = snug_train_here(cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "offload_weights:" in resumed.stdout
    assert_same_run(out, reference)
