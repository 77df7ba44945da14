"""snug's DPO against TRL's DPOTrainer + peft on this CPU, and full-parameter DPO with the
reference as a frozen copy against precomputed log-probs.

The same random-weight model (Qwen2.5-0.5B's catalog config with its 151,936-token vocabulary,
shrunk to 2 layers of width 256 so that it runs here), the same pairs (a prompt of about 900
tokens of the bundled corpus, chosen and rejected answers of about 150: over 1,024 tokens a
pair), the same steps, batch, learning rate, beta and LoRA (r 16, alpha 32, dropout 0.05, every
linear layer), gradient checkpointing on both sides (snug's default; set on TRL's). Each run is
a fresh process; measured:
- peak memory: the process's peak resident set (ru_maxrss) minus its resident set once the
  libraries are imported, before the model and data are made ("RSS above idle");
- pairs/s: pairs trained over the training loop's seconds (snug: summary.json's
  train_seconds; TRL: train() metrics' train_runtime), all steps included.

Run: python benchmarks/preference.py [--steps 8] [--batch 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "snug/models/catalog/models/Qwen__Qwen2.5-0.5B.json"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
BETA, LR = 0.1, 1e-5
PROMPT_TOKENS, ANSWER_TOKENS = 900, 150


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build(work: Path, pairs: int) -> tuple[Path, Path]:
    """The model directory and the pairs file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models/tiny")
    raw = json.loads(CATALOG.read_text())
    raw.update(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    raw.pop("head_dim", None)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    assert config.vocab_size >= 100_000
    torch.manual_seed(0)
    model_dir = work / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    docs = [json.loads(x)["text"] for x in (ROOT / "data/corpus/corpus.jsonl").open()]

    def text(start: int, tokens: int) -> tuple[str, int]:
        out, n, i = [], 0, start
        while n < tokens:
            out.append(docs[i % len(docs)])
            n += len(tok(docs[i % len(docs)])["input_ids"]) + 1
            i += 1
        return " ".join(out), i

    rows, at = [], 0
    for _ in range(pairs):
        prompt, at = text(at, PROMPT_TOKENS)
        chosen, at = text(at, ANSWER_TOKENS)
        rejected, at = text(at, ANSWER_TOKENS)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def run_snug(spec: dict) -> dict:
    from rich.console import Console

    from snug.config import config_from_dict
    from snug.train.training import run_training

    idle = rss()
    method = {"name": "lora", **LORA, "targets": "all-linear"}
    if spec["method"] == "full":
        method = {"name": "full"}
    raw = {
        "model": {"name_or_path": spec["model"]},
        "method": method,
        "data": {"train": spec["data"], "cutoff_len": spec["cutoff"]},
        "train": {
            "stage": "dpo",
            "micro_batch": spec["batch"],
            "grad_accum": 1,
            "max_steps": spec["steps"],
            "lr": LR,
            "warmup": 0,
            "eval_generate": 0,
            "log_every": 1,
        },
        "pref": {"beta": BETA, "reference": spec["reference"]},
        "output": {"dir": spec["out"], "plot_loss": False},
    }
    summary = run_training(config_from_dict(raw), console=Console(quiet=True))
    return {
        "peak_above_idle": peak_rss() - idle,
        "pairs_per_s": spec["steps"] * spec["batch"] / summary["train_seconds"],
        "train_seconds": summary["train_seconds"],
        "loss_last": summary.get("train_loss_last"),
    }


def run_trl(spec: dict) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    idle = rss()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    data = load_dataset("json", data_files=spec["data"], split="train")
    args = DPOConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=LR,
        warmup_steps=0,
        beta=BETA,
        max_length=spec["cutoff"],
        gradient_checkpointing=True,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    peft = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft
    )
    metrics = trainer.train().metrics
    return {
        "peak_above_idle": peak_rss() - idle,
        "pairs_per_s": spec["steps"] * spec["batch"] / metrics["train_runtime"],
        "train_seconds": metrics["train_runtime"],
        "loss_last": metrics.get("train_loss"),
    }


def one(side: str, spec: dict) -> dict:
    """A side in a fresh process; its result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--one", side, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr or proc.stdout).strip()[-800:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        side, spec = args.one[0], json.loads(args.one[1])
        result = {"snug": run_snug, "trl": run_trl}[side](spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = build(work, args.steps * args.batch)
        base = {
            "model": str(model),
            "data": str(data),
            "batch": args.batch,
            "steps": args.steps,
            "cutoff": PROMPT_TOKENS + ANSWER_TOKENS + 200,
        }
        runs = {
            "TRL DPOTrainer + peft LoRA": ("trl", {"method": "lora", "reference": "auto"}),
            "snug dpo, LoRA (reference: adapter off)": ("snug", {"method": "lora", "reference": "auto"}),
            "snug dpo, full, reference copy": ("snug", {"method": "full", "reference": "copy"}),
            "snug dpo, full, reference precompute": ("snug", {"method": "full", "reference": "precompute"}),
        }  # fmt: skip
        results = {}
        for i, (name, (side, extra)) in enumerate(runs.items()):
            results[name] = one(side, {**base, **extra, "out": str(work / f"run{i}")})
            print(name, json.dumps(results[name]), flush=True)
    lines = report(results, args, time.perf_counter() - started)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


def report(results: dict, args, seconds: float) -> list[str]:
    import torch
    import transformers
    import trl

    cpu = next(
        (x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
         if x.startswith("model name")), platform.processor(),
    )  # fmt: skip
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text()
    lines = [
        f"# snug DPO against TRL's DPOTrainer ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/preference.py --steps {args.steps} --batch {args.batch}`; "
        f"{seconds:.0f} s. CPU: {cpu}, {os.cpu_count()} cores, "
        f"{'with' if avx512 else 'without'} AVX-512. torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}.",
        "",
        "Model: Qwen2.5-0.5B's config (vocabulary 151,936) shrunk to 2 layers of width 256, "
        f"random weights, fp32. {args.steps * args.batch} pairs of {PROMPT_TOKENS}+ prompt and "
        f"{ANSWER_TOKENS}+ answer tokens; batch {args.batch}, {args.steps} steps, beta {BETA}, "
        f"lr {LR}, LoRA r {LORA['r']} alpha {LORA['alpha']} dropout {LORA['dropout']} on every "
        "linear layer, gradient checkpointing.",
        "",
        "| run | peak RSS above idle (MiB) | pairs/s | train s |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][-300:]} | | |")
            continue
        mib = r["peak_above_idle"] / 2**20
        lines.append(f"| {name} | {mib:,.0f} | {r['pairs_per_s']:.3f} | {r['train_seconds']:.1f} |")
    trl_r = results.get("TRL DPOTrainer + peft LoRA", {})
    ours = results.get("snug dpo, LoRA (reference: adapter off)", {})
    if "error" not in trl_r and "error" not in ours and trl_r and ours:
        lines += [
            "",
            f"snug / TRL: peak {ours['peak_above_idle'] / trl_r['peak_above_idle']:.2f}x "
            f"(target at most 0.5x), speed {ours['pairs_per_s'] / trl_r['pairs_per_s']:.2f}x "
            "(target at least 1.2x).",
        ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
