"""Peak memory and tokens/s of snug's defaults against the tools people use, on this machine.

One script, one run: a Llama-architecture model with a 128,256-token vocabulary (Llama 3's) and
long sequences, the same LoRA (r 16, alpha 32, all linear layers, dropout 0.05), the same
tokenized samples and one epoch for every row:

- baseline: transformers `Trainer` + peft LoRA with Trainer's defaults (fp32 on CPU, no
  checkpointing, AdamW), micro-batch and accumulation as snug's;
- LLaMA-Factory through its own `run_exp` (what `llamafactory-cli train` calls) in its own
  environment, where it installs (`--llamafactory PYTHON`);
- snug with its defaults, then with each default technique switched off in turn, and with the
  opt-in ones switched on.

Each row runs in a fresh process. Peak memory is that process's peak RSS above its own idle RSS
(measured after imports, before the model or data exist); for snug rows also snug's tracked
tensor peak. tokens/s counts non-padding tokens of the epoch over the training loop's wall
time (no model loading, no tokenization). Ratios are to the baseline on the same dataset.

Run: python benchmarks/memory.py [--llamafactory /path/to/venv/bin/python] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB, HIDDEN, LAYERS, CUTOFF = 128_256, 256, 4, 2048
MICRO, ACCUM, N_FIXED, N_VARIABLE = 2, 2, 12, 24
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}

# (dataset, row name, snug overrides or None for a tool row)
ROWS = [
    ("fixed", "baseline: transformers Trainer + peft", "trainer"),
    ("fixed", "LLaMA-Factory (run_exp, its defaults)", "llamafactory"),
    ("fixed", "snug defaults", []),
    ("fixed", "snug, grad_checkpointing off", ["memory.grad_checkpointing=false"]),
    ("fixed", "snug, chunked_loss off", ["memory.chunked_loss=false"]),
    ("fixed", "snug + offload_activations", ["memory.offload_activations=true"]),
    ("fixed", "snug + adamw8bit", ["memory.optimizer=adamw8bit"]),
    ("variable", "baseline: transformers Trainer + peft", "trainer"),
    ("variable", "snug defaults", []),
    ("variable", "snug + group_by_length", ["data.group_by_length=true"]),
    ("variable", "snug + packing", ["data.packing=true"]),
    (
        "variable",
        "snug + packing + group_by_length",
        ["data.packing=true", "data.group_by_length=true"],
    ),
]


def rss_now() -> int:
    """Resident set size of this process, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------- set-up (parent process)


