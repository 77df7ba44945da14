"""Checkpoints that are either complete or ignored, loaded back exactly, and never unpickled.

A checkpoint is written into a temporary directory beside its target, every file flushed to
disk, then the completion marker written (and flushed) last, then the directory renamed into
place; old ones are deleted only after the new one is complete. A kill at any moment leaves
the previous checkpoint whole; a failed write (a full disk) removes the partial one and says so,
and a checkpoint whose weights and optimizer state (one process: their bytes are known) cannot
fit on the disk is not begun.
Written here (not accelerate's save_state) because snug's step, data position and resume
checks are its own.

Files (nothing in them can run code when read):
- `trainable.safetensors`: the trainable weights (one process), or `shards/`: every rank's
  slice of the trainable weights and optimizer tensors, through torch.distributed.checkpoint's
  Hugging Face storage (safetensors with their offsets in the header, no pickled metadata);
- `state.json` + `state.safetensors`: optimizer, scheduler, grad scaler, RNGs and the loop's
  state (snug/train/statefile.py); with several ranks, `rng-rankN.json/.safetensors` each;
- `COMPLETE`, written last.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from snug.errors import RunError, UserError, first_line
from snug.runtime.files import disk_full, free_bytes, fsync, out_of_space
from snug.train.outputs import COMPLETE, complete_checkpoints, prune
from snug.train.statefile import load_state, save_state, tensor_bytes

SHARDS = "shards"  # torch.distributed.checkpoint's safetensors files, one per rank


class CheckpointError(RunError):
    """A checkpoint could not be written; the message names it and what is intact."""


class CheckpointLoadError(UserError):
    """A checkpoint in output.dir cannot be read or does not fit this run (bad input: nothing
    is changed; the message says how to go on)."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def rng_state() -> dict:
    """Every RNG, in plain types and tensors (statefile stores them)."""
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
        torch.cuda.set_rng_state_all(list(state["cuda"]))


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
    best: int | None = None,
) -> Path:
    """`ctx` (train/dist.py Dist) with several ranks: weights and optimizer tensors go through
    torch.distributed.checkpoint (each rank writes its shards; DDP's replicas once), each rank
    its own RNG files; rank 0 writes the rest, the marker and renames, between barriers.
    `best`: the step of the checkpoint output.keep_best ends with, kept beside the newest
    `keep_last`."""
    from snug.train import dist

    sharded = ctx is not None and ctx.active
    main = not sharded or ctx.main
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    weights = None if sharded else trainable_state(model)
    needed = 0 if weights is None else _room_for(root, final, weights, optimizer)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        if sharded:
            optim_skeleton = _save_sharded(tmp, model, optimizer, ctx)
        else:
            save_file(weights, tmp / "trainable.safetensors")
            optim_skeleton = optimizer.state_dict()
        dist.barrier()
        if main:
            state = {
                "optimizer": optim_skeleton,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
                "train_state": train_state,
            }
            _write_state(tmp, step, state)
    except Exception as e:  # safetensors' own error on a full disk is no OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(e, OSError) or disk_full(e)):
            raise
        if disk_full(e) and needed:
            why = out_of_space(root, needed, final.name, e)
        else:
            why = f"could not write checkpoint {final} ({' '.join(str(e).split())})"
        raise CheckpointError(f"{why}; {_kept(root)}.") from None
    if not main:
        dist.barrier()  # rank 0 commits
        return final
    _commit(root, tmp, final, keep_last, best)
    if sharded:
        dist.barrier()
    return final


def _room_for(root: Path, final: Path, weights: dict, optimizer) -> int:
    """The bytes a one-process checkpoint holds (its weights and the optimizer's tensors);
    CheckpointError before anything is written when its disk has less free."""
    needed = tensor_bytes(weights) + tensor_bytes(optimizer.state_dict()["state"])
    if free_bytes(root) < needed:
        raise CheckpointError(f"{out_of_space(root, needed, final.name)}; {_kept(root)}.")
    return needed


def _write_state(tmp: Path, step: int, state: dict) -> None:
    """Rank 0: the state beside the weights, every file flushed to disk, then the marker."""
    save_state(state, tmp / "state")
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync(f)
    (tmp / COMPLETE).write_text(str(step))  # last: its presence means the rest is on disk
    fsync(tmp / COMPLETE)
    fsync(tmp)


def _commit(root: Path, tmp: Path, final: Path, keep_last: int, best: int | None) -> None:
    """The rename is the commit point: before it the old checkpoint (if any) is whole, after
    it the new one is. A checkpoint of the same step is moved aside first (recover() moves it
    back should a kill fall between the two renames), then deleted; then old ones pruned."""
    old = root / f".old-{final.name}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(root)
    shutil.rmtree(old, ignore_errors=True)
    prune(root, keep_last, best)


def _kept(root: Path) -> str:
    previous = complete_checkpoints(root)
    return (
        f"the previous checkpoint {previous[-1]} is intact"
        if previous
        else "there is no checkpoint before it"
    )


def _split_tensors(value, path: str, flat: dict):
    """`value` with each tensor replaced by {"$shard": its path}; the tensors go to `flat`."""
    if isinstance(value, torch.Tensor):
        flat[path] = value
        return {"$shard": path}
    if isinstance(value, dict):
        return {k: _split_tensors(v, f"{path}/{k}", flat) for k, v in value.items()}
    if isinstance(value, list):
        return [_split_tensors(v, f"{path}/{i}", flat) for i, v in enumerate(value)]
    return value


