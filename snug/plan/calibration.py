"""What `snug calibrate` measured on a device, kept per user, and the step-time model that reads it.

The file is JSON at `$SNUG_CALIBRATION`, else `$XDG_CONFIG_HOME/snug/calibration.json`, else
`~/.config/snug/calibration.json`: `{"version": 1, "devices": {KEY: ENTRY}}`, one entry per
device (a GPU by its name in snug's table, the CPU by its model and thread count), each entry
`Calibration.as_dict()`. `snug calibrate` adds or replaces its device's entry and keeps the
others; the file is written whole to a temporary file and renamed, so an interrupted write never
leaves half a file. A file that is not valid is an error that names it, never overwritten.

Step time (per optimizer step, per rank), from two parts. The device's: `max(flops / rate, 3 x
weights / bandwidth) + traffic / traffic_bandwidth`, the compute at an achieved FLOP rate or
reading the weights three times (forward, backward, recomputation), whichever is longer, plus
the bytes that ops without FLOPs read and write (norms, activations, softmax, dequantisation,
DoRA's weight norm, the optimizer's update: the replay counts them) at the device's measured
copy bandwidth. The host's: `ops x op_seconds`, a fixed cost for every op the step dispatches (a
kernel launch and the Python and dispatcher work around it, which dominate small steps). On a
CPU the two add up (the host does the work). On a GPU the host queues kernels while the device
runs earlier ones, so a calibrated GPU takes the longer of the two (`overlap`); then each
matmul with a 4-bit weight adds `quant_call_seconds` (bitsandbytes dequantises it in several
ops with Python around them, where the replay's stand-in is one op). Calibration measures the
bandwidth and fits `rate` and `op_seconds` to real steps (the rate at most the device's
one-large-matmul rate: a whole step cannot beat its best case) and the 4-bit cost to its QLoRA
step; without it the rate is the card's table rate times a typical efficiency, op_seconds a
typical value (below, with where they come from), the two parts add up, and the traffic and
4-bit terms are left out (the typical values were fitted without them), as they are for a
calibration entry written before those terms existed.

With memory.offload_weights the frozen weights of the decoder layers are copied from host memory
for every layer's forward and again for its recomputation in backward (`streamed`, the replay
counts the bytes), at `h2d_gbs`: the pinned host-to-device rate `snug calibrate` measured, else
the GPU table's PCIe figure, else a typical one; on a CPU the rate of a large clone (the copy is
host to host). On a GPU the next layer's copy runs on a side stream while the current layer
computes, so each pass takes the longer of its compute and its copies: forward copies half the
bytes beside forward's compute, backward the other half beside the recomputation and backward
(`FORWARD_SHARE` of the device's time is forward's), and the step's device part becomes
`max(share x device, copies / 2) + max((1 - share) x device, copies / 2)`: the device's time
while the copies keep up, the copies' time when they do not, and more than either near the
crossover, where forward waits on its copies while backward does not. On a CPU the host makes the
copies itself and they add up. Pure Python, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from snug.errors import UserError

FILE_VERSION = 1

# Typical values, used for a device with no calibration entry. GPU: 0.4 of the table's dense
# rate (a model-FLOPs utilisation typical of published fine-tuning runs) and the per-op cost that
# best fits, at that rate, the 13 configurations of the H200 run of 2026-11-27: 15.8 us
# (`python benchmarks/step_time_fit.py` prints it: leave-one-out median error 21%, where FLOPs
# over 0.4 of the rate alone were 76% short; small models on a fast card are launch-bound; a
# free fit of both terms asks for 1.15x the card's peak rate, so the rate stays fixed).
# CPU: the matmul rate is measured when the plan is made; the per-op cost is what `snug
# calibrate --device cpu` fitted on this project's 2-core AMD EPYC (AVX2): 20.7 and 21.1 us.
GPU_EFFICIENCY = 0.4
GPU_OP_SECONDS = 15.8e-6
CPU_OP_SECONDS = 21e-6
# A GPU with neither a calibration nor a PCIe figure in the table (a size such as 24GiB): the
# practical pinned host-to-device rate of PCIe 4.0 x16, the commonest link of the table's cards
# (snug/models/catalog/GPUS.md: 25.13 GB/s measured on an A100).
TYPICAL_H2D_GBS = 25.1
# The share of a step's device time that its forward passes take: with checkpointing a layer
# runs forward, again in backward, then its backward (two forwards' FLOPs): 1 of 4; without,
# forward and backward: 1 of 3. Streamed copies overlap the pass they belong to.
FORWARD_SHARE = {True: 1 / 4, False: 1 / 3}


# Entries snug ships, for cards its GPU kit calibrated (each names its source): a plan for such a
# card uses them until `snug calibrate` on the user's own card replaces them.
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "catalog" / "calibrations.json"


class CalibrationError(UserError):
    """The calibration file cannot be read or written (names the file)."""


@dataclass(frozen=True)
class Calibration:
    device: str  # the key: GPU table name, or "cpu: <model> x<threads> threads"
    date: str  # ISO date of the measurement
    precision: str  # of the measured steps: bf16-mixed on a GPU, fp32 on a CPU
    rate_flops: float  # achieved FLOP/s of whole training steps (fitted)
    op_seconds: float  # fixed seconds per dispatched op (fitted)
    step_error: tuple[float, float]  # min, max of (fitted - measured) / measured over the series
    matmul_flops: float | None = None  # one large matmul, the device's best case
    bandwidth_gbs: float | None = None  # a large device copy (read + write)
    # the bandwidth the fit charged the step's memory traffic at (None: an entry fitted without
    # the traffic term, before it existed)
    traffic_gbs: float | None = None
    context_bytes: int | None = None  # CUDA context: device memory used by initialisation
    # True: the host's dispatch and the device's work overlap (CUDA; module docstring). False:
    # they add up, as on a CPU and in an entry written before the overlapped fit existed
    overlap: bool = False
    # seconds each matmul with a 4-bit weight costs beyond its FLOPs and ops (None: the series
    # had no 4-bit step, as on a CPU)
    quant_call_seconds: float | None = None
    # the rate memory.offload_weights streams at: on a GPU a pinned host-to-device copy, on a
    # CPU a large clone (None: an entry written before it was measured)
    h2d_gbs: float | None = None
    reserved_ratio: float | None = None  # measured max_memory_reserved / planned, median
    reserved_error: tuple[float, float] | None = None  # min, max of planned/measured - 1
    steps: tuple[dict, ...] = ()  # each configuration of the series, as measured
    versions: dict = dataclasses.field(default_factory=dict)  # torch, snug, the device's
    # where an entry shipped with snug comes from (None: the user's own `snug calibrate`)
    source: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(raw: dict) -> Calibration:
        names = {f.name for f in dataclasses.fields(Calibration)}
        keys = {k: v for k, v in raw.items() if k in names}
        for key in ("step_error", "reserved_error"):
            if keys.get(key) is not None:
                keys[key] = tuple(keys[key])
        keys["steps"] = tuple(keys.get("steps") or ())
        return Calibration(**keys)

    def label(self) -> str:
        where = f"; {self.source}" if self.source else ""
        return f"calibrated on {self.date} ({self.device}{where})"


def calibration_path() -> Path:
    if os.environ.get("SNUG_CALIBRATION"):
        return Path(os.environ["SNUG_CALIBRATION"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "snug" / "calibration.json"


def _read(path: Path) -> dict:
    """The file's {key: entry} (empty when there is no file)."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(
            f"{path}: not a snug calibration file ({e}); move it away or point "
            "SNUG_CALIBRATION elsewhere, then run snug calibrate again."
        ) from None
    raw = raw if isinstance(raw, dict) else {}
    devices = raw.get("devices")
    if raw.get("version") != FILE_VERSION or not isinstance(devices, dict):
        raise CalibrationError(
            f"{path}: not a snug calibration file (version {FILE_VERSION} with a 'devices' "
            "object expected); move it away or point SNUG_CALIBRATION elsewhere."
        )
    return devices


