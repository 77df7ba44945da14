"""Preference training (dpo, orpo, simpo, kto): the losses against TRL's on the same log-probs,
the chunked log-probs against the model's whole logits, the adapter-off reference against the
base model, what trains, the data layouts read alike, and the layouts refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from snug.config import config_from_dict
from snug.data.formats import DataError
from snug.plan.autofit import auto_fit
from snug.train.training import run_training

from conftest import ROOT, write_jsonl

TINY = ROOT / "models/tiny"
WORDS = "red blue green cat dog sun moon tree".split()


def pairs(n: int = 24) -> list[dict]:
    """A learnable preference: answer with the first word, not with the last."""
    rows = []
    for i in range(n):
        a, b, c = WORDS[i % 8], WORDS[(i + 3) % 8], WORDS[(i + 5) % 8]
        rows.append({"prompt": f"First word of: {a} {b} {c}", "chosen": a, "rejected": c})
    return rows


def labelled(n: int = 24) -> list[dict]:
    return [
        {"prompt": p["prompt"], "completion": p["chosen"] if i % 2 else p["rejected"],
         "label": bool(i % 2)}
        for i, p in enumerate(pairs(n))
    ]  # fmt: skip


def run_config(tmp_path: Path, stage: str, data: Path, **sections) -> dict:
    raw = {
        "model": {"name_or_path": str(TINY)},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "cutoff_len": 64},
        "train": {
            "stage": stage,
            "micro_batch": 4,
            "grad_accum": 1,
            "max_steps": 2,
            "lr": 5e-3,
            "log_every": 1,
            "eval_generate": 0,
        },
        "output": {"dir": str(tmp_path / "run"), "plot_loss": False},
    }
    for name, keys in sections.items():
        raw.setdefault(name, {}).update(keys)
    return raw


@pytest.mark.parametrize(
    "stage,rows,found",
    [
        ("sft", pairs, "preference pairs"),
        ("sft", labelled, "labelled completions"),
        ("pt", pairs, "preference pairs"),
        ("dpo", labelled, "use train.stage=kto"),
        ("kto", pairs, "use train.stage=dpo"),
    ],
)
def test_preference_data_is_never_trained_as_the_wrong_thing(stage, rows, found, tmp_path):
    """Pairs or labelled completions given to sft (a kto file with label: false rows trained
    as SFT on its rejected answers, status completed, before) and one kind given to the
    other's stage: one error naming the file, nothing trained."""
    data = write_jsonl(tmp_path / "data.jsonl", rows())
    raw = run_config(tmp_path, stage, data)
    if stage == "pt":
        raw["data"]["format"] = "auto"
    with pytest.raises(DataError) as e:
        run_training(config_from_dict(raw))
    assert str(data) in str(e.value) and found in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run/summary.json").exists()


def test_sft_data_given_to_dpo_is_refused(tmp_path):
    data = ROOT / "data/instruct/train.jsonl"
    with pytest.raises(DataError, match="no 'chosen'/'rejected' answers"):
        run_training(config_from_dict(run_config(tmp_path, "dpo", data)))


# -- the losses against TRL's, on the same log-probs -----------------------------------------
def _logps(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]
    lengths = [torch.randint(1, 30, (n,), generator=g).double() for _ in range(2)]
    return logps, lengths