def make_model(work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = work / "model"
    tok = AutoTokenizer.from_pretrained(ROOT / "models/tiny")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4 * CUTOFF,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_data(work: Path) -> dict[str, Path]:
    """Alpaca records: repeat a passage of the bundled corpus. fixed: every sample is cut at
    CUTOFF tokens (half prompt, half answer); variable: 128 to CUTOFF tokens, uniformly."""
    docs = [json.loads(line)["text"] for line in (ROOT / "data/corpus/corpus.jsonl").open()]
    rng = random.Random(0)
    words_per_token = 0.8  # about, for the bundled tokenizer on this corpus

    def passage(tokens: int) -> str:
        words: list[str] = []
        while len(words) < tokens * words_per_token:
            words += rng.choice(docs).split()
        return " ".join(words[: int(tokens * words_per_token)])

    out = {}
    for name, n, lengths in (
        ("fixed", N_FIXED, lambda: CUTOFF),
        ("variable", N_VARIABLE, lambda: rng.randint(128, CUTOFF)),
    ):
        rows = []
        for _ in range(n):
            text = passage(lengths() // 2 + 8)
            rows.append({"instruction": "Repeat the passage.", "input": text, "output": text})
        out[name] = work / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def snug_config(model: Path, data: Path, out: Path, overrides: list[str]):
    from snug.config import load_config

    return load_config(
        None,
        [
            f"model.name_or_path={model}",
            "method.name=lora",
            *(f"method.{k}={v}" for k, v in LORA.items()),
            f"data.train={data}",
            f"data.cutoff_len={CUTOFF}",
            "train.epochs=1",
            f"train.micro_batch={MICRO}",
            f"train.grad_accum={ACCUM}",
            "train.lr=1e-4",
            "train.log_every=1",
            "train.eval_generate=0",
            "output.plot_loss=false",
            f"output.dir={out}",
            *overrides,
        ],
    )


# ---------------------------------------------------------------- rows (child processes)


def row_snug(args) -> dict:
    from rich.console import Console

    from snug.train.training import run_training

    cfg = snug_config(args.model, args.data, args.work / "snug-run", json.loads(args.overrides))
    idle = rss_now()
    s = run_training(cfg, Console(quiet=True))
    return {
        "peak_above_idle": peak_rss() - idle,
        "tracked_peak": s["peak_memory"].get("measured_bytes"),
        "seconds": s["train_seconds"],
    }


def _tokenized(model: Path, data: Path):
    """The very samples snug trains on (same template, masks and cutoff)."""
    from snug.data.dataset import build_datasets
    from snug.models.load import load_tokenizer

    cfg = snug_config(model, data, Path("unused"), [])
    tok = load_tokenizer(cfg.model)
    train, _, _ = build_datasets(cfg.data, tok, "sft", 0, str(model))
    return tok, train


def row_trainer(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok, train = _tokenized(args.model, args.data)
    idle = rss_now()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    targs = TrainingArguments(
        output_dir=str(args.work / "trainer-run"),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=1,
        learning_rate=1e-4,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
    )
    result = trainer.train()
    return {
        "peak_above_idle": peak_rss() - idle,
        "tracked_peak": None,
        "seconds": result.metrics["train_runtime"],
    }


def row_llamafactory(args) -> dict:
    """Runs under LLaMA-Factory's own Python: imports nothing of snug."""
    from llamafactory.train.tuner import run_exp

    data_dir = args.work / "lf-data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "dataset_info.json").write_text(
        json.dumps({"bench": {"file_name": str(args.data)}})
    )
    out = args.work / "lf-run"
    idle = rss_now()
    started = time.perf_counter()
    run_exp(
        {
            "model_name_or_path": str(args.model),
            "stage": "sft",
            "do_train": True,
            "finetuning_type": "lora",
            "lora_rank": LORA["r"],
            "lora_alpha": LORA["alpha"],
            "lora_dropout": LORA["dropout"],
            "lora_target": "all",
            "dataset": "bench",
            "dataset_dir": str(data_dir),
            "template": "qwen",  # ChatML, as the bundled tokenizer's template
            "cutoff_len": CUTOFF,
            "output_dir": str(out),
            "overwrite_output_dir": True,
            "per_device_train_batch_size": MICRO,
            "gradient_accumulation_steps": ACCUM,
            "num_train_epochs": 1,
            "learning_rate": 1e-4,
            "save_strategy": "no",
            "report_to": "none",
            "logging_steps": 1,
            "disable_tqdm": True,
            "preprocessing_num_workers": 1,
        }
    )
    wall = time.perf_counter() - started
    results = json.loads((out / "train_results.json").read_text())
    return {
        "peak_above_idle": peak_rss() - idle,
        "tracked_peak": None,
        "seconds": results.get("train_runtime", wall),
    }


# ---------------------------------------------------------------- driver


def run_row(kind: str, python: str, work: Path, model: Path, data: Path, overrides) -> dict:
    cmd = [
        python,
        __file__,
        "--row",
        kind,
        "--work",
        str(work),
        "--model",
        str(model),
        "--data",
        str(data),
        "--overrides",
        json.dumps(overrides or []),
    ]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[-300:]}
    return json.loads(lines[-1][4:])


def fmt_mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--llamafactory", help="python of an environment with llamafactory")
    parser.add_argument(
        "--out", type=Path, default=ROOT / f"benchmarks/results/memory-{datetime.date.today()}.md"
    )
    args = parser.parse_args()
    if args.row:  # a child: one row, one JSON line
        fn = {"snug": row_snug, "trainer": row_trainer, "llamafactory": row_llamafactory}
        print("ROW " + json.dumps(fn[args.row](args)), flush=True)
        return

    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work)
        data = make_data(work)
        tokens = {}
        for name, path in data.items():
            _, train = _tokenized(model, path)
            tokens[name] = sum(len(x) for x in train["input_ids"])
        results: dict[tuple[str, str], dict] = {}
        for dataset, name, spec in ROWS:
            if spec == "llamafactory" and not args.llamafactory:
                results[dataset, name] = {"error": "not run: no --llamafactory environment"}
                continue
            kind = spec if isinstance(spec, str) else "snug"
            python = args.llamafactory if kind == "llamafactory" else sys.executable
            r = run_row(kind, python, work, model, data[dataset], spec if kind == "snug" else [])
            if "seconds" in r:
                r["tokens_per_second"] = tokens[dataset] / r["seconds"]
            results[dataset, name] = r
            print(dataset, name, json.dumps(r), flush=True)

    lines = [
        f"# Memory and speed against the field — {datetime.date.today()}",
        "",
        "Command: `python benchmarks/memory.py"
        + (" --llamafactory PYTHON" if args.llamafactory else "")
        + f"` on {platform.machine()}, {os.cpu_count()} CPU cores, fp32, no GPU; "
        f"whole script {time.perf_counter() - started:,.0f} s.",
        "",
        f"Model: Llama architecture, vocabulary {VOCAB:,}, hidden {HIDDEN}, {LAYERS} layers, "
        f"untied head, random weights (tokens come from the bundled tokenizer, so ids above 763 "
        f"never occur, but the head and softmax run over all {VOCAB:,} rows). LoRA r "
        f"{LORA['r']}, alpha {LORA['alpha']}, dropout {LORA['dropout']}, all linear layers; "
        f"micro-batch {MICRO}, accumulation {ACCUM}, one epoch, cutoff {CUTOFF}. "
        f"Data: 'repeat the passage' records from the bundled corpus: *fixed*, {N_FIXED} samples "
        f"of exactly {CUTOFF} tokens ({tokens['fixed']:,} tokens); *variable*, {N_VARIABLE} "
        f"samples of 128-{CUTOFF} tokens ({tokens['variable']:,} tokens). About half of each "
        "sample is prompt, which carries no loss.",
        "",
        "Peak = the row's process peak RSS above its idle RSS (after imports); tracked = snug's "
        "peak of live tensor storage. tokens/s = non-padding tokens of the epoch / training "
        "loop wall time. Ratios are to the baseline row of the same dataset.",
        "",
        "| data | row | peak MiB | tracked MiB | peak ratio | tokens/s | speed ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, name, _ in ROWS:
        r = results[dataset, name]
        base = results[dataset, "baseline: transformers Trainer + peft"]
        if "error" in r:
            lines.append(f"| {dataset} | {name} | — | — | — | — | — ({r['error']}) |")
            continue
        peak_ratio = r["peak_above_idle"] / base["peak_above_idle"] if "error" not in base else None
        speed_ratio = (
            r["tokens_per_second"] / base["tokens_per_second"] if "error" not in base else None
        )
        lines.append(
            f"| {dataset} | {name} | {fmt_mib(r['peak_above_idle'])} | "
            f"{fmt_mib(r['tracked_peak'])} | "
            f"{'—' if peak_ratio is None else f'{peak_ratio:.2f}x'} | "
            f"{r['tokens_per_second']:,.0f} | "
            f"{'—' if speed_ratio is None else f'{speed_ratio:.2f}x'} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
