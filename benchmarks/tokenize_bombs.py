"""Tokenizing records built to be slow or large (issue 33, points 7 and 8): one conversation of
3,000 turns (~320 KB) under data.cutoff_len 128, one alpaca record whose instruction is 30 MB,
and that text as one plain-text record (30 MB, and its first 9.5 MB); the seconds each takes
to tokenize, in a fresh datasets cache. And what showing tokenizing's progress costs.

Run:
  python benchmarks/tokenize_bombs.py make DIR   # writes DIR/{turns,long,text,text9}.{jsonl,yaml}
  /usr/bin/time -f "%e s, peak RSS %M KB" python benchmarks/tokenize_bombs.py tokenize DIR/turns.yaml
  (the same for long.yaml, text.yaml, text9.yaml)
  python benchmarks/tokenize_bombs.py progress data/corpus/corpus.jsonl pt

`tokenize` prints the seconds `build_datasets` took (the tokenizer loaded before the clock
starts) and the data counts; /usr/bin/time measures the whole process, imports included.
`progress` tokenizes a file 5 times as before (datasets' batches of 1,000 records, no progress)
and 5 times as now (batches of 100, progress told to a console that is not a terminal), each
in a fresh cache, alternating, and prints the median CPU seconds of this process (wall time on
a shared machine varied by 2x between runs).
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
    (folder / "text.jsonl").write_text(json.dumps({"text": instruction}) + "\n")
    (folder / "text9.jsonl").write_text(json.dumps({"text": instruction[:9_500_000]}) + "\n")
    for name in ("turns", "long", "text", "text9"):
        cfg = {
            "model": {"name_or_path": str(ROOT / "models/tiny")},
            "data": {"train": str(folder / f"{name}.jsonl"), "cutoff_len": 128},
            "train": {"stage": "pt" if name.startswith("text") else "sft"},
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


def progress(spec: str, stage: str) -> None:
    import io
    import statistics

    import datasets
    from rich.console import Console

    from snug.config import DataConfig, load_config
    from snug.data import dataset
    from snug.models.load import load_tokenizer

    tok = load_tokenizer(load_config(None, [f"model.name_or_path={ROOT / 'models/tiny'}"]).model)
    variants = {
        "batches of 1,000, no progress": (1000, False),
        "batches of 100, progress": (100, True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(5):
        for name, (batch, shown) in variants.items():
            datasets.config.HF_DATASETS_CACHE = Path(tempfile.mkdtemp(prefix="snug-bench-"))
            dataset.MAP_BATCH = batch
            console = Console(file=io.StringIO()) if shown else None
            started = time.process_time()
            dataset.build_datasets(DataConfig(train=spec), tok, stage, 0, "tiny", console)
            times[name].append(round(time.process_time() - started, 2))
    for name, seconds in times.items():
        print(f"{spec} ({stage}), {name}: median {statistics.median(seconds):.2f} CPU s {seconds}")


if __name__ == "__main__":
    if sys.argv[1] == "progress":
        progress(sys.argv[2], sys.argv[3])
    else:
        {"make": make, "tokenize": tokenize}[sys.argv[1]](Path(sys.argv[2]))