def _trl_cpo(loss_type: str, beta: float, smoothing: float = 0.0, gamma: float = 0.0):
    """TRL's CPOTrainer.cpo_loss as a function of (chosen, rejected) log-probs."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    this = SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=smoothing,
        simpo_gamma=gamma,
        accelerator=SimpleNamespace(device="cpu"),
    )
    return lambda c, r: CPOTrainer.cpo_loss(this, c, r)


@pytest.mark.parametrize(
    "kind,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("hinge", 0.1, 0.0),
                            ("ipo", 0.5, 0.0)],
)  # fmt: skip
def test_dpo_losses_equal_trls(kind, beta, smoothing):
    """DPO is CPO's loss of the log-ratios (policy minus reference); IPO of the log-ratios
    averaged per token (TRL's DPOTrainer normalises IPO so, with the IPO authors)."""
    from snug.core.registry import pref_losses

    (pc, pr, rc, rr), (nc, nr) = _logps(1)
    given = {"label_smoothing": smoothing} if kind == "sigmoid" else {}
    loss = pref_losses()[kind](beta=beta, **given)  # chosen by name, as pref.loss does
    ours, chosen, rejected = loss(pc, pr, rc, rr, nc, nr)
    trl = _trl_cpo(kind, beta, smoothing)
    if kind == "ipo":
        theirs, *_ = trl((pc - rc) / nc, (pr - rr) / nr)
    else:
        theirs, *_ = trl(pc - rc, pr - rr)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen, beta * (pc - rc), rtol=0, atol=1e-6)
    torch.testing.assert_close(rejected, beta * (pr - rr), rtol=0, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_loss_equals_trls(smoothing):
    """SimPO in TRL's CPOTrainer: log-probs averaged per token, margin gamma."""
    from snug.stages.pref_losses import SimPOLoss

    (pc, pr, _, _), (nc, nr) = _logps(2)
    loss = SimPOLoss(beta=2.0, gamma=1.0, label_smoothing=smoothing)
    ours, chosen, _ = loss(pc, pr, None, None, nc, nr)
    theirs, their_chosen, _ = _trl_cpo("simpo", 2.0, smoothing, gamma=1.0)(pc / nc, pr / nr)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen, their_chosen, rtol=0, atol=1e-6)


def test_orpo_loss_equals_trls():
    """ORPO's odds-ratio term is TRL's ORPOTrainer.odds_ratio_loss (which the trainer
    subtracts from the chosen answer's NLL); snug adds that NLL per pair."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from snug.stages.pref_losses import ORPOLoss

    (pc, pr, _, _), (nc, nr) = _logps(3)
    # log-probs per token near 0 too, where log(1 - p) needs care
    pc, pr = pc / 40, pr / 40
    ours, *_ = ORPOLoss(beta=0.25)(pc, pr, None, None, nc, nr)
    this = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    ratio, *_ = ORPOTrainer.odds_ratio_loss(this, pc / nc, pr / nr)
    torch.testing.assert_close(ours, -(pc / nc) - ratio, rtol=0, atol=1e-6)


def test_kto_loss_equals_the_papers():
    """KTO, eq. 7-8 of Ethayarajh et al. 2024 as TRL's KTOTrainer computes it
    (trl/trainer/kto_trainer.py, loss_type kto: the KL of the mismatched rows, clamped at 0
    and detached; a weight per side), written out here on the same log-probs."""
    from snug.stages.pref_losses import KTOLoss

    (policy, ref, kl_policy, kl_ref), _ = _logps(4)
    desirable = torch.arange(16) % 3 == 0
    kl = (kl_policy - kl_ref).mean().clamp(min=0)
    ours, rewards = KTOLoss(0.2, 1.5, 0.7)(policy, ref, kl, desirable.long())
    r = policy - ref
    want = torch.where(
        desirable,
        1.5 * (1 - torch.sigmoid(0.2 * (r - kl))),
        0.7 * (1 - torch.sigmoid(0.2 * (kl - r))),
    )
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(rewards, 0.2 * r, rtol=0, atol=1e-6)


# -- log-probs and the reference ---------------------------------------------------------------
def _batch(tok, stage: str = "dpo", n: int = 4) -> dict:
    from snug.config import load_config
    from snug.core.registry import get_stage
    from snug.data.preference import tokenize_pairs
    from snug.data.templates import resolve_template

    template = resolve_template(tok, "auto", str(TINY))
    rows = pairs(n) if stage != "kto" else labelled(n)
    cols = {k: [r.get(k) for r in rows] for k in {k for r in rows for k in r}}
    out = tokenize_pairs(
        cols, list(range(n)), tok=tok, template=template, cutoff_len=64,
        paired=stage != "kto", where=lambda i: f"row {i}",
    )  # fmt: skip
    samples = [{k: out[k][i] for k in out} for i in range(n)]
    stage_obj = get_stage(stage).configured(load_config(None, [f"train.stage={stage}"]))
    return stage_obj.collate(samples, tok.pad_token_id)


def _by_whole_logits(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logp.gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    return (picked * mask).sum(1)


@pytest.mark.parametrize("chunk", [1024, 5])
def test_chunked_log_probs_equal_the_whole_logits(chunk, tokenizer, monkeypatch):
    """Summed log-probs of each row's answer from chunks of positions (one chunk, and chunks
    of 5 that split rows) against log-softmax of the model's whole logits; fp32 sums of tens
    of terms: 1e-5 relative."""
    from transformers import AutoModelForCausalLM

    import snug.stages.preference as pref

    monkeypatch.setattr(pref, "CHUNK_POSITIONS", chunk)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    batch = _batch(tokenizer)
    assert batch["input_ids"].shape[0] == 8  # 4 chosen rows, then 4 rejected
    ours = pref.sequence_logps(model, batch)
    want = _by_whole_logits(model, batch)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        pref.sequence_logps(model, batch, chunked=False), ours, rtol=1e-5, atol=1e-4
    )


def test_the_adapter_off_reference_is_the_base_model(tokenizer):
    """LoRA with non-zero weights changes the log-probs; switched off, the same model gives
    the base model's exactly as a fresh copy of the base computes them."""
    from transformers import AutoModelForCausalLM

    from snug.config import load_config
    from snug.methods import apply_method
    from snug.stages.preference import make_reference, sequence_logps

    cfg = load_config(None, ["train.stage=dpo", "method.r=4"])
    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_pretrained(TINY), cfg.method)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    batch = _batch(tokenizer)
    reference = make_reference(model, cfg)
    assert reference.kind == "adapter_off" and reference.frozen is None  # no second copy
    base = sequence_logps(AutoModelForCausalLM.from_pretrained(TINY), batch)
    assert not torch.allclose(sequence_logps(model, batch), base)
    torch.testing.assert_close(reference.logps(model, batch, True), base, rtol=1e-6, atol=1e-5)
    assert torch.is_grad_enabled()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto"])
