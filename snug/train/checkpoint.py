"""Checkpoints that are either complete or ignored.

A checkpoint is written into a temporary directory beside its target, flushed, renamed into
place, and only then marked complete; old ones are deleted after the new one is complete.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

COMPLETE = "COMPLETE"


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer, scheduler, train_state: dict, keep_last: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "train_state": train_state,
        },
        tmp / "state.pt",
    )
    (tmp / COMPLETE).write_text(str(step))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    # The rename is the commit point: before it the old checkpoint (if any) is whole, after it
    # the new one is. A checkpoint of the same step is moved aside first, then deleted.
    old = root / f".old-step-{step}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    prune(root, keep_last)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are not listed."""
    if not root.exists():
        return []
    done = [p for p in root.glob("step-*") if (p / COMPLETE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)
