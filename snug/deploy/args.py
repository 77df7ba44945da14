"""Command-line options shared by `snug chat`, `snug generate` and `snug eval`: which base and
adapters to load, and which answers. No torch import here: `snug --help` builds its parser
from these modules."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from snug.deploy.session import Session


def at_least_1(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1")
    return value


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --use, --device, --dtype, --template: what `open_session` loads."""
    parser.add_argument(
        "--model",
        help="base model: a directory, a hub id, or a full/freeze run (default: the base the "
        "first adapter's run trained)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a run directory, its adapter/ or any peft adapter directory; repeat for several "
        "(NAME defaults to the run's directory name)",
    )
    parser.add_argument(
        "--use",
        metavar="NAME",
        help="the adapter that answers, or 'base' for none (default: the first --adapter)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the model runs (default auto: cuda when present)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype of the base weights (default auto: as the run loaded them)",
    )
    parser.add_argument(
        "--template",
        help="chat template: auto (the tokenizer's) or a built-in name such as chatml "
        "(default: the run's data.template)",
    )
    add_trust_arguments(parser)


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    """--trust-remote-code and --allow-other-base: what a run directory can never switch on."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run model code shipped with the base (off unless given here: a run's saved "
        "config.yaml never turns it on)",
    )
    parser.add_argument(
        "--allow-other-base",
        action="store_true",
        help="load an adapter on a base whose weights differ from those it was trained on",
    )


def open_from_args(
    args: argparse.Namespace, console: Console | None = None, label: str = ""
) -> Session:
    """The session the options name, with --use's adapter active; with a `console`, its two
    steps (the imports, the loading: seconds each) are counted there as `label`."""
    from snug.runtime.hub import offline_said_on_stderr

    offline_said_on_stderr()  # before the imports that would ask the hub (snug/runtime/hub.py)
    if console is not None:
        from snug.runtime.progress import Phase

        with Phase(console, label, 2, "steps") as steps:
            steps.step("importing torch, transformers and peft")
            import snug.deploy.session  # noqa: F401 (its imports: torch, transformers, peft)

            steps.step("loading the base and adapters")
            session = open_from_args(args)
            steps.advance(1)
        return session
    from snug.deploy.session import open_session

    session = open_session(
        args.model,
        args.adapter,
        args.device,
        args.dtype,
        args.template,
        args.trust_remote_code,
        args.allow_other_base,
    )
    if args.use:
        session.use(args.use)
    return session
