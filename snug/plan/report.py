"""`snug plan` and `snug calibrate`: inputs resolved, the plan printed as a table or JSON."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import PretrainedConfig

from snug.config import Config, load_config, save_config
from snug.config.overrides import with_overrides
from snug.config.paths import looks_like_hub_id
from snug.core.registry import get_stage
from snug.errors import UserError
from snug.methods import check_against_model
from snug.plan.cheapest import Change, cheapest_changes, why_nothing_fits
from snug.plan.hardware import Device, cpu_device, find_gpu, local_gpu, model_config
from snug.plan.recommend import recommend
from snug.plan.search import Candidate, plan_one, search
from snug.plan.simulate import PlanError
from snug.plan.simulate import explain as explain_peak
from snug.plan.timing import precision_for
from snug.runtime.progress import PhaseFactory, phases, quiet


def resolve_device(args, cfg: Config) -> Device:
    """The device planned for; a plan for this machine's CPU, or (with memory.offload_weights,
    whose weights live in host memory) for the GPU this machine has, knows its RAM."""
    if args.device == "cpu":
        return cpu_device()
    gpu = args.gpu or cfg.memory.gpu
    if not gpu:
        raise PlanError("name the device: --gpu NAME (e.g. 'RTX 4090' or 24GiB) or --device cpu.")
    device = find_gpu(gpu, args.num_gpus)
    return local_gpu(device) if cfg.memory.offload_weights else device


def sequence_length(args, cfg: Config, has_config: bool) -> tuple[int, str]:
    """--seq-len, else the longest sample of the config's data (cutoff_len with packing),
    else cutoff_len."""
    if args.seq_len:
        return args.seq_len, "--seq-len"
    if cfg.data.packing:
        return cfg.data.cutoff_len, "data.cutoff_len (packed rows)"
    if has_config:
        from snug.data.dataset import build_datasets
        from snug.models.load import load_tokenizer
        from snug.train.schedule import sample_lengths

        try:
            tok = load_tokenizer(cfg.model)
            train, _, _ = build_datasets(
                cfg.data,
                tok,
                cfg.train.stage,
                cfg.train.seed,
                cfg.model.name_or_path,
                own=get_stage(cfg.train.stage).own(cfg),
            )
            return max(sample_lengths(train)), "longest tokenized sample of data.train"
        except (UserError, OSError, ValueError):  # no tokenizer or data here: plan for the cutoff
            pass
    return cfg.data.cutoff_len, "data.cutoff_len"


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def print_table(console: Console, cands: list[Candidate], device: Device, title: str) -> None:
    table = Table(title=title)
    # the host memory streamed weights take, only when a candidate streams them
    streams = any(c.sim is not None and c.sim.host_bytes for c in cands)
    cols = ("candidate", "peak GiB", "reserved GiB") + (("host GiB",) if streams else ())
    for col in cols + ("fits", "trainable", "step s", "tokens/s"):
        table.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=True)
    for c in cands:
        if c.error:  # a failed simulation is no verdict on fit: its cause follows the table
            table.add_row(c.name, *["—"] * (len(cols) - 1), "error", "—", "—", "—")
            continue
        host = (_gib(c.sim.host_bytes),) if streams else ()
        table.add_row(
            c.name,
            _gib(c.peak_bytes),
            _gib(c.reserved_bytes),
            *host,
            {True: "yes", False: "no", None: "—"}[c.fits],
            f"{c.sim.trainable_params:,}",
            "—" if c.step_seconds is None else f"{c.step_seconds:.2f}",
            "—" if c.tokens_per_second is None else f"{c.tokens_per_second:,.0f}",
        )
    console.print(table)
    for c in cands:
        if c.error:
            console.print(f"{c.name}: the simulation failed: {c.error}")
        elif c.host_short:
            console.print(f"{c.name} does not fit host memory: it {c.host_short}")
    if streams:
        c = next(c for c in cands if c.sim is not None and c.sim.host_bytes)
        copied = (
            f"; {c.sim.streamed_bytes_per_step / 1e9:,.1f} GB copied per step at {c.h2d}"
            if c.h2d
            else ""
        )
        pinned = "pinned " if device.type == "cuda" else ""
        console.print(
            f"memory.offload_weights: host GiB is the streamed weights in {pinned}host memory"
            + copied
        )
    if device.memory_bytes:
        console.print(f"device: {device.name}, {_gib(device.memory_bytes)} GiB usable")
    shown = next((c for c in cands if c.sim is not None), None)
    if shown is not None:
        what = "step time and reserved terms" if device.type == "cuda" else "step time"
        console.print(f"{what}: {shown.calibration}")


def breakdown_line(c: Candidate) -> str:
    """What the peak of one candidate is made of, and what reserved adds, in GiB."""
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in c.sim.breakdown.items() if v)
    line = f"peak of {c.name} ({_gib(c.peak_bytes)} GiB): {parts}"
    if c.reserved_terms:
        terms = ", ".join(f"{k} {v['bytes'] / 2**30:.2f}" for k, v in c.reserved_terms.items())
        line += f"; reserved adds {terms}"
    return line


def print_explain(console: Console, explained: dict) -> None:
    table = Table(
        title=f"largest live tensors at the peak of {explained['candidate']} "
        f"(simulated with {explained['layers']} decoder layers)"
    )
    for col in ("MiB", "what", "shape", "dtype", "made by", "in module"):
        table.add_column(col, justify="right" if col == "MiB" else "left", no_wrap=True)
    for t in explained["largest"]:
        table.add_row(
            f"{t['bytes'] / 2**20:,.1f}",
            t["what"],
            "x".join(map(str, t["shape"])),
            t["dtype"].replace("torch.", ""),
            t["op"],
            t["module"],
        )
    console.print(table)


def failed_simulations(cands: list[Candidate]) -> str:
    """Why nothing can be recommended when simulations failed: that is an error, not "does not
    fit" (exit 2, where exit 1 means every candidate was planned and none fits)."""
    failed = [c for c in cands if c.error]
    first = failed[0]
    more = f" (and {len(failed) - 1} more candidates)" if len(failed) > 1 else ""
    return (
        f"the plan of {first.name} failed{more}: {first.error}; nothing was found to fit, but "
        "what failed may fit."
    )