def _join_tensors(value, flat: dict):
    if isinstance(value, dict):
        if set(value) == {"$shard"}:
            return flat[value["$shard"]]
        return {k: _join_tensors(v, flat) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, flat) for v in value]
    return value


def _sharded_state(model: nn.Module, optimizer) -> tuple[dict, dict, dict]:
    """(model state, optimizer skeleton, optimizer tensors by path) of this run, as
    torch.distributed.checkpoint's state_dict helpers give them (FSDP: DTensor slices)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.tensor import DTensor

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    # Tied weights (embeddings and head) are one storage under two names: safetensors stores it
    # once, and loading the first name fills both.
    seen: set[tuple] = set()
    kept = {}
    for name, value in model_state.items():
        local = value.to_local() if isinstance(value, DTensor) else value  # FSDP: its shard
        where = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if where not in seen:
            seen.add(where)
            kept[name] = value
    model_state = kept
    flat: dict = {}
    skeleton = _split_tensors(optim_state, "optim", flat)
    return model_state, skeleton, flat


def _save_sharded(tmp: Path, model: nn.Module, optimizer, ctx) -> dict:
    """Each rank writes its slices as safetensors; returns the optimizer's non-tensor
    skeleton (the same on every rank; rank 0 stores it in state.json)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model_state, skeleton, flat = _sharded_state(model, optimizer)
    writer = HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True)
    dcp.save({"model": model_state, **flat}, storage_writer=writer)
    save_state({"rng": rng_state()}, tmp / f"rng-rank{ctx.rank}")
    return skeleton


def _load_sharded(path: Path, model: nn.Module, optimizer, skeleton: dict, ctx) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, _, flat = _sharded_state(model, optimizer)
    state = {"model": model_state, **flat}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)))
    loaded = {k: v for k, v in state.items() if k != "model"}
    # strict=False: the frozen weights are not in the checkpoint (dcp.load above already
    # refused a checkpoint lacking any trainable one)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=_join_tensors(skeleton, loaded),
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    rank = ctx.rank if ctx is not None else 0
    own = path / f"rng-rank{rank}"  # more processes than saved: rank 0's generators
    set_rng_state(
        load_state(own if own.with_suffix(".json").exists() else path / "rng-rank0")["rng"]
    )


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
        raise ValueError("the checkpoint's optimizer holds other parameters")
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


def _unreadable(path: Path, why: str) -> CheckpointLoadError:
    earlier = [p for p in complete_checkpoints(path.parent) if p != path]
    fallback = f", or delete {path} to resume from {earlier[-1].name}" if earlier else ""
    return CheckpointLoadError(
        f"checkpoint {path} cannot be resumed ({why}); nothing was changed: run with --fresh "
        f"to start over{fallback}."
    )


def _read_state(path: Path) -> dict:
    if (path / "state.pt").exists() and not (path / "state.json").exists():
        raise _unreadable(
            path, "it was written by an older snug as a pickle, which snug no longer reads"
        )
    try:
        state = load_state(path / "state")
        if not isinstance(state, dict) or not isinstance(state.get("train_state"), dict):
            raise ValueError("state.json holds no train_state")
        return state
    except CheckpointLoadError:
        raise
    except Exception as e:  # JSON, safetensors, missing files: all mean a damaged checkpoint
        raise _unreadable(path, first_line(e)) from None


def read_train_state(path: Path) -> dict:
    """The loop's state of a checkpoint (data position, config, counters), without loading
    weights; CheckpointLoadError when it cannot be read."""
    return _read_state(path)["train_state"]


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None = None,
    ctx=None,
) -> dict:
    """Restore trainable weights, optimizer, scheduler, grad scaler and every RNG from `path`;
    returns its train_state. Anything wrong with the files is one CheckpointLoadError naming
    the checkpoint (torch.distributed.checkpoint's own error derives from BaseException)."""
    state = _read_state(path)
    try:
        if (path / SHARDS).is_dir():  # any number of processes: the shards are re-split
            _load_sharded(path, model, optimizer, state["optimizer"], ctx)
        else:
            _load_whole(path, model, optimizer, state, ctx)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
    except (KeyboardInterrupt, SystemExit, CheckpointLoadError):
        raise
    except BaseException as e:  # noqa: BLE001 (torch's CheckpointException is a BaseException)
        raise _unreadable(path, first_line(e)) from None
    return state["train_state"]


def _load_whole(path: Path, model: nn.Module, optimizer, state: dict, ctx) -> None:
    from snug.train import dist

    weights = load_file(path / "trainable.safetensors")
    params = dict(dist.unwrap(model).named_parameters())  # FSDP: global shapes
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected or any(
        weights[n].shape != params[n].shape for n in expected & set(weights)
    ):
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointLoadError(
            f"checkpoint {path} does not match this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, or shapes differ); nothing was "
            "changed: run with --fresh to start over."
        )
    if ctx is not None and ctx.active and ctx.strategy == "fsdp":
        _load_full_into_shards(model, optimizer, weights, state["optimizer"])
    else:  # one process, or DDP's replicas: every rank loads the whole state
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
