"""`snug plan` against the peak RSS of real runs measured two ways: the way
benchmarks/plan_accuracy.py controls it, and the way a user measures it (issue 36).

Rows: shapes plan_accuracy.py's main table does not have, each a small CPU model (2 decoder
layers of width 256, fp32, LoRA on every linear layer): Phi-3's (Phi3ForCausalLM: fused
qkv_proj and gate_up_proj, 32,064-token vocabulary), Gemma's (tied embeddings, 256,000-token
vocabulary, the embedding scaled by sqrt(hidden), GeGLU) and Qwen2's with its 151,936-token
vocabulary trained with dpo (answers of about 1,000 tokens, micro-batch 2 pairs, the reference
the base with the adapter off). Each run, and the same run on a near-empty model (1 layer,
hidden 48, same vocabulary, data and settings), is measured:

- controlled, as plan_accuracy.py's independent column: the checkpoint saved in bf16 (loading
  converts every weight into memory of its own), glibc's mmap threshold fixed at 64 KiB (freed
  blocks leave RSS), the peak-RSS mark reset as training starts;
- as users see it: the checkpoint saved in fp32 (safetensors maps it, and only the pages a run
  reads count: the embedding rows of the tokens it meets), glibc's default allocator (whose heap
  keeps freed blocks), the whole process's peak (what `/usr/bin/time -f %M` reports).

Each against the same difference of two plans (`snug plan --device cpu`'s replay at the data's
longest sample, as the command plans it). Run on its own: python benchmarks/plan_accuracy.py
--rss-only [--out FILE]; plan_accuracy.py's full run appends these rows to its report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
NEAR_EMPTY = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1}
# (row, family, vocabulary, tied, config extras, stage, tokens: per text sample, per dpo answer)
ROWS = [
    ("phi3 LoRA", "phi3", 32_064, False, {"num_key_value_heads": 4}, "pt", 1024),
    ("gemma LoRA", "gemma", 256_000, True, {"num_key_value_heads": 1}, "pt", 512),
    ("qwen2 dpo LoRA", "qwen2", 151_936, False, {"num_key_value_heads": 2}, "dpo", 1000),
]
WAYS = {  # how the checkpoint is saved, the child's environment
    "controlled": ("bfloat16", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
    "user": ("float32", {"SNUG_BENCH_WHOLE_RUN": "1"}),
}


def make_model(work: Path, family, vocab, tied, extra, size, dtype) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = work / f"{family}-{size['hidden_size']}-{dtype}"
    tok = AutoTokenizer.from_pretrained(ROOT / "models/tiny")
    config = AutoConfig.for_model(
        family,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        num_attention_heads=4,
        head_dim=size["hidden_size"] // 4,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **size,
        **extra,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_pairs(work: Path, answer_tokens: int, rows: int = 4) -> Path:
    """Pairs of a prompt of about 40 tokens of the bundled corpus and two answers of about
    `answer_tokens`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models/tiny")
    docs = [json.loads(x)["text"] for x in (ROOT / "data/corpus/corpus.jsonl").open()]
    at = 0

    def text(tokens: int) -> str:
        nonlocal at
        out, n = [], 0
        while n < tokens:
            out.append(docs[at % len(docs)])
            n += len(tok(out[-1])["input_ids"]) + 1
            at += 1
        return " ".join(out)

    pairs = [
        {"prompt": text(40), "chosen": text(answer_tokens), "rejected": text(answer_tokens)}
        for _ in range(rows)
    ]
    path = work / f"pairs-{answer_tokens}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return path


def row_keys(model: Path, data: Path, stage: str, tokens: int, out: Path) -> list[str]:
    from plan_accuracy import overrides

    if stage == "pt":
        return overrides(model, data, "lora", False, tokens, out, steps=2)
    return [
        f"model.name_or_path={model}",
        "method.name=lora",
        "train.stage=dpo",
        f"data.train={data}",
        f"data.cutoff_len={2 * tokens + 200}",
        "train.micro_batch=2",
        "train.grad_accum=1",
        "train.max_steps=2",
        "train.log_every=1",
        "train.eval_generate=0",
        "output.plot_loss=false",
        f"output.dir={out}",
    ]


