import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from snug.config import Config, MethodConfig
from snug.data.collate import collate
from snug.methods import apply_method, count_params, get_method
from snug.train.loop import _save_final
from snug.train.step import train_step

from conftest import cpu_opts

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
    _save_final(model, tokenizer, cfg, tmp_path)
    assert (tmp_path / "adapter/adapter_config.json").exists()
    assert (tmp_path / "adapter/adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter"
    )
    ids = toy_batches(tokenizer)[0]["input_ids"]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6
        )


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="method.name=ia3 is not available yet; choose one of"):
        get_method("ia3")
