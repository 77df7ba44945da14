"""Many processes: torchrun launch, process group, DDP / FSDP2 wrapping, data shares, and the
collectives the loop needs. PyTorch's own engine (torch.distributed, DistributedDataParallel,
FSDP2 `fully_shard`, torch.distributed.checkpoint); what is written here is only the glue
snug's own loop needs (which rows each rank trains, how the loss is normalised across ranks).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from snug.arguments import LAUNCH_FLAGS
from snug.config import Config, ConfigError
from snug.core.registry import methods
from snug.core.stage import Stage
from snug.errors import AlreadySaid, exit_code
from snug.train.collectives import all_sum  # noqa: F401  (callers: dist.all_sum)
from snug.train.lock import handed_on
from snug.train.resume import EXIT_STOPPED
from snug.train.wrapped import causal_lm, unwrap  # noqa: F401  (callers: dist.unwrap)

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; world 1 without torchrun."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """True inside a process torchrun started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


# How long torchrun lets the ranks finish their step and save after a stop signal before it
# kills them (torchrun's own default, 30 s, is shorter than one step of a large model).
SHUTDOWN_TIMEOUT_S = 1800


def launch(cfg: Config, argv: list[str], flags: dict, debug: bool = False) -> int:
    """Start `snug train` again under torchrun with dist.nproc processes on this node (and the
    rendezvous flags for several nodes); returns torchrun's exit status. No shell.

    torchrun runs in a session of its own, so a terminal's Ctrl-C reaches only this process,
    which passes each stop signal on once: the first SIGINT or SIGTERM goes to torchrun, which
    forwards it to every rank (they save after the current step and exit 75); a second Ctrl-C
    goes straight to the ranks, which abort without saving, as in one process."""
    # debug: torchrun's own report too
    runner = "torch.distributed.run" if debug else "snug.train.torchrun"
    cmd = [sys.executable, "-m", runner, f"--nproc-per-node={cfg.dist.nproc}"]
    for key in LAUNCH_FLAGS:
        if flags.get(key) is not None:
            cmd.append(f"--{key.replace('_', '-')}={flags[key]}")
    if flags.get("nnodes") in (None, 1):
        cmd.append("--standalone")  # one node: a private rendezvous on a free port
    cmd += ["-m", "snug.cli", *argv]
    # torchrun keeps output.dir's lock (held by this process on the node of rank 0) as long as
    # it runs, and tells rank 0 who holds it
    handed_env, handed_fds = handed_on(Path(cfg.output.dir))
    env = {**os.environ, **handed_env}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, preexec_fn=_stop_with_parent, pass_fds=handed_fds
    )
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if len(received) == 1 or signum != signal.SIGINT:
            _signal(proc.pid, signum)
            return
        import psutil  # a second Ctrl-C: abort the ranks themselves

        try:
            ranks = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for rank in ranks:
            _signal(rank.pid, signal.SIGINT)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.time()
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    summary = Path(cfg.output.dir) / "summary.json"  # rank 0's, written after our start
    if code != 0 and received and summary.exists() and summary.stat().st_mtime >= started:
        if json.loads(summary.read_text()).get("status") == "stopped":
            return EXIT_STOPPED  # the signal we passed on stopped the ranks with a checkpoint
    return code


def _stop_with_parent() -> None:
    """In torchrun's process, before it starts (Linux): should `snug train` itself be killed,
    the kernel sends torchrun SIGTERM, which stops the ranks with a checkpoint instead of
    leaving them running unwatched."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def trains_sharded(method: str, quant: str) -> bool:
    """Whether `check` lets this method on this base train under ddp and fsdp."""
    return methods()[method].shardable and quant != "8bit"


def setup(cfg: Config, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun described (gloo on CPU, nccl on CUDA); the device of
    this rank."""
    if cfg.dist.cpu_offload and device.type != "cuda":  # train.device=auto on a machine without
        raise ConfigError(  # a GPU (config checks refuse train.device=cpu itself)
            "dist.cpu_offload moves FSDP's shards from the GPU to the host; training on the CPU "
            "keeps them there already, so leave it off there."
        )
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(strategy=cfg.dist.strategy), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        # Rank 0 tokenizes (and precomputes reference log-probs) while the others wait in a
        # collective: NCCL's default 10 minutes would end a run on a large dataset.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return Dist(dist.get_world_size(), dist.get_rank(), local_rank, cfg.dist.strategy), device


