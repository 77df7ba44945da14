"""A dispatch-mode tracker of tensor memory: every storage created and freed, and the peak.

Written here because torch's own `MemTracker` registers hooks on frozen parameters and fails
on adapter models (torch 2.13). The same tracker measures a real CPU run (`snug train`,
`summary.json`) and, on fake tensors, the planner's prediction, so both count alike.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages. Storages that exist before the mode is entered
    count once `track(...)` is given them (e.g. the model's weights). With `rounding`, every
    storage counts as its size rounded up to a multiple of it (the CUDA caching allocator's 512
    bytes), as the planner needs for a GPU."""

    def __init__(self, rounding: int = 1) -> None:
        super().__init__()
        self.rounding = rounding
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        nbytes = -(-storage.nbytes() // self.rounding) * self.rounding
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        # Storages keep their Python object alive as long as the C++ storage lives, so the
        # finalizer fires exactly when the memory is released.
        weakref.finalize(storage, self._free, key, nbytes)

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


class ModuleNames:
    """The name of the module whose forward is running (forward hooks that hold no tensors:
    torch's ModuleTracker keeps tensors alive through its backward hooks and so moves the peak
    it is asked to explain). Empty in backward, except while checkpointing recomputes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.stack, self.handles = model, [], []

    def __enter__(self) -> ModuleNames:
        for name, module in self.model.named_modules():
            short = name.split("model.")[-1] or type(module).__name__
            self.handles.append(
                module.register_forward_pre_hook(lambda m, a, n=short: self.stack.append(n))
            )
            # always_call: checkpointing stops a recomputation early by raising inside forward
            self.handles.append(module.register_forward_hook(self._leave, always_call=True))
        return self

    def _leave(self, module, args, output) -> None:  # returns None: the output stays as is
        self.stack.pop()

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "(backward)"


class ExplainingTracker(TensorMemoryTracker):
    """The tracker, also remembering for each live storage its shape, dtype, the op that made
    it and the module running then (`modules`: ModuleNames), and keeping a copy of that list at
    each new peak: what the memory *is* at the peak (`snug plan --explain`)."""

    def __init__(self, rounding: int = 1, modules=None) -> None:
        super().__init__(rounding)
        self.modules = modules
        self._op = "weights and buffers"
        self._meta: dict[int, tuple] = {}
        self.at_peak: list[tuple] = []

    def _where(self) -> str:
        if self._op == "weights and buffers" or not self.modules:
            return ""
        return self.modules.current

    def _add(self, t: torch.Tensor) -> None:
        key, peak = id(t.untyped_storage()), self.peak
        fresh = key not in self._seen
        super()._add(t)
        if fresh:
            nbytes = t.untyped_storage().nbytes()
            self._meta[key] = (nbytes, tuple(t.shape), str(t.dtype), self._op, self._where())
        if self.peak > peak:
            self.at_peak = list(self._meta.values())

    def _free(self, key: int, nbytes: int) -> None:
        super()._free(key, nbytes)
        self._meta.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = func.overloadpacket.__name__
        return super().__torch_dispatch__(func, types, args, kwargs)

    def largest(self, n: int = 12) -> list[dict]:
        keys = ("bytes", "shape", "dtype", "op", "module")
        return [dict(zip(keys, m, strict=True)) for m in sorted(self.at_peak, reverse=True)[:n]]