# What `--search` varies (search.py: _variants, _fallbacks, _largest_fitting_micro_batch);
# every other key is the config's in every candidate.
SEARCHED = (
    "method.name",
    "model.quant",
    "train.micro_batch",
    "train.grad_accum",
    "memory.grad_checkpointing",
    "memory.offload_activations",
    "memory.offload_weights",
    "memory.optimizer",
    "memory.chunked_loss",
)


def searched_keys(method_given: bool, num_gpus: int) -> list[str]:
    keys = [k for k in SEARCHED if not (method_given and k == "method.name")]
    return keys + (["dist.strategy", "dist.nproc"] if num_gpus > 1 else [])


def held_fixed(cfg: Config, searched: list[str], config_path: str | None = None) -> dict:
    """The keys the config sets (differs from the defaults on, its paths read as the config's
    are) that the search keeps."""

    from snug.config import config_from_dict
    from snug.core.sections import MethodConfig

    base = Path(config_path).resolve().parent if config_path else None
    default = config_from_dict({}, base=base).to_dict()
    own = MethodConfig(name=cfg.method.name).own  # the method's own keys: their defaults
    default["method"].update(dataclasses.asdict(own) if own is not None else {})
    held = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name in searched or name == "model.name_or_path":
                continue
            # a stage's own keys (or a plug-in's) without a default here count as the config's
            if key not in default.get(section, {}) or value != default[section][key]:
                held[name] = value
    return held


def data_naming_no_file(cfg: Config) -> dict[str, str]:
    """The data keys of `cfg` whose value names no file (nor a hub dataset), each with what it
    should name: a plan without a config carries data.train's default, which --write-config
    writes, and the user fills in."""
    wanted = {"train": "your training data", "eval": "your held-out data (or null)"}
    unset = {}
    for key, what in wanted.items():
        value = getattr(cfg.data, key)
        for spec in [] if value is None else [value] if isinstance(value, str) else value:
            if not Path(spec).exists() and not looks_like_hub_id(spec, dataset=True):
                unset[f"data.{key}"] = what
    return unset


@dataclass
class Plan:
    """What `snug plan` found, before it is printed: `result` is its --json output."""

    cfg: Config
    config: PretrainedConfig
    device: Device
    seq_len: int
    cands: list[Candidate]
    choice: Candidate | None
    why: str
    changes: list[Change]
    searching: bool
    result: dict