def test_each_stage_lowers_its_loss_and_trains_only_what_it_should(stage, tmp_path):
    """On a learnable toy (answer with the first word, not the last), each stage's held-out
    loss falls (summary.json's eval before -> after, the same rows both times); LoRA trains the
    adapter only; the stage's metrics reach metrics.jsonl."""
    from safetensors.torch import load_file

    rows = labelled(48) if stage == "kto" else pairs(48)
    data = write_jsonl(tmp_path / "data.jsonl", rows[:32])
    raw = run_config(tmp_path, stage, data)
    raw["data"]["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", rows[32:]))
    raw["train"].update(max_steps=16, lr=2e-3)
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed"
    ev = summary["eval"]
    assert ev["loss_after"] < 0.8 * ev["loss_before"], ev
    assert ev["metric"] == "pref_accuracy"
    if stage != "orpo":  # orpo's 16 steps go mostly to its SFT term
        assert ev["after"] >= 0.75 > ev["before"], ev
    logged = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert "pref_accuracy" in logged[-1] and ("kl" in logged[-1]) == (stage == "kto")
    adapter = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)


def test_full_dpo_compares_with_a_frozen_copy_that_never_moves(tmp_path):
    """Full fine-tuning has no adapter to switch off: the reference is a frozen copy of the
    weights as loaded (pref.reference auto), a full dpo run trains with it, and asking for the
    adapter switch instead is refused."""
    from transformers import AutoModelForCausalLM

    from snug.config import load_config
    from snug.stages.preference import make_reference

    cfg = load_config(None, ["train.stage=dpo", "method.name=full"])
    model = AutoModelForCausalLM.from_pretrained(TINY)
    reference = make_reference(model, cfg)
    assert reference.kind == "copy"
    assert all(not p.requires_grad for p in reference.frozen.parameters())
    data = write_jsonl(tmp_path / "data.jsonl", pairs(8))
    raw = run_config(tmp_path, "dpo", data)
    raw["method"] = {"name": "full"}
    raw["train"].update(max_steps=2, lr=1e-4)
    assert run_training(config_from_dict(raw))["status"] == "completed"
    with pytest.raises(Exception, match="adapter_off needs a peft adapter method"):
        make_reference(model, load_config(None, ["train.stage=dpo", "method.name=full",
                                                 "pref.reference=adapter_off"]))  # fmt: skip


