"""The `snug` command: one small function per sub-command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from snug.config import ConfigError


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "your input is wrong": shown as one sentence, no traceback."""
    from snug.data.formats import DataError
    from snug.data.templates import TemplateError
    from snug.models.load import ModelLoadError
    from snug.train.loop import OutputDirError

    return (ConfigError, DataError, TemplateError, ModelLoadError, OutputDirError)


def cmd_train(args: argparse.Namespace) -> int:
    from snug.config import load_config
    from snug.train.loop import run_training

    cfg = load_config(args.config, args.overrides)

    summary = run_training(cfg)
    return 0 if summary["status"] == "completed" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snug", description="Fine-tune large language models inside the memory you have."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="fine-tune a model as a YAML config says",
        description="Fine-tune as CONFIG says; writes adapter/ or model/, metrics.jsonl, "
        "loss.png, config.yaml and summary.json into output.dir. Keys are listed in the README.",
    )
    train.add_argument("config", help="YAML config file (see examples/)")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override one config key, e.g. train.lr=1e-4",
    )
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:  # library chatter (progress bars, optional-kernel notices) hides our output
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, _user_errors()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"error: {e.__class__.__name__}: {e} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