def make_plan(args, phase: PhaseFactory = quiet) -> Plan:
    """The plan `snug plan` prints for its parsed arguments `args` (also `snug ui`'s Plan tab):
    the config with the flags as overrides, the model and device resolved, one candidate or the
    search, the recommendation and, when nothing fits, the cheapest changes that do."""
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    if args.method:
        overrides.append(f"method.name={args.method}")
    if args.micro_batch:
        overrides.append(f"train.micro_batch={args.micro_batch}")
    cfg = load_config(args.config, overrides)
    config = model_config(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    check_against_model(cfg, config)  # lora's targets: names the model has
    device = resolve_device(args, cfg)
    seq_len, seq_source = sequence_length(args, cfg, args.config is not None)
    searching = args.search or (args.config is None and args.method is None)
    if searching:
        # --method with --search: that method's settings only; without: every method
        methods = (args.method,) if args.method else None
        cands = search(
            cfg, config, device, seq_len, methods, args.max_micro_batch, args.num_gpus, phase=phase
        )
        choice, why = recommend(cands)
    else:
        if args.num_gpus > 1:  # one config on N ranks: its strategy, else FSDP
            strategy = cfg.dist.strategy if cfg.dist.strategy != "none" else "fsdp"
            cfg = with_overrides(cfg, dist={"strategy": strategy, "nproc": args.num_gpus})
        with phase("plan", 1, "configurations") as p:
            cands = [plan_one(cfg, config, device, seq_len)]
            p.advance(1)
        choice, why = (cands[0], "the configuration as given") if cands[0].fits else (None, "")
    changes: list[Change] = []
    if choice is None and not any(c.error for c in cands) and device.memory_bytes is not None:
        why = why_nothing_fits(cands, device, seq_len)
        with phase("cheapest changes that fit", 1, "plans") as p:
            changes = cheapest_changes(cands, config, device, seq_len)
            p.advance(1)
    result = {
        "model": cfg.model.name_or_path,
        "device": device.as_dict(),
        "seq_len": seq_len,
        "seq_len_from": seq_source,
        "precision": precision_for(device, cfg),
        "calibration": next((c.calibration for c in cands if c.sim is not None), None),
        "candidates": [c.as_dict() for c in cands],
        "best": cands.index(choice) if choice is not None else None,
        "why": why,
    }
    if choice is None:
        result["cheapest_changes"] = [c.as_dict() for c in changes]
    if searching:
        result["searched"] = searched_keys(bool(args.method), args.num_gpus)
        result["held_fixed"] = held_fixed(cfg, result["searched"], args.config)
    return Plan(cfg, config, device, seq_len, cands, choice, why, changes, searching, result)


def cmd_plan(args) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # the table's columns stay whole in logs and pipes
    if args.list_models:
        from snug.plan.hardware import catalog_models

        console.print("\n".join(catalog_models()))
        return 0
    # progress beside the table, or on stderr when stdout is JSON
    planned = make_plan(
        args, phases(Console(stderr=True, soft_wrap=True) if args.json else console)
    )
    cfg, config, device, seq_len = planned.cfg, planned.config, planned.device, planned.seq_len
    cands, choice, why, changes = planned.cands, planned.choice, planned.why, planned.changes
    searching, result = planned.searching, planned.result
    explained = None
    if args.explain:
        target = choice or cands[0]
        if target.sim is not None:
            largest, layers = explain_peak(
                target.cfg, config, seq_len, device.type, precision_for(device, target.cfg)
            )
            explained = {"candidate": target.name, "layers": layers, "largest": largest}
            result["explain"] = explained
    unset: dict[str, str] = {}  # data keys of the written config that name no file
    if args.write_config and choice is not None:
        path = Path(args.write_config)
        if path.exists():
            raise PlanError(f"--write-config {path} exists; name a new file.")
        unset = data_naming_no_file(choice.cfg)
        save_config(
            choice.cfg, path, {k: f"names no file: set it to {v}" for k, v in unset.items()}
        )
        result["config_written"] = {"path": str(path), "names_no_file": sorted(unset)}
    broken = choice is None and any(c.error for c in cands)
    if args.json:
        print(json.dumps(result, indent=2))
        if broken:
            raise PlanError(failed_simulations(cands))
        return 0 if choice is not None else 1
    title = f"{cfg.model.name_or_path}, {seq_len} tokens per sample ({result['seq_len_from']})"
    print_table(console, cands, device, title)
    shown = choice or cands[0]
    if shown.sim is not None:
        console.print(breakdown_line(shown))
    if searching:
        held = ", ".join(f"{k}={_yaml(v)}" for k, v in result["held_fixed"].items())
        console.print(f"searched: {', '.join(result['searched'])}")
        console.print(f"held fixed from your config: {held or 'nothing (all defaults)'}")
    if explained:
        print_explain(console, explained)
    if choice is not None:
        console.print(f"recommended: [bold]{choice.name}[/bold] — {why}")
        if args.write_config:
            todo = "; ".join(f"set {k} there to {v}" for k, v in unset.items())
            console.print(f"wrote {args.write_config}" + (f"; {todo}" if todo else ""))
    elif broken:
        raise PlanError(failed_simulations(cands))
    else:
        console.print("nothing fits" + (f": {why}" if why else ""))
        if changes:
            console.print("the cheapest changes that fit, each planned:")
            for change in changes:
                console.print(f"  {change.line()}", markup=False, highlight=False)
    return 0 if choice is not None else 1


def cmd_calibrate(args) -> int:
    """`snug calibrate`: measure, print with the spread, keep in the calibration file."""
    import torch

    from snug.plan import calibration
    from snug.plan.calibrate import calibrate

    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu and kind != "cuda":
        raise PlanError("snug calibrate --gpu names the GPU calibrated; it needs --device cuda.")
    path = calibration.calibration_path()
    if not args.no_save:
        calibration.load("", path)  # a calibration file we cannot read: say so before the series
    console = Console(stderr=args.json, soft_wrap=True)
    started = time.perf_counter()
    cal = calibrate(
        kind,
        args.gpu,
        progress=lambda line: console.print(line, markup=False, highlight=False),
        phase=phases(console),
    )
    seconds = time.perf_counter() - started
    if not args.no_save:
        calibration.save(cal, path)
    if args.json:
        print(json.dumps({**cal.as_dict(), "seconds": round(seconds, 1)}, indent=2))
        return 0
    table = Table(title=f"snug calibrate: {cal.device}, {cal.precision}, {seconds:.0f} s")
    cols = ("model", "method", "gc", "mb x tokens", "GFLOP", "ops", "traffic GB", "measured s")
    cols += ("fitted s",)
    if kind == "cuda":
        cols += ("peak err", "reserved planned/measured GiB")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in cal.steps:
        shape = f" ({r['layers']} x {r['hidden']})" if kind == "cpu" and "hidden" in r else ""
        cells = [
            r["model"] + shape,
            r["method"] + ("" if r.get("quant", "none") == "none" else f" {r['quant']}"),
            "on" if r["checkpointing"] else "off",
            f"{r['micro_batch']} x {r['tokens']}",
            f"{r['flops'] / 1e9:,.1f}",
            f"{r['ops']:,}",
            f"{r['traffic'] / 1e9:,.1f}",
            f"{r['seconds']:.3f}",
            f"{r['fitted_seconds']:.3f}",
        ]
        if kind == "cuda":
            cells += [
                f"{100 * (r['planned_peak'] / r['measured_peak'] - 1):+.1f}%",
                f"{_gib(r['planned_reserved'])}/{_gib(r['measured_reserved'])}",
            ]
        table.add_row(*cells)
    console.print(table)
    lo, hi = cal.step_error
    how = "the longer of the device's work and" if cal.overlap else "plus"
    quant = (
        f"; each 4-bit matmul {cal.quant_call_seconds * 1e6:.0f} us more"
        if cal.quant_call_seconds is not None
        else ""
    )
    console.print(
        f"step time: {cal.rate_flops / 1e12:.3g} TFLOP/s achieved by whole steps "
        f"(one large matmul: {cal.matmul_flops / 1e12:.3g} TFLOP/s), memory traffic at the "
        f"copy bandwidth {cal.bandwidth_gbs:,.1f} GB/s, {how} "
        f"{cal.op_seconds * 1e6:.1f} us per op{quant}; fitted within {100 * lo:+.1f}% to "
        f"{100 * hi:+.1f}% of the measured steps"
    )
    if cal.h2d_gbs is not None:
        where = "pinned host to device" if kind == "cuda" else "a large clone, host to host"
        console.print(f"memory.offload_weights streams at {cal.h2d_gbs:,.1f} GB/s ({where})")
    if kind == "cuda":
        ctx = (
            "unread (no nvidia-smi)"
            if cal.context_bytes is None
            else (f"{_gib(cal.context_bytes)} GiB")
        )
        rlo, rhi = cal.reserved_error
        console.print(
            f"CUDA context {ctx}; "
            f"max_memory_reserved = {cal.reserved_ratio:.3f} x the replayed reserve "
            f"({100 * rlo:+.1f}% to {100 * rhi:+.1f}% over the series)"
        )
    console.print(
        "not saved (--no-save)" if args.no_save else f"saved to {path} under {cal.device!r}"
    )
    return 0