LAYOUTS = {
    "trl": {"prompt": "Name a colour.", "chosen": "red", "rejected": "cat"},
    "trl conversational": {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "cat"}],
    },
    "trl implicit prompt": {
        "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}],
        "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "cat"}],
    },
    "llama-factory sharegpt ranking": {
        "conversations": [{"from": "human", "value": "Name a colour."}],
        "chosen": {"from": "gpt", "value": "red"},
        "rejected": {"from": "gpt", "value": "cat"},
    },
    "llama-factory alpaca ranking": {"instruction": "Name a colour.", "chosen": "red", "rejected": "cat"},
}  # fmt: skip
UNPAIRED = {
    "trl": {"prompt": "Name a colour.", "completion": "cat", "label": False},
    "llama-factory kto": {
        "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "cat"}],
        "label": False,
    },
    "alpaca": {"instruction": "Name a colour.", "output": "cat", "label": False},
}  # fmt: skip


def _tokenized(tok, record: dict, paired: bool) -> dict:
    from snug.data.preference import tokenize_pairs
    from snug.data.templates import resolve_template

    out = tokenize_pairs(
        {k: [v] for k, v in record.items()},
        [0],
        tok=tok,
        template=resolve_template(tok, "auto", str(TINY)),
        cutoff_len=64,
        paired=paired,
        where=lambda i: "data.jsonl line 1",
    )
    return {k: v[0] for k, v in out.items()}


def test_every_layout_of_the_same_pair_gives_the_same_tokens(tokenizer):
    """TRL's and LLaMA-Factory's layouts of one pair (and of one labelled completion) give
    the same tokens; the prompt is masked, the answers are what the template adds."""
    seen = {name: _tokenized(tokenizer, r, True) for name, r in LAYOUTS.items()}
    first = seen["trl"]
    assert first["status"] == "kept" and first["prompt_len"] > 0
    assert all(v == first for v in seen.values()), {k: v["input_ids"] for k, v in seen.items()}
    p = first["prompt_len"]
    assert first["labels"][:p] == [-100] * p and first["labels"][p:] == first["input_ids"][p:]
    assert tokenizer.decode(first["input_ids"][p:]).startswith("red")
    assert tokenizer.decode(first["rejected_ids"][p:]).startswith("cat")
    unpaired = {name: _tokenized(tokenizer, r, False) for name, r in UNPAIRED.items()}
    assert all(v == unpaired["trl"] for v in unpaired.values())
    assert (
        unpaired["trl"]["input_ids"] == first["rejected_ids"] and unpaired["trl"]["desirable"] == 0
    )


@pytest.mark.parametrize(
    "record,says",
    [
        ({"prompt": "Hi", "chosen": "a", "rejected": 3}, "field 'rejected' must be a string"),
        ({"prompt": "Hi", "chosen": " ", "rejected": "b"}, "field 'chosen' has no text"),
        ({"chosen": "a", "rejected": "b"}, "no prompt"),
        ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "b"}]},
         "differ only in their last"),
        ({"conversations": [{"from": "gpt", "value": "x"}], "chosen": "a", "rejected": "b"},
         "must end with a user turn"),
    ],
)  # fmt: skip
def test_a_broken_pair_names_its_line_and_field(record, says, tokenizer):
    out = _tokenized(tokenizer, record, True)
    assert out["status"] == "invalid"
    assert out["problem"].startswith("data.jsonl line 1: ") and says in out["problem"], out


