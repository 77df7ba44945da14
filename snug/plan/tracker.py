"""The planner's tracker: snug's tensor tracker, plus what the peak is made of and the FLOPs.

Written here (not torch's MemTracker / FlopCounterMode) because MemTracker fails on adapter
models with torch 2.13 and both register module hooks that keep tensors alive and so move the
peak they measure. This one only reads what the dispatcher passes through; FLOPs use torch's
own per-op formulas (`torch.utils.flop_counter.flop_registry`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from snug.plan.trace import LayerTags
from snug.train.memory import TensorMemoryTracker, local

# What the bytes at the peak are, as DESIGN.md's `breakdown` names them.
CATEGORIES = (
    "weights",  # frozen weights and buffers
    "trainable",  # trainable parameters
    "gradients",  # .grad of trainable parameters
    "optimizer",  # optimizer state
    "activations",  # made inside a module's forward (or its recomputation) and still alive
    "logits",  # vocabulary-wide tensors of the head and loss, and their gradients
    "temporary",  # everything else: backward temporaries, the update's scratch, loss scalars
    "overhead",  # the batch tensors and the allocator's rounding of every block
)


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


# Ops a fake tensor dispatches where a real one answers from its own fields (`tensor.device`):
# no kernel, no cost, not counted.
METADATA_OPS = {torch.ops.prim.device}
DEVICE_QUERY = torch.ops.prim.device.default


# Ops that read and write no tensor data: views, and memory handed out uninitialised.
NO_DATA = {
    "_unsafe_view",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "_local_scalar_dense",
    "set_",
    "resize_",
    "_reshape_alias",
}


def moves_data(func) -> bool:
    return not func.is_view and func.overloadpacket.__name__ not in NO_DATA


def _tensor_bytes(args, kwargs, out) -> int:
    """Bytes of the tensors an op reads and writes (its arguments and results; a view's
    elements, not its whole storage)."""
    leaves = tree_leaves((args, kwargs, out))
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class PlanTracker(TensorMemoryTracker):
    """Remembers, for each live storage, its size, shape, dtype, the op and module that made it
    and what it is (CATEGORIES), and keeps that list as it stood at the peak. The list is copied
    lazily, at the first free after a new peak (nothing is freed between the peak and then, so
    the copy is exact), which keeps the cost to one copy per local maximum.

    Gradients are made by backward ops and optimizer state by the update, so what they are is
    only known once they are stored: `mark(tensors, category)` says so then (from a gradient
    hook, after an optimizer step). The copy at the peak shares each storage's record, so a mark
    made after the peak on a storage alive at the peak still counts. `inputs=True` marks the
    batch being built. While `counting`, FLOPs of every op add to `flops` and every op to `ops`
    (each a dispatch, most a kernel launch on a GPU: the step's fixed cost per op)."""

    def __init__(self, rounding: int, modules: ModuleNames, vocab_size: int) -> None:
        super().__init__(rounding)
        self.modules, self.vocab_size = modules, vocab_size
        self.inputs = False
        self.counting = False
        self.flops = 0
        self.ops = 0
        self.traffic = 0  # bytes read and written by ops without FLOPs (memory-bound work)
        # matmuls with a 4-bit weight (forward, recomputation, backward): the stand-in is one
        # op where bitsandbytes runs several, each with Python work around it (plan/standins.py)
        self.quant_calls = 0
        self._op: str | None = None  # None: outside dispatch (the model's own tensors)
        self._meta: dict[int, list] = {}  # [bytes, shape, dtype, op, module, category]
        self._at_peak: list[list] = []
        self._stale = False

    def _origin(self, t: torch.Tensor, requires_grad: bool) -> tuple[str, str]:
        if self._op is None:
            return ("trainable" if requires_grad else "weights"), ""
        module = self.modules.stack[-1] if self.modules.stack else ""
        if self.inputs:
            return "overhead", module
        if t.dim() and t.shape[-1] == self.vocab_size:
            return "logits", module
        return ("activations" if module else "temporary"), module or "(backward)"

    def _add(self, t: torch.Tensor) -> None:
        requires_grad = t.requires_grad  # an FSDP parameter says so, its local shard does not
        t = local(t)
        key, peak = id(t.untyped_storage()), self.peak
        fresh = key not in self._sizes
        super()._add(t)
        if fresh:
            origin, module = self._origin(t, requires_grad)
            nbytes = t.untyped_storage().nbytes()
            op = self._op or "weights and buffers"
            self._meta[key] = [nbytes, tuple(t.shape), str(t.dtype), op, module, origin]
        if self.peak > peak:
            self._stale = True

    def _free(self, key: int) -> None:
        # Runs as a storage is released (a finalizer): it must not touch any tensor.
        if self._stale:
            self._snapshot()
        super()._free(key)
        self._meta.pop(key, None)

    def _resized(self, storage) -> None:
        key = id(storage)
        if key not in self._sizes:
            return
        if self._stale:  # a resize may shrink: the peak before it is the one to keep
            self._snapshot()
        peak = self.peak
        super()._resized(storage)
        meta = self._meta.get(key)
        if meta is not None:  # a new record: the copy at the peak keeps the old size
            self._meta[key] = [storage.nbytes(), *meta[1:]]
        if self.peak > peak:
            self._stale = True

    def _snapshot(self) -> None:
        self._at_peak = list(self._meta.values())
        self._stale = False

    def mark(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        for t in tensors:
            meta = self._meta.get(id(local(t).untyped_storage()))
            if meta is not None:
                meta[5] = category

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = func.overloadpacket.__name__
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.counting and func.overloadpacket not in METADATA_OPS:
            self.ops += 1
        if self.counting and func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out)
        elif self.counting and func.overloadpacket not in METADATA_OPS and moves_data(func):
            self.traffic += _tensor_bytes(args, kwargs, out)
        return out

    def __exit__(self, *exc):
        if self._stale:
            self._snapshot()
        return super().__exit__(*exc)

    def breakdown(self) -> dict[str, int]:
        """Bytes at the peak by category; the allocator's rounding counts as overhead, so the
        parts add up to the peak exactly."""
        parts = dict.fromkeys(CATEGORIES, 0)
        for nbytes, *_, category in self._at_peak:
            parts[category] += nbytes
        parts["overhead"] += self.peak - sum(parts.values())
        return parts

    def largest(self, n: int = 12) -> list[dict]:
        keys = ("bytes", "shape", "dtype", "op", "module", "what")
        at_peak = sorted(map(tuple, self._at_peak), reverse=True)
        return [dict(zip(keys, m, strict=True)) for m in at_peak[:n]]


class PhaseTracker(PlanTracker):
    """PlanTracker that also keeps the peak and breakdown of each phase of the step: a phase
    ends whenever autograd's backward starts or ends (its graph task id, as
    torch.utils.checkpoint reads it) and at `close_phase()`. Each phase's peak is linear in the
    depth, but which phase holds the step's peak need not be: bitsandbytes' 8-bit matmuls keep
    their input for as long as the graph lives, and the step holds a micro-batch's graph until
    the next one's loss replaces it, so past a few layers the next forward overtakes the loss's
    backward. After the step, `peak`, `breakdown()` and `largest()` are the step's, as before."""

    def __init__(self, rounding: int, modules: ModuleNames, vocab_size: int) -> None:
        super().__init__(rounding, modules, vocab_size)
        self.phases: list[tuple[int, dict[str, int]]] = []
        self.layers: LayerTags | None = None  # with `events`: tag each with its layer
        self._backward = False
        self._step_peak: tuple[int, list] = (0, [])  # the largest phase's peak and records

    def _event(self, key: int, nbytes: int) -> None:
        self.events.append((key, nbytes, self.layers.current()))

    def close_phase(self) -> None:
        if self._stale:
            self._snapshot()
        self.phases.append((self.peak, self.breakdown()))
        if self.peak > self._step_peak[0]:
            self._step_peak = (self.peak, self._at_peak)
        self.peak, self._at_peak = self.live, list(self._meta.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is DEVICE_QUERY:
            # Most calls of a replay (two in three): the autograd engine and F.linear ask a fake
            # tensor its device. Nothing is allocated, counted or timed: straight to the fake
            # mode, past the tracking (a phase that changes here closes at the next op, with
            # the same live bytes).
            return func(*args, **(kwargs or {}))
        backward = torch._C._current_graph_task_id() != -1
        if backward != self._backward:
            self._backward = backward
            self.close_phase()
        return super().__torch_dispatch__(func, types, args, kwargs)

    def __exit__(self, *exc):
        self.close_phase()
        self.peak, self._at_peak = self._step_peak
        return super().__exit__(*exc)
