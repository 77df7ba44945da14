"""`snug plan` against GPU peak memory that others measured and published.

Each row of benchmarks/published_rows.yaml is one published measurement (LitGPT's resource and
config-hub tables, the Qwen README's profiling table, ms-swift's benchmark document): the
number, its unit and the counter it reports, the card, the tokens per sample at the peak, and
the snug overrides that express the run. The plan's number is taken in the same counter:

- max_memory_allocated: the replay's peak of live tensors (`peak_bytes`);
- max_memory_reserved: that plus the planner's allocator term (`allocator`: what its replay of
  the caching allocator reserves beyond the peak);
- nvidia-smi: that plus the CUDA context, i.e. the plan's `reserved_bytes`.

A source that does not say which counter it used names the one it most likely used
(`compare_as`). Rows whose config snug refuses, or whose replay fails, are listed with the
reason and left out of the statistics. Every row over 20% carries a written explanation in the
data file; one without is flagged. A row may name what-ifs (`what_if`) that test its
explanation: an extra override, or `bitsandbytes<0.43.2` (the 4-bit matmul keeps its input, as
bitsandbytes did then); they are reported beside the row, never in the statistics.

Run: python benchmarks/published.py [--only SUBSTRING] [--out benchmarks/results/published-DATE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "benchmarks" / "published_rows.yaml"
UNITS = {"GB": 10**9, "GiB": 2**30}
EXPLAIN_ABOVE = 0.20  # rows whose |error| exceeds this need a written explanation


def flatten(items: list) -> list[str]:
    """Overrides as written (YAML anchors nest lists); later ones win, as on the command line."""
    out: list[str] = []
    for item in items:
        out.extend(flatten(item) if isinstance(item, list) else [str(item)])
    return out


def counter_of(row: dict, source: dict) -> str:
    counter = source["counter"]
    return source["compare_as"] if counter == "unstated" else counter


OLD_BNB = "bitsandbytes<0.43.2"


@contextlib.contextmanager
def bitsandbytes_keeps_4bit_input():
    """bitsandbytes before 0.43.2 kept each 4-bit matmul's input for its backward
    (`ctx.tensors = (A, B)` in MatMul4Bit.forward; PR #1270, commit 9e753741, made it
    `(None, B)`). The replay's stand-in follows bitsandbytes 0.50; this what-if keeps the input
    on the autograd node as the old version did."""
    from snug.plan import standins

    forward = standins._FourBitMatmul.forward

    def keeping(ctx, x, weight, layer):
        ctx.kept_input = x
        return forward(ctx, x, weight, layer)

    standins._FourBitMatmul.forward = staticmethod(keeping)
    try:
        yield
    finally:
        standins._FourBitMatmul.forward = staticmethod(forward)


def plan_row(row: dict, source: dict, extra: tuple[str, ...] = ()) -> dict:
    """The plan of one row in the row's counter, or why there is none."""
    from snug.config import ConfigError, load_config
    from snug.plan.hardware import find_gpu, model_config
    from snug.plan.search import plan_one

    model = row["model"]
    if model.endswith(".json"):
        model = str(ROOT / model)
    started = time.perf_counter()
    try:
        cfg = load_config(None, [f"model.name_or_path={model}", *flatten(row["overrides"]), *extra])
    except ConfigError as e:
        return {"status": f"config refused: {e}"}
    config = model_config(model)
    for key, value in (row.get("model_config") or {}).items():
        setattr(config, key, value)
    device = find_gpu(row["card"], cfg.dist.processes)
    cand = plan_one(cfg, config, device, row["tokens"])
    if cand.error:
        return {"status": f"planner error: {cand.error}"}
    counter = counter_of(row, source)
    terms = {k: v["bytes"] for k, v in cand.reserved_terms.items()}
    predicted = {
        "max_memory_allocated": cand.peak_bytes,
        "max_memory_reserved": cand.peak_bytes + terms["allocator"],
        "nvidia-smi": cand.reserved_bytes,
    }[counter]
    published = row["published"] * UNITS[row["unit"]]
    return {
        "status": "planned",
        "predicted": predicted,
        "published": published,
        "error": (predicted - published) / published,
        "label": cand.name,
        "breakdown": {k: v for k, v in cand.sim.breakdown.items() if v},
        "seconds": time.perf_counter() - started,
    }


