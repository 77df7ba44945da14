"""`snug eval`: loss, perplexity and accuracy by generation, of the base and its adapters.

Each number is the one training reports on its held-out data, computed by the same code: the
data is tokenized as the first adapter's run tokenized its eval data (template, cutoff, answer
mask), the loss is `eval_metrics`' (mean cross-entropy per answer token) with the run's step
options and micro-batch, and exact match is `exact_match` (greedy, case and spacing ignored).
So `snug eval --adapter RUN --data DATA.EVAL` gives the run's summary.json `eval.loss_after`.
"contains" counts answers that hold the expected answer (normalized the same way).

torch and transformers are imported inside the functions that use them (see generate.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snug.deploy.args import add_session_arguments, at_least_1, open_from_args
from snug.deploy.generate import refuse_existing, refuse_special, write_atomically

if TYPE_CHECKING:
    from datasets import Dataset

    from snug.deploy.session import Session
    from snug.runtime.progress import PhaseFactory

METRICS = ("loss", "exact", "contains")  # as --metrics names them
SAMPLES = 3  # generations kept per model in the results file
LF_DATASET_DIR = "data"  # LLaMA-Factory's default dataset_dir, read from the current folder


@dataclass
class EvalData:
    dataset: Dataset  # tokenized as training tokenizes its eval data
    records: int  # records read (at most --limit)
    dropped: int  # records left out (data.on_error=skip in the run's config)
    answers: bool  # conversations whose answers generation can be scored on (not plain text)
    read_as: str = "sft"  # the stage that tokenized it: sft, dpo (pairs) or pt (plain text)


def eval_dataset_dir(given: str | None, run_dir: str | None) -> str | None:
    """The dataset_info.json folder that --data's names are read from: --dataset-dir, else the
    evaluated run's data.dataset_dir (where it still holds one), else ./data when it holds one
    (LLaMA-Factory's default dataset_dir), else none."""
    from snug.config.dataset_info import INFO_FILE, read_registry

    if given is not None:
        read_registry(given)  # one error naming it when it holds no dataset_info.json
        return given
    for folder in (run_dir, LF_DATASET_DIR):
        if folder is not None and (Path(folder) / INFO_FILE).is_file():
            return folder
    return None


def data_specs(data: str) -> list[str]:
    """--data as the sources it names: a comma list (LLaMA-Factory's eval_dataset), unless it is
    a path that exists."""
    if Path(data).exists():
        return [data]
    return [s.strip() for s in data.split(",") if s.strip()] or [data]


def resolve_specs(specs: list[str], dataset_dir: str | None) -> list[str]:
    """Each of --data's sources as data.eval keeps it (snug/config/dataset_info.py:
    resolve_data): a registered name as it is, else a path or hub id; an unknown name is one
    error naming dataset_info.json and the names near it. A named pipe or device is refused
    before it is opened, given or registered."""
    from snug.config.dataset_info import registered, resolve_data

    found = []
    for spec in specs:
        spec = resolve_data(spec, "--data", Path.cwd(), dataset_dir)
        entry = registered(spec, dataset_dir)
        if entry is None:
            refuse_special("--data", Path(spec))
        elif entry.path is not None:
            refuse_special(f"--data {spec}:", entry.path)
        found.append(spec)
    return found


def load_eval_data(
    session: Session, specs: list[str], limit: int | None, dataset_dir: str | None = None
) -> EvalData:
    """Each of `specs` (a file, directory, hub dataset or name of `dataset_dir`'s registry, as
    data.eval takes them; `resolve_specs`) tokenized with the run's data settings, at most
    `limit` records of each; several are scored as one set, when they are of one kind."""
    from datasets import concatenate_datasets

    from snug.deploy.session import SessionError

    parts = [read_eval_source(session, spec, limit, dataset_dir) for spec in specs]
    kinds = {p.read_as for p in parts}
    if len(kinds) > 1:
        held = ", ".join(f"{spec} ({p.read_as})" for spec, p in zip(specs, parts, strict=True))
        raise SessionError(
            f"--data {','.join(specs)}: holds records of several kinds ({held}), scored apart; "
            "score them one at a time."
        )
    if len(parts) == 1:
        return parts[0]
    return EvalData(
        concatenate_datasets([p.dataset for p in parts]),
        sum(p.records for p in parts),
        sum(p.dropped for p in parts),
        parts[0].answers,
        parts[0].read_as,
    )


def read_eval_source(
    session: Session, spec: str, limit: int | None, dataset_dir: str | None
) -> EvalData:
    """One source, read as training reads data.eval (snug/data/registry.py: open_source, a
    registered name with its own format and its num_samples drawn by train.seed); plain text
    records ({"text"}) are scored as language modelling."""
    import datasets

    from snug.config.dataset_info import registered
    from snug.core.registry import get_stage
    from snug.data.dataset import tokenize_source
    from snug.data.formats import detect_format
    from snug.data.preference import is_pair, is_unpaired
    from snug.data.registry import open_source
    from snug.data.tokenize import EMPTY, FULLY_MASKED, INVALID, first_record
    from snug.deploy.session import SessionError

    datasets.disable_progress_bars()  # as training reads data: quietly
    # the run's format too
    cfg = dataclasses.replace(session.cfg.data, max_samples=limit, dataset_dir=dataset_dir)
    seed = session.cfg.train.seed
    entry = registered(spec, dataset_dir)
    plain = get_stage(session.cfg.train.stage).formats == ("text",)  # pt reads alpaca as text
    reader = "dpo" if entry is not None and entry.ranking else "pt" if plain else "sft"
    src, read = open_source(spec, cfg, get_stage(reader), seed)
    raw = src.records
    fmt = read.format
    first = first_record(raw) if raw else {}
    if is_unpaired(first):
        raise SessionError(
            f"{spec}: holds labelled completions (kto data), which have no one right answer to "
            "score; give preference pairs (scored against the chosen answer) or SFT records."
        )
    pairs = is_pair(first)  # scored as SFT data whose answer is the chosen one
    if fmt == "auto" and raw and not pairs:
        fmt = detect_format(first, f"{spec} record 1")
    text = fmt == "text"
    stage = "dpo" if pairs else "pt" if text else "sft"
    if pairs:
        cfg = dataclasses.replace(cfg, format="auto", packing=False)
    model = session.cfg.model.name_or_path
    ds, counts, _ = tokenize_source(spec, cfg, session.tok, stage, model, seed=seed)
    records = min(len(raw), limit or len(raw))
    dropped = counts[EMPTY] + counts[FULLY_MASKED] + counts[INVALID]
    return EvalData(ds, records, dropped, not text, stage)


def score(
    session: Session,
    name: str,
    data: EvalData,
    metrics: list[str],
    micro_batch: int,
    max_new: int,
    phase: PhaseFactory | None = None,
) -> dict:
    """The metrics of one model: `name` is an adapter or BASE; `phase(title, total, unit)`
    (snug/runtime/progress.py) counts the samples scored."""
    from snug.core.registry import get_stage
    from snug.models.load import resolve_precision
    from snug.runtime.progress import quiet
    from snug.train.evaluate import eval_metrics, exact_match, normalize
    from snug.train.prepare import step_options

    phase = phase or quiet
    session.use(name)
    result: dict = {}
    with session.scope():
        if "loss" in metrics:
            precision = resolve_precision(session.cfg, session.device)
            # the loss per answer token, whatever the run's stage (a preference run is scored
            # on its chosen answers)
            opts = dataclasses.replace(
                step_options(session.cfg, session.device, precision), stage=get_stage("sft")
            )
            pad = session.tok.pad_token_id
            with phase("loss", len(data.dataset), "samples") as p:
                loss = eval_metrics(
                    session.model, data.dataset, opts, micro_batch, pad, session.device, p.advance
                )["loss"]
            result.update(loss=loss, perplexity=math.exp(loss))
        if "exact" in metrics or "contains" in metrics:
            with phase("answers by generation", len(data.dataset), "samples") as p:
                hits, samples = exact_match(
                    session.model,
                    session.tok,
                    session.template,
                    data.dataset,
                    len(data.dataset),
                    max_new,
                    session.device,
                    p.advance,
                )
            if "exact" in metrics:
                result["exact_match"] = hits
            if "contains" in metrics:
                held = [normalize(s["expected"]) in normalize(s["answer"]) for s in samples]
                result["contains"] = sum(held) / len(held)
            result.update(generated=len(samples), samples=samples[:SAMPLES])
    session.model.eval()  # the evaluation helpers leave the model in train mode
    return result


def parse_metrics(text: str) -> list[str]:
    from snug.deploy.session import SessionError

    wanted = [m.strip() for m in text.split(",") if m.strip()]
    for m in wanted:
        if m not in METRICS:
            raise SessionError(f"--metrics {text}: unknown metric {m!r}; use {','.join(METRICS)}.")
    if not wanted:
        raise SessionError(f"--metrics {text!r}: name at least one of {','.join(METRICS)}.")
    return wanted


ROWS = (  # (key in the results, row label, format)
    ("loss", "loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.4g}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("contains", "contains", "{:.1%}"),
)


def table(results: dict[str, dict]) -> str:
    """Metrics down, models across."""
    names = list(results)
    lines = [["metric", *names]]
    for key, label, fmt in ROWS:
        if key in results[names[0]]:
            lines.append([label, *(fmt.format(results[n][key]) for n in names)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(names) + 1)]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="loss, perplexity and accuracy of a base and its adapters on a dataset",
        description="Scores the active adapter (the first, or --use NAME), or with --compare "
        "the base and every adapter side by side, on --data: loss per answer token and "
        "perplexity, as training's held-out loss; exact match and 'contains' (the expected "
        "answer within the answer, case and spacing ignored) by greedy generation. Data is read and "
        "tokenized as the first adapter's run read its eval data; plain text records "
        "({'text'}) give loss and perplexity only.",
    )
    add_session_arguments(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="eval data: a file, directory, hub dataset or dataset named in --dataset-dir's "
        "dataset_info.json, or a comma list of these (as data.eval)",
    )
    parser.add_argument(
        "--dataset-dir",
        metavar="DIR",
        help="a folder with LLaMA-Factory's dataset_info.json, whose names --data may give "
        "(default: the run's data.dataset_dir, else ./data when it holds dataset_info.json)",
    )
    parser.add_argument(
        "--limit", type=at_least_1, help="score only the first N records (of each --data source)"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="score the base and every --adapter, one column each",
    )
    parser.add_argument(
        "--metrics",
        help="comma-separated, from loss,exact,contains (default: all; plain text data: loss)",
    )
    parser.add_argument(
        "--batch-size",
        type=at_least_1,
        help="samples per forward pass of the loss (default: the run's train.micro_batch)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=at_least_1,
        help="longest generated answer (default: the run's train.max_new_tokens)",
    )
    parser.add_argument("--output", help="write every metric and a few generations as JSON here")
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from snug.deploy.session import BASE, SessionError
    from snug.runtime.progress import phases

    out = Path(args.output) if args.output else None
    if out is not None:
        refuse_existing(out, "--output")
    for spec in data_specs(args.data):  # before the model loads: a pipe would wait
        if Path(spec).exists():
            refuse_special("--data", Path(spec))
    specs = None  # --data's sources, resolved when the dataset_info.json folder is known
    if args.dataset_dir is not None:  # known before the model loads
        specs = resolve_specs(data_specs(args.data), eval_dataset_dir(args.dataset_dir, None))
    metrics = parse_metrics(args.metrics) if args.metrics else None
    if args.compare and args.use:
        raise SessionError("--compare scores the base and every adapter; leave out --use.")
    console = Console(soft_wrap=True)  # progress, before the table (stderr keeps to errors)
    session = open_from_args(args, console, "eval: loading")
    if args.compare and not session.base_reachable:
        raise SessionError(
            "--compare scores the base too, but this adapter (method adapter) is built into the "
            "model's layers and cannot be switched off; score the base on its own with --model."
        )
    names = [BASE, *session.adapters] if args.compare else [session.active]
    dataset_dir = eval_dataset_dir(args.dataset_dir, session.cfg.data.dataset_dir)
    specs = specs or resolve_specs(data_specs(args.data), dataset_dir)
    data = load_eval_data(session, specs, args.limit, dataset_dir)
    if len(data.dataset) == 0:  # scores of nothing would read as loss 0, perplexity 1
        raise SessionError(
            f"--data {args.data}: no sample to score ({data.records} records read, {data.dropped} "
            "dropped as empty, invalid or with no answer token within data.cutoff_len)."
        )
    possible = list(METRICS) if data.answers else ["loss"]  # plain text has no answers to score
    for m in metrics or []:
        if m not in possible:
            raise SessionError(f"--metrics {m}: {args.data} holds plain text, no answers.")
    metrics = metrics or possible
    micro_batch = args.batch_size or session.cfg.train.micro_batch
    max_new = args.max_new_tokens or session.cfg.train.max_new_tokens
    results = {}  # by label: a full/freeze run given as --model is its directory's name
    for name in names:
        session.use(name)
        print(f"scoring {session.label} on {len(data.dataset)} samples")
        phase = phases(console, f"eval {session.label}")
        results[session.label] = score(session, name, data, metrics, micro_batch, max_new, phase)
    first = next(iter(results.values()))
    scored = f", {first['generated']} answered by generation" if "generated" in first else ""
    print(
        f"{args.data}: {len(data.dataset)} samples from {data.records} records{scored} | "
        f"base {session.cfg.model.name_or_path}"
    )
    print(table(results))
    if out is not None:
        report = {
            "data": args.data,
            "base_model": session.cfg.model.name_or_path,
            "adapters": {n: str(d) for n, d in session.adapters.items()},
            "counts": {
                "records": data.records,
                "samples": len(data.dataset),
                "dropped": data.dropped,
                "generated": first.get("generated", 0),
            },
            "limit": args.limit,
            "metrics": metrics,
            "max_new_tokens": max_new if "generated" in first else None,
            "models": results,
        }
        write_atomically(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n", "--output")
        print(f"wrote {out}")
    return 0
