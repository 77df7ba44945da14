"""memory.offload_weights: the frozen weights of the decoder layers stay in host memory (pinned
on CUDA) and reach the device one layer at a time, for its forward and again for its
recomputation and backward; the next layer's copy runs on a side stream while the current one
computes. Trainable weights (adapters, virtual tokens, a freeze run's top layers), their
gradients and optimizer state, and everything outside the decoder layers (embeddings, final
norm, head) stay on the device.

Written here, after measuring the engines that exist (docs/design.md, "Streaming the frozen
weights"): FSDP2's `CPUOffloadPolicy` at one process offloads the trainable weights too, runs
their optimizer step on the CPU and copies every gradient to the host, and needs a process
group; FSDP1's CPU offload held 1.65x more GPU memory with mostly frozen weights (pytorch
#91165). This is the hook design of Axolotl's `layer_offloading` (forward pre-hooks that bring
a layer in and prefetch the next one), written for snug's non-reentrant checkpointing: a
checkpointed layer's forward keeps no reference to its weights, so they can leave as soon as
it returns; its recomputation in backward brings them back, and they stay until the layer
below starts recomputing (by then this layer's backward has run: the layer below needs the
gradient of this layer's input).

On a CPU the same code runs with the "device" copy a clone of the host tensor, so a config
that streams on a GPU trains (and is tested) anywhere; `snug plan` replays it on fake tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from snug.train.wrapped import causal_lm


@dataclass
class _Slot:
    """One frozen tensor of a layer: where it is installed, and its host copy."""

    owner: object  # a Parameter (installed as .data), a module (a buffer) or a quant state
    name: str  # the buffer's or the attribute's name ("" for a parameter)
    host: torch.Tensor

    def install(self, tensor: torch.Tensor) -> None:
        if isinstance(self.owner, nn.Parameter):
            self.owner.data = tensor
        elif isinstance(self.owner, nn.Module):
            self.owner._buffers[self.name] = tensor
        else:
            setattr(self.owner, self.name, tensor)


@dataclass
class _Layer:
    slots: list[_Slot] = field(default_factory=list)
    ready: torch.cuda.Event | None = None  # the copy to the device is done (CUDA)
    resident: bool = False

    @property
    def nbytes(self) -> int:
        return sum(s.host.untyped_storage().nbytes() for s in self.slots)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of `model` (through peft and DDP wrappers), in order."""
    return list(causal_lm(model).get_decoder().layers)


def _frozen_slots(layer: nn.Module) -> list[_Slot]:
    """Every frozen tensor of `layer`: its parameters that do not train, its buffers, and the
    quantization state bitsandbytes keeps beside a 4-bit weight (absmax: 1 byte per 64
    weights; its small code books move to the device once)."""
    slots, seen = [], set()
    for module in layer.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            slots.append(_Slot(p, "", p.data))
            state = getattr(p, "quant_state", None)
            if state is not None and torch.is_tensor(getattr(state, "absmax", None)):
                slots.append(_Slot(state, "absmax", state.absmax))
        for name, b in module._buffers.items():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                slots.append(_Slot(module, name, b))
    return slots