def teardown() -> None:
    """Leave the process group. Gloo's worker thread releases each finished collective (and
    the Python tensors it holds, which needs the GIL) a moment after the caller sees it done;
    should the group's destructor run before that (when DDP's reducer, its last owner, is
    freed), it joins that thread while holding the GIL and never returns (seen once under
    load, torch 2.13). A last barrier, then a pause without the GIL, lets the thread finish."""
    if dist.is_initialized():
        barrier()
        time.sleep(0.5)
        dist.destroy_process_group()


def wrap(model: nn.Module, cfg: Config, ctx: Dist, precision: str, device) -> nn.Module:
    """DDP: replicate, all-reduce gradients. FSDP: `fully_shard` each decoder layer, then the
    root (embeddings, final norm, head), so parameters, gradients and optimizer state are
    sharded; `dist.reshard_after_forward=false` keeps gathered layers until backward (ZeRO-2
    like); `dist.cpu_offload` keeps shards and optimizer state on the host."""
    if not ctx.active or ctx.strategy == "none":
        return model
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return shard_fsdp(model, cfg, precision)


def wrap_reference(
    stage: Stage, reference: object, cfg: Config, ctx: Dist, precision: str, mesh=None
) -> None:
    """FSDP: shard the frozen models a stage's reference holds (`Stage.frozen_models`: a
    preference stage's frozen copy) as the model is (`shard_fsdp`), so each rank holds its share
    of them too; DDP and one process keep them whole. In place."""
    if ctx.active and ctx.strategy == "fsdp":
        for frozen in stage.frozen_models(reference):
            shard_fsdp(frozen, cfg, precision, mesh, frozen=True)


def shard_fsdp(
    model: nn.Module, cfg: Config, precision: str, mesh=None, frozen: bool = False
) -> nn.Module:
    """`fully_shard` each decoder layer, then the root, in place (the planner passes the mesh
    of its fake process group). `frozen`: a model that never runs backward (a preference
    stage's reference), whose layers reshard after each forward whatever
    dist.reshard_after_forward says, since no backward would free them."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if precision.endswith("-mixed"):  # half-precision compute, fp32 master weights
        half = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        reduce = getattr(torch, cfg.dist.reduce_dtype)
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=reduce)
    if cfg.dist.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        reshard = frozen or cfg.dist.reshard_after_forward
        fully_shard(layer, reshard_after_forward=reshard, **kwargs)
    # The root (embeddings, final norm, head) stays gathered from forward to backward, FSDP2's
    # default for a root: snug's chunked loss runs the head after the model's forward returns.
    fully_shard(model, **kwargs)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = causal_lm(model).get_decoder().layers
    return list(layers)


def share(rows: list, ctx: Dist) -> list:
    """This rank's contiguous share of a global micro-batch's rows (sizes differ by at most
    one); rank order concatenated gives the rows back, so a 1-process run with the same
    global micro-batch trains the same samples."""
    if not ctx.active:
        return rows
    n, k = divmod(len(rows), ctx.world)
    start = ctx.rank * n + min(ctx.rank, k)
    return rows[start : start + n + (1 if ctx.rank < k else 0)]


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is true on any (e.g. a signal one rank received)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def agree(prepare: Callable[[], T], device) -> T:
    """`prepare()` on every rank, going on only if it worked on all of them, so that rank 0
    never takes output.dir over for a run another rank cannot start. When some failed, the
    lowest failing rank raises its own error (and prints it); every other rank stops quietly
    with that rank's exit status (the same error on every rank is said once)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return prepare()
    failure: BaseException | None = None
    try:
        result = prepare()
    except BaseException as e:  # noqa: BLE001 (re-raised below, after the others are told)
        failure = e
    codes = torch.zeros(dist.get_world_size(), device=device)
    codes[dist.get_rank()] = 0 if failure is None else exit_code(failure)
    dist.all_reduce(codes)
    failed = [i for i, c in enumerate(codes.tolist()) if c]
    if not failed:
        return result
    if dist.get_rank() == failed[0]:
        raise failure
    raise AlreadySaid(int(codes[failed[0]].item())) from failure


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def full_state(model: nn.Module, trainable_only: bool, ctx: Dist) -> dict | None:
    """FSDP: the whole (or trainable) state dict gathered to rank 0's host memory (a collective:
    every rank calls it; others get an empty dict). None when nothing is sharded."""
    if not (ctx.active and ctx.strategy == "fsdp"):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    state = get_model_state_dict(model, options=options)
    # Tied weights (e.g. embeddings and head) are one parameter under two names; the gathered
    # copies are separate tensors, so keep the first name only, as save_pretrained expects.
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {n for group in names.values() for n in group[1:]}
    return {k: v for k, v in state.items() if k not in tied}