def what_ifs(row: dict, source: dict) -> list[tuple[str, dict]]:
    out = []
    for name in row.get("what_if") or []:
        if name == OLD_BNB:
            with bitsandbytes_keeps_4bit_input():
                out.append((name, plan_row(row, source)))
        else:
            out.append((name, plan_row(row, source, (name,))))
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table_line(row: dict, source: dict, r: dict) -> str:
    counter = counter_of(row, source)
    if source["counter"] == "unstated":
        counter = f"unstated (as {counter})"
    mb = next(
        (o.split("=")[1] for o in reversed(flatten(row["overrides"])) if "micro_batch=" in o), "1"
    )
    head = (
        f"| {row['id']} | {row['model'].split('/')[-1]} | {r.get('label', '—')} | {row['card']} | "
        f"{counter} | {mb} x {row['tokens']} | {row['published']} {row['unit']} = "
        f"{gib(row['published'] * UNITS[row['unit']])} |"
    )
    if r["status"] != "planned":
        return head + f" — | — | {r['status'].split(':')[0]} |"
    return head + f" {gib(r['predicted'])} | {100 * r['error']:+.1f}% | |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only rows whose id contains this")
    parser.add_argument(
        "--note", help="a paragraph for the results file: how this run differs from a plain one"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / f"benchmarks/results/published-{datetime.date.today()}.md",
    )
    args = parser.parse_args()
    data = yaml.safe_load(ROWS.read_text())
    sources, rows = data["sources"], data["rows"]
    if args.only:
        rows = [r for r in rows if args.only in r["id"]]
    started = time.perf_counter()
    results, extras = [], []
    for row in rows:
        source = sources[row["source"]]
        r = plan_row(row, source)
        results.append(r)
        print(table_line(row, source, r), flush=True)
        for name, w in what_ifs(row, source):
            extras.append((row, name, w))
            if w["status"] == "planned":
                print(f"  what-if {name}: {gib(w['predicted'])} GiB, {100 * w['error']:+.1f}%")

    planned = [(row, r) for row, r in zip(rows, results, strict=True) if r["status"] == "planned"]
    errors = [abs(r["error"]) for _, r in planned]
    worst_row, worst = max(planned, key=lambda p: abs(p[1]["error"])) if planned else (None, None)
    over = [(row, r) for row, r in planned if abs(r["error"]) > EXPLAIN_ABOVE]
    unexplained = [row["id"] for row, _ in over if not row.get("explanation")]
    used = sorted({row["source"] for row, _ in planned})

    lines = [
        f"# `snug plan` against published GPU peak memory — {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/published.py` on {platform.machine()}, {os.cpu_count()} "
        f"CPU cores; whole script {time.perf_counter() - started:,.0f} s. Rows and their sources: "
        "`benchmarks/published_rows.yaml`.",
        "",
        "Each row is a peak-memory figure someone measured on a real GPU and published, with enough "
        "of the run's configuration to write it as a snug config. The prediction is `snug plan`'s "
        "replay of that config on fake tensors (no GPU), in the counter the source reports: "
        "`max_memory_allocated` = the replay's peak of live tensors; `max_memory_reserved` = that "
        "plus the planner's allocator term (its replay of the caching allocator over the step's "
        "allocations and frees, snug/plan/allocator.py); `nvidia-smi` = that plus the CUDA "
        "context (0.5 GiB). Error = (predicted - published) / published. All sizes in GiB "
        "(published GB converted: 1 GB = 0.931 GiB).",
        "",
        *([args.note, ""] if args.note else []),
        "| row | model | planned as | card | counter | micro-batch x tokens | published | "
        "predicted GiB | error | |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(table_line(row, sources[row["source"]], r) for row, r in zip(rows, results, strict=True)),
        "",
    ]
    if planned:
        lines += [
            f"**{len(planned)} rows planned from {len(used)} sources: median absolute error "
            f"{100 * statistics.median(errors):.1f}%, worst {100 * abs(worst['error']):.1f}% "
            f"({worst_row['id']}); {len(over)} rows over {100 * EXPLAIN_ABOVE:.0f}%"
            + (
                f", unexplained: {', '.join(unexplained)}"
                if unexplained
                else ", each explained below"
            )
            + ".** (Targets: median at most 10%, no row over 30% unexplained.)",
            "",
        ]
    if planned:
        lines += ["| rows | count | median abs error | worst abs error |", "|---|---|---|---|"]
        groups = {f"source {k}": [r for row, r in planned if row["source"] == k] for k in used}
        for counter in sorted({counter_of(row, sources[row["source"]]) for row, _ in planned}):
            groups[f"counter {counter}"] = [
                r for row, r in planned if counter_of(row, sources[row["source"]]) == counter
            ]
        for name, group in groups.items():
            errs = [abs(r["error"]) for r in group]
            lines.append(
                f"| {name} | {len(group)} | {100 * statistics.median(errs):.1f}% | "
                f"{100 * max(errs):.1f}% |"
            )
        lines.append("")
    if extras:
        lines += [
            "## What-ifs",
            "",
            "Replays that test an explanation (not in the statistics above).",
            "",
            "| row | what-if | published GiB | predicted GiB | error |",
            "|---|---|---|---|---|",
        ]
        for row, name, w in extras:
            if w["status"] == "planned":
                lines.append(
                    f"| {row['id']} | {name} | {gib(w['published'])} | {gib(w['predicted'])} | "
                    f"{100 * w['error']:+.1f}% |"
                )
            else:
                lines.append(f"| {row['id']} | {name} | — | — | {w['status']} |")
        lines.append("")
    not_planned = [
        (row, r) for row, r in zip(rows, results, strict=True) if r["status"] != "planned"
    ]
    if not_planned:
        lines += ["## Rows not planned", ""]
        lines += [f"- {row['id']}: {r['status']}" for row, r in not_planned]
        lines.append("")
    if over:
        lines += [f"## Rows over {100 * EXPLAIN_ABOVE:.0f}%", ""]
        by_text: dict[str, list[str]] = {}
        for row, r in over:
            text = " ".join(str(row.get("explanation", "UNEXPLAINED")).split())
            by_text.setdefault(text, []).append(f"{row['id']} ({100 * r['error']:+.1f}%)")
        for text, ids in by_text.items():
            lines += [f"- **{', '.join(ids)}**: {text}", ""]
    lines += ["## Sources", ""]
    for key, source in sources.items():
        lines += [
            f"### {source['title']}",
            "",
            f"- URL: {source['url']}",
            f"- Counter: {source['counter']}"
            + (f", compared as {source['compare_as']}" if source["counter"] == "unstated" else "")
            + f". {' '.join(source['counter_evidence'].split())}",
            f"- Setup: {' '.join(source['setup'].split())}",
            "",
        ]
        for row, r in zip(rows, results, strict=True):
            if row["source"] != key:
                continue
            config = f" Config: {row['config']}." if row.get("config") else ""
            notes = f" {' '.join(str(row['notes']).split())}" if row.get("notes") else ""
            parts = ""
            if r["status"] == "planned":
                parts = " Plan's peak (GiB): " + ", ".join(
                    f"{k} {v / 2**30:.2f}" for k, v in r["breakdown"].items()
                )
                parts += "."
            lines.append(
                f"- {row['id']}: {row['where']} ({row['published']} {row['unit']}).{config}"
                f"{notes}{parts}"
            )
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
