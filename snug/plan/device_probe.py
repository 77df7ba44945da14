"""What a device does at its best, measured for `snug calibrate`: one large matmul's FLOP rate,
a large copy's bandwidth, the host-to-device copy rate weight streaming gets and, on CUDA, the
memory the context takes."""

from __future__ import annotations

import statistics
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


def h2d_bandwidth(device: torch.device) -> float:
    """GB/s at which memory.offload_weights streams weights to `device` (bytes copied, counted
    once). On a GPU: a 256 MiB pinned host tensor copied to the device with non_blocking on a
    side stream, as train/streaming.py copies, timed with CUDA events, the median of five. On a
    CPU: a 32 MiB clone (the host-to-host copy streaming makes there, into fresh memory, so its
    page faults count as they do in training), the median of three after a first; about a third
    of a second on this project's 2-core machines, where a clone runs at 0.35 GB/s."""
    if device.type != "cuda":
        src = torch.ones(2**25, dtype=torch.uint8)
        times = []
        for _ in range(4):
            started = time.perf_counter()
            src.clone()
            times.append(time.perf_counter() - started)
        return src.numel() / statistics.median(times[1:]) / 1e9
    src = torch.empty(2**28, dtype=torch.uint8).pin_memory()
    dst = torch.empty(src.numel(), dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)
    times = []
    with torch.cuda.stream(side):
        dst.copy_(src, non_blocking=True)  # warm-up
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(side)
            dst.copy_(src, non_blocking=True)
            end.record(side)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # ms -> s
    return src.numel() / statistics.median(times) / 1e9
