"""Checkpoints that are either complete or ignored, and loading one back exactly.

A checkpoint is written into a temporary directory beside its target, every file flushed to
disk, then the completion marker written (and flushed) last, then the directory renamed into
place; old ones are deleted only after the new one is complete. A kill at any moment leaves
the previous checkpoint whole; a failed write (a full disk) removes the partial one and says so.
Written here (not accelerate's save_state) because snug's step, data position and resume
checks are its own; the formats are safetensors and `torch.save` of plain types, read back
with `weights_only=True`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

COMPLETE = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names it and what is intact."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def rng_state() -> dict:
    """Every RNG, in types that `torch.load(weights_only=True)` accepts (no numpy objects)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    train_state: dict,
    keep_last: int,
    scaler: torch.amp.GradScaler | None = None,
    ctx=None,
) -> Path:
    """`ctx` (train/dist.py Dist) with several ranks: weights and optimizer state go through
    torch.distributed.checkpoint (each rank writes its shards; DDP's replicas once), each rank
    its own RNG file; rank 0 writes the rest, the marker and renames, between barriers."""
    from snug.train import dist

    sharded = ctx is not None and ctx.active
    main = not sharded or ctx.main
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        if sharded:
            _save_sharded(tmp, model, optimizer, ctx)
        else:
            save_file(trainable_state(model), tmp / "trainable.safetensors")
        dist.barrier()
        if not main:
            dist.barrier()  # rank 0 commits
            return final
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
                "train_state": train_state,
            },
            tmp / "state.pt",
        )
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        (tmp / COMPLETE).write_text(str(step))  # last: its presence means the rest is on disk
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(root)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "none before"
        raise CheckpointError(f"could not write checkpoint {final} ({e}); {kept}.") from None
    # The rename is the commit point: before it the old checkpoint (if any) is whole, after it
    # the new one is. A checkpoint of the same step is moved aside first (recover() moves it
    # back should a kill fall between the two renames), then deleted.
    old = root / f".old-step-{step}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(root)
    shutil.rmtree(old, ignore_errors=True)
    prune(root, keep_last)
    if sharded:
        dist.barrier()
    return final


def _save_sharded(tmp: Path, model: nn.Module, optimizer, ctx) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    torch.save({"rng": rng_state()}, tmp / f"rng-rank{ctx.rank}.pt")


def _load_sharded(path: Path, model: nn.Module, optimizer, ctx) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    except Exception as e:  # another model, method or strategy
        raise CheckpointError(
            f"cannot load checkpoint {path} into this run ({e}); use --fresh."
        ) from None
    # strict=False: the frozen weights are not in the checkpoint (dcp.load above already
    # refused a checkpoint lacking any trainable one)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    rank = ctx.rank if ctx is not None else 0
    own = path / f"rng-rank{rank}.pt"  # more processes than saved: rank 0's generators
    rng = torch.load(own if own.exists() else path / "rng-rank0.pt", weights_only=True)
    set_rng_state(rng["rng"])


def _load_full_into_shards(model: nn.Module, optimizer, weights: dict, saved: dict) -> None:
    """A one-process checkpoint (whole tensors) into FSDP shards: each rank keeps its slice
    (torch.distributed.checkpoint's set_state_dict with full_state_dict). The saved optimizer
    state names parameters by position; this run's optimizer, built the same way, holds the
    same parameters in the same order, which gives each position its name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    ours = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    theirs = [i for g in saved["param_groups"] for i in g["params"]]
    if len(ours) != len(theirs):
        raise CheckpointError("the checkpoint's optimizer holds other parameters; use --fresh.")
    name = dict(zip(theirs, ours, strict=True))
    optim = {
        "state": {name[i]: v for i, v in saved["state"].items()},
        "param_groups": [
            {**g, "params": [name[i] for i in g["params"]]} for g in saved["param_groups"]
        ],
    }
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=optim,
        options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False),
    )


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are not listed."""
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if _STEP.match(p.name) and (p / COMPLETE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def recover(root: Path) -> Path | None:
    """Clean what a kill during a save left behind and return the newest complete checkpoint:
    a checkpoint moved aside for a same-step replacement comes back if the new one never
    landed; temporary and unmarked directories are removed."""
    if not root.exists():
        return None
    for old in root.glob(".old-step-*"):
        final = root / old.name.removeprefix(".old-")
        if (final / COMPLETE).exists() or not (old / COMPLETE).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
    for p in root.iterdir():
        if p.name.startswith(".tmp-step-") or (_STEP.match(p.name) and not (p / COMPLETE).exists()):
            shutil.rmtree(p, ignore_errors=True)
    done = complete_checkpoints(root)
    return done[-1] if done else None


def prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def read_train_state(path: Path) -> dict:
    """The loop's state of a checkpoint (data position, config, counters), without loading it."""
    try:
        return torch.load(path / "state.pt", weights_only=True, map_location="cpu")["train_state"]
    except Exception as e:  # a damaged file: say which
        raise CheckpointError(f"cannot read checkpoint {path} ({e}); use --fresh.") from None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None = None,
    ctx=None,
) -> dict:
    """Restore trainable weights, optimizer, scheduler, grad scaler and every RNG from `path`;
    returns its train_state."""
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    if (path / "dcp").is_dir():  # any number of processes: the shards are re-split on load
        _load_sharded(path, model, optimizer, ctx)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        return state["train_state"]
    from snug.train import dist

    weights = load_file(path / "trainable.safetensors")
    params = dict(dist.unwrap(model).named_parameters())  # FSDP: global shapes
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected or any(
        weights[n].shape != params[n].shape for n in expected & set(weights)
    ):
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(
            f"checkpoint {path} does not match this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, or shapes differ); use --fresh."
        )
    if ctx is not None and ctx.active and ctx.strategy == "fsdp":
        _load_full_into_shards(model, optimizer, weights, state["optimizer"])
    else:  # one process, or DDP's replicas: every rank loads the whole state
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["train_state"]
