"""Speed of preparation (issue 35, point 7): 50,000 alpaca records in a JSON array (as
LLaMA-Factory's .json files), tokenized by `build_datasets` at the default data.num_proc and at
data.num_proc 1 (the baseline, in this script), each in a fresh datasets cache, alternating;
then once more at the default in the same cache (what a second run or a resume costs).

Run:
  python benchmarks/prepare_speed.py [RECORDS] [REPEATS]     # defaults: 50000 3

Prints the median wall seconds of each setting, their ratio (target: default / 1 <= 0.5), the
processes the default chose, and the seconds spent reading the file into records (the same in
both settings: done in this process before tokenizing). The tokenizer (models/tiny) is loaded
before the clock starts.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
from transformers import AutoTokenizer

from snug.config import DataConfig
from snug.data.dataset import build_datasets
from snug.data.parallel import processes
from snug.data.sources import load_raw

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def write_records(path: Path, n: int) -> None:
    """n alpaca records of ~40-word instructions and ~120-word answers."""

    def text(i: int, words: int) -> str:
        return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))

    rows = [{"instruction": text(i, 40), "input": "", "output": text(i + 1, 120)} for i in range(n)]
    path.write_text(json.dumps(rows))


def timed(data: Path, tok, num_proc: int | None, cache: str) -> tuple[float, float, float]:
    """Wall seconds of build_datasets, and the CPU seconds of this process and of the worker
    processes it waited for."""
    datasets.config.HF_DATASETS_CACHE = cache
    cfg = DataConfig(train=str(data), template="chatml", cutoff_len=1024, num_proc=num_proc)
    before, started = os.times(), time.perf_counter()
    train, _, _ = build_datasets(cfg, tok, "sft", 0, "tiny")
    took, after = time.perf_counter() - started, os.times()
    assert len(train) > 0
    own = after.user - before.user + after.system - before.system
    workers = (
        after.children_user - before.children_user + after.children_system - before.children_system
    )
    return took, own, workers


def main() -> None:
    records = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tok = AutoTokenizer.from_pretrained(ROOT / "models/tiny")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca.json"
        write_records(data, records)
        started = time.perf_counter()
        load_raw(str(data), "train")
        reading = time.perf_counter() - started
        runs: dict[str, list[tuple[float, float, float]]] = {"1": [], "default": []}
        load = os.getloadavg()[0]
        for r in range(repeats):
            for name, n in (("1", 1), ("default", None)):
                runs[name].append(timed(data, tok, n, os.path.join(tmp, f"cache-{name}-{r}")))
        load = max(load, os.getloadavg()[0])
        again = timed(data, tok, None, os.path.join(tmp, f"cache-default-{repeats - 1}"))[0]
    procs = processes(None, records)
    median = {
        k: [statistics.median(run[i] for run in v) for i in range(3)] for k, v in runs.items()
    }
    one, default = median["1"][0], median["default"][0]
    print(f"{records:,} records, {repeats} runs each, medians; load average up to {load:.1f}")
    print(f"  {os.cpu_count()} cores; the default: {procs} processes")
    for name in ("1", "default"):
        wall, own, workers = median[name]
        walls = [round(run[0], 2) for run in runs[name]]
        print(
            f"  data.num_proc {name:>7}: {wall:6.2f} s wall {walls}, CPU s: this process "
            f"{own:.2f}, workers {workers:.2f}"
        )
    print(f"  ratio default / 1 (wall): {default / one:.2f}  (target <= 0.5)")
    # On idle cores the wall time is the CPU time of this process and of one worker (the
    # shards are of equal records): what the ratio would be with a core free for each.
    own1 = median["1"][1]
    own, workers = median["default"][1:]
    print(
        f"  ratio on idle cores (CPU: this process + workers / {procs}): "
        f"{(own + workers / procs) / own1:.2f}"
    )
    print(f"  reading the file into records (in both): {reading:.2f} s")
    print(f"  again, from the cache: {again:.2f} s")


if __name__ == "__main__":
    main()
