"""One rank of a multi-process run, for the replay: a fake process group (collectives that
move no data, from torch's own testing tools) and the same FSDP/DDP wrapping `snug train` does.

FSDP2 runs on fake tensors as it runs on real ones: its all-gather and reduce-scatter buffers,
shards and sharded gradients and optimizer state are allocated by the same code, so the
tracker sees one rank's memory. DDP does not run on fake tensors (its C++ reducer reads data
pointers); a DDP rank holds what one device holds plus the reducer's gradient buckets, one
buffer as large as all trainable gradients, allocated when the model is wrapped, so the replay
allocates that buffer beside the unwrapped model.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("fsdp", "ddp")


@contextlib.contextmanager
def fake_group(world: int):
    """A fake process group of `world` ranks, this process rank 0, and its device mesh; the
    default group is destroyed again on exit. Refused inside a real distributed run."""
    if world <= 1:
        yield None
        return
    if dist.is_initialized():
        raise RuntimeError("planning several ranks inside a distributed run is not supported")
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  registers backend "fake"
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("fake", rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))  # made before fake tensors: it holds real ones
    finally:
        dist.destroy_process_group()


def shard(model: nn.Module, cfg, mesh, precision: str) -> list[torch.Tensor]:
    """Wrap `model` (fake tensors) as rank 0 of `snug train` would; returns tensors the wrapper
    holds outside the model (DDP's gradient buckets) for the tracker to count."""
    if mesh is None or cfg.dist.strategy == "none":
        return []
    if cfg.dist.strategy == "ddp":
        return [
            torch.empty(p.numel(), dtype=p.dtype) for p in model.parameters() if p.requires_grad
        ]
    from snug.train.dist import shard_fsdp

    shard_fsdp(model, cfg, precision, mesh)
    return []
