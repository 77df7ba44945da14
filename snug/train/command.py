"""`snug train`: its command-line options, the checks before torch is imported, output.dir's
lock, and the launch of several processes through torchrun."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING

from snug.arguments import LAUNCH_FLAGS, config_arguments
from snug.config.switch import say_set_aside

if TYPE_CHECKING:
    from snug.config.llamafactory import Converted


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="fine-tune a model as a YAML config says",
        description="Fine-tune as CONFIG says; writes adapter/ or model/, metrics.jsonl, "
        "loss.png, config.yaml and summary.json into output.dir. Keys are listed in the README.",
    )
    config_arguments(train)
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


def config_argv(args: argparse.Namespace) -> list[str]:
    """The config as the command line gave it: a file, or LLaMA-Factory's flags."""
    return list(getattr(args, "llamafactory_flags", None) or [args.config])


def resume_command(args: argparse.Namespace) -> str:
    """The command that resumes a stopped run: this one, less --fresh."""
    argv = ["snug", "train", *config_argv(args), *args.overrides]
    argv += ["--allow-config-change"] * args.allow_config_change
    for key in LAUNCH_FLAGS:
        if getattr(args, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return shlex.join(argv)


def cmd_train(args: argparse.Namespace) -> int:
    # Config, output directory, model and data paths first, before torch is imported (seconds);
    # then output.dir's lock (a torchrun launcher takes it for its ranks).
    from snug.config import load_config
    from snug.config.preflight import check_data_paths, check_model_dir
    from snug.runtime.hub import offline_said_on_stderr
    from snug.train.outputs import check_output_dir, own_output_dir
    from snug.train.status import RunStatus

    converted = _from_llamafactory(args)
    if converted is not None:
        from snug.config.llamafactory_io import load_converted

        cfg = load_converted(converted, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if "LOCAL_RANK" not in os.environ:  # said once: by this command, not by each rank it starts
        say_set_aside(cfg)
    check_output_dir(cfg)
    check_model_dir(cfg.model.name_or_path)
    check_data_paths(cfg.data)
    command = resume_command(args) + " --fresh" * args.fresh
    if cfg.dist.nproc > 1 and "LOCAL_RANK" not in os.environ:  # start the ranks (torchrun)
        return _launch(args, cfg, command)
    main = os.environ.get("RANK", "0") == "0"
    with own_output_dir(cfg, args.fresh, command, lock=main) as out:
        # status.json from here, before the heavy imports (train/status.py: where, and why)
        status = RunStatus(out, detail="importing torch, transformers and peft") if main else None
        try:
            if "LOCAL_RANK" not in os.environ:  # (a rank's launcher asked)
                offline_said_on_stderr()  # after the checks of bad input: its error is one line
            from snug.plan.autofit import auto_fit
            from snug.train.resume import EXIT_STOPPED, TrainingStopped
            from snug.train.training import run_training

            try:
                summary = run_training(
                    cfg,
                    fresh=args.fresh,
                    allow_config_change=args.allow_config_change,
                    resume_command=resume_command(args),
                    planner=auto_fit,
                    status=status,
                )
            except TrainingStopped as e:
                if main:  # under torchrun every rank stops; one says so
                    print(str(e), file=sys.stderr)
                return EXIT_STOPPED
        except BaseException as e:
            if status is not None:  # before run_training, or a start it did not end
                status.ended_by(e)
            raise
        finally:
            if status is not None:  # (closed by run_training if it was reached)
                status.close()
    return 0 if summary["status"] == "completed" else 1


def _from_llamafactory(args: argparse.Namespace) -> Converted | None:
    """A LLaMA-Factory config (file or flags) converted, its snug YAML printed (output.dir's
    config.yaml keeps it, as for any run); None for a snug config."""
    from snug.config import llamafactory_io

    flags = getattr(args, "llamafactory_flags", None)
    converted = (
        llamafactory_io.read_flags(flags) if flags else llamafactory_io.read_file(args.config)
    )
    if converted is None:
        return None
    if "LOCAL_RANK" not in os.environ:  # said once: by this command, not by each rank
        for line in converted.said:
            print(f"note: {line}", file=sys.stderr)
        print(llamafactory_io.to_yaml(converted, f"{converted.source} as a snug config:"))
    return converted


def _launch(args: argparse.Namespace, cfg, command: str) -> int:
    """`snug train` with dist.nproc processes: torchrun starts them. On the node of rank 0 this
    process holds output.dir's lock from before any rank starts until torchrun has ended
    (torchrun keeps it should this process be killed; rank 0 checks it is held: train/lock.py);
    the launchers of other nodes check the folder and take no lock."""
    from snug.runtime.hub import offline_said_on_stderr
    from snug.train.outputs import own_output_dir

    with own_output_dir(cfg, args.fresh, command, lock=args.node_rank in (None, 0)):
        offline_said_on_stderr()  # the ranks inherit the answer (HF_HUB_OFFLINE)
        from snug.train import dist

        argv = ["--debug"] * args.debug + ["train", *config_argv(args), *args.overrides]
        argv += ["--fresh"] * args.fresh + ["--allow-config-change"] * args.allow_config_change
        for key in LAUNCH_FLAGS:  # the ranks pass them on in the command that resumes
            if getattr(args, key) is not None:
                argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        flags = {k: getattr(args, k) for k in LAUNCH_FLAGS}
        return dist.launch(cfg, argv, flags, args.debug)
