"""A dispatch-mode tracker of tensor memory: every storage created and freed, and the peak.

Written here because torch's own `MemTracker` registers hooks on frozen parameters and fails
on adapter models (torch 2.13). The same tracker measures a real CPU run (`snug train`,
`summary.json`) and, on fake tensors, the planner's prediction, so both count alike.
"""

from __future__ import annotations

import resource
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages. Storages that exist before the mode is entered
    count once `track(...)` is given them (e.g. the model's weights). With `rounding`, every
    storage counts as its size rounded up to a multiple of it (the CUDA caching allocator's 512
    bytes), as the planner needs for a GPU. With `events` a list, every storage created
    appends (id, bytes) to it and every storage released (id, -1), in order: what the planner
    replays through its model of the caching allocator (plan/allocator.py).

    FSDP frees and re-allocates gathered parameters by resizing their storage in place
    (`UntypedStorage.resize_`), which no op reports: while the tracker is active that method
    is wrapped so a resize counts as the memory it frees or takes."""

    def __init__(self, rounding: int = 1) -> None:
        super().__init__()
        self.rounding = rounding
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # counted bytes of each live storage, by id
        self._resize = None
        self.events: list[tuple[int, int]] | None = None

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.rounding) * self.rounding

    def _event(self, key: int, nbytes: int) -> None:
        self.events.append((key, nbytes))

    def _free(self, key: int) -> None:
        if self.events is not None and key in self._sizes:
            self._event(key, -1)
        self.live -= self._sizes.pop(key, 0)

    def _add(self, t: torch.Tensor) -> None:
        t = local(t)
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        if self.events is not None:
            self._event(key, storage.nbytes())
        nbytes = self._rounded(storage.nbytes())
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        # Storages keep their Python object alive as long as the C++ storage lives, so the
        # finalizer fires exactly when the memory is released.
        weakref.finalize(storage, self._free, key)

    def _resized(self, storage) -> None:
        key = id(storage)
        if key not in self._sizes:
            return
        if self.events is not None:  # FSDP frees (to 0 bytes) and re-allocates (from 0)
            if self._sizes[key]:  # an empty storage holds no block: nothing to free
                self._event(key, -1)
            if storage.nbytes():  # nor does one resized to 0: no empty block is made
                self._event(key, storage.nbytes())
        nbytes = self._rounded(storage.nbytes())
        self.live += nbytes - self._sizes[key]
        self._sizes[key] = nbytes
        self.peak = max(self.peak, self.live)

    def __enter__(self):
        original, tracker = torch.UntypedStorage.resize_, self

        def resize_(storage, size):
            out = original(storage, size)
            tracker._resized(storage)
            return out

        self._resize, torch.UntypedStorage.resize_ = original, resize_
        return super().__enter__()

    def __exit__(self, *exc):
        if self._resize is not None:
            torch.UntypedStorage.resize_, self._resize = self._resize, None
        return super().__exit__(*exc)

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


class StepPeaks:
    """The tensor-memory peak of a training loop, measured on the steps that can set it.

    Tracking every op costs 1.3-1.6x step time on a small model, where per-op Python overhead
    is largest (`python benchmarks/tracker_overhead.py`). Between steps only persistent tensors
    live (weights, optimizer state: the step ends with `zero_grad(set_to_none=True)`); what a
    step adds grows with its micro-batches' rows x length (activations, logits) and rows x
    length² (attention scores without a fused kernel). So the first `warmup` steps are tracked
    (the optimizer's state appears during step 1, and step 2 is the first to hold it with
    activations), and after them only a step with a micro-batch larger in one of those two
    measures than every micro-batch tracked so far: another step can add no more than one
    already tracked. On entering, the persistent tensors are counted again, since storages
    made while untracked (the optimizer's state) are not yet known to the tracker."""

    def __init__(self, warmup: int = 2) -> None:
        self.tracker = TensorMemoryTracker()
        self.warmup = warmup
        self.steps = 0
        self.tracked = 0
        self._largest = (0, 0)

    @property
    def peak(self) -> int:
        return self.tracker.peak

    @contextmanager
    def step(
        self, shapes: Iterable[tuple[int, int]], persistent: Callable[[], Iterable[torch.Tensor]]
    ) -> Iterator[None]:
        """Around one step whose micro-batches have (rows, length) `shapes`."""
        shapes = list(shapes)
        size = (
            max((r * n for r, n in shapes), default=0),
            max((r * n * n for r, n in shapes), default=0),
        )
        track = self.steps < self.warmup or size[0] > self._largest[0] or size[1] > self._largest[1]
        self.steps += 1
        if not track:
            yield
            return
        self._largest = (max(size[0], self._largest[0]), max(size[1], self._largest[1]))
        self.tracked += 1
        with self.tracker:
            self.tracker.track(persistent())
            yield


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors (AdamW's moments, an 8-bit optimizer's quantised state)."""
    return [
        v
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds `t` on this rank: an FSDP shard (DTensor) reports the
    whole tensor's size through its wrapper, its local tensor the shard's."""
    return t._local_tensor if isinstance(t, DTensor) else t


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (an independent measure beside the tracker)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory_report(peaks: StepPeaks | None, device, rss_before: int) -> dict:
    """summary.json's peak_memory: the tracker's peak on a CPU (with the process's RSS), the
    allocator's on CUDA."""
    if peaks is not None:
        return {
            "measured_bytes": peaks.peak,
            "tracked_steps": peaks.tracked,
            "predicted_bytes": None,
            "device": "cpu",
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_before_training_bytes": rss_before,
        }
    return {
        "measured_bytes": torch.cuda.max_memory_allocated(device),
        "reserved_bytes": torch.cuda.max_memory_reserved(device),
        "predicted_bytes": None,
        "device": torch.cuda.get_device_name(device),
    }
