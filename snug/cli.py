"""The `snug` command: one small function per sub-command."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from snug.arguments import LAUNCH_FLAGS
from snug.config.llamafactory_io import FLAGS_SOURCE, has_flags, split_arguments
from snug.deploy.args import add_trust_arguments
from snug.deploy.chat import add_parser as add_chat_parser
from snug.deploy.evaluate import add_eval_parser
from snug.deploy.generate import add_generate_parser
from snug.deploy.serve import add_serve_parser
from snug.errors import AlreadySaid, RunError, UserError, exit_code, first_line
from snug.plan.command import add_plan_parsers
from snug.runtime.files import disk_full, failed_write
from snug.train.command import add_train_parser
from snug.ui.command import add_ui_parser

DEBUG_HELP = "show tracebacks on errors (also accepted before the sub-command)"
OVERRIDE = re.compile(r"[A-Za-z_]\w*\.[\w.]+=")  # section.key=value


def cmd_merge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from snug.runtime.hub import offline_said_on_stderr
    from snug.runtime.progress import Phase

    offline_said_on_stderr()
    # the steps: the imports (seconds), then merge()'s: loading, adapter, folding, verifying,
    # writing
    with Phase(Console(soft_wrap=True), "merge", 5 + args.verify, "steps") as steps:
        steps.step("importing torch, transformers and peft")
        from snug.deploy.merge import find_source, merge

        src = find_source(args.adapter, args.model, args.trust_remote_code)
        report = merge(
            src,
            args.out,
            dtype=args.dtype,
            device=args.device,
            verify=args.verify,
            max_shard_size=args.max_shard_size,
            allow_other_base=args.allow_other_base,
            progress=steps,
        )
    print(f"merged {report['method']} from {report['adapter']} into {report['base']}")
    if report["verified"]:
        print(
            f"verified on {report['prompts']} prompts: largest logit difference "
            f"{report['max_logit_difference']:.3g} (tolerance {report['tolerance']:.3g}, "
            f"{report['dtype']})"
        )
    print(f"wrote {args.out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from snug.config import llamafactory, llamafactory_io
    from snug.errors import ConfigError
    from snug.runtime.files import write_text_atomic

    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: no such config file.")
    converted = llamafactory_io.read_file(args.config)
    if converted is None:
        raise ConfigError(
            f"{args.config}: not a LLaMA-Factory config (none of "
            f"{', '.join(llamafactory.MARKERS)} at its top level); snug train reads it as it is."
        )
    if args.out and Path(args.out).exists():
        raise ConfigError(f"--out {args.out} exists; name a new file so nothing is overwritten.")
    llamafactory_io.load_converted(converted)  # checked as snug train would
    for line in converted.said:
        print(f"note: {line}", file=sys.stderr)
    text = llamafactory_io.to_yaml(converted, f"{args.config} as a snug config (snug convert)")
    if not args.out:
        print(text, end="")
        return 0
    write_text_atomic(Path(args.out), text)
    print(f"wrote {args.out}; run it with: snug train {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snug", description="Fine-tune large language models inside the memory you have."
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_plan_parsers(sub)
    merge = sub.add_parser(
        "merge",
        help="fold a LoRA, DoRA or IA3 adapter into its base; write a transformers model",
        description="Fold the adapter of a run (or any peft LoRA/DoRA/IA3 directory) into the "
        "base weights and write a model directory that transformers loads without peft. A QLoRA "
        "adapter is folded into the dequantized base. Before writing, checks that the merged "
        "logits equal base plus adapter on a few prompts.",
    )
    merge.add_argument("--adapter", required=True, metavar="RUN_OR_DIR", help="run or adapter dir")
    merge.add_argument("--out", required=True, help="new directory for the merged model")
    merge.add_argument("--model", help="base model (default: the one the run or adapter names)")
    merge.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype to merge and write in (auto: the base checkpoint's)",
    )
    merge.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda")
    merge.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare merged logits with base plus adapter before writing (default: on)",
    )
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    add_trust_arguments(merge)
    merge.set_defaults(func=cmd_merge)
    convert = sub.add_parser(
        "convert",
        help="write a LLaMA-Factory config as a snug config, without running it",
        description="Convert a LLaMA-Factory training YAML (flat keys: model_name_or_path, stage, "
        "finetuning_type, dataset, ...) into a snug config, with LLaMA-Factory's defaults for "
        "the keys it leaves out; keys snug cannot honour are refused in one error. snug train "
        "reads such a YAML directly, too.",
    )
    convert.add_argument("config", help="LLaMA-Factory YAML file")
    convert.add_argument("--out", help="new file for the snug YAML (default: print it)")
    convert.set_defaults(func=cmd_convert)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_chat_parser(sub)
    add_serve_parser(sub)
    add_ui_parser(sub)
    for command in sub.choices.values():  # `snug train --debug` as well as `snug --debug train`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere (`snug --debug train`, `snug train cfg.yaml --debug k=v`): argparse would
    # take it after the sub-command only before the overrides.
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if a != "--debug" or i >= end]
    llamafactory_flags = None
    if argv[:1] == ["train"] and has_flags(argv[1:]):  # `llamafactory-cli train`'s flags
        switches = ("--fresh", "--allow-config-change")
        options = tuple(f"--{k.replace('_', '-')}" for k in LAUNCH_FLAGS)
        llamafactory_flags, own = split_arguments(argv[1:], switches, options, OVERRIDE.match)
        argv = ["train", FLAGS_SOURCE, *own]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if llamafactory_flags is not None:
        args.llamafactory_flags = llamafactory_flags
    # `snug train cfg.yaml --fresh train.lr=1e-4`: argparse ends the overrides at the first flag
    if extra and args.command in ("train", "plan", "measure") and all(map(OVERRIDE.match, extra)):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = debug
    logging.basicConfig(
        level=logging.INFO if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:  # library chatter (progress bars, optional-kernel notices) hides our output
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers loads
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        logging.getLogger("kernels").setLevel(logging.ERROR)  # bitsandbytes' CPU kernel fetch
        import warnings

        warnings.filterwarnings("ignore")
        if "transformers" in sys.modules:  # already imported (snug used as a library): too late
            from transformers.utils import logging as hf_logging  # for the variable above

            hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except AlreadySaid as e:  # another process of this run said why
        return e.code
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, (UserError, RunError)):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        elif disk_full(e):  # a write of snug's that no out-of-space check of its own covers
            print(
                f"error: out of space: could not write {failed_write(e)}; free some space on "
                "that disk and run again.",
                file=sys.stderr,
            )
        else:  # not a message of snug's: a bug here or in a library
            print(
                f"error: {e.__class__.__name__}: {first_line(e)} (unexpected; run with --debug "
                "for the traceback and report it)",
                file=sys.stderr,
            )
        return exit_code(e)


def run() -> None:
    """The `snug` command: `main`, then the process ends without Python's teardown of every
    imported module (snug/runtime/shutdown.py: 1.5 s after a training command's imports here)."""
    from snug.runtime.shutdown import exit_now, stacks_on_request

    stacks_on_request()
    exit_now(main())


if __name__ == "__main__":
    run()
