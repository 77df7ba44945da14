"""The replay's storage events by decoder layer, and the events of a deeper model made from them.

The allocator replay (plan/allocator.py) needs the whole model's sequence of allocations and
frees, but the fake step runs a shallow copy (simulate.py: two or three decoder layers). Every
decoder layer makes and frees the same storages in the same order, so the deep model's sequence
is the shallow one with one middle layer's events repeated: each event is tagged with the
layer it belongs to (the layer whose forward, recomputation or backward is running, or whose
parameter it is), and `deepen` repeats the middle layer's runs of events, in forward order
where layers run first to last and in reverse where backward runs them last to first.
`tests/test_plan.py` compares a deepened trace with a replay at the deeper depth.

The tags only read what autograd exposes: forward hooks on the decoder layers (no tensors held,
unlike module backward hooks, which would move the peak), the sequence number each autograd
node gets when forward creates it, and the node backward is running. The pre-hook runs before
any other: FSDP2 all-gathers a layer in its own pre-hook and there makes the node whose backward
reduce-scatters the gradients and frees the gathered weights, all of which belong to that layer.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_right
from collections.abc import Sequence
from difflib import SequenceMatcher

import torch
from torch import nn

from snug.train.memory import local

Event = tuple  # (key, nbytes) or, tagged, (key, nbytes, layer or None); nbytes -1: a free


class LayerTags:
    """While entered: which decoder layer is running. In forward (and checkpointing's
    recomputation) the forward hooks say so, and between two layers of the decoder's loop it is
    the one that just ran (its iteration ends by dropping what the layer before made); in
    backward, the running node's sequence number falls in the range its layer's forward gave
    out, and a gradient accumulation belongs to its parameter's layer."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder, self.layers = decoder, decoder.layers
        self.stack: list[int] = []
        self.in_decoder = 0  # decoder forwards running
        self.just_ran: int | None = None  # the layer the decoder's loop ran last
        self.handles: list = []
        self._starts: list[int] = []  # first sequence number of each forward pass of a layer
        self._ranges: list[tuple[int, int]] = []  # (end, layer) of each of those passes
        self._open: list[int] = []  # the passes still running (their index in _ranges)
        self.of_tensor: dict[int, int] = {}  # id(parameter or buffer) -> layer
        self.of_storage: dict[int, int] = {}  # id(its storage) -> layer
        self.forced: int | None = None  # `forcing`

    def __enter__(self) -> LayerTags:
        self.handles.append(self.decoder.register_forward_pre_hook(lambda m, a: self._decoder(1)))
        self.handles.append(
            self.decoder.register_forward_hook(lambda m, a, o: self._decoder(-1), always_call=True)
        )
        for i, layer in enumerate(self.layers):
            # prepend: ahead of FSDP2's pre-forward hook (itself prepended when the layer was
            # wrapped), so its all-gather and the post-backward node it creates belong to this
            # layer, not to the one before; so is what weight streaming's hook brings in (the
            # next layer's copy: train/streaming.py)
            self.handles.append(
                layer.register_forward_pre_hook(lambda m, a, i=i: self._enter(i), prepend=True)
            )
            self.handles.append(
                layer.register_forward_hook(lambda m, a, out: self._leave(), always_call=True)
            )
            for t in [*layer.parameters(), *layer.buffers()]:
                self.tag(t, i)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def tag(self, t: torch.Tensor, layer: int | None) -> None:
        """Say that `t` (a parameter, a buffer, an optimizer state) belongs to `layer`."""
        self.of_tensor[id(t)] = layer
        self.of_storage[id(local(t).untyped_storage())] = layer

    def tagged(self, events: Sequence[Event]) -> list[tuple]:
        """`events` of storages that are still alive, tagged with the layer of their tensor."""
        return [(key, nbytes, self.of_storage.get(key)) for key, nbytes, *_ in events]

    def _decoder(self, step: int) -> None:
        self.in_decoder += step
        self.just_ran = None

    def _enter(self, i: int) -> None:
        # sequence numbers only grow (on this thread, which CPU backward runs on too), so the
        # starts stay sorted
        self.stack.append(i)
        self._open.append(len(self._ranges))
        self._starts.append(torch._C._autograd._get_sequence_nr())
        self._ranges.append((-1, i))

    def _leave(self) -> None:
        i = self.stack.pop()
        self._ranges[self._open.pop()] = (torch._C._autograd._get_sequence_nr(), i)
        self.just_ran = i

    @contextlib.contextmanager
    def forcing(self, layer: int):
        """Tag what happens inside with `layer` (weight streaming's release of a layer's
        copies: train/streaming.py)."""
        before, self.forced = self.forced, layer
        try:
            yield
        finally:
            self.forced = before

    def current(self) -> int | None:
        if self.forced is not None:
            return self.forced
        if self.stack:
            return self.stack[-1]
        if self.in_decoder:
            return self.just_ran
        node = torch._C._current_autograd_node()
        if node is None:
            return None
        if node.name() == "torch::autograd::AccumulateGrad":
            return self.of_tensor.get(id(node.variable))
        seq = node._sequence_nr()
        at = bisect_right(self._starts, seq) - 1
        if at >= 0 and seq < self._ranges[at][0]:
            return self._ranges[at][1]
        return None


