"""The memory toolkit: packing, length grouping, offloaded checkpoints, masked-position skipping,
and every optimizer."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_step import LOSS_RTOL, assert_grads_close, lora_model, samples, sgd_after_step
from transformers import AutoModelForCausalLM

from snug.config import MemoryConfig, TrainConfig
from snug.data.collate import collate, collate_packed
from snug.data.packing import micro_batches, pack
from snug.data.tokenize import IGNORE
from snug.train import loss as loss_module
from snug.train.activations import enable_checkpointing
from snug.train.optim import build_optimizer
from snug.train.step import train_step

from conftest import cpu_opts


def test_pack_places_every_sample_once_within_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 300, (500,), generator=g).tolist()
    rows = pack(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert max(sum(lengths[i] for i in r) for r in rows) <= 512
    # best-fit decreasing is near the bound: within 3% of ceil(total / capacity) rows
    assert len(rows) <= 1.03 * sum(lengths) / 512 + 1
    assert pack([600, 10], 512) == [[0], [1]]  # a sample longer than a row gets its own


def test_length_grouping_cuts_padding_and_keeps_every_row():
    lengths = torch.randint(1, 500, (400,), generator=torch.Generator().manual_seed(0)).tolist()

    def padding(mbs):
        return sum(
            len(mb) * max(lengths[r] for r in mb) - sum(lengths[r] for r in mb) for mb in mbs
        )

    plain = micro_batches(400, 8, torch.Generator().manual_seed(1))
    grouped = micro_batches(400, 8, torch.Generator().manual_seed(1), lengths)
    assert sorted(r for mb in grouped for r in mb) == list(range(400))
    assert all(len(mb) == 8 for mb in grouped)
    assert padding(grouped) < 0.2 * padding(plain)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("prompt", [3, 0])  # sft (masked prompt), pt (every token a target)
def test_packed_loss_and_gradients_equal_unpacked(attn, chunked, prompt, tiny_llama):
    model = lora_model(tiny_llama)
    model.set_attn_implementation(attn)
    rows = samples([9, 23, 16, 5, 30], prompt=prompt)
    unpacked = [collate(rows, pad_id=0)]
    packed = [collate_packed([[rows[0], rows[1], rows[2]], [rows[3], rows[4]]], pad_id=0)]
    assert "attention_mask" not in packed[0] and packed[0]["input_ids"].shape == (2, 48)
    opts = cpu_opts(chunked_loss=chunked)
    a, g_a = sgd_after_step(model, unpacked, opts)
    b, g_b = sgd_after_step(model, packed, opts)
    assert a.target_tokens == b.target_tokens
    torch.testing.assert_close(b.loss, a.loss, rtol=LOSS_RTOL, atol=0)  # see test_step
    assert_grads_close(g_a, g_b)


def test_packing_without_the_restarting_positions_would_differ(tiny_llama):
    """The check above can fail: attention across samples changes the loss."""
    model = lora_model(tiny_llama)
    rows = samples([9, 23, 16])
    packed = collate_packed([rows], pad_id=0)
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    a, _ = sgd_after_step(model, [collate(rows, pad_id=0)])
    b, _ = sgd_after_step(model, [leaky])
    assert (a.loss - b.loss).abs() > 1e-3


def test_chunked_loss_runs_the_head_only_on_target_positions(tiny_llama):
    model = lora_model(tiny_llama)
    batch = collate(samples([9, 23, 16], prompt=5), pad_id=0)
    seen = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        loss_module.chunked_loss(model, batch)
    finally:
        handle.remove()
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert sum(seen[1:]) == targets  # seen[0]: the model's own logits_to_keep=1 position(s)
    assert targets < batch["labels"][:, 1:].numel()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_offloaded_checkpoints_give_the_same_gradients_and_free_the_layer_inputs(
    method, tiny_llama
):
    batch = [collate(samples([12, 20]), pad_id=0)]
    if method == "lora":
        model = lora_model(tiny_llama)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    _, reference = sgd_after_step(model, batch)

    kept = {}
    for offload in (False, True):
        m = (
            lora_model(tiny_llama)
            if method == "lora"
            else AutoModelForCausalLM.from_pretrained(tiny_llama)
        )
        enable_checkpointing(m, offload=offload)
        m.train()
        _, grads = sgd_after_step(m, batch, cpu_opts(offload_activations=offload))
        assert_grads_close(reference, grads)

        # After forward, before backward: is each decoder layer's input still alive?
        inputs = []
        hooks = [
            layer.register_forward_pre_hook(
                lambda mod, args, seen=inputs: seen.append(weakref.ref(args[0]))
            )
            for layer in (m.get_base_model() if method == "lora" else m).model.layers
        ]
        loss = loss_module.plain_loss(m, batch[0])
        for h in hooks:
            h.remove()
        gc.collect()
        kept[offload] = sum(r() is not None for r in inputs[1:])  # layer 0's input is the embedding
        loss.backward()
    assert kept[False] == len(inputs) - 1 and kept[True] == 0


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "adafactor"])
def test_each_optimizer_steps_and_holds_state_only_for_trainable_weights(name, tiny_llama):
    model = lora_model(tiny_llama)
    opt = build_optimizer(model, MemoryConfig(optimizer=name), TrainConfig(lr=1e-2))
    trainable = {p for p in model.parameters() if p.requires_grad}
    for p in trainable:
        p.data.normal_(0, 0.02)  # LoRA B = 0 gives A no gradient; make every weight move
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_step(model, opt, [collate(samples([12, 20]), pad_id=0)], cpu_opts(max_grad_norm=1.0))
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert len(moved) == len(before)
    assert set(opt.state) <= trainable and opt.state
