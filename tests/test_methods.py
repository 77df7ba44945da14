import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from snug.config import Config, MethodConfig
from snug.core.registry import get_method
from snug.data.collate import collate
from snug.methods import apply_method, count_params
from snug.train.finish import save_final
from snug.train.step import train_step

from conftest import cpu_opts, method_keys

OPTS = cpu_opts(
    max_grad_norm=1.0,
    chunked_loss=True,
)


def toy_batches(tokenizer, n=4):
    """Learnable toy: the answer is always the first word of the prompt."""
    from snug.data.tokenize import encode_chat

    words = "red blue green cat dog sun moon tree".split()
    rows = []
    for i, a in enumerate(words):
        b = words[(i + 3) % len(words)]
        msgs = [
            {"role": "user", "content": f"first word of: {a} {b}"},
            {"role": "assistant", "content": a},
        ]
        ids, labels, _, _ = encode_chat(tokenizer, tokenizer.chat_template, msgs, 64, False, "toy")
        rows.append({"input_ids": ids, "labels": labels})
    return [collate(rows[i : i + 2], tokenizer.pad_token_id) for i in range(0, len(rows), 2)][:n]


def train_toy(model, tokenizer, steps=30, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = toy_batches(tokenizer)
    losses = [train_step(model, opt, batches, OPTS).loss.item() for _ in range(steps)]
    return losses


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_adapter_learns_changes_adapters_and_keeps_base_bit_identical(name, tiny_llama, tokenizer):
    base_before = {
        k: v.clone()
        for k, v in AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict().items()
    }
    model = apply_method(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        MethodConfig(name=name, r=4, alpha=8, rslora=name == "dora"),
    )
    adapters_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    model.train()
    losses = train_toy(model, tokenizer)
    assert losses[-1] < 0.5 * losses[0]
    changed = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not torch.equal(p, adapters_before[n])
    ]
    assert len(changed) == len(adapters_before) > 0
    base_after = model.get_base_model().state_dict()
    for key, value in base_before.items():
        peft_key = next(k for k in base_after if k.replace(".base_layer", "") == key)
        assert torch.equal(base_after[peft_key], value), key


def test_lora_trainable_params_match_formula(tiny_llama):
    model = apply_method(
        AutoModelForCausalLM.from_pretrained(tiny_llama), MethodConfig(name="lora", r=4)
    )
    c = model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    shapes = [
        (c.hidden_size, c.hidden_size),
        (c.hidden_size, kv),
        (c.hidden_size, kv),
        (c.hidden_size, c.hidden_size),
        (c.hidden_size, c.intermediate_size),
        (c.hidden_size, c.intermediate_size),
        (c.intermediate_size, c.hidden_size),
    ]
    expected = c.num_hidden_layers * sum(4 * (i + o) for i, o in shapes)  # r (in + out) each
    assert count_params(model)[0] == expected


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_saved_adapter_loads_with_peft_and_gives_same_logits(name, tiny_llama, tokenizer, tmp_path):
    model = apply_method(
        AutoModelForCausalLM.from_pretrained(tiny_llama), MethodConfig(name=name, r=4)
    )
    model.train()
    train_toy(model, tokenizer, steps=5)
    cfg = Config()
    cfg.method.name = name
    save_final(model, tokenizer, cfg, tmp_path)
    assert (tmp_path / "adapter/adapter_config.json").exists()
    assert (tmp_path / "adapter/adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter"
    )
    ids = toy_batches(tokenizer)[0]["input_ids"]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        # the same float32 weights (safetensors keeps them bit for bit) through the same
        # kernels on the same input: bit-identical logits (measured: equal for every method)
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="method.name=lorra is not available yet; choose one of"):
        get_method("lorra")


ALL_METHODS = [
    "full",
    "freeze",
    "lora",
    "dora",
    "ia3",
    "prefix",
    "prompt",
    "ptuning",
    "llama_adapter",
    "adapter",
]