def load(key: str, path: Path | None = None) -> Calibration | None:
    """The entry for device `key` in `path`, by default the user's file and then, for a card
    the user never calibrated, the one snug ships (SHIPPED); None when neither has one."""
    for file in [path] if path else [calibration_path(), SHIPPED]:
        entry = _read(file).get(key)
        if entry is not None:
            break
    else:
        return None
    try:
        cal = Calibration.from_dict(entry)
    except (TypeError, ValueError) as e:
        raise CalibrationError(
            f"{file}: the entry for {key!r} is not valid ({e}); run snug calibrate again."
        ) from None
    if why := _bad_number(cal):
        raise CalibrationError(f"{file}: the entry for {key!r}: {why}; run snug calibrate again.")
    return cal


# What each number of an entry must be, as the plan computes with it: (the words, the test).
# The fits may give a cost of 0. None: not measured (allowed but for the REQUIRED ones).
ABOVE_0 = ("a finite number above 0", lambda v: _finite(v) and v > 0)
AT_LEAST_0 = ("a finite number of 0 or more", lambda v: _finite(v) and v >= 0)
PAIR = (
    "two finite numbers",
    lambda v: isinstance(v, tuple) and len(v) == 2 and all(map(_finite, v)),
)
NUMBERS = {
    "rate_flops": ABOVE_0,
    "op_seconds": AT_LEAST_0,
    "step_error": PAIR,
    "matmul_flops": ABOVE_0,
    "bandwidth_gbs": ABOVE_0,
    "traffic_gbs": ABOVE_0,
    "context_bytes": AT_LEAST_0,
    "quant_call_seconds": AT_LEAST_0,
    "h2d_gbs": ABOVE_0,
    "reserved_ratio": ABOVE_0,
    "reserved_error": PAIR,
}
REQUIRED = ("rate_flops", "op_seconds", "step_error")


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad_number(cal: Calibration) -> str | None:
    """Why a number of `cal` cannot be planned with, or None. Python's JSON reads NaN and
    Infinity, and a plan would compute with them and print `nan`."""
    for name, (must, good) in NUMBERS.items():
        value = getattr(cal, name)
        if (value is not None or name in REQUIRED) and not good(value):
            shown = list(value) if isinstance(value, tuple) else value
            return f"{name} is {shown!r}, but must be {must}"
    return None