# -- the planner replays the preference step ---------------------------------------------------
def _real_peak(cfg, config, seq_len: int) -> int:
    """Two real optimizer steps of the stage's step, on a fresh model prepared as `snug train`
    prepares it, with the reference build_run makes, under the tracker `snug train` uses on
    CPU (tests/test_plan.py's measured_peak, for pairs). Each micro-batch's last pair has both
    answers a token shorter, so it is padded, as pairs of real data are (two targets fewer)."""
    from transformers import AutoModelForCausalLM

    from snug.core.registry import get_stage
    from snug.train.memory import TensorMemoryTracker, model_tensors
    from snug.train.optim import build_optimizer
    from snug.train.prepare import prepare_for_training, step_options
    from snug.train.step import train_step

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    base.config.use_cache = False
    model = prepare_for_training(base, cfg, "fp32")
    opts = step_options(cfg, torch.device("cpu"), "fp32")
    reference = get_stage(cfg.train.stage).reference(model, cfg)
    optimizer = build_optimizer(model, cfg.memory, cfg.train)
    b = cfg.train.micro_batch
    tracker = TensorMemoryTracker()
    with tracker:
        tracker.track(model_tensors(model))
        if reference.frozen is not None:
            tracker.track(model_tensors(reference.frozen))
        for _ in range(2):
            micro = []
            for _ in range(cfg.train.grad_accum):
                rows = torch.randint(0, config.vocab_size, (2 * b, seq_len)).tolist()
                rows[b - 1], rows[-1] = rows[b - 1][:-1], rows[-1][:-1]
                samples = [
                    {"input_ids": c, "labels": c, "rejected_ids": r, "rejected_labels": r,
                     "prompt_len": 0, "desirable": i % 2}
                    for i, (c, r) in enumerate(zip(rows[:b], rows[b:], strict=True))
                ]  # fmt: skip
                if reference.kind == "precompute":  # what precompute_reference adds
                    for s in samples:
                        s.update(ref_chosen=-1.0, ref_rejected=-2.0)
                micro.append(opts.stage.collate(samples, 0))
            train_step(model, optimizer, micro, opts, reference=reference)
            del micro
    return tracker.peak


@pytest.mark.parametrize(
    "stage,method,gc,reference",
    [
        ("dpo", "lora", True, "auto"),
        ("dpo", "full", False, "auto"),
        ("dpo", "full", False, "precompute"),
        ("kto", "lora", False, "auto"),
    ],
)
def test_the_plan_replays_the_preference_step_exactly(stage, method, gc, reference):
    """`snug plan`'s fake replay of the preference step, its reference forward included (the
    adapter switched off, or a frozen copy for full; none with precompute), against two real
    steps of padded pairs: the same peak bytes."""
    from transformers import AutoConfig

    from snug.config import load_config
    from snug.plan.simulate import simulate

    cfg = load_config(
        None,
        [f"train.stage={stage}", f"method.name={method}", f"memory.grad_checkpointing={gc}",
         "train.micro_batch=2", "train.grad_accum=2", f"pref.reference={reference}"],
    )  # fmt: skip
    config = AutoConfig.for_model(
        "llama", vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    targets = cfg.train.micro_batch * 63 - 1  # per answer: the shorter pair has one fewer
    predicted = simulate(cfg, config, 64, "cpu", "fp32", targets, extend=False)
    assert predicted.peak_bytes == _real_peak(cfg, config, 64)
    if method == "full" and reference == "auto":  # the copy counts with the weights
        assert predicted.weights_bytes >= 2 * predicted.total_params * 4
    if reference == "precompute":  # no reference model: the plan of a copy holds one more
        copy = simulate(
            load_config(None, ["train.stage=dpo", "method.name=full", "train.micro_batch=2",
                               "train.grad_accum=2", "memory.grad_checkpointing=false"]),
            config, 64, device_type="cpu", extend=False,
        )  # fmt: skip
        assert copy.peak_bytes - predicted.peak_bytes >= predicted.total_params * 4


def test_a_resume_with_other_pref_keys_or_other_rejected_answers_is_refused(tmp_path, tokenizer):
    """The pref keys change what is trained: a checkpoint's run and this one must share them
    (as data and method keys); a pair's rejected answer counts in the data's hash."""
    from datasets import Dataset

    from snug.config import load_config
    from snug.train.resume import config_drift, data_hash

    old = load_config(None, ["train.stage=dpo"]).to_dict()
    new = load_config(None, ["train.stage=dpo", "pref.beta=0.3"]).to_dict()
    assert config_drift(old, new) == ["pref.beta: 0.1 -> 0.3"]
    sft = load_config(None, []).to_dict()
    assert config_drift(sft, sft) == []
    row = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "rejected_ids": [1, 2, 4]}
    other = {**row, "rejected_ids": [1, 2, 5]}
    assert data_hash(Dataset.from_list([row])) != data_hash(Dataset.from_list([other]))