# Steps each method takes to learn the toy: its loss must drop by 0.25. Measured drops (steps:
# drop): most methods 0.9 to 5.5 at 10; prompt 0.30 at 10, 0.42 at 15; llama_adapter, whose
# gate starts at zero, 0.28 at 30 and 0.38 at 40.
LEARN_STEPS = {"prompt": 15, "llama_adapter": 40}


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_learns_keeps_frozen_weights_and_round_trips(name, tokenizer, tmp_path):
    from conftest import TINY_BASE

    cfg = Config()
    keys = method_keys(name, r=4, num_virtual_tokens=8, trainable_layers=1)
    cfg.method = MethodConfig(name=name, **keys)
    model = apply_method(AutoModelForCausalLM.from_pretrained(TINY_BASE), cfg.method)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and (name == "full" or frozen)
    model.train()
    losses = train_toy(model, tokenizer, steps=LEARN_STEPS.get(name, 10), lr=1e-2)
    assert losses[-1] < losses[0] - 0.25, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(
        not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable
    )

    save_final(model, tokenizer, cfg, tmp_path)
    method = get_method(name)
    if method.output == "adapter":
        loaded = method.load(AutoModelForCausalLM.from_pretrained(TINY_BASE), tmp_path / "adapter")
    else:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = toy_batches(tokenizer)[0]["input_ids"]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        # the same float32 weights (safetensors keeps them bit for bit) through the same
        # kernels on the same input: bit-identical logits (measured: equal for every method)
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_trainable_params_match_each_methods_formula():
    from conftest import TINY_BASE

    c = AutoModelForCausalLM.from_pretrained(TINY_BASE).config
    L, h, kv, inter, n = c.num_hidden_layers, c.hidden_size, 128, c.intermediate_size, 8
    assert kv == c.num_key_value_heads * h // c.num_attention_heads
    expected = {
        "ia3": L * (kv + kv + inter),  # k, v outputs and the down_proj input are rescaled
        "prefix": n * L * 2 * kv,  # a key and a value prefix per layer
        "prompt": n * h,  # virtual input embeddings
        "llama_adapter": 1 * (n * h + 1),  # top layer: adaption prompt + gate
        "adapter": L * 2 * (h * 64 + 64 + 64 * h + h),  # down + up (with biases), twice per layer
        "freeze": sum(
            p.numel()
            for p in AutoModelForCausalLM.from_pretrained(TINY_BASE).model.layers[-1].parameters()
        ),
    }
    for name, count in expected.items():
        model = AutoModelForCausalLM.from_pretrained(TINY_BASE)
        method = MethodConfig(
            name=name, **method_keys(name, num_virtual_tokens=n, trainable_layers=1)
        )
        assert count_params(apply_method(model, method))[0] == count, name


def test_freeze_by_patterns_with_extra_modules():
    from conftest import TINY_BASE

    model = apply_method(
        AutoModelForCausalLM.from_pretrained(TINY_BASE),
        MethodConfig(
            name="freeze", trainable_modules=["model.layers.0.mlp"], extra_modules=["norm"]
        ),
    )
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "model.layers.3.input_layernorm.weight",
    } <= names
    assert (
        "model.layers.1.mlp.up_proj.weight" not in names
        and "model.embed_tokens.weight" not in names
    )


def test_lora_plus_gives_b_matrices_a_larger_learning_rate(tiny_llama):
    from snug.config import MemoryConfig, TrainConfig
    from snug.train.optim import build_optimizer

    method = MethodConfig(name="lora", r=4, lora_plus_ratio=16)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_llama), method)
    opt = build_optimizer(model, MemoryConfig(), TrainConfig(lr=1e-4), method)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert lrs[id(p)] == pytest.approx(1.6e-3)
        elif "lora_A" in name:
            assert lrs[id(p)] == pytest.approx(1e-4)