def planned(keys: list[str]) -> int:
    """`snug plan --device cpu`'s peak for these keys, at the data's longest sample."""
    from snug.config import load_config
    from snug.plan.hardware import model_config
    from snug.plan.report import sequence_length
    from snug.plan.simulate import simulate

    cfg = load_config(None, keys)
    seq, _ = sequence_length(argparse.Namespace(seq_len=None), cfg, True)
    return simulate(cfg, model_config(cfg.model.name_or_path), seq, "cpu", "fp32").peak_bytes


def rss_rows(work: Path, log=print) -> tuple[list[str], list[dict]]:
    """The table's lines and each row's numbers."""
    from plan_accuracy import make_text, real_run

    lines, results = [], []
    for name, family, vocab, tied, extra, stage, tokens in ROWS:
        data = make_text(work, tokens) if stage == "pt" else make_pairs(work, tokens)
        result = {"row": name}
        for way, (dtype, env) in WAYS.items():
            got = {}
            for kind, size in (("real", SIZE), ("empty", NEAR_EMPTY)):
                model = make_model(work, family, vocab, tied, extra, size, dtype)
                keys = row_keys(model, data, stage, tokens, work / f"{family}-{way}-{kind}")
                got[kind] = {"plan": planned(keys), **real_run(keys, env)}
            plan_above = got["real"]["plan"] - got["empty"]["plan"]
            rss_above = got["real"]["peak_rss_bytes"] - got["empty"]["peak_rss_bytes"]
            tracked_above = got["real"]["tracked_bytes"] - got["empty"]["tracked_bytes"]
            result[way] = {
                "plan_above": plan_above,
                "rss_above": rss_above,
                "tracked_above": tracked_above,
                "runs": got,
            }
            log(f"{name} ({way}): plan above {plan_above / 2**20:,.1f} MiB, RSS above "
                f"{rss_above / 2**20:,.1f} MiB, tracked above {tracked_above / 2**20:,.1f} MiB")  # fmt: skip
        results.append(result)
        cells = []
        for way in WAYS:
            r = result[way]
            error = (r["plan_above"] - r["rss_above"]) / r["rss_above"]
            cells += [
                f"{r['plan_above'] / 2**20:,.1f}",
                f"{r['rss_above'] / 2**20:,.1f}",
                f"{100 * error:+.1f}%",
            ]
        tracked = result["controlled"]["tracked_above"]
        plan = result["controlled"]["plan_above"]
        lines.append(
            f"| {name} | {tokens} | {tracked / 2**20:,.1f} | {100 * (plan - tracked) / tracked:+.1f}% | "
            + " | ".join(cells)
            + " |"
        )
    header = [
        "| row | tokens | tracked above MiB | plan vs tracked | planned above MiB (controlled) | "
        "RSS above MiB (controlled) | error (controlled) | planned above MiB (user) | "
        "RSS above MiB (user) | error (user) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return header + lines, results


def rss_section(work: Path) -> list[str]:
    """The report's section: what the rows are, their table, what the two ways differ by."""
    table, _ = rss_rows(work)
    return [
        "## Against RSS, controlled and as users measure it",
        "",
        "Small models of shapes plan_accuracy.py's main table lacks (benchmarks/plan_rss.py: 2 layers of "
        "width 256, fp32, LoRA; phi3 at 2 x 1,024 tokens, gemma (tied, 256,000-token "
        "vocabulary) at 2 x 512, qwen2 (151,936) dpo with 2 pairs of a 40-token prompt and "
        "two answers of about 1,000 tokens, reference adapter-off), each minus the same run on "
        "a near-empty model, against the same difference of two plans. Controlled: checkpoint "
        "saved in bf16, glibc mmap threshold 64 KiB, peak reset as training starts. User: "
        "checkpoint saved in fp32 (mapped from its file: only the pages a run reads count), "
        "glibc's default allocator, the whole process's peak. Error = (planned - RSS) / RSS.",
        "",
        *table,
    ]


def rss_report(out: Path, started: float) -> None:
    import datetime
    import os
    import platform
    import subprocess
    import tempfile
    import time

    flags = subprocess.run(
        "lscpu | grep -o 'avx512[a-z_0-9]*' | head -3", shell=True, capture_output=True, text=True
    ).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        section = rss_section(Path(tmp))
    lines = [
        f"# Plan against RSS — {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/plan_accuracy.py --rss-only` on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, {', '.join(flags) if flags else 'no AVX-512'}; "
        f"{time.perf_counter() - started:,.0f} s.",
        "",
        *section[2:],
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