def save(cal: Calibration, path: Path | None = None) -> Path:
    """Add or replace `cal`'s entry, keeping every other device's."""
    path = path or calibration_path()
    devices = _read(path)  # a file we cannot read is reported, never overwritten
    devices[cal.device] = cal.as_dict()
    text = json.dumps({"version": FILE_VERSION, "devices": devices}, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".calibration-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise CalibrationError(f"{path}: cannot write the calibration ({e}).") from None
    return path


@dataclass(frozen=True)
class StepModel:
    """Inputs of the step-time formula (module docstring) and where they came from."""

    rate_flops: float | None  # None: no rate known (no step time)
    op_seconds: float
    bandwidth_gbs: float | None
    source: str  # "calibrated on <date> (<device>)" or "typical values, not calibrated"
    context_bytes: int | None = None  # CUDA context, measured
    reserved_ratio: float | None = None  # measured / replayed max_memory_reserved
    traffic_gbs: float | None = None  # None: no traffic term (typical values)
    overlap: bool = False  # the host's dispatch runs while the device works (CUDA, calibrated)
    quant_call_seconds: float = 0.0  # per matmul with a 4-bit weight
    # memory.offload_weights: the rate its copies run at (GB/s), whether they run on a side
    # stream beside the compute (a GPU) or in line (a CPU's clones), and where the rate is from
    h2d_gbs: float | None = None
    h2d_overlaps: bool = False
    h2d_source: str = ""

    def seconds(
        self,
        flops: int,
        ops: int,
        weights_bytes: int,
        traffic: int = 0,
        quant_calls: int = 0,
        streamed: int = 0,
        forward_share: float = FORWARD_SHARE[True],
    ) -> float | None:
        if not self.rate_flops:
            return None
        compute = flops / self.rate_flops
        memory = 3 * weights_bytes / (self.bandwidth_gbs * 1e9) if self.bandwidth_gbs else 0.0
        moved = traffic / (self.traffic_gbs * 1e9) if self.traffic_gbs else 0.0
        device, host = max(compute, memory) + moved, ops * self.op_seconds
        if streamed:
            device = self.streaming(device, streamed, forward_share)
        both = max(device, host) if self.overlap else device + host
        return both + quant_calls * self.quant_call_seconds

    def streaming(self, device: float, streamed: int, forward_share: float) -> float:
        """The device's seconds with `streamed` bytes copied in (module docstring)."""
        if not self.h2d_gbs:
            raise ValueError("the step streams weights, but no host-to-device rate is known")
        copies = streamed / (self.h2d_gbs * 1e9)
        if not self.h2d_overlaps:
            return device + copies
        forward, backward = forward_share * device, (1 - forward_share) * device
        return max(forward, copies / 2) + max(backward, copies / 2)

    def of(self, sim, checkpointing: bool = True) -> float | None:
        """The step seconds of a replay (plan/simulate.py's Simulation) of a configuration
        with `checkpointing` (memory.grad_checkpointing: what share of the step is forward)."""
        return self.seconds(
            sim.flops_per_step,
            sim.ops_per_step,
            sim.weights_bytes,
            sim.traffic_per_step,
            sim.quant_calls_per_step,
            sim.streamed_bytes_per_step,
            FORWARD_SHARE[checkpointing],
        )