def test_4bit_gradients_are_the_same_after_an_eval_forward():
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval-mode forward, and its packed
    kernel has no backward: training after an evaluation must not lose gradients."""
    from snug.config import config_from_dict
    from snug.models.load import load_model

    from conftest import TINY_BASE

    cfg = config_from_dict({"model": {"name_or_path": str(TINY_BASE), "quant": "4bit"}})
    model = apply_method(
        load_model(cfg, torch.device("cpu"), "fp32"), MethodConfig(name="lora", r=4)
    )
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    ids = torch.randint(5, 700, (2, 12))

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grads()
    # The same 4-bit weights, dequantised alike: equal (measured on an AVX2-only CPU, where
    # bitsandbytes does not repack; it does with AVX512-BF16). 1e-4 of each tensor's largest
    # gradient leaves room for float32 rounding only (as test_step.GRAD_RTOL); lost gradients,
    # the bug, are all of it.
    for name in before:
        scale = before[name].abs().max().item()
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-4 * scale, msg=name)


def test_progressive_unfreezing_adds_layers_from_the_top(tokenizer):
    from conftest import TINY_BASE

    cfg = MethodConfig(name="freeze", trainable_layers=3, unfreeze_every=2)
    method = get_method("freeze")
    model = apply_method(AutoModelForCausalLM.from_pretrained(TINY_BASE), cfg)
    model.train()
    layers = model.model.layers
    start = [[p.detach().clone() for p in layer.parameters()] for layer in layers]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = toy_batches(tokenizer)

    def changed():
        return [
            any(not torch.equal(p, q) for p, q in zip(layer.parameters(), s0, strict=True))
            for layer, s0 in zip(layers, start, strict=True)
        ]

    seen = []
    for step in range(6):
        method.before_step(model, cfg, step)
        train_step(model, opt, batches, OPTS)
        seen.append(changed())
    assert seen[1] == [False, False, False, True]  # steps 0-1: top layer only
    assert seen[3] == [False, False, True, True]  # steps 2-3: one more
    assert seen[5] == [False, True, True, True]  # steps 4-5: all three; layer 0 never


ADAPTER_METHODS = [m for m in ALL_METHODS if m not in ("full", "freeze")]


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_every_adapter_trains_in_bf16_true(name, tokenizer):
    """train.precision=bf16-true keeps the adapter in bf16, as torchtune's LoRA recipes do:
    weights (so gradients, which autograd keeps in their weight's dtype) and AdamW's moments
    in bf16, on a bf16 base, without autocast. (bf16
    matmuls are about 20x slower than fp32 on a CPU without bf16 instructions, so this takes
    three steps on one micro-batch; learning itself is shown in fp32 above.)"""
    from conftest import TINY_BASE

    base = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.bfloat16)
    cfg = MethodConfig(name=name, **method_keys(name, r=4, num_virtual_tokens=8))
    model = apply_method(base, cfg, trainable_dtype=torch.bfloat16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.bfloat16}
    model.train()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    batch = toy_batches(tokenizer)[:1]
    losses = [train_step(model, opt, batch, OPTS).loss.item() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses), losses
    moments = [s["exp_avg"] for s in opt.state.values()]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())


def _own_key_reads(path, keys: set[str]) -> list[str]:
    """Where a module reads a method's own key off a method section: `cfg.method.r`,
    `method.own.r`, `getattr(cfg.method.own, "r")`, `hasattr(method, "r")` (an expression
    naming `method` holds a method section or its own settings)."""
    import ast

    def of_method(node) -> bool:
        text = ast.unparse(node)
        return text.split(".")[-1] in ("method", "own") and "method" in text

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in keys and of_method(node.value):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "") in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in keys
            and of_method(node.args[0])
        ):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_snug_methods_reads_a_methods_own_keys():
    """What the core asks of a method is a hook on Method (which layers train, the optimizer's
    parameter groups, the search's label), never a look-up of its keys (issue 34)."""
    import dataclasses
    from pathlib import Path

    import snug
    from snug.core.registry import methods

    keys = {
        f.name
        for m in methods().values()
        if m.settings is not None
        for f in dataclasses.fields(m.settings)
    }
    assert {"r", "trainable_layers", "trainable_modules", "lora_plus_ratio"} <= keys
    package = Path(snug.__file__).parent
    found = [
        hit
        for path in sorted(package.rglob("*.py"))
        if "methods" not in path.relative_to(package).parts[:1]
        for hit in _own_key_reads(path, keys)
    ]
    assert not found, found


@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_targets_are_checked_against_the_models_module_names(name):
    """method.targets names modules the model has (the model built on the meta device, no
    weights), or each name that matches none is refused with the near name."""
    from snug.config import config_from_dict
    from snug.errors import ConfigError
    from snug.methods import check_against_model

    from conftest import ROOT

    def check(targets):
        raw = {"model": {"name_or_path": str(ROOT / "models/tiny")}}
        raw["method"] = {"name": name, "targets": targets}
        check_against_model(config_from_dict(raw))

    for fine in ("all-linear", ["q_proj", "v_proj"], ["self_attn.q_proj"], ".*\\.v_proj"):
        check(fine)
    with pytest.raises(
        ConfigError,
        match=r"^method.targets names no module of \S*tiny called "
        r"'vproj' \(did you mean 'v_proj'\?\), 'qq_proj' \(did you mean 'q_proj'",
    ):
        check(["vproj", "qq_proj", "k_proj"])
    with pytest.raises(
        ConfigError,
        match=r"method.targets is 'vproj', a regular expression .* "
        r"matches no module of \S*tiny \(did you mean 'v_proj'\?\); its modules",
    ):
        check("vproj")
    with pytest.raises(ConfigError, match=r"method.targets is '\(q_proj', which peft reads as"):
        check("(q_proj")


def test_plan_refuses_unknown_targets(capsys):
    from snug.cli import main

    from conftest import ROOT

    quickstart = str(ROOT / "examples/quickstart.yaml")
    code = main(["plan", quickstart, "method.targets=[q_proj, vproj]", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and "did you mean 'v_proj'" in lines[0], lines


def test_freeze_patterns_are_checked_against_the_models_module_names():
    """method.trainable_modules: each glob pattern matches a module, else it is refused before
    tokenizing (apply_freeze refused only patterns matching nothing at all, after it)."""
    from snug.config import config_from_dict
    from snug.errors import ConfigError
    from snug.methods import check_against_model

    from conftest import ROOT

    def check(patterns):
        raw = {"model": {"name_or_path": str(ROOT / "models/tiny")}}
        raw["method"] = {"name": "freeze", "trainable_modules": patterns}
        check_against_model(config_from_dict(raw))

    check(["model.layers.1.*", "lm_head"])
    with pytest.raises(
        ConfigError,
        match=r"method.trainable_modules: no module of \S*tiny matches "
        r"'model.layer.1.\*' \(did you mean 'model.layers.1'\?\); give glob",
    ):
        check(["lm_head", "model.layer.1.*"])
