"""`snug serve` under load (issue 37, point 5): N concurrent clients (the official `openai`
package, one thread each) send chat requests for the bundled base and two LoRA adapters, mixed,
for a bounded time each, against one `snug serve` process on a loopback port.

Run:
  python benchmarks/serve.py [SECONDS] [OUT.md]      # defaults: 20, print only

First every (model, prompt) pair is asked alone, one request at a time: those greedy answers are
the reference. Then for N in 1, 4, 16 clients, each client loops over its share of the pairs
(client i starts at pair i, so every batch mixes models) until SECONDS pass, and the script
prints requests/s, completion tokens/s, p50/p95 latency, errors, and how many answers equal
their single-request answer. The target: tokens/s at 16 clients >= 4x tokens/s at 1 client
(one at a time). The adapters are LoRA r=8 on q/k/v/o/up/down with random weights (peft's
init_lora_weights=False, fixed seeds): they answer differently from the base and each other.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models/tiny"
MODELS = ("base", "a", "b")
CLIENTS = (1, 4, 16)
MAX_TOKENS = 32


def make_adapters(folder: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    found = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(BASE)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder / name)
        found[name] = folder / name
    return found


def start_server(adapters: dict[str, Path], log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "snug.cli", "serve", "--model", str(BASE), "--port", "0"]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while "ready on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"snug serve did not start:\n{log.read_text()}")
        time.sleep(0.2)
    line = next(x for x in log.read_text().splitlines() if "ready on" in x)
    return proc, line.split("ready on ")[1].split()[0]


def prompts() -> list[str]:
    rows = (ROOT / "data/instruct/heldout.jsonl").read_text().splitlines()[:8]
    return [json.loads(r)["instruction"] for r in rows]


def ask(client, model: str, prompt: str) -> tuple[str, int]:
    got = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    return got.choices[0].message.content, got.usage.completion_tokens


def health(url: str) -> dict:
    """The server's own counts (GET /health): batches run and the requests they held."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        return json.loads(r.read())


def load(url: str, pairs, reference, clients: int, seconds: float) -> dict:
    import openai

    lock = threading.Lock()
    latencies, tokens, errors, equal = [], [0], [0], [0]
    stop_at = time.monotonic() + seconds

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        k = i
        while time.monotonic() < stop_at:
            model, prompt = pairs[k % len(pairs)]
            k += clients
            started = time.monotonic()
            try:
                text, n = ask(client, model, prompt)
            except Exception as e:  # noqa: BLE001 (counted: the target is zero)
                with lock:
                    errors[0] += 1
                print(f"error: {e.__class__.__name__}: {e}", file=sys.stderr)
                continue
            with lock:
                latencies.append(time.monotonic() - started)
                tokens[0] += n
                equal[0] += text == reference[(model, prompt)]

    before = health(url)
    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started  # the last requests end after `seconds`
    after = health(url)
    batches = after["batches"] - before["batches"]
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": q[18],
        "mean_batch": (after["rows"] - before["rows"]) / max(batches, 1),
        "errors": errors[0],
        "equal": equal[0],
    }


def main(seconds: float = 20.0, out: str | None = None) -> None:
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp))
        proc, url = start_server(adapters, Path(tmp) / "serve.log")
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            pairs = [(m, p) for p in prompts() for m in MODELS]
            reference = {pair: ask(client, *pair)[0] for pair in pairs}  # alone, one at a time
            rows = [load(url, pairs, reference, n, seconds) for n in CLIENTS]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ratio = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    cpu = platform.processor() or platform.machine()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "with AVX-512" if "avx512f" in flags else "without AVX-512"
    lines = [
        f"# snug serve under load ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python benchmarks/serve.py {seconds:g}` on {os.cpu_count()} CPU cores ({cpu}, {kind}); "
        f"the bundled base (models/tiny) and two random LoRA adapters, {len(pairs)} (model, "
        f"prompt) pairs mixed, greedy, max_tokens {MAX_TOKENS}, {seconds:g} s per row.",
        "",
        "| clients | requests | req/s | tokens/s | p50 s | p95 s | mean batch | errors | equal to alone |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['mean_batch']:.1f} | "
            f"{r['errors']} | "
            f"{r['equal']}/{r['requests']} |"
        )
    lines += [
        "",
        f"tokens/s at {CLIENTS[-1]} clients / at 1 client (one at a time): **{ratio:.2f}x** "
        "(target >= 4x)",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if out:
        Path(out).write_text(report)


if __name__ == "__main__":
    main(
        float(sys.argv[1]) if len(sys.argv) > 1 else 20.0,
        sys.argv[2] if len(sys.argv) > 2 else None,
    )
