"""How fast `snug train` reports a config or path error, against importing torch and
transformers (what every error cost before snug checked them first); and what a process that
imported snug's training path spends ending: Python's own exit against snug's `exit_now`
(snug/runtime/shutdown.py), which the `snug` command ends with.

Run: python benchmarks/startup.py  (each command 3 times in a fresh process; median seconds)
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def seconds(cmd: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name_or_path": "no/such/model/dir"}}))
    typo = tmp / "t.yaml"
    typo.write_text("train:\n  lr_rate: 1.0e-4\n")
    data = tmp / "d.yaml"
    data.write_text(
        yaml.safe_dump(
            {"model": {"name_or_path": str(ROOT / "models/tiny")}, "data": {"train": "x.jsonl"}}
        )
    )
    snug = [sys.executable, "-m", "snug.cli", "train"]
    baseline = seconds([sys.executable, "-c", "import torch, transformers, datasets, peft"])
    print(
        f"import torch, transformers, datasets, peft: {baseline:.2f} s (what an error cost before)"
    )
    for name, cmd in (
        ("missing config file", [*snug, str(tmp / "missing.yaml")]),
        ("unknown key", [*snug, str(typo)]),
        ("missing model directory", [*snug, str(cfg)]),
        ("missing data file", [*snug, str(data)]),
    ):
        t = seconds(cmd)
        print(f"snug train, {name}: {t:.2f} s ({t / baseline:.2f} x the imports)")
    imports = "import snug.cli, snug.train.training"
    plain = exit_seconds(f"{imports}\nprint(time.time(), flush=True)")
    fast = exit_seconds(
        f"{imports}\nfrom snug.runtime.shutdown import exit_now\nprint(time.time(), flush=True)\n"
        "exit_now(0)"
    )
    print(
        f"after {imports}: ending through Python's exit {plain:.2f} s, through exit_now "
        f"{fast:.2f} s"
    )


def exit_seconds(code: str, runs: int = 3) -> float:
    """Median seconds from the moment `code` (which prints time.time() last) printed to the
    end of its process."""
    times = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", f"import time\n{code}"], capture_output=True, text=True
        )
        ended = time.time()
        times.append(ended - float(done.stdout.split()[-1]))
    return statistics.median(times)


if __name__ == "__main__":
    main()
