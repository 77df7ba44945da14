"""Tokenizing records built to be slow or large (issue 33, points 7 and 8): one conversation of
3,000 turns (~320 KB) under data.cutoff_len 128, and one alpaca record whose instruction is
30 MB; the seconds each takes to tokenize, in a fresh datasets cache.

Run:
  python benchmarks/tokenize_bombs.py make DIR          # writes DIR/turns.yaml, DIR/long.yaml, ...
  /usr/bin/time -f "%e s, peak RSS %M KB" python benchmarks/tokenize_bombs.py tokenize DIR/turns.yaml
  /usr/bin/time -f "%e s, peak RSS %M KB" python benchmarks/tokenize_bombs.py tokenize DIR/long.yaml

`tokenize` prints the seconds `build_datasets` took (the tokenizer loaded before the clock
starts) and the data counts; /usr/bin/time measures the whole process, imports included.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over a lazy dog while seven red birds sing".split()


def sentence(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


def make(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}: " + sentence(i, 14)}
        for i in range(3000)
    ]
    (folder / "turns.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    instruction = sentence(0, 6_000_000)[: 30 * 10**6]  # 30 MB of words
    (folder / "long.jsonl").write_text(
        json.dumps({"instruction": instruction, "output": "ok"}) + "\n"
    )
    for name in ("turns", "long"):
        cfg = {
            "model": {"name_or_path": str(ROOT / "models/tiny")},
            "data": {"train": str(folder / f"{name}.jsonl"), "cutoff_len": 128},
            "output": {"dir": str(folder / f"run-{name}")},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    sizes = {p.name: p.stat().st_size for p in sorted(folder.glob("*.jsonl"))}
    print(f"wrote {folder}: {sizes}")


def tokenize(config: Path) -> None:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="snug-bench-cache-")
    from snug.config import load_config
    from snug.data.dataset import build_datasets
    from snug.models.load import load_tokenizer

    cfg = load_config(config)
    tok = load_tokenizer(cfg.model)
    started = time.perf_counter()
    train, _, stats = build_datasets(cfg.data, tok, cfg.train.stage, 0, cfg.model.name_or_path)
    seconds = time.perf_counter() - started
    counts = {k: v for k, v in stats.as_dict().items() if k != "problems"}
    lengths = [len(ids) for ids in train["input_ids"]]
    print(f"{config.name}: tokenized in {seconds:.2f} s; {counts}; sample lengths {lengths}")


if __name__ == "__main__":
    {"make": make, "tokenize": tokenize}[sys.argv[1]](Path(sys.argv[2]))
