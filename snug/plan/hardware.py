"""What the planner plans for: the model's architecture and the device.

Models: a local directory, a `config.json`, a name from the bundled catalog
(`snug/models/catalog/models/`, keyed by hub id such as `meta-llama/Llama-3.2-3B`), or a hub id
(config only, when the hub is reachable). Devices: a GPU name from the bundled table
(`snug/models/catalog/gpus.csv`), matched loosely, a memory size such as `24GiB`, or the CPU.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from snug.plan.simulate import PlanError

CATALOG = Path(__file__).resolve().parent.parent / "models" / "catalog"
GIB = 2**30


def catalog_models() -> list[str]:
    """Hub ids of the bundled model configs."""
    return sorted(p.stem.replace("__", "/", 1) for p in (CATALOG / "models").glob("*.json"))


def model_config(
    name: str, trust_remote_code: bool = False, revision: str | None = None
) -> PretrainedConfig:
    path = Path(name)
    if path.is_file():  # a config.json
        raw = json.loads(path.read_text())
    elif (CATALOG / "models" / (name.replace("/", "__", 1) + ".json")).is_file():
        raw = json.loads((CATALOG / "models" / (name.replace("/", "__", 1) + ".json")).read_text())
    else:
        try:  # a local model directory, or a hub id when the hub is reachable
            return AutoConfig.from_pretrained(
                name, trust_remote_code=trust_remote_code, revision=revision
            )
        except (OSError, ValueError) as e:
            close = [m for m in catalog_models() if name.lower().split("/")[-1] in m.lower()]
            hint = f"; bundled: {', '.join(close)}" if close else " (snug plan --list-models)"
            raise PlanError(
                f"--model {name}: not a config.json, a model directory, a bundled model or a "
                f"reachable hub id ({str(e).splitlines()[0][:120]}){hint}."
            ) from None
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    if "model_type" not in raw:
        raise PlanError(f"--model {name}: the config has no model_type.")
    config = AutoConfig.for_model(**raw)
    if hasattr(config, "text_config") and not hasattr(config, "num_hidden_layers"):
        raise PlanError(f"--model {name}: multimodal configs are not planned yet.")
    return config


@dataclass(frozen=True)
class Host:
    """The memory of the machine a local run trains on (`local_host`)."""

    memory_bytes: int  # its RAM
    process_bytes: int  # what this process holds already (torch, libraries, data): a floor on
    # what training needs beside the streamed weights


def host_memory_bytes() -> int:
    """This machine's RAM."""
    import psutil

    return psutil.virtual_memory().total


def local_host() -> Host:
    """This machine's RAM and this process's resident memory now."""
    import psutil

    return Host(host_memory_bytes(), psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class Device:
    name: str
    type: str  # "cuda" | "cpu"
    memory_bytes: int | None  # per device; None: no budget (plan without a fit verdict)
    count: int = 1
    bf16_tflops: float | None = None  # dense, fp32 accumulate
    fp16_tflops: float | None = None
    fp32_tflops: float | None = None
    bandwidth_gbs: float | None = None
    supports_bf16: bool = True
    pcie_gbs: float | None = None  # practical pinned host-to-device GB/s of its PCIe link
    # the machine that trains, when the plan is for the machine it runs on (a local run):
    # streamed weights are checked against its RAM. None: another machine, not checked
    host: Host | None = None

    def as_dict(self) -> dict:
        out = {"name": self.name, "memory_bytes": self.memory_bytes, "count": self.count}
        if self.host is not None:
            out["host_memory_bytes"] = self.host.memory_bytes
        return out


def host_shortfall(device: Device, streamed: int, tensors: int = 0) -> str | None:
    """Why the machine that trains on `device` cannot hold the `streamed` bytes of weights that
    memory.offload_weights keeps in host memory (pinned on a GPU), or None: those, the run's
    `tensors` in host memory (on a CPU its reserved bytes), and what this process holds
    already, against the machine's RAM. Only for a local run (`device.host`): another machine's
    RAM is not known."""
    host = device.host
    if host is None or not streamed:
        return None
    need = streamed + tensors + host.process_bytes
    if need <= host.memory_bytes:
        return None
    pinned = "pinned host memory" if device.type == "cuda" else "host memory"
    besides = f", the run's tensors {tensors / GIB:.1f} GiB" if tensors else ""
    return (
        f"needs {need / GIB:.1f} GiB of {pinned} (the streamed weights {streamed / GIB:.1f} "
        f"GiB{besides}, this process {host.process_bytes / GIB:.1f} GiB), this machine has "
        f"{host.memory_bytes / GIB:.1f} GiB"
    )


def gpu_table() -> list[dict]:
    with open(CATALOG / "gpus.csv", newline="") as f:
        return list(csv.DictReader(f))


def _words(text: str) -> list[str]:
    text = text.lower().replace("geforce", " ").replace("nvidia", " ").replace("tesla", " ")
    # torch reports the H100 SXM5 as "NVIDIA H100 80GB HBM3" (the PCIe card says "PCIe")
    text = text.replace("hbm3", "sxm")
    return re.findall(r"[a-z]+|\d+", text)


def parse_memory(text: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb)\s*", text.lower())
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    scale = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6}[unit]
    return int(value * scale)


