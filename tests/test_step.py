import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from transformers import AutoConfig, AutoModelForCausalLM

from snug.config import MethodConfig
from snug.data.collate import collate
from snug.data.tokenize import IGNORE
from snug.methods import apply_method
from snug.train import loss as loss_module
from snug.train.memory import TensorMemoryTracker, model_tensors
from snug.train.step import train_step

from conftest import cpu_opts

OPTS = cpu_opts()


def samples(lengths, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 700, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def lora_model(path, r=4):
    model = AutoModelForCausalLM.from_pretrained(path)
    return apply_method(model, MethodConfig(name="lora", r=r, alpha=8, dropout=0.0))


def sgd_after_step(model, micro_batches, opts=OPTS):
    model = copy.deepcopy(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # B starts at zero in LoRA; give it values so that every adapter weight gets a gradient.
    torch.manual_seed(1)
    for p in trainable:
        p.data.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(trainable, lr=1.0)
    result = train_step(model, opt, micro_batches, opts)
    grads = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return result, grads


# float32 rounding, u = 2**-24 = 6e-8. A weight's gradient sums one term per position (N of
# 40-80 here), each through 2 layers of dot products of K = 32-64 terms; other micro-batches,
# chunks or packing change the order of those sums: at most about (N + K) * u = 1e-5 of the
# tensor's largest gradient. Reading the gradient back as p - (p - g) rounds at ulp(|p|) = 4e-9,
# 1e-6 of the smallest tensor scale. Measured on an AVX2-only CPU: 1e-6 at most. Real bugs are
# of order 1: per-micro-batch means instead of the whole batch's give 1.3, attention leaking
# across packed samples 2.2.
GRAD_RTOL = 1e-4
# A loss sums N positive per-token cross-entropies: another order changes it by at most N * u =
# 5e-6 of itself. Measured: 2e-7 at most; attention leaking across packed samples: 6e-2.
LOSS_RTOL = 1e-5


def assert_grads_close(a: dict, b: dict) -> None:
    """Equal to float tolerance, measured against each tensor's own scale (GRAD_RTOL)."""
    assert a.keys() == b.keys() and a
    for name in a:
        scale = a[name].abs().max().clamp(min=1e-12)
        torch.testing.assert_close(
            b[name], a[name], rtol=0, atol=float(GRAD_RTOL * scale), msg=name
        )


def test_accumulation_normalises_over_the_whole_batch(tiny_llama):
    model = lora_model(tiny_llama)
    rows = samples([6, 19, 11, 30])  # different lengths: per-micro-batch means would differ
    whole, g_whole = sgd_after_step(model, [collate(rows, pad_id=0)])
    parts, g_parts = sgd_after_step(model, [collate([r], pad_id=0) for r in rows])
    torch.testing.assert_close(parts.loss, whole.loss, rtol=LOSS_RTOL, atol=0)
    assert_grads_close(g_whole, g_parts)
    assert int(whole.target_tokens) == sum(len(r["input_ids"]) - 3 for r in rows)


@pytest.mark.parametrize("family_model", ["llama", "gemma2"], indirect=True)
def test_chunked_loss_equals_plain_loss_and_gradients(family_model, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_POSITIONS", 7)  # several chunks, a ragged last one
    model = lora_model(family_model)
    batch = [collate(samples([9, 23, 16]), pad_id=0)]
    plain, g_plain = sgd_after_step(model, batch)
    chunked, g_chunked = sgd_after_step(
        model,
        batch,
        opts=cpu_opts(
            chunked_loss=True,
        ),
    )
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=LOSS_RTOL, atol=0)
    assert_grads_close(g_plain, g_chunked)


@pytest.fixture
def family_model(request, tmp_path, tokenizer):
    from conftest import make_tiny_model

    return make_tiny_model(request.param, tmp_path / request.param, tokenizer)


def test_step_runs_on_fake_tensors_without_weights(tokenizer):
    """What `snug plan` will do: a meta-device model, materialised as fake tensors, one step."""
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = apply_method(model, MethodConfig(name="lora", r=8))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opts = cpu_opts(
        max_grad_norm=1.0,
        chunked_loss=True,
    )
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        tracker = TensorMemoryTracker()
        with tracker:
            tracker.track(model_tensors(model))
            weights = tracker.live
            ids = torch.randint(0, len(tokenizer), (2, 32))
            batch = {
                "input_ids": ids,
                "labels": ids.clone(),
                "attention_mask": torch.ones_like(ids),
            }
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
            result = train_step(model, opt, [batch, batch], opts)
    assert isinstance(result.loss, FakeTensor) and result.loss.shape == ()
    assert tracker.peak > weights > 0  # the step's own tensors were seen


def test_tracker_counts_allocations_and_frees_exactly():
    tracker = TensorMemoryTracker()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view shares the storage: no new bytes
        c = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        assert tracker.live == 8000
        del a, b
        assert tracker.live == 4000
        del c
    assert tracker.live == 0 and tracker.peak == 8000


@pytest.mark.parametrize("technique", ["grad_checkpointing", "offload_activations"])
def test_checkpointing_and_offload_give_the_same_gradients(technique, tiny_llama):
    model = lora_model(tiny_llama)
    batch = [collate(samples([12, 20]), pad_id=0)]
    _, reference = sgd_after_step(model, batch)
    if technique == "grad_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opts = OPTS
    else:
        opts = cpu_opts(offload_activations=True)
    _, grads = sgd_after_step(model, batch, opts=opts)
    assert_grads_close(reference, grads)


def test_a_large_vocabulary_gets_shorter_chunks_of_logits(monkeypatch):
    """One chunk's fp32 logits stay within 256 MiB: at Qwen2.5's 151,936 tokens a chunk is 384
    positions, not 1,024, and a step over 1,100 targets peaks lower by the difference of a
    chunk's logits, their log-softmax and their gradient (1.2 GB here). The step runs on fake
    tensors (as `snug plan` replays it: the same ops and storages, no arithmetic): a real step
    gave the same two peaks, 739,489,608 and 1,906,358,084 bytes, in 5 s against 0.3 s."""
    assert [loss_module.chunk_positions(v) for v in (32000, 128256, 151936, 256000)] == [
        1024,
        512,
        384,
        256,
    ]
    vocab = 151936
    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # a gradient through every chunk's head
    peaks, scaled = {}, loss_module.CHUNK_BYTES
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        ids = torch.randint(0, vocab, (1, 1101))
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        for cap in (scaled, 2**40):  # scaled, and 1,024 positions whatever the vocabulary
            monkeypatch.setattr(loss_module, "CHUNK_BYTES", cap)
            opt = torch.optim.SGD([model.model.norm.weight], lr=0.0)
            tracker = TensorMemoryTracker()
            with tracker:
                tracker.track(model_tensors(model))
                result = train_step(model, opt, [batch], cpu_opts(chunked_loss=True))
            assert isinstance(result.loss, FakeTensor)  # nothing was computed
            peaks[cap] = tracker.peak
    # a chunk's fp32 logits, their log-softmax and, in backward, their gradient: 3 x 640 rows
    assert peaks[2**40] - peaks[scaled] > 2.5 * (1024 - 384) * vocab * 4


def test_chunked_loss_never_holds_the_full_logits(tiny_llama, monkeypatch):
    """Peak tensor memory of a step falls by about the fp32 logits (tokens x vocab x 4 B)."""
    monkeypatch.setattr(loss_module, "CHUNK_POSITIONS", 64)
    model = lora_model(tiny_llama)
    ids = torch.randint(5, 700, (8, 256))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    peaks = {}
    for chunked in (False, True):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        opts = cpu_opts(max_grad_norm=1.0, chunked_loss=chunked)
        tracker = TensorMemoryTracker()
        with tracker:
            tracker.track(model_tensors(model))
            train_step(model, opt, [batch], opts)
        peaks[chunked] = tracker.peak
    logits_bytes = 8 * 255 * model.config.vocab_size * 4
    assert peaks[False] - peaks[True] > logits_bytes