def deepen(events: Sequence[Event], middle: int, extra: int) -> list[tuple]:
    """The untagged events of the model with `extra` more layers like `middle` (which has a
    layer before and after it): each run of events tagged `middle` is repeated extra + 1
    times, copy c standing for the c-th of the middle layers, first to last. A copy's
    storages get keys of their own ((key, c)). A copy that frees what the layer before (or
    after) made frees what the copy before (after) made in the same role: the storage the
    middle layer makes at the same place in its own sequence of allocations. A free with no
    layer of its own (the update's `zero_grad`, a graph released) belongs to the layer of
    what it frees. Events must be tagged (key, nbytes, layer)."""
    if extra <= 0:
        return [(key, nbytes) for key, nbytes, _ in events]
    rows = _with_owners(events)
    role = _roles(rows, middle)
    direction = _directions(rows, middle)
    out: list[tuple] = []
    i = 0
    while i < len(rows):
        key, nbytes, layer, owner, _ = rows[i]
        if layer != middle:
            if owner != middle:
                out.append((key, nbytes))
            else:  # the next layer freeing the last copy's, or the one before the first's
                out.append(((key, extra if layer > middle else 0), nbytes))
            i += 1
            continue
        j = i
        while j < len(rows) and rows[j][2] == middle:
            j += 1
        for c in range(extra + 1) if direction[i] else range(extra, -1, -1):
            for key, nbytes, _, owner, made_at in rows[i:j]:
                if owner == middle:
                    key = (key, c)
                elif owner == middle - 1 and c > 0 and made_at in role:
                    key = (role[made_at], c - 1)
                elif owner == middle + 1 and c < extra and made_at in role:
                    key = (role[made_at], c + 1)
                out.append((key, nbytes))
        i = j
    return out


def _with_owners(events: Sequence[Event]) -> list[tuple]:
    """(key, nbytes, layer, owner, made_at): owner is the layer that made the storage an event
    frees, made_at the row that made it (for an allocation, its own layer and row); a free
    with no layer takes its owner's."""
    made: dict = {}
    rows = []
    for key, nbytes, layer in events:
        if nbytes >= 0:
            made[key] = (layer, len(rows))
            rows.append((key, nbytes, layer, layer, len(rows)))
        else:
            owner, at = made.pop(key, (None, None))
            rows.append((key, nbytes, owner if layer is None else layer, owner, at))
    return rows


def _roles(rows: list[tuple], middle: int) -> dict[int, object]:
    """For each allocation of the layers next to `middle` (by row), the key of the middle
    layer's allocation in the same role: the same place in the layer's own sequence of
    allocations, matched by size (the first and last layers may make a few storages more or
    fewer, e.g. where the embeddings or the final norm join)."""
    made: dict = {}
    for k, (_, nbytes, layer, _, _) in enumerate(rows):
        if nbytes >= 0 and layer is not None and abs(layer - middle) <= 1:
            made.setdefault(layer, []).append(k)
    ours = made.get(middle, [])
    sizes = [rows[k][1] for k in ours]
    role: dict[int, object] = {}
    for layer in (middle - 1, middle + 1):
        theirs = made.get(layer, [])
        other = [rows[k][1] for k in theirs]
        if other == sizes:
            pairs = zip(range(len(sizes)), range(len(sizes)), strict=True)
        else:
            blocks = SequenceMatcher(None, other, sizes, autojunk=False).get_matching_blocks()
            pairs = ((a + n, b + n) for a, b, size in blocks for n in range(size))
        for a, b in pairs:
            role[theirs[a]] = rows[ours[b]][0]
    return role


def _directions(rows: list[tuple], middle: int) -> list[bool]:
    """For each row, whether layers run first to last there: the nearest other layer before it
    is shallower (or, with none before, the nearest after it is deeper)."""
    before, last = [], None
    for row in rows:
        before.append(last)
        if row[2] is not None and row[2] != middle:
            last = row[2]
    after, nxt = [None] * len(rows), None
    for k in range(len(rows) - 1, -1, -1):
        after[k] = nxt
        if rows[k][2] is not None and rows[k][2] != middle:
            nxt = rows[k][2]
    return [
        (b < middle) if b is not None else (a is None or a > middle)
        for b, a in zip(before, after, strict=True)
    ]


def survivors(events: Sequence[Event]) -> list[Event]:
    """The allocations of `events` whose storage is not freed in them, in order."""
    alive: dict = {}
    for event in events:
        if event[1] < 0:
            alive.pop(event[0], None)
        else:
            alive[event[0]] = event
    return list(alive.values())