class WeightStream:
    """The streamed layers of one model; `stream_weights` makes it and hooks it in."""

    def __init__(self, layers: list[nn.Module], device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.modules = layers
        self.layers = [_Layer(_frozen_slots(layer)) for layer in layers]
        self.loads = 0  # layer copies made (a test counts them)
        self.loaded_bytes = 0  # bytes copied to the device so far (the plan's traffic)
        # told the copies of each layer brought in (the planner marks them as weights)
        self.on_load: Callable[[list[torch.Tensor]], None] | None = None
        # around the release of layer i's copies (the planner tags those frees with layer i:
        # backward releases a layer from the gradient hook of its input, which runs in the
        # node of the layer below)
        self.tagging: Callable[[int], contextlib.AbstractContextManager] | None = None
        self._saving: dict[int, _Tokens] = {}  # forwards saving their weights as tokens

    @property
    def host_bytes(self) -> int:
        """Bytes the streamed weights hold in host memory (pinned on CUDA)."""
        return sum(layer.nbytes for layer in self.layers)

    def host_tensors(self) -> list[torch.Tensor]:
        return [s.host for layer in self.layers for s in layer.slots]

    def to_host(self) -> None:
        """Put every streamed tensor in host memory (pinned on CUDA); called once, at set-up."""
        for layer in self.layers:
            for slot in layer.slots:
                host = slot.host
                if host.device.type != "cpu":
                    host = host.to("cpu")
                if self.cuda and not host.is_pinned():
                    host = host.pin_memory()
                slot.host = host
                slot.install(host)
            layer.resident = False

    def _load(self, i: int) -> None:
        """Start copying layer `i` to the device (on the side stream on CUDA)."""
        layer = self.layers[i]
        if layer.resident:
            return
        self.loads += 1
        self.loaded_bytes += layer.nbytes
        if not self.cuda:  # host to host: the same path, so a CPU run exercises it
            copies = [slot.host.clone() for slot in layer.slots]
            for slot, copy in zip(layer.slots, copies, strict=True):
                slot.install(copy)
            layer.resident = True
            if self.on_load is not None:
                self.on_load(copies)
            return
        current = torch.cuda.current_stream(self.device)
        # made on the compute stream (whose work orders their reuse), filled on the side one
        # once the compute stream has finished what it queued before
        copies = [torch.empty_like(s.host, device=self.device) for s in layer.slots]
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            for slot, dev in zip(layer.slots, copies, strict=True):
                dev.copy_(slot.host, non_blocking=True)
            layer.ready = torch.cuda.Event()
            layer.ready.record(self.side)
        for slot, dev in zip(layer.slots, copies, strict=True):
            slot.install(dev)
        layer.resident = True
        if self.on_load is not None:
            self.on_load(copies)

    def _evict(self, i: int) -> None:
        layer = self.layers[i]
        if layer.resident:
            with self.tagging(i) if self.tagging is not None else contextlib.nullcontext():
                for slot in layer.slots:
                    slot.install(slot.host)  # the device copy is freed once nothing holds it
            layer.resident, layer.ready = False, None

    def before(self, i: int, module: nn.Module | None = None, args: tuple = ()) -> None:
        """Layer `i` is about to run: have it on the device, prefetch the next one the pass
        will need (below it in backward, above it in a forward), and let go of every other
        layer. In a forward that backward will follow, the gradient of the layer's input
        (`args[0]`) says when the layer's backward is done, and then its weights leave. A
        forward that backward will need without recomputing it (no checkpointing) saves the
        layer's weights as tokens that bring them back (`_Tokens`)."""
        backward = torch._C._current_graph_task_id() != -1
        step = -1 if backward else 1
        self._load(i)
        ahead = i + step
        if 0 <= ahead < len(self.layers):
            self._load(ahead)
        for j, layer in enumerate(self.layers):
            if layer.resident and j not in (i, ahead):
                self._evict(j)
        ready = self.layers[i].ready
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
            self.layers[i].ready = None
        if module is not None and not backward and torch.is_grad_enabled():
            hidden = args[0] if args else None
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad: self._evict(i))
            if not _checkpointed(module):
                self._saving[i] = _Tokens(self, i)
                self._saving[i].__enter__()

    def after(self, i: int, module: nn.Module) -> None:
        """Layer `i`'s forward returned. Its weights leave now unless backward needs them
        here: a recomputation keeps them for the layer's backward, and the top layer stays for
        backward's first recomputation."""
        tokens = self._saving.pop(i, None)
        if tokens is not None:
            tokens.__exit__(None, None, None)
        if torch._C._current_graph_task_id() != -1:
            return
        if torch.is_grad_enabled() and i == len(self.layers) - 1:
            return
        self._evict(i)


def _recomputing(checkpoint: Callable, stream: WeightStream, i: int) -> Callable:
    """The layer's checkpointing function, whose recomputation in backward first brings the
    layer's weights back: transformers checkpoints a layer's `forward`, not its `__call__`, so
    the module hooks stay outside and do not run again when backward recomputes it."""

    def checkpointed(fn: Callable, *args, **kwargs):
        def run(*a, **k):
            if torch._C._current_graph_task_id() != -1:
                stream.before(i)
            return fn(*a, **k)

        return checkpoint(run, *args, **kwargs)

    return checkpointed


def _checkpointed(module: nn.Module) -> bool:
    """Whether transformers runs `module` under (snug's non-reentrant) checkpointing, which
    keeps no tensor of its forward for backward."""
    return bool(getattr(module, "gradient_checkpointing", False)) and module.training


class _Tokens(torch.autograd.graph.saved_tensors_hooks):
    """Without checkpointing, a layer's forward saves its weights for backward: each streamed
    weight is saved as its place in the stream, and backward brings its layer back (as a
    recomputation would) when it unpacks it. Other tensors are saved as they are."""

    def __init__(self, stream: WeightStream, i: int) -> None:
        owners = {id(s.owner): s.owner for s in stream.layers[i].slots}

        def pack(t: torch.Tensor):
            return (i, t) if id(t) in owners else t

        def unpack(saved):
            if isinstance(saved, tuple):
                layer, t = saved
                stream.before(layer)
                return t
            return saved

        super().__init__(pack, unpack)


def stream_weights(model: nn.Module, device: torch.device) -> WeightStream:
    """Stream the frozen weights of `model`'s decoder layers from host memory to `device`
    (the model's other tensors and every trainable one are moved to `device`)."""
    layers = decoder_layers(model)
    stream = WeightStream(layers, device)
    slots = [s for layer in stream.layers for s in layer.slots]
    streamed = {id(s.owner) for s in slots if isinstance(s.owner, nn.Parameter)}
    streamed_buffers = {(id(s.owner), s.name) for s in slots if isinstance(s.owner, nn.Module)}
    stream.to_host()
    for module in model.modules():  # the rest lives on the device
        for p in module.parameters(recurse=False):
            if id(p) not in streamed and p.device != device:
                p.data = p.data.to(device)
        for name, b in list(module._buffers.items()):
            if b is not None and (id(module), name) not in streamed_buffers and b.device != device:
                module._buffers[name] = b.to(device)
        for p in module.parameters(recurse=False):
            state = getattr(p, "quant_state", None)
            if state is not None and hasattr(state, "code"):
                absmax = state.absmax
                state.to(device)  # code books and nested state (small)
                state.absmax = absmax  # streamed with its weight
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: stream.before(i, m, args))
        layer.register_forward_hook(lambda m, args, out, i=i: stream.after(i, m))
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = _recomputing(
                layer._gradient_checkpointing_func, stream, i
            )
    model._snug_weight_stream = stream  # for the run's summary, the planner and tests
    return stream
