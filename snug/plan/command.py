"""`snug plan`, `snug measure` and `snug calibrate`: their command-line options, the config
checked before the planner's imports, and the hub asked once before those imports ask it."""

from __future__ import annotations

import argparse

from snug.arguments import config_arguments
from snug.config.switch import say_set_aside


def add_plan_parsers(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="predict peak memory and step time before training; search what fits",
        description="Replays snug's training step on fake tensors (no weights, no GPU) and "
        "reports the peak tensor memory, what the device must hold, FLOPs and a step-time "
        "estimate. Without CONFIG or --method, or with --search, searches methods, "
        "checkpointing, optimizers and micro-batches for the fastest that fits.",
    )
    config_arguments(plan, required=False)
    plan.add_argument("--model", help="catalog name (see --list-models), config.json, dir, hub id")
    plan.add_argument("--gpu", help="GPU name from the bundled table (e.g. 4090) or a size (24GiB)")
    plan.add_argument("--device", choices=["cpu"], help="plan for this machine's CPU")
    plan.add_argument(
        "--num-gpus", type=int, default=1, help="GPUs: plan one rank of FSDP or DDP over N"
    )
    plan.add_argument("--seq-len", type=int, help="tokens per sample (default: from the data)")
    plan.add_argument("--micro-batch", type=int, help="micro-batch size")
    plan.add_argument(
        "--method", help="plan this method (with --search: search only its memory settings)"
    )
    plan.add_argument("--search", action="store_true", help="search for the fastest that fits")
    plan.add_argument(
        "--max-micro-batch", type=int, default=64, help="largest micro-batch to try (default 64)"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--explain",
        action="store_true",
        help="list the largest live tensors at the peak, with the op and module that made them",
    )
    plan.add_argument("--write-config", metavar="OUT.yaml", help="write the chosen config")
    plan.add_argument("--list-models", action="store_true", help="list the bundled model configs")
    plan.set_defaults(func=cmd_plan)

    measure = sub.add_parser(
        "measure",
        help="run a few real steps and print the measured peak next to the plan's",
        description="Runs real training steps of CONFIG (outputs in a temporary directory): "
        "--warmup steps, then --steps timed ones, and prints the measured peak memory (over all "
        "of them) and step time (the median of the timed ones) next to the predicted ones.",
    )
    config_arguments(measure)
    measure.add_argument(
        "--steps",
        type=int,
        default=3,
        help="real optimizer steps timed after the warm-up; the step time is their median (3)",
    )
    measure.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="steps run first and left out of the step time: the first step's one-time set-up "
        "and, on a CPU, the memory tracker of the first two (2)",
    )
    measure.add_argument("--seq-len", type=int, help="tokens per sample to plan for")
    measure.add_argument("--json", action="store_true", help="print JSON")
    measure.set_defaults(func=cmd_measure)

    calibrate = sub.add_parser(
        "calibrate",
        help="measure this machine's device so the plan's step time and reserved memory fit it",
        description="Runs a short, fixed series of real training steps (catalog models with "
        "random weights, nothing downloaded) on this machine's GPU or CPU, measures what the "
        "plan cannot see from fake tensors (the achieved FLOP rate and per-op cost of whole "
        "steps; on a GPU the CUDA context and what the caching allocator reserves), prints "
        "it with its spread and keeps it in the calibration file ($SNUG_CALIBRATION, else "
        "~/.config/snug/calibration.json), one entry per device. snug plan and memory.auto_fit "
        "then use it for that device and say so.",
    )
    calibrate.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        help="what to calibrate (default: cuda when torch sees a GPU, else cpu)",
    )
    calibrate.add_argument(
        "--gpu", metavar="NAME", help="the GPU's name in the bundled table, if torch's differs"
    )
    calibrate.add_argument(
        "--no-save", action="store_true", help="print the measurement, keep the file as it is"
    )
    calibrate.add_argument("--json", action="store_true", help="print JSON")
    calibrate.set_defaults(func=cmd_calibrate)


def _hub_or_offline(label: str, to_stderr: bool) -> None:
    """Whether the hub answers, asked before the planner's imports ask it (snug/runtime/hub.py); then
    those imports, counted (on stderr where stdout is JSON)."""
    from rich.console import Console

    from snug.runtime.hub import offline_said_on_stderr
    from snug.runtime.progress import importing

    offline_said_on_stderr()
    importing(Console(stderr=to_stderr, soft_wrap=True), label, "snug.plan.report")


def cmd_plan(args: argparse.Namespace) -> int:
    if args.config:  # a config error in a moment, before the planner's imports
        from snug.config import load_config

        overrides = [*args.overrides, *([f"method.name={args.method}"] if args.method else [])]
        say_set_aside(load_config(args.config, overrides))
    if not args.list_models:  # which needs neither
        _hub_or_offline("plan", args.json)
    from snug.plan.report import cmd_plan as run

    return run(args)


def cmd_measure(args: argparse.Namespace) -> int:
    from snug.config import load_config

    say_set_aside(load_config(args.config, args.overrides))
    _hub_or_offline("measure", args.json)
    from snug.plan.measure import cmd_measure as run

    return run(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    _hub_or_offline("calibrate", args.json)
    from snug.plan.report import cmd_calibrate as run

    return run(args)
