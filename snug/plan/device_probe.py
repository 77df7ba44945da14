"""What a device does at its best, measured for `snug calibrate`: one large matmul's FLOP rate,
a large copy's bandwidth and, on CUDA, the memory the context takes."""

from __future__ import annotations

import subprocess
import time

import torch


def _used_by_others() -> int | None:
    """Device memory in use before this process touched CUDA (nvidia-smi), None if unreadable."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def cuda_context() -> int | None:
    """Device memory that initialising CUDA takes (call before anything touches CUDA)."""
    before = _used_by_others()
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the context as the first tensor makes it
    free, total = torch.cuda.mem_get_info()
    if before is None:
        return None
    return total - free - before - torch.cuda.memory_reserved()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device) -> float:
    """FLOP/s of one large square matmul (bf16 on a GPU, fp32 on a CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    sync(device)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(5):
            a @ a
        sync(device)
        best = min(best, (time.perf_counter() - started) / 5)
    return 2 * n**3 / best


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy (bytes read plus bytes written) of 1 GiB on a GPU, of
    256 MiB on a CPU (well beyond its caches)."""
    src = torch.empty(2**30 if device.type == "cuda" else 2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    started = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    return 2 * 5 * src.numel() / (time.perf_counter() - started) / 1e9