def _num(row: dict, key: str) -> float | None:
    return float(row[key]) if row.get(key) else None


def find_gpu(query: str, count: int = 1) -> Device:
    """A GPU by a loose name ("4090", "RTX 4090", "a100 80gb", "h100"), or a memory size
    ("24GiB"). An ambiguous name lists the matches."""
    memory = parse_memory(query)
    if memory is not None:
        return Device(name=query.strip(), type="cuda", memory_bytes=memory, count=count)
    want = _words(query)
    rows = gpu_table()
    hits = [r for r in rows if all(w in _words(r["name"]) for w in want)]
    exact = [r for r in hits if _words(r["name"]) == want]
    if len(hits) > 1 and not exact:
        # "a100" matches 40GB and 80GB; prefer none silently
        names = "; ".join(r["name"] for r in hits)
        raise PlanError(f"--gpu {query!r} matches several GPUs: {names}. Name one.")
    if not hits:
        raise PlanError(
            f"--gpu {query!r} is not in the bundled table; give a memory size such as 24GiB, "
            f"or one of: {', '.join(r['name'] for r in rows)}."
        )
    row = (exact or hits)[0]
    return Device(
        name=row["name"],
        type="cuda",
        # Usable memory: nominal GiB less the 2% CUDA keeps (an A100 40GB reports 39.49 GiB).
        memory_bytes=int(float(row["memory_gib_usable_nominal"]) * GIB * 0.98),
        count=count,
        bf16_tflops=_num(row, "bf16_dense_tflops"),
        fp16_tflops=_num(row, "fp16_dense_tflops"),
        fp32_tflops=_num(row, "fp32_tflops"),
        bandwidth_gbs=_num(row, "mem_bandwidth_gbs"),
        supports_bf16=row["supports_bf16"] == "true",
        pcie_gbs=_num(row, "pcie_h2d_gbs"),
    )


def cpu_device(memory: int | None = None) -> Device:
    """This machine's CPU, its memory `memory` (a budget) or all its RAM."""
    host = local_host()
    return Device(name="cpu", type="cpu", memory_bytes=memory or host.memory_bytes, host=host)


def local_gpu(device: Device) -> Device:
    """`device` with this machine's host memory when it is the GPU this machine has (a plan
    for the machine it runs on), else as it is. Asks CUDA for the card's name."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return device
    here = Device(name=torch.cuda.get_device_name(0), type="cuda", memory_bytes=None)
    if device_key(here) != device_key(device):
        return device
    return dataclasses.replace(device, host=local_host())


def cpu_name() -> str:
    """This CPU's model, as /proc/cpuinfo or the platform names it."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_key(device: Device) -> str:
    """The name a device's `snug calibrate` entry is kept under: a GPU by its name in the
    bundled table (so "NVIDIA H200" from torch and "h200" from --gpu meet), else as given; the
    CPU by its model and the threads torch uses (both set its speed)."""
    if device.type == "cpu":
        import torch

        return f"cpu: {cpu_name()} x{torch.get_num_threads()} threads"
    try:
        return find_gpu(device.name).name if parse_memory(device.name) is None else device.name
    except PlanError:
        return device.name
