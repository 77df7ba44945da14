"""The `snug` command: one small function per sub-command."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys

from snug.deploy.args import add_trust_arguments
from snug.deploy.chat import add_parser as add_chat_parser
from snug.deploy.evaluate import add_eval_parser
from snug.deploy.generate import add_generate_parser
from snug.errors import AlreadySaid, RunError, UserError, exit_code, first_line
from snug.files import disk_full, failed_write

# What `snug train` passes on to torchrun for several nodes (the usual rendezvous arguments).
LAUNCH_FLAGS = ("nnodes", "node_rank", "master_addr", "master_port")
DEBUG_HELP = "show tracebacks on errors (also accepted before the sub-command)"
OVERRIDE = re.compile(r"[A-Za-z_]\w*\.[\w.]+=")  # section.key=value


def resume_command(args: argparse.Namespace) -> str:
    """The command that resumes a stopped run: this one, less --fresh."""
    argv = ["snug", "train", args.config, *args.overrides]
    argv += ["--allow-config-change"] * args.allow_config_change
    for key in LAUNCH_FLAGS:
        if getattr(args, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return shlex.join(argv)


def say_set_aside(cfg) -> None:
    """The config file's keys set aside for a method or stage the command line chose (one line
    each), on stderr: stdout may be JSON (`snug plan --json`)."""
    for line in cfg.set_aside:
        print(line, file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    # Config, output directory, model and data paths first, before torch is imported (seconds);
    # then output.dir's lock (a torchrun launcher takes it for its ranks).
    from snug.config import load_config
    from snug.hub import offline_said_on_stderr
    from snug.preflight import check_data_paths, check_model_dir
    from snug.train.outputs import check_output_dir, own_output_dir

    cfg = load_config(args.config, args.overrides)
    if "LOCAL_RANK" not in os.environ:  # said once: by this command, not by each rank it starts
        say_set_aside(cfg)
    check_output_dir(cfg)
    check_model_dir(cfg.model.name_or_path)
    check_data_paths(cfg.data)
    command = resume_command(args) + " --fresh" * args.fresh
    if cfg.dist.nproc > 1 and "LOCAL_RANK" not in os.environ:  # start the ranks (torchrun)
        return _launch(args, cfg, command)
    with own_output_dir(cfg, args.fresh, command, lock=os.environ.get("RANK", "0") == "0"):
        if "LOCAL_RANK" not in os.environ:  # (a rank's launcher asked)
            offline_said_on_stderr()  # after the checks of bad input: its error is one line
        from snug.train.loop import run_training
        from snug.train.resume import EXIT_STOPPED, TrainingStopped

        try:
            summary = run_training(
                cfg,
                fresh=args.fresh,
                allow_config_change=args.allow_config_change,
                resume_command=resume_command(args),
            )
        except TrainingStopped as e:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says so
                print(str(e), file=sys.stderr)
            return EXIT_STOPPED
    return 0 if summary["status"] == "completed" else 1


def _launch(args: argparse.Namespace, cfg, command: str) -> int:
    """`snug train` with dist.nproc processes: torchrun starts them. On the node of rank 0 this
    process holds output.dir's lock from before any rank starts until torchrun has ended
    (torchrun keeps it should this process be killed; rank 0 checks it is held: train/lock.py);
    the launchers of other nodes check the folder and take no lock."""
    from snug.hub import offline_said_on_stderr
    from snug.train.outputs import own_output_dir

    with own_output_dir(cfg, args.fresh, command, lock=args.node_rank in (None, 0)):
        offline_said_on_stderr()  # the ranks inherit the answer (HF_HUB_OFFLINE)
        from snug.train import dist

        argv = ["--debug"] * args.debug + ["train", args.config, *args.overrides]
        argv += ["--fresh"] * args.fresh + ["--allow-config-change"] * args.allow_config_change
        for key in LAUNCH_FLAGS:  # the ranks pass them on in the command that resumes
            if getattr(args, key) is not None:
                argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        flags = {k: getattr(args, k) for k in LAUNCH_FLAGS}
        return dist.launch(cfg, argv, flags, args.debug)


def _hub_or_offline(label: str, to_stderr: bool) -> None:
    """Whether the hub answers, asked before the planner's imports ask it (snug/hub.py); then
    those imports, counted (on stderr where stdout is JSON)."""
    from rich.console import Console

    from snug.hub import offline_said_on_stderr
    from snug.progress import importing

    offline_said_on_stderr()
    importing(Console(stderr=to_stderr), label, "snug.plan.report")


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


def cmd_merge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from snug.hub import offline_said_on_stderr
    from snug.progress import Phase

    offline_said_on_stderr()
    # the steps: the imports (seconds), then merge()'s: loading, adapter, folding, verifying,
    # writing
    with Phase(Console(), "merge", 5 + args.verify, "steps") as steps:
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
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
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
        description="Runs real training steps of CONFIG (outputs in a temporary directory): "
        "--warmup steps, then --steps timed ones, and prints the measured peak memory (over all "
        "of them) and step time (the median of the timed ones) next to the predicted ones.",
    )
    _config_arguments(measure)
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
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_chat_parser(sub)
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
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
    imported module (snug/shutdown.py: 1.5 s after a training command's imports here)."""
    from snug.shutdown import exit_now, stacks_on_request

    stacks_on_request()
    exit_now(main())


if __name__ == "__main__":
    run()
