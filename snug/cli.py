"""The `snug` command: one small function per sub-command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from snug.config import ConfigError
from snug.deploy.chat import add_parser as add_chat_parser
from snug.deploy.evaluate import add_eval_parser
from snug.deploy.generate import add_generate_parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "your input is wrong": shown as one sentence, no traceback."""
    from snug.data.formats import DataError
    from snug.data.templates import TemplateError
    from snug.deploy.merge import MergeError
    from snug.models.load import ModelLoadError
    from snug.plan.simulate import PlanError
    from snug.train.loop import OutputDirError
    from snug.train.resume import ResumeError

    return (
        ConfigError,
        DataError,
        TemplateError,
        ModelLoadError,
        OutputDirError,
        MergeError,
        PlanError,
        ResumeError,
    )


def _run_errors() -> tuple[type[Exception], ...]:
    """Errors of a run that stopped for a reason it states (exit 1, one sentence)."""
    from snug.train.checkpoint import CheckpointError
    from snug.train.loop import NonFiniteError, OutOfMemory

    return (CheckpointError, NonFiniteError, OutOfMemory)


def cmd_train(args: argparse.Namespace) -> int:
    from snug.config import load_config
    from snug.train.loop import run_training
    from snug.train.resume import EXIT_STOPPED, TrainingStopped

    cfg = load_config(args.config, args.overrides)
    from snug.train import dist

    if cfg.dist.nproc > 1 and not dist.launched():  # start the ranks, each runs this again
        argv = ["--debug"] * args.debug + ["train", args.config, *args.overrides]
        argv += ["--fresh"] * args.fresh + ["--allow-config-change"] * args.allow_config_change
        code = dist.launch(cfg, argv, {k: getattr(args, k) for k in dist.LAUNCH_FLAGS})
        summary = Path(cfg.output.dir) / "summary.json"  # rank 0's: torchrun reports only 1
        if code != 0 and summary.exists():
            if json.loads(summary.read_text()).get("status") == "stopped":
                return EXIT_STOPPED
        return code
    try:
        summary = run_training(cfg, fresh=args.fresh, allow_config_change=args.allow_config_change)
    except TrainingStopped as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says so
            print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    return 0 if summary["status"] == "completed" else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from snug.plan.report import cmd_plan as run

    return run(args)


def cmd_measure(args: argparse.Namespace) -> int:
    from snug.plan.report import cmd_measure as run

    return run(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from snug.deploy.merge import find_source, merge

    src = find_source(args.adapter, args.model)
    report = merge(
        src,
        args.out,
        dtype=args.dtype,
        device=args.device,
        verify=args.verify,
        max_shard_size=args.max_shard_size,
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


def _config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "config", nargs=None if required else "?", help="YAML config file (see examples/)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override one config key, e.g. train.lr=1e-4",
    )


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
    _config_arguments(train)
    train.add_argument(
        "--fresh",
        action="store_true",
        help="start over instead of resuming the newest checkpoint in output.dir",
    )
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though seed, data, method, batch or accumulation changed",
    )
    several = train.add_argument_group(
        "several nodes", "passed to torchrun with dist.nproc processes on each node"
    )
    several.add_argument("--nnodes", type=int, help="nodes taking part (default 1)")
    several.add_argument("--node-rank", type=int, help="this node's rank, 0 to nnodes-1")
    several.add_argument("--master-addr", help="address of node 0")
    several.add_argument("--master-port", type=int, help="port on node 0 (default 29500)")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser(
        "plan",
        help="predict peak memory and step time before training; search what fits",
        description="Replays snug's training step on fake tensors (no weights, no GPU) and "
        "reports the peak tensor memory, what the device must hold, FLOPs and a step-time "
        "estimate. Without CONFIG or --method, or with --search, searches methods, "
        "checkpointing, optimizers and micro-batches for the fastest that fits.",
    )
    _config_arguments(plan, required=False)
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
        description="Runs N real training steps of CONFIG (outputs in a temporary directory) "
        "and prints the measured peak memory and step time next to the predicted ones.",
    )
    _config_arguments(measure)
    measure.add_argument("--steps", type=int, default=3, help="real optimizer steps (default 3)")
    measure.add_argument("--seq-len", type=int, help="tokens per sample to plan for")
    measure.add_argument("--json", action="store_true", help="print JSON")
    measure.set_defaults(func=cmd_measure)

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
    merge.set_defaults(func=cmd_merge)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_chat_parser(sub)
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
        if isinstance(e, _run_errors()):
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(
            f"error: {e.__class__.__name__}: {e} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