@pytest.mark.slow
def test_a_dpo_result_merges_chats_and_evaluates(tmp_path, capsys):
    """The result of a preference stage is an ordinary adapter: `snug merge` folds it,
    `snug eval` scores it on pairs against their chosen answers (labelled completions are
    refused: no one right answer), a chat session opens it and `snug generate` answers."""
    from snug.cli import main
    from snug.deploy.session import open_session

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    raw = run_config(tmp_path, "dpo", data)
    assert run_training(config_from_dict(raw))["status"] == "completed"
    run = tmp_path / "run"
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged/config.json").exists()
    out = tmp_path / "eval.json"
    args = ["eval", "--adapter", str(run), "--data", str(data), "--limit", "4"]
    assert main([*args, "--output", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["counts"]["samples"] == 4 and "loss" in json.dumps(scored["models"])
    kto = write_jsonl(tmp_path / "kto.jsonl", labelled(4))
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--data", str(kto)]) == 2
    assert "labelled completions" in capsys.readouterr().err
    session = open_session(adapters=[str(run)], device="cpu")
    assert session.cfg.train.stage == "dpo"  # the run's config, pref section included
    answers = tmp_path / "answers.jsonl"
    gen = ["generate", "--adapter", str(run), "--input", str(ROOT / "data/prompts.jsonl")]
    assert main([*gen, "--output", str(answers), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert rows and all(isinstance(r["output"], str) and r["adapter"] == "run" for r in rows)


@pytest.mark.slow
def test_a_dpo_run_killed_by_sigkill_resumes_bit_identical(tmp_path):
    """kill -9 of a dpo run while it writes its step-4 checkpoint (the step-2 one complete),
    then `snug train` again, which resumes at step 2 and crosses into the second epoch (3 steps
    each): the final adapter is bit-identical to an uninterrupted run's and every step's loss is
    the same (LoRA dropout on: the RNG is restored too)."""
    import yaml
    from test_reliability import adapter, losses, snug_train, snug_train_here

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(12))

    def cfg(name: str) -> Path:
        raw = run_config(tmp_path / name, "dpo", data)
        raw["method"]["dropout"] = 0.1
        raw["train"].update(micro_batch=2, grad_accum=2, epochs=2, max_steps=None, lr=1e-3)
        raw["output"].update(save_every=2, keep_last=2)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    whole = snug_train_here(cfg("whole"))
    assert whole.returncode == 0, whole.stderr
    killed = snug_train(cfg("killed"), at=2, where="ckpt.save_file")
    assert killed.returncode == -9, killed.stderr[-800:]
    resumed = snug_train_here(tmp_path / "killed.yaml")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    ours, theirs = adapter(tmp_path / "killed/run"), adapter(tmp_path / "whole/run")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert losses(tmp_path / "killed/run") == losses(tmp_path / "whole/run")
    assert len(losses(tmp_path / "whole/run")) == 6


def test_precomputed_reference_log_probs_train_as_the_copy_does(tmp_path):
    """pref.reference=precompute: the reference's log-probs of every pair are computed once
    before training and carried by the data (no reference model while training); full DPO then
    logs the same losses as with a frozen copy (fp32 sums in other batch shapes: 1e-5), and a
    second run reads them from the cache."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    logged = {}
    for kind in ("copy", "precompute", "precompute"):
        raw = run_config(tmp_path / f"{kind}{len(logged)}", "dpo", data)
        raw["method"] = {"name": "full"}
        raw["train"].update(max_steps=3, lr=1e-4, micro_batch=2)
        raw["pref"] = {"reference": kind}
        summary = run_training(config_from_dict(raw))
        assert summary["status"] == "completed"
        rows = (tmp_path / f"{kind}{len(logged)}/run/metrics.jsonl").read_text().splitlines()
        logged[f"{kind}{len(logged)}"] = [json.loads(x)["loss"] for x in rows if '"loss"' in x]
    copy, first, second = logged.values()
    assert first == pytest.approx(copy, rel=1e-5) and second == first


@pytest.mark.slow
def test_dpo_trains_on_4bit_and_8bit_bases_and_auto_fit_plans_it(tmp_path):
    """QLoRA: the adapter switch works on a 4-bit and an 8-bit base (the reference is that
    base, no copy).
    auto_fit plans the preference step (its reference forward included) against a budget below
    what micro-batch 8 without checkpointing needs and keeps the effective batch. The real
    run's measured peak is at most the plan (the plan replays its longest pair in a padded
    micro-batch; the real steps' rows are shorter or as long) and within 1% of it (measured
    26,723,564 bytes against 26,725,820 planned; 26,303,724 before the replay carried the
    mask of a padded batch)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    for quant in ("4bit", "8bit"):
        raw = run_config(tmp_path / quant, "dpo", data, model={"quant": quant})
        summary = run_training(config_from_dict(raw))
        assert summary["status"] == "completed" and summary["train_loss_last"] > 0
    raw = run_config(tmp_path / "fit", "dpo", data)
    raw["train"].update(micro_batch=8, max_steps=2)
    raw["memory"] = {"auto_fit": True, "gpu": "30MiB", "grad_checkpointing": False}
    summary = run_training(config_from_dict(raw), planner=auto_fit)
    fit = summary["auto_fit"]
    assert summary["status"] == "completed"
    assert fit["micro_batch"] * fit["grad_accum"] == 8
    assert (fit["micro_batch"], fit["grad_checkpointing"]) != (8, False), fit
    peak = summary["peak_memory"]
    assert peak["predicted_bytes"] <= 30 * 2**20
    assert 0.99 * peak["predicted_bytes"] <= peak["measured_bytes"] <= peak["predicted_bytes"]


# -- the out-of-memory fallback and the NaN guard ----------------------------------------------
def _inject_oom(monkeypatch, above_rows: int) -> list[torch.Tensor]:
    """Every policy forward over more than `above_rows` rows runs out of memory; returns the
    batches that trained (their input_ids and labels)."""
    import snug.stages.kto as kto_module
    import snug.stages.preference as pref_module

    real, trained = pref_module.sequence_logps, []

    def logps(model, batch, chunked=True):
        if torch.is_grad_enabled():  # the policy's forward (the reference runs without)
            if batch["input_ids"].shape[0] > above_rows:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            trained.append((batch["input_ids"], batch["labels"]))
        return real(model, batch, chunked)

    monkeypatch.setattr(pref_module, "sequence_logps", logps)
    monkeypatch.setattr(kto_module, "sequence_logps", logps)
    return trained


def test_out_of_memory_halves_the_pairs_and_keeps_each_pair_together(tmp_path, monkeypatch):
    """dpo at 4 pairs a micro-batch runs out of memory above one pair: it trains each pair's
    chosen and rejected rows together in micro-batches of one pair, and ends where the run
    without the fallback ends (the step divides by the pairs of the whole window)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    plain = run_training(config_from_dict(run_config(tmp_path / "plain", "dpo", data)))
    trained = _inject_oom(monkeypatch, above_rows=2)
    raw = run_config(tmp_path / "fell", "dpo", data)
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["steps"] == plain["steps"]
    assert summary["oom_changes"] == [
        {"step": 1, "micro_batch": 2, "grad_accum": 2},
        {"step": 1, "micro_batch": 1, "grad_accum": 4},
    ]
    assert len(trained) == 4 * summary["steps"]
    for ids, labels in trained:  # row 0 chosen, row 1 rejected: one prompt
        prompt = int((labels[0] != -100).nonzero()[0])
        assert ids.shape[0] == 2 and torch.equal(ids[0, :prompt], ids[1, :prompt])
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "fell/run/adapter/adapter_model.safetensors")
    theirs = load_file(tmp_path / "plain/run/adapter/adapter_model.safetensors")
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    # as tests/test_reliability.py's fallback test: other sums round otherwise, a small part of
    # what AdamW moves a weight (about lr a step)
    assert worst < 0.02 * raw["train"]["lr"] * summary["steps"], worst


def test_kto_halves_no_further_than_two_rows(tmp_path, monkeypatch):
    """kto's KL estimate needs two completions a micro-batch: the fallback stops there and
    says so."""
    from snug.train.run import OutOfMemory

    data = write_jsonl(tmp_path / "kto.jsonl", labelled(16))
    _inject_oom(monkeypatch, above_rows=2)  # 1 completion + its KL row: never reached
    with pytest.raises(OutOfMemory) as e:
        run_training(config_from_dict(run_config(tmp_path, "kto", data)))
    said = str(e.value)
    assert "micro-batches of 2 rows, the fewest train.stage=kto takes" in said, said


@pytest.mark.parametrize("skip", [0, 1])
def test_a_nonfinite_preference_loss_stops_or_is_skipped(skip, tmp_path, monkeypatch):
    """The NaN guard holds for pairs: a NaN loss at step 2 stops the run before the update
    (naming the step), or with train.skip_nonfinite is skipped and counted."""
    from snug.stages.pref_losses import DPOLoss
    from snug.train.run import NonFiniteError

    real, calls = DPOLoss.__call__, []

    def poisoned(*args):
        calls.append(1)
        losses, chosen, rejected = real(*args)
        return (losses * float("nan") if len(calls) == 2 else losses), chosen, rejected

    monkeypatch.setattr(DPOLoss, "__call__", poisoned)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    raw = run_config(tmp_path, "dpo", data, train={"max_steps": 3, "skip_nonfinite": skip})
    if not skip:
        with pytest.raises(NonFiniteError, match="^step 2: the loss is nan"):
            run_training(config_from_dict(raw))
        return
    summary = run_training(config_from_dict(raw))
    assert summary["status"] == "completed" and summary["nonfinite_skipped"] == [2]


def test_kto_refuses_a_micro_batch_of_one(tmp_path):
    from snug.config import ConfigError

    data = write_jsonl(tmp_path / "kto.jsonl", labelled(4))
    raw = run_config(tmp_path, "kto", data, train={"micro_batch": 1})
    with pytest.raises(ConfigError, match="train.stage=kto needs train.micro_batch of at least 2"):
        config_from_dict(raw)


# -- kto's two completions a micro-batch, everywhere ----------------------------------------------
def test_no_micro_batch_leaves_a_rank_without_rows_or_kto_with_one(tmp_path):
    """25 completions, 2 ranks, 2 a rank: the short last global micro-batch is filled with the
    epoch's first rows again (as torch's DistributedSampler pads), so each rank's share holds
    2; the out-of-memory split joins a short last piece to the one before."""
    from snug.train.dist import Dist, share
    from snug.train.schedule import Schedule, split_window

    data = write_jsonl(tmp_path / "kto.jsonl", labelled(4))
    cfg = config_from_dict(run_config(tmp_path, "kto", data, train={"micro_batch": 2}))
    schedule = Schedule.build([10] * 25, cfg, world=2)
    seen = set()
    for window in schedule.windows(0):
        for mb in window:
            assert all(len(share(mb, Dist(2, r, r, "fsdp"))) == 2 for r in (0, 1)), mb
            seen |= {i for row in mb for i in row}
    assert seen == set(range(25))
    assert len(schedule.windows(0)) * 1 == schedule.steps_per_epoch
    rows = [[0], [1], [2]]
    assert split_window([rows], 2, least=2) == [rows]
    assert split_window([rows], 2) == [rows[:2], rows[2:]]


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_eval_every_scores_with_the_reference(stage, tmp_path):
    """train.eval_every evaluates with the stage's reference (it crashed on None before); kto's
    odd last evaluation micro-batch joins the one before (5 completions, 2 a micro-batch)."""
    rows = labelled(5) if stage == "kto" else pairs(5)
    data = write_jsonl(tmp_path / "train.jsonl", rows * 4)
    held = write_jsonl(tmp_path / "eval.jsonl", rows)
    raw = run_config(tmp_path, stage, data, train={"micro_batch": 2, "eval_every": 1})
    raw["data"]["eval"] = str(held)
    assert run_training(config_from_dict(raw))["status"] == "completed"
    logged = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len([r for r in logged if "eval_loss" in r]) == 2


def test_the_search_plans_kto_at_two_completions_or_more():
    """The search's micro-batches start at the stage's min_rows: kto's smallest is 2."""
    from test_plan import small_config

    from snug.config import load_config
    from snug.plan.hardware import cpu_device
    from snug.plan.search import _largest_fitting_micro_batch
    from snug.plan.timing import device_model

    cfg = load_config(None, ["train.stage=kto", "train.micro_batch=2", "train.grad_accum=2"])
    device = cpu_device(2**30)
    found = _largest_fitting_micro_batch(
        cfg, small_config(layers=2), device, 32, device_model(device, "fp32"), 4, 2
    )
    assert found.fits and found.cfg.train.micro_batch == 2, found.name
    assert found.cfg.train.grad_accum == 2
